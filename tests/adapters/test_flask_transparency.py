"""Transparency: a real third-party Flask app's own test suite passes with the mesh installed.

The app is Flaskr, the Flask tutorial app, vendored unchanged in ``tests/third_party/flaskr``
(see its README). Its suite runs in a subprocess, from a temporary copy so it is its own
rootdir and runs under its own pytest settings, with ``tests.support.flask_mesh_plugin``
installing ``MeshWSGIMiddleware`` into every Flask app it creates.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.flask_mesh_plugin import REPORT_PATTERN

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "tests" / "third_party" / "flaskr"
CHECKSUM_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64})  (?P<path>\S+)$", re.MULTILINE)
GENERATED = ("__pycache__", "instance", ".pytest_cache", ".ruff_cache", ".mypy_cache")
"""Directories that running or linting the vendored app may leave behind; not upstream files."""
FINAL_LINE = re.compile(r"^=*\s*(?P<summary>\d+ (passed|failed).*) in [\d.]+s\b", re.MULTILINE)


def _run_suite(tmp_path: Path, authentication: str) -> tuple[int, str, dict[str, int]]:
    """Run the vendored suite under the plugin; return exit code, output and the mesh counts."""
    app_dir = tmp_path / "flaskr"
    shutil.copytree(VENDORED, app_dir, ignore=shutil.ignore_patterns(*GENERATED))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH")
    }
    # The repository root makes the plugin importable; the copy itself makes ``flaskr`` so.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(app_dir)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.support.flask_mesh_plugin",
        f"--mesh-authentication={authentication}",
        "tests",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(
        command, cwd=app_dir, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    output = result.stdout + result.stderr
    report = REPORT_PATTERN.search(output)
    assert report is not None, f"the mesh plugin did not report:\n{output}"
    assert report["authentication"] == authentication
    counts = {name: int(report[name]) for name in ("apps", "requests", "admitted", "refused")}
    return result.returncode, output, counts


def _summary(output: str) -> str:
    match = FINAL_LINE.search(output)
    assert match is not None, f"no pytest summary line in:\n{output}"
    return match["summary"]


def test_vendored_files_are_byte_identical_to_upstream() -> None:
    """Every vendored file matches the upstream sha256 recorded in its README, none is extra."""
    recorded = {
        match["path"]: match["digest"]
        for match in CHECKSUM_LINE.finditer((VENDORED / "README.md").read_text())
    }
    present = {
        path.relative_to(VENDORED).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in VENDORED.rglob("*")
        if path.is_file()
        and path.name != "README.md"
        and not set(GENERATED) & set(path.relative_to(VENDORED).parts)
    }
    assert "tests/test_auth.py" in recorded
    assert present == recorded


def test_flaskr_suite_passes_unchanged_behind_a_permissive_mesh(tmp_path: Path) -> None:
    """Flaskr's own suite passes with every request going through a permissive mesh."""
    returncode, output, counts = _run_suite(tmp_path, "permissive")
    assert returncode == pytest.ExitCode.OK, output
    summary = _summary(output)
    passed = re.fullmatch(r"(\d+) passed", summary)
    assert passed is not None, f"expected only passes, got {summary!r}:\n{output}"
    assert int(passed[1]) > 0
    assert counts["apps"] > 0
    assert counts["requests"] > 0
    assert counts["admitted"] == counts["requests"]
    assert counts["refused"] == 0


def test_flaskr_suite_fails_behind_a_strict_mesh(tmp_path: Path) -> None:
    """Under a strict policy the same suite fails: its anonymous requests get 401 from the mesh."""
    returncode, output, counts = _run_suite(tmp_path, "strict")
    assert returncode == pytest.ExitCode.TESTS_FAILED, output
    assert re.match(r"\d+ failed", _summary(output)), output
    assert counts["requests"] > 0
    assert counts["admitted"] == 0
    assert counts["refused"] == counts["requests"]
    assert "401" in output
