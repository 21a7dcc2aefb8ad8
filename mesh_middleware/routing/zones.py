"""Zone-aware routing: keep calls in the caller's zone while it is healthy enough, then spill.

After Envoy's locality weighting with its overprovisioning factor (1.4): the local zone keeps a
share ``p = min(1, 1.4 * local_available / local_total)`` of the calls and the other zones take
the rest. A zone with at least 1/1.4 (about 71%) of its instances available keeps every call; a
zone with 1 of 3 left keeps about 47% and spills the other 53%.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh_middleware import defaults
from mesh_middleware.discovery.endpoints import Endpoint

__all__ = ["prefer_zone"]

_OVERPROVISIONING = defaults.ZONE_OVERPROVISIONING


def prefer_zone(
    available: Sequence[Endpoint],
    subset: Sequence[Endpoint],
    zone: str | None,
    rand: float,
) -> Sequence[Endpoint]:
    """The endpoints to balance this call over, preferring the caller's ``zone``.

    ``subset`` is the version subset as discovered, ``available`` the part of it that may be
    called now (not ejected), ``rand`` a uniform draw from [0, 1). With no caller zone, or no
    instance of ``subset`` in it, ``available`` is returned unchanged (the same object). Otherwise,
    with probability ``p`` (``rand < p``) the local available endpoints are returned, else those
    of the other zones; when the chosen side has none the other side is used, and ``available``
    when neither has any.
    """
    if zone is None:
        return available
    local_total = 0
    for endpoint in subset:
        if endpoint.zone == zone:
            local_total += 1
    if local_total == 0:
        return available
    local = [e for e in available if e.zone == zone]
    if len(local) == len(available):
        # Every available instance is local (or none is available): nothing to choose between.
        return available
    share = min(1.0, _OVERPROVISIONING * len(local) / local_total)
    if local and rand < share:
        return local
    return [e for e in available if e.zone != zone]
