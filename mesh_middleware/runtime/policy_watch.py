"""Hot reload: a policy file is checked for changes off the request path.

A change that validates replaces the running policy at once; one that does not is logged with
every problem found, counted, and the last good policy stays in force.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import structlog

from mesh_middleware.errors import PolicyError
from mesh_middleware.policy.compiled import CompiledPolicy, compile_policy_file
from mesh_middleware.telemetry import metrics

__all__ = ["PolicyFileWatch"]

log = structlog.get_logger("mesh.policy")

_Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)


class PolicyFileWatch:
    """Reloads one policy file when it changes on disk (edits and atomic renames alike)."""

    def __init__(
        self,
        path: str | Path,
        install: Callable[[CompiledPolicy], None],
        current_service: Callable[[], str],
    ) -> None:
        self.path = Path(path)
        self._install = install
        self._current_service = current_service
        self._stamp = _stamp(self.path)
        self._pending: _Stamp | None = None
        self.failures = 0
        self.last_error: str | None = None

    def check(self) -> bool | None:
        """Reload a settled change: ``True`` installed, ``False`` rejected, ``None`` not now.

        A change is loaded only when the file looked the same at two checks in a row, so an
        editor still writing the file in place is never caught half-way (a truncated file can
        be valid YAML that allows more than intended). Atomic renames settle at once.
        """
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            self._pending = None
            return None
        if stamp != self._pending:
            self._pending = stamp
            return None
        self._stamp = stamp
        self._pending = None
        return self.reload()

    def reload(self) -> bool:
        """Load, validate and install the file now; keep the running policy if it fails."""
        try:
            compiled = compile_policy_file(self.path)
        except PolicyError as exc:
            self.failures += 1
            self.last_error = str(exc)
            metrics.count_reload(self._current_service(), ok=False)
            log.error(
                "policy_reload_failed",
                file=str(self.path),
                problems=[str(issue) for issue in exc.issues],
                kept="last good policy",
            )
            return False
        self.last_error = None
        self._install(compiled)
        metrics.count_reload(compiled.service, ok=True)
        log.info("policy_reloaded", file=str(self.path), service=compiled.service)
        return True
