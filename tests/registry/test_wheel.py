"""The registry's packages are part of what a wheel installs (so `mesh registry` runs there)."""

from __future__ import annotations

import tomllib

from tests.support.servers import REPO


def test_every_registry_package_is_listed_for_the_wheel() -> None:
    """pyproject's explicit package list names mesh_middleware.registry and its subpackages;
    a package missing there is missing from the wheel and `mesh registry` fails to import."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = config["tool"]["setuptools"]["packages"]
    assert isinstance(listed, list)
    root = REPO / "mesh_middleware"
    expected = {
        ".".join(("mesh_middleware", *init.parent.relative_to(root).parts))
        for init in (root / "registry").rglob("__init__.py")
    }
    assert expected >= {"mesh_middleware.registry", "mesh_middleware.registry.store"}
    assert sorted(expected - set(listed)) == []
