"""Schemathesis against /openapi.json of a real registry: no generated request gets a 5xx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from tests.registry.support import Registry, start_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


EXAMPLES_PER_OPERATION = 50
_LONG_WAIT = re.compile(r"^[0-9]+(ms|s|m|h)$")


@pytest.fixture(params=["admin", "dev"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Registry, bool]]:
    """A registry outside dev mode (called with the admin token), or one in dev mode (called
    with no credential at all)."""
    dev = request.param == "dev"
    with start_registry(tmp_path / "data", dev=dev) as registry:
        yield registry, dev


def _bounded(case: Case[Any]) -> None:
    """Keep generated watches short: with `index`, a valid or absent `wait` may legitimately
    block for up to minutes."""
    query = case.query
    if not isinstance(query, dict) or "index" not in query:
        return
    if "wait" not in query or _LONG_WAIT.match(str(query["wait"])):
        query["wait"] = "20ms"


def test_no_generated_request_gets_a_server_error(target: tuple[Registry, bool]) -> None:
    """Positive and negative requests generated from the served OpenAPI document, for every
    operation, are answered without a 5xx."""
    registry, dev = target
    schema = schemathesis.openapi.from_url(f"{registry.url}/openapi.json", timeout=10)
    headers = {} if dev else registry.admin()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the served document is valid
        operations.append(result.ok())
    assert len(operations) >= 12
    strategy = st.one_of(
        [
            operation.as_strategy(generation_mode=mode)
            for operation in operations
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )

    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(operations) * 2,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(case=strategy)
    def call(case: Case[Any]) -> None:
        _bounded(case)
        response = case.call(base_url=registry.url, headers=headers, timeout=15)
        case.validate_response(response, checks=[not_a_server_error])

    call()
