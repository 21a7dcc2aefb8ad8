"""Shared fixtures: an issuer with its JWKS file, and policy files written on demand."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh_middleware import Mesh, TokenIssuer

collect_ignore_glob = ["third_party/*"]


@pytest.fixture
def issuer() -> TokenIssuer:
    """A fresh trust domain signing key."""
    return TokenIssuer()


@pytest.fixture
def jwks_file(tmp_path: Path, issuer: TokenIssuer) -> Path:
    """The issuer's public keys as a JWKS file."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return path


PolicyWriter = Callable[[str], Path]


@pytest.fixture
def write_policy(tmp_path: Path) -> PolicyWriter:
    """Write dedented policy YAML to a file and return its path."""
    counter = iter(range(1_000_000))

    def write(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"policy-{next(counter)}.yaml")
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    return write


@pytest.fixture
def make_mesh(jwks_file: Path) -> Iterator[Callable[..., Mesh]]:
    """Build Meshes (closed after the test)."""
    made: list[Mesh] = []

    def make(policy: Path, **options: object) -> Mesh:
        options.setdefault("jwks", jwks_file)
        mesh = Mesh(policy, **options)  # type: ignore[arg-type]
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()
