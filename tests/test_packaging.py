"""A wheel built from the tree installs into a fresh venv with adapters under mesh_middleware."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.support.servers import REPO


@pytest.mark.slow
def test_wheel_installs_and_imports_the_public_api(tmp_path: Path) -> None:
    """Build the sdist and from it the wheel (with the request path compiled by mypyc), install
    the wheel with its dependencies into a new venv, import the API, find the dashboard."""
    dist = tmp_path / "dist"
    subprocess.run(
        # An sdist, then the wheel built from it: the path pip takes from a source release.
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("mesh_middleware-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = (
        "import mesh_middleware as m, mesh_middleware.adapters.asgi as a;"
        "from mesh_middleware import Mesh, MeshMiddleware, MeshWSGIMiddleware;"
        "assert 'site-packages' in a.__file__, a.__file__;"
        "from mesh_middleware import _compiled;"
        "assert _compiled.compiled(), 'the wheel did not compile the request path';"
        # The dashboard's page, script and styles are files of the package.
        "from importlib.resources import files;"
        "ui = files('mesh_middleware.registry') / 'ui';"
        "assert all((ui / f).is_file() for f in"
        " ('index.html', 'login.html', 'dashboard.js', 'dashboard.css')), 'no dashboard';"
        "print(len(m.__all__))"
    )
    done = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 10
    schema = subprocess.run(
        [str(env_dir / "bin" / "mesh"), "policy", "schema"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert schema.returncode == 0


def test_editable_install_maps_adapters_to_the_top_level_folder() -> None:
    """In this checkout mesh_middleware.adapters is the top-level adapters/ folder."""
    import mesh_middleware.adapters.wsgi as wsgi

    assert Path(wsgi.__file__).resolve() == (REPO / "adapters" / "wsgi.py").resolve()


def test_every_subpackage_is_listed_for_the_wheel() -> None:
    """setuptools is given the packages by name (adapters/ is mapped in): a new subpackage
    missing from the list would be left out of wheels while editable installs still work."""
    import tomllib

    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "mesh_middleware").rglob("__init__.py")
        if "__pycache__" not in init.parts
    } | {"mesh_middleware.adapters"}
    assert found == listed
