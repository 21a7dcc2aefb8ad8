"""ServiceWatch and RegistryClient.instances against a fake catalog that never blocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from mesh_middleware.discovery.endpoints import EndpointSet
from mesh_middleware.discovery.watch import ServiceWatch
from mesh_middleware.runtime.backoff import Backoff
from mesh_middleware.runtime.registry_client import RegistryClient, RegistryUnavailable
from tests.discovery.fake_catalog import FakeCatalog, instance, serving, wait_until
from tests.support.servers import free_port


@pytest.fixture
def fake() -> Iterator[FakeCatalog]:
    with serving(FakeCatalog()) as running:
        yield running


def started(url: str, **options: object) -> ServiceWatch:
    watch = ServiceWatch("inventory", RegistryClient(url), **options)  # type: ignore[arg-type]
    watch.start()
    return watch


def ids(endpoints: EndpointSet | None) -> list[str]:
    return [e.id for e in endpoints.endpoints] if endpoints is not None else []


# -- RegistryClient.instances ------------------------------------------------------------------


def test_instances_asks_for_healthy_ones_and_blocks_only_with_an_index(fake: FakeCatalog) -> None:
    fake.set(7, [instance("a", version="v1", zone="eu-1")])
    client = RegistryClient(fake.url)
    try:
        assert client.instances("inventory", index=None, wait=None, timeout=1.0) == (
            7,
            fake.instances,
        )
        client.instances("inventory", index=7, wait="30s", timeout=1.0)
    finally:
        client.close()
    plain, watch = fake.seen()
    assert plain.path == "/v1/catalog/services/inventory"
    assert plain.query == {"healthy": "true"}
    assert watch.query == {"healthy": "true", "index": "7", "wait": "30s"}


def test_the_read_timeout_of_a_watch_covers_its_wait(fake: FakeCatalog) -> None:
    """The same slow answer fails a plain read but not a watch whose wait covers it."""
    fake.delay = 1.2
    client = RegistryClient(fake.url)
    try:
        with pytest.raises(RegistryUnavailable, match="Timeout"):
            client.instances("inventory", index=None, wait=None, timeout=0.5)
        assert client.instances("inventory", index=1, wait="1s", timeout=0.5) == (1, [])
    finally:
        client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"[]",
        b"not json",
        b'{"index": -1, "instances": []}',
        b'{"index": "3", "instances": []}',
        b'{"index": true, "instances": []}',
        b'{"index": 3}',
        b'{"index": 3, "instances": {}}',
        b'{"index": 3, "instances": [7]}',
        b'{"index": 3, "instances": [{"id": "a", "address": "127.0.0.1", "port": 0}]}',
        b'{"index": 3, "instances": [{"id": "a", "address": "127.0.0.1", "port": 65536}]}',
        b'{"index": 3, "instances": [{"id": "a", "address": "127.0.0.1", "port": "80"}]}',
        b'{"index": 3, "instances": [{"id": "a", "address": "", "port": 80}]}',
        b'{"index": 3, "instances": [{"address": "127.0.0.1", "port": 80}]}',
        b'{"index": 3, "instances": [{"id": "a", "address": "h", "port": 80, "zone": 1}]}',
    ],
)
def test_malformed_answers_are_the_registry_being_unavailable(
    fake: FakeCatalog, answer: bytes
) -> None:
    fake.raw = answer
    client = RegistryClient(fake.url)
    try:
        with pytest.raises(RegistryUnavailable):
            client.instances("inventory", index=None, wait=None, timeout=1.0)
    finally:
        client.close()


# -- ServiceWatch ----------------------------------------------------------------------------


def test_a_registry_that_never_blocks_is_not_busy_looped(fake: FakeCatalog) -> None:
    """Every answer comes at once with the same index: about one poll a second, not thousands."""
    fake.set(7, [instance("a")])
    watch = started(fake.url)
    try:
        time.sleep(3.0)
    finally:
        watch.stop(join=2.0)
    polls = len(fake.seen())
    assert 2 <= polls <= 4, polls
    assert ids(watch.current) == ["a"]


def test_an_index_that_goes_backwards_resets_the_watch(fake: FakeCatalog) -> None:
    fake.set(50, [instance("a")])
    watch = started(fake.url)
    try:
        wait_until(lambda: watch.current is not None, 2.0)
        wait_until(lambda: any(r.query.get("index") == "50" for r in fake.seen()), 2.0)
        switched = time.monotonic()
        fake.set(3, [instance("b")])  # a registry that came back with another history
        wait_until(lambda: ids(watch.current) == ["b"], 4.0)
        assert watch.current is not None and watch.current.index == 3
        # Consul-style: start again with a plain read, then watch from the new index.
        wait_until(lambda: any(r.query.get("index") == "3" for r in fake.seen()), 4.0)
        sent = [r.query.get("index") for r in fake.seen() if r.at > switched]
        last_old = max(i for i, index in enumerate(sent) if index == "50")
        assert sent[last_old + 1] is None, sent
        assert set(sent[last_old + 1 :]) == {None, "3"}, sent
    finally:
        watch.stop(join=2.0)


def test_endpoints_are_kept_while_their_place_is_unchanged(fake: FakeCatalog) -> None:
    published: list[EndpointSet] = []
    fake.set(1, [instance("a", 8001, version="v1"), instance("b", 8002, version="v1")])
    watch = started(fake.url, publish=lambda _, endpoints: published.append(endpoints))
    try:
        wait_until(lambda: len(published) == 1, 2.0)
        a, b = published[0].endpoints
        a.in_flight, a.consecutive_failures = 3, 2  # state the balancer and detector keep
        fake.set(2, [instance("a", 8001, version="v1"), instance("b", 8003, version="v1")])
        wait_until(lambda: len(published) == 2, 4.0)
        a2, b2 = published[1].endpoints
        assert a2 is a and (a2.in_flight, a2.consecutive_failures) == (3, 2)
        assert b2 is not b and b2.port == 8003
        fake.set(3, [instance("a", 8001, version="v2")])  # a new version is a new place
        wait_until(lambda: len(published) == 3, 4.0)
        (a3,) = published[2].endpoints
        assert a3 is not a and a3.version == "v2"
        assert published[2].subset("v2") == (a3,) and published[2].subset("v1") == ()
        fake.set(4, [])  # everything gone: an empty set, not "nothing known"
        wait_until(lambda: len(published) == 4, 4.0)
        assert published[3].endpoints == () and published[3].index == 4
    finally:
        watch.stop(join=2.0)


def test_an_unchanged_answer_publishes_nothing(fake: FakeCatalog) -> None:
    published: list[EndpointSet] = []
    fake.set(1, [instance("a")])
    watch = started(fake.url, publish=lambda _, endpoints: published.append(endpoints))
    try:
        wait_until(lambda: len(fake.seen()) >= 3, 4.0)
        assert len(published) == 1
    finally:
        watch.stop(join=2.0)


def test_errors_keep_the_last_good_set_and_log_once_per_outage(fake: FakeCatalog) -> None:
    fake.set(1, [instance("a")])
    with capture_logs() as logs:
        watch = started(fake.url, backoff=Backoff(base=0.02, cap=0.05))
        try:
            wait_until(lambda: watch.connected, 2.0)
            last = watch.current
            assert last is not None
            fake.raw = b'{"index": 2, "instances": [{"id": "a", "port": 0}]}'
            wait_until(lambda: len(fake.seen()) >= 10, 4.0)  # many failed polls
            assert watch.current is last and not watch.connected
            fake.status, fake.raw = 503, b'{"error": "unavailable"}'
            wait_until(lambda: len(fake.seen()) >= 20, 4.0)
            fake.status = 200
            fake.set(2, [instance("a"), instance("b")])
            wait_until(lambda: watch.connected and ids(watch.current) == ["a", "b"], 4.0)
            assert watch.current is not None
            assert watch.current.endpoints[0] is last.endpoints[0]
        finally:
            watch.stop(join=2.0)
    events = [e["event"] for e in logs if e["event"].startswith("discovery_")]
    assert events == ["discovery_unreachable", "discovery_recovered"], events


def test_a_refusal_is_logged_as_such(fake: FakeCatalog) -> None:
    fake.status, fake.raw = 400, b'{"error": "bad_request", "reason": "invalid service name"}'
    with capture_logs() as logs:
        watch = started(fake.url, backoff=Backoff(base=0.02, cap=0.05))
        try:
            assert watch.answered.wait(2.0)
            wait_until(lambda: len(fake.seen()) >= 5, 4.0)
        finally:
            watch.stop(join=2.0)
    refusals = [e for e in logs if e["event"] == "discovery_refused"]
    assert len(refusals) == 1 and "invalid service name" in refusals[0]["error"]
    assert watch.current is None


def test_stop_ends_the_thread_promptly_while_it_pauses(fake: FakeCatalog) -> None:
    fake.set(1, [])
    pausing = started(fake.url)  # answers at once: it pauses about a second between polls
    down = started(f"http://127.0.0.1:{free_port()}", backoff=Backoff(base=5.0, cap=5.0))
    try:
        wait_until(lambda: len(fake.seen()) >= 2 and down.answered.is_set(), 2.0)
    finally:
        begun = time.monotonic()
        pausing.stop(join=2.0)
        down.stop(join=2.0)
    assert time.monotonic() - begun < 1.0
    names = {t.name for t in threading.enumerate()}
    assert "mesh-discovery-inventory" not in names
    assert not pausing.running and not down.running
