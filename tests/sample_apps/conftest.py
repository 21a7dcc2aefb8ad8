"""Fixtures of the sample apps' tests: the real upstream processes, started once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sample_apps.shop import Shop, running_shop


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """inventory v1 and v2, payments steady and chaotic, and orders under gunicorn."""
    with running_shop(tmp_path_factory.mktemp("shop")) as processes:
        yield processes
