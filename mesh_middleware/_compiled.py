"""Which implementation of the request path runs: the mypyc-compiled modules, or their source.

``pip install`` compiles the modules named in :data:`COMPILED_MODULES` with mypyc where it can
(see ``setup.py``); the extension modules sit beside the ``.py`` files, and Python imports an
extension before a source file of the same name. The source is imported instead, for all of
them together (compiled modules call each other directly, so it is all or none), when

- ``MESH_MIDDLEWARE_PURE_PYTHON=1`` asks for it (tracebacks with Python frames, a debugger, a
  profiler), or
- any compiled module's source is not the one it was compiled from (``setup.py`` records
  their SHA-256): an editable checkout edited since its last build, whose compiled code is no
  longer the code on disk.

This module is never compiled itself and imports only the standard library: ``setup.py`` reads
the list from it before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = [
    "COMPILED_MODULES",
    "PURE_PYTHON_ENV",
    "compiled",
    "pure_python_wanted",
    "source_digest",
    "source_files",
    "stale_modules",
]

COMPILED_MODULES = (
    "mesh_middleware.adapters.asgi",
    "mesh_middleware.identity.end_user",
    "mesh_middleware.identity.verifier",
    "mesh_middleware.inbound.engine",
    "mesh_middleware.inbound.telemetry",
    "mesh_middleware.policy.authorization",
    "mesh_middleware.policy.conditions",
    "mesh_middleware.policy.paths",
    "mesh_middleware.policy.patterns",
    "mesh_middleware.runtime.context",
    "mesh_middleware.telemetry.access_log",
    "mesh_middleware.telemetry.metrics",
    "mesh_middleware.telemetry.spans",
    "mesh_middleware.telemetry.tracecontext",
)
"""The modules every inbound request runs through, compiled when the install could."""

PURE_PYTHON_ENV = "MESH_MIDDLEWARE_PURE_PYTHON"
"""Set to ``1`` to run the source of :data:`COMPILED_MODULES` even where they were compiled."""

_PACKAGE_DIR = Path(__file__).resolve().parent
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def source_files(root: Path | None = None) -> dict[str, Path]:
    """Each compiled module's source file, in a checkout or installed package at ``root``
    (the folder holding ``mesh_middleware``; ``adapters`` is mapped in by the build)."""
    root = _PACKAGE_DIR.parent if root is None else root
    found = {}
    for name in COMPILED_MODULES:
        parts = name.split(".")
        found[name] = root.joinpath(*parts).with_suffix(".py")
    return found


def pure_python_wanted() -> bool:
    """Whether :data:`PURE_PYTHON_ENV` asks for the source (at install, or at run time)."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def source_digest(source: Path) -> str:
    """What the build records of a compiled module's source, and what it is checked against."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def _extension(source: Path) -> Path | None:
    for suffix in _EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def _built_digests() -> dict[str, str]:
    try:
        written = importlib.import_module("mesh_middleware._compiled_sources")
    except ImportError:  # built without mypyc
        return {}
    return dict(getattr(written, "DIGESTS", {}))


def stale_modules(root: Path | None = None, digests: dict[str, str] | None = None) -> list[str]:
    """The compiled modules whose source is not the source they were compiled from
    (``digests``: what the build recorded)."""
    built = _built_digests() if digests is None else digests
    stale = []
    for name, source in source_files(root).items():
        if _extension(source) is None:
            continue
        try:
            digest = source_digest(source)
        except OSError:  # an install without the sources: nothing to compare
            continue
        if built.get(name) != digest:
            stale.append(name)
    return stale


class _SourceFinder:
    """Finds the ``.py`` file of the compiled modules, ahead of their extension module."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self._names or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for folder in path:
            source = os.path.join(folder, leaf)
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


_compiled: bool | None = None


def _choose() -> None:
    """Decide once, as the package is imported, before any compiled module is."""
    global _compiled
    if _compiled is not None:
        return
    wanted = pure_python_wanted()
    built = any(_extension(source) is not None for source in source_files().values())
    stale = stale_modules() if built and not wanted else []
    if stale:
        print(
            f"mesh-middleware: {', '.join(stale)} changed since it was compiled; running the "
            "source of every compiled module (rebuild: pip install -e . or ./dev)",
            file=sys.stderr,
        )
    if built and (wanted or stale):
        sys.meta_path.insert(0, _SourceFinder(COMPILED_MODULES))
    _compiled = built and not (wanted or stale)


def compiled() -> bool:
    """Whether the request path runs mypyc-compiled code in this process."""
    _choose()
    if not _compiled:
        return False
    import mesh_middleware.adapters.asgi as asgi

    return str(asgi.__file__).endswith(_EXTENSION_SUFFIXES)


if __name__ == "mesh_middleware._compiled":  # not when setup.py reads the list
    _choose()
