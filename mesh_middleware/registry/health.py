"""Active HTTP health checks of registered instances, run by the registry in the background."""

from __future__ import annotations

import asyncio
import functools
import time

import httpx
import structlog

from mesh_middleware.registry import settings
from mesh_middleware.registry.catalog import Catalog, Instance

__all__ = ["HealthChecker"]

log = structlog.get_logger("mesh.registry")


class HealthChecker:
    """Polls each instance that registered a check, flipping its health by the check's counts."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._due: dict[tuple[str, str], float] = {}
        self._limit = asyncio.Semaphore(settings.MAX_HEALTH_CHECKS_IN_FLIGHT)
        self._client = httpx.AsyncClient(follow_redirects=False)
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight: set[tuple[str, str]] = set()

    async def tick(self) -> None:
        """Start the checks that are due (each bounded by its own timeout)."""
        now = time.monotonic()
        seen = set()
        for instance in self._catalog.all_instances():
            check = instance.record.check
            if not check:
                continue
            key = (instance.record.service, instance.record.instance_id)
            seen.add(key)
            if self._due.get(key, 0.0) > now or key in self._in_flight:
                continue
            self._due[key] = now + float(check["interval"])
            self._in_flight.add(key)
            task = asyncio.create_task(self._check(instance))
            task.add_done_callback(functools.partial(self._finished, key))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        for key in set(self._due) - seen:
            del self._due[key]

    def _finished(self, key: tuple[str, str], _: asyncio.Task[None]) -> None:
        self._in_flight.discard(key)

    async def _check(self, instance: Instance) -> None:
        record = instance.record
        check = record.check or {}
        url = f"http://{_host(record.address)}:{record.port}{check.get('http', '/')}"
        # The check's timeout bounds the whole check (per-operation timeouts would let a slow
        # trickle run on), and never exceeds its interval.
        limit = min(float(check.get("timeout", 1.0)), float(check.get("interval", 10.0)))
        async with self._limit:
            try:
                response = await asyncio.wait_for(self._client.get(url, timeout=limit), limit)
                ok = 200 <= response.status_code < 400
            except Exception:  # unreachable, refused, timed out, or no URL can be made of it
                ok = False
        current = self._catalog.get(record.service, record.instance_id)
        if current is None or current.record is not record:
            return  # re-registered or gone meanwhile
        if ok:
            current.check_failures = 0
            current.check_successes += 1
            if not current.healthy and current.check_successes >= int(
                check.get("successes_before_healthy", 1)
            ):
                await self._catalog.set_health(record.service, record.instance_id, True)
        else:
            current.check_successes = 0
            current.check_failures += 1
            if current.healthy and current.check_failures >= int(
                check.get("failures_before_unhealthy", 3)
            ):
                await self._catalog.set_health(record.service, record.instance_id, False)

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await self._client.aclose()


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
