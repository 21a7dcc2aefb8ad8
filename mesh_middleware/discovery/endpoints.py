"""The instances of a destination as the outbound client sees them, with their live state.

An :class:`Endpoint` is created once per instance id and kept across catalog updates, so what
the balancer and the outlier detector learned about it (latency, in-flight calls, failures,
ejections) survives a watch answer or a policy reload. An :class:`EndpointSet` is an immutable
snapshot of one destination's instances, with its per-version subsets computed once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Endpoint", "EndpointSet"]


@dataclass(eq=False, slots=True)
class Endpoint:
    """One instance: where it listens, which version and zone it is, and how it is doing.

    Identity is the object itself (``eq=False``); ``id`` is the registry's instance id, or the
    URL of a static endpoint. The fields after ``zone`` are mutable state, updated by the
    balancers and the outlier detector; plain attribute writes are enough since a torn update
    can only skew one balancing decision.
    """

    id: str
    scheme: str
    host: str
    port: int
    version: str | None = None
    zone: str | None = None
    tls: bool = False  # serves mesh mutual TLS on ``port`` (``scheme`` is then "https")
    plain_port: int | None = None  # where it also takes plaintext (mtls: permissive), if any
    # -- live state: balancing
    in_flight: int = 0
    ewma: float = 0.0  # seconds; 0.0 until the first response is observed
    ewma_at: float = field(default_factory=time.monotonic)  # last observation, or creation
    # -- live state: outlier detection
    consecutive_failures: int = 0
    ejections: int = 0  # how many times ejected (the next ejection lasts base * (this + 1))
    ejected_until: float = 0.0  # monotonic; 0.0 when never ejected
    last_ejection_end: float = 0.0
    probing: bool = False  # back from an ejection: one real request decides
    probe_in_flight: bool = False
    # the authority to connect to, computed once ("host:port", IPv6 hosts bracketed)
    authority: str = field(init=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = f"{host}:{self.port}"

    def same_place(self, other: Endpoint) -> bool:
        """Whether ``other`` describes the same instance at the same address."""
        return (
            self.id,
            self.scheme,
            self.host,
            self.port,
            self.version,
            self.zone,
            self.tls,
            self.plain_port,
        ) == (
            other.id,
            other.scheme,
            other.host,
            other.port,
            other.version,
            other.zone,
            other.tls,
            other.plain_port,
        )

    def __repr__(self) -> str:
        return f"Endpoint({self.id!r}, {self.scheme}://{self.authority}, version={self.version!r})"


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """A snapshot of one destination's instances (healthy ones, as the registry sees them).

    ``index`` is the registry index the snapshot was taken at (0 for static endpoints);
    ``source`` is ``"registry"`` or ``"static"``.
    """

    service: str
    endpoints: tuple[Endpoint, ...]
    index: int = 0
    source: str = "registry"
    _versions: dict[str | None, tuple[Endpoint, ...]] = field(init=False, repr=False, compare=False)
    tls: bool = field(init=False, repr=False, compare=False)  # some instance serves mutual TLS

    def __post_init__(self) -> None:
        versions: dict[str | None, list[Endpoint]] = {None: list(self.endpoints)}
        for endpoint in self.endpoints:
            if endpoint.version is not None:
                versions.setdefault(endpoint.version, []).append(endpoint)
        object.__setattr__(self, "_versions", {k: tuple(v) for k, v in versions.items()})
        object.__setattr__(self, "tls", any(e.tls for e in self.endpoints))

    def subset(self, version: str | None) -> tuple[Endpoint, ...]:
        """The instances of ``version``; every instance for ``None``; ``()`` if none."""
        return self._versions.get(version, ())

    def __len__(self) -> int:
        return len(self.endpoints)
