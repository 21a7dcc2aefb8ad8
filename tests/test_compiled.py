"""The request path as the install built it: compiled by mypyc, or its source on demand."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from mesh_middleware import _compiled
from tests.support.servers import REPO

_SOURCE_MODE = {**os.environ, _compiled.PURE_PYTHON_ENV: "1"}


def test_every_module_listed_for_compiling_has_its_source_here() -> None:
    for name, source in _compiled.source_files(REPO).items():
        assert source.is_file(), name


def test_the_install_compiled_the_request_path() -> None:
    """./dev installs with mypyc: a build that quietly fell back to Python is a failure here."""
    if _compiled.pure_python_wanted():
        assert not _compiled.compiled()
        return
    assert _compiled.compiled(), "the request path is not compiled: see .venv/install.log"
    assert _compiled.stale_modules() == []
    import mesh_middleware.inbound.engine as engine

    assert str(engine.__file__).endswith(tuple(EXTENSION_SUFFIXES))


def test_an_edited_source_makes_its_compiled_module_stale(tmp_path: Path) -> None:
    sources = _compiled.source_files(tmp_path)
    for source in sources.values():
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("x = 1\n")
        source.with_name(source.stem + EXTENSION_SUFFIXES[0]).write_bytes(b"")
    digests = {name: _compiled.source_digest(path) for name, path in sources.items()}
    assert _compiled.stale_modules(tmp_path, digests) == []
    edited = "mesh_middleware.inbound.engine"
    sources[edited].write_text("x = 2\n")
    assert _compiled.stale_modules(tmp_path, digests) == [edited]
    sources[edited].with_name("engine" + EXTENSION_SUFFIXES[0]).unlink()  # never compiled
    assert _compiled.stale_modules(tmp_path, digests) == []


def test_the_source_runs_when_asked() -> None:
    probe = (
        "import mesh_middleware, mesh_middleware.inbound.engine as e,"
        " mesh_middleware.adapters.asgi as a;"
        "from mesh_middleware import _compiled;"
        "print(e.__file__.endswith('.py'), a.__file__.endswith('.py'), _compiled.compiled())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=_SOURCE_MODE,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["True", "True", "False"]


@pytest.mark.slow
def test_the_request_path_passes_its_unit_tests_from_source() -> None:
    """The suite runs what the install compiled; the source, which is what runs where mypyc
    could not, must pass the unit tests of those modules too."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "tests/policy",
            "tests/telemetry",
            "tests/identity/test_verifier.py",
            "tests/adapters/test_asgi_inprocess.py",
            "tests/runtime/test_context.py",
            "tests/test_compiled.py",
        ],
        env=_SOURCE_MODE,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
