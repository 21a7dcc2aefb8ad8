"""Fixtures of the registry's tests: real registry processes and an HTTP client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware.registry.store import SQLiteStore
from tests.registry.support import Registry, start_registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry process (not in dev mode) with a fresh data directory."""
    with start_registry(tmp_path / "data") as running:
        yield running


@pytest.fixture
def dev_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry process started with ``--dev``."""
    with start_registry(tmp_path / "dev-data", dev=True) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """A plain HTTP client with a bounded timeout."""
    with httpx.Client(timeout=15.0) as http:
        yield http


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    """A SQLite store in a temporary file."""
    opened = SQLiteStore(tmp_path / "registry.db")
    yield opened
    opened.close()
