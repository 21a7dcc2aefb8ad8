"""Fault injection: delays and aborts for the requests a fault's match selects.

Percentages are on Istio's 0-100 scale and a missing one means 0. Each roll is independent,
so over many requests the injected share follows the binomial distribution exactly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from mesh_middleware.policy.conditions import Conditions
from mesh_middleware.policy.loader import LoadedPolicy
from mesh_middleware.policy.schema import Fault

__all__ = ["CompiledFault", "FaultOutcome", "compile_faults"]


@dataclass(frozen=True, slots=True)
class FaultOutcome:
    """What to inject into one request: a delay in seconds, an abort status, or both."""

    fault: str
    delay: float
    abort_status: int | None


@dataclass(frozen=True, slots=True)
class CompiledFault:
    """A fault ready to evaluate."""

    name: str
    line: int | None
    conditions: Conditions
    delay: float
    delay_percent: float
    abort_status: int | None
    abort_percent: float

    def matches(
        self, caller: str | None, method: str, path: str, headers: Mapping[str, str]
    ) -> bool:
        """Whether this fault's match holds for the request."""
        return self.conditions.holds(caller, method, path, headers)

    def roll(self, chance: random.Random) -> FaultOutcome | None:
        """Roll the dice for a matching request: what to inject, or ``None``."""
        delay = (
            self.delay
            if self.delay_percent and chance.random() * 100.0 < self.delay_percent
            else 0.0
        )
        abort = (
            self.abort_status
            if self.abort_percent and chance.random() * 100.0 < self.abort_percent
            else None
        )
        if not delay and abort is None:
            return None
        return FaultOutcome(self.name, delay, abort)


def _compile(position: int, fault: Fault, loaded: LoadedPolicy) -> CompiledFault:
    match = fault.match
    return CompiledFault(
        name=fault.name,
        line=loaded.line_of("inbound", "faults", position),
        conditions=Conditions(
            from_=match.from_, methods=match.methods, paths=match.paths, headers=match.headers
        ),
        delay=fault.delay.duration if fault.delay else 0.0,
        delay_percent=fault.delay.percent if fault.delay else 0.0,
        abort_status=fault.abort.status if fault.abort else None,
        abort_percent=fault.abort.percent if fault.abort else 0.0,
    )


def compile_faults(loaded: LoadedPolicy) -> tuple[CompiledFault, ...]:
    """Compile a policy's faults, in file order (the first whose match holds is rolled)."""
    return tuple(_compile(i, f, loaded) for i, f in enumerate(loaded.policy.inbound.faults))
