"""Whether the demo can run here: a checkout with the shop's apps, the packages they need,
and policy files that pass ``mesh policy check``."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mesh_middleware.demo.shop import SHOP_APPS, AppSpec
from mesh_middleware.errors import PolicyError
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy_file

__all__ = ["REQUIRED_MODULES", "Preflight", "check_policies", "missing_apps", "missing_modules"]

REQUIRED_MODULES = ("fastapi", "flask", "gunicorn", "uvicorn")


def missing_apps(repo: Path, apps: Sequence[AppSpec] = SHOP_APPS) -> list[str]:
    """The shop's files that are not in ``repo`` (each app's ``app.py`` and policy file)."""
    wanted: list[str] = []
    for spec in apps:
        for path in (spec.module.replace(".", "/") + ".py", spec.policy):
            if path not in wanted:
                wanted.append(path)
    return [path for path in wanted if not (repo / path).is_file()]


def missing_modules(names: Sequence[str] = REQUIRED_MODULES) -> list[str]:
    """The packages the apps import that are not installed."""
    return [name for name in names if importlib.util.find_spec(name) is None]


@dataclass(slots=True)
class Preflight:
    """The checked policies, what they promise the summary, and the problems found."""

    policies: dict[str, CompiledPolicy] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def mirror_percent(self) -> float | None:
        """The share of the gateway's inventory calls mirrored, as its policy says: the first
        route's own mirror (the reads', in the shop), else the destination's."""
        gateway = self.policies.get("gateway")
        if gateway is None:
            return None
        destination = gateway.loaded.policy.outbound.services.get("inventory")
        if destination is None:
            return None
        mirrors = [route.mirror for route in destination.routes if route.mirror is not None]
        mirror = mirrors[0] if mirrors else destination.mirror
        return float(mirror.percent) if mirror is not None else None


def check_policies(repo: Path, apps: Sequence[AppSpec] = SHOP_APPS) -> Preflight:
    """Validate each service's policy file the way ``mesh policy check`` does."""
    result = Preflight()
    for policy in dict.fromkeys(spec.policy for spec in apps):
        try:
            compiled = compile_policy_file(repo / policy)
        except PolicyError as exc:
            result.problems.extend(str(issue) for issue in exc.issues)
            continue
        result.policies[compiled.service] = compiled
        rules = len(compiled.authorizer.rules)
        faults = len(compiled.loaded.policy.inbound.faults)
        result.lines.append(
            f"  policy ok   {policy} ({_plural(rules, 'rule')}, {_plural(faults, 'fault')})"
        )
    return result


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
