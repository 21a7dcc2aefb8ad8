"""Several registry URLs: parsing, failover between them, stickiness, and what is not retried.

The registry is a real `mesh registry --dev` process; the replicas that fail are a closed
loopback port, or a small HTTP server in a thread answering a fixed status.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from mesh_middleware import Mesh
from mesh_middleware.cli import main
from mesh_middleware.identity.keys import KeyStore
from mesh_middleware.runtime.registry_client import (
    RegistryClient,
    RegistryRefused,
    RegistryUnavailable,
    parse_registry_urls,
)
from tests.conftest import PolicyWriter
from tests.registry.support import Registry, start_registry, wait_until
from tests.support.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

POLICY = """\
service: orders
outbound:
  services:
    inventory: {}
"""

INSTANCE = {"address": "127.0.0.1", "port": 8001}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("failover") / "registry", dev=True) as running:
        yield running


def closed() -> str:
    """The URL of a loopback port nothing listens on: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


class Stub:
    """A registry replica in a thread that answers every call with ``status``, and counts."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.hits.append(f"{self.command} {self.path}")
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                body = json.dumps({"error": "stub", "reason": f"stub says {owner.status}"})
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            do_GET = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def failovers(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "registry_failover"]


# -- parsing -----------------------------------------------------------------------------------


def test_a_comma_separated_list_is_parsed() -> None:
    """Whitespace and trailing slashes are dropped, a repeat is kept once, order is kept."""
    given = " http://127.0.0.1:7401/ ,https://r2.example:7402,  http://127.0.0.1:7401 "
    assert parse_registry_urls(given) == ("http://127.0.0.1:7401", "https://r2.example:7402")
    assert parse_registry_urls(["http://a:1", " http://b:2/ "]) == ("http://a:1", "http://b:2")
    client = RegistryClient("http://a:1, http://b:2")
    assert client.base_urls == ("http://a:1", "http://b:2")
    assert client.base_url == "http://a:1"
    assert client.failover_order == ("http://a:1", "http://b:2")
    assert RegistryClient(client.base_urls).base_urls == client.base_urls  # a sequence too


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("http://a:1,ftp://b:2", "'ftp://b:2'"),
        ("http://a:1, 127.0.0.1:7400", "'127.0.0.1:7400'"),
        ("http://a:1,,http://b:2", "got ''"),
        ("", "no registry URL"),
        (" , ", "no registry URL"),
    ],
)
def test_a_bad_item_is_named(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_registry_urls(given)
    with pytest.raises(ValueError, match=re.escape(message)):
        RegistryClient(given)


def test_a_mesh_with_a_bad_item_does_not_start(write_policy: PolicyWriter) -> None:
    with pytest.raises(ValueError, match=re.escape("'127.0.0.1:7402'")):
        Mesh(write_policy(POLICY), registry_url="http://127.0.0.1:7401,127.0.0.1:7402")


# -- failover ----------------------------------------------------------------------------------


def test_connection_refused_fails_over_and_sticks(registry: Registry) -> None:
    """A closed port first: the call is answered by the next URL, which becomes current; the
    next call starts there (no second failover)."""
    dead = closed()
    client = RegistryClient(f"{dead}, {registry.url}")
    try:
        with capture_logs() as logs:
            assert client.trust().trust_domain == "mesh.local"
            assert client.base_url == registry.url
            client.register("orders", "o-1", INSTANCE)
            index, instances = client.instances("orders", index=None, wait=None, timeout=5.0)
        assert [i["id"] for i in instances] == ["o-1"] and index > 0
        assert client.base_url == registry.url
        assert client.failover_order == (registry.url, dead)
        [moved] = failovers(logs)
        assert (moved["from"], moved["to"], moved["log_level"]) == (dead, registry.url, "warning")
        assert "ConnectError" in moved["error"]
        assert client.deregister("orders", "o-1")
    finally:
        client.close()


def test_a_5xx_fails_over_and_the_next_call_goes_straight_to_the_answering_url(
    registry: Registry,
) -> None:
    with Stub(503) as failing:
        client = RegistryClient([failing.url, registry.url])
        try:
            client.register("orders", "o-2", INSTANCE)
            assert len(failing.hits) == 1
            assert client.base_url == registry.url
            client.register("orders", "o-2", INSTANCE)
            assert client.trust().jwks_urls[0].startswith(registry.url)
            assert len(failing.hits) == 1  # sticky: the 503 replica is not asked again
            assert client.deregister("orders", "o-2")
        finally:
            client.close()


def test_a_watch_fails_over_with_the_same_index(registry: Registry) -> None:
    """The index is shared by the replicas: the next one holds the watch as the first would."""
    setup = RegistryClient(registry.url)
    with Stub(502) as failing:
        client = RegistryClient([failing.url, registry.url])
        try:
            setup.register("watched", "w-1", INSTANCE)
            index, _ = setup.instances("watched", index=None, wait=None, timeout=5.0)
            started = time.monotonic()
            again, instances = client.instances("watched", index=index, wait="1s", timeout=5.0)
            assert time.monotonic() - started >= 0.9  # held by the registry: nothing changed
            assert (again, [i["id"] for i in instances]) == (index, ["w-1"])
            assert failing.hits == [
                f"GET /v1/catalog/services/watched?healthy=true&index={index}&wait=1s"
            ]
        finally:
            setup.deregister("watched", "w-1")
            client.close()
            setup.close()


def test_a_refusal_is_not_failed_over(registry: Registry) -> None:
    """A 4xx is every replica's answer: the next URL is never asked."""
    with Stub(403) as refusing, Stub(200) as spare:
        client = RegistryClient([refusing.url, spare.url])
        try:
            with pytest.raises(RegistryRefused) as refused:
                client.register("orders", "o-3", INSTANCE)
            assert refused.value.status == 403
            assert (len(refusing.hits), spare.hits) == (1, [])
            assert client.base_url == refusing.url
        finally:
            client.close()
        # The real registry refusing a bad join token, after a failover to it: that answer
        # makes it current, and the spare behind it is not asked.
        dead = closed()
        client = RegistryClient([dead, registry.url, spare.url], "mjt_not-a-token")
        try:
            with pytest.raises(RegistryRefused) as refused:
                client.register("orders", "o-3", INSTANCE)
            assert refused.value.status == 401
            assert spare.hits == []
            assert client.base_url == registry.url
        finally:
            client.close()


def test_all_down_is_one_bounded_fast_failure_naming_every_url() -> None:
    with Stub(503) as first, Stub(500) as second:
        dead = closed()
        client = RegistryClient([first.url, dead, second.url])
        try:
            started = time.monotonic()
            with capture_logs() as logs, pytest.raises(RegistryUnavailable) as down:
                client.register("orders", "o-4", INSTANCE)
            assert time.monotonic() - started < 2.0
            assert (len(first.hits), len(second.hits)) == (1, 1)  # each URL once
            for url in (first.url, dead, second.url):
                assert url in str(down.value)
            assert "500" in str(down.value)  # the last error
            assert client.base_url == first.url  # nothing answered: nothing moves
            assert failovers(logs) == []
        finally:
            client.close()


def test_one_url_fails_as_before() -> None:
    """A single URL: the error is the call's own, with no list of URLs tried."""
    dead = closed()
    client = RegistryClient(dead)
    try:
        with pytest.raises(RegistryUnavailable) as down:
            client.trust()
        assert "ConnectError" in str(down.value) and "tried" not in str(down.value)
    finally:
        client.close()


def test_a_change_is_not_sent_twice(registry: Registry) -> None:
    """``idempotent=False`` goes on only when no connection was made: a replica that received
    the call and failed (5xx) may have done it."""
    with Stub(503) as failing, Stub(201) as spare:
        client = RegistryClient([failing.url, spare.url])
        try:
            with pytest.raises(RegistryUnavailable):
                client.request("POST", "/v1/admin/join-tokens", body={}, idempotent=False)
            assert (len(failing.hits), spare.hits) == (1, [])
        finally:
            client.close()
    client = RegistryClient([closed(), registry.url], registry.admin_token)
    try:
        answer = client.request(
            "POST", "/v1/admin/join-tokens", body={"service": "orders"}, idempotent=False
        )
        assert str(answer["token"]).startswith("mjt_")
    finally:
        client.close()


def test_concurrent_calls_fail_over_once(registry: Registry) -> None:
    """Threads racing through a failover: every call succeeds, the move is logged once."""
    client = RegistryClient([closed(), registry.url])
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def call() -> None:
        barrier.wait()
        try:
            client.trust()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    try:
        with capture_logs() as logs:
            threads = [threading.Thread(target=call) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert errors == []
        assert len(failovers(logs)) == 1
        assert client.base_url == registry.url
    finally:
        client.close()


# -- the JWKS ---------------------------------------------------------------------------------


def test_the_trust_answer_lists_the_jwks_at_every_registry(registry: Registry) -> None:
    dead = closed()
    client = RegistryClient([dead, registry.url])
    try:
        bundle = client.trust()
    finally:
        client.close()
    path = "/v1/identity/jwks"
    assert bundle.jwks_urls == (registry.url + path, dead + path)  # the one that answered first
    assert bundle.jwks_url == bundle.jwks_urls[0]


def test_the_jwks_fetch_fails_over_and_sticks(registry: Registry) -> None:
    dead = closed() + "/v1/identity/jwks"
    live = registry.url + "/v1/identity/jwks"
    store = KeyStore([dead, live], fetch_timeout=2.0)
    with capture_logs() as logs:
        assert store.refresh()
        assert store.kids()
        assert store.source == live and store.sources == (live, dead)
        assert store.refresh()
    moved = [entry for entry in logs if entry["event"] == "jwks_failover"]
    assert [(m["from"], m["to"]) for m in moved] == [(dead, live)]
    assert store.last_error is None


def test_a_jwks_fetch_with_every_source_down_keeps_the_keys(registry: Registry) -> None:
    live = registry.url + "/v1/identity/jwks"
    store = KeyStore(live, fetch_timeout=2.0)
    assert store.refresh()
    kids = store.kids()
    first, second = closed() + "/jwks", closed() + "/jwks"
    store.sources = (first, second)
    assert not store.refresh()
    assert store.kids() == kids
    assert store.last_error is not None
    assert first in store.last_error and second in store.last_error
    assert store.sources == (first, second)


# -- the Mesh and the command line -------------------------------------------------------------


def test_a_mesh_fails_over_to_register_and_get_tokens(
    registry: Registry, write_policy: PolicyWriter
) -> None:
    dead = closed()
    with Mesh(
        write_policy(POLICY),
        registry_url=f"{dead} , {registry.url}",
        advertise="127.0.0.1:8124",
    ) as mesh:
        assert mesh.registry_connected  # trust and keys learned while constructed
        assert mesh.keys.kids()
        assert mesh.keys.source == registry.url + "/v1/identity/jwks"
        mesh.start()
        assert mesh.identity_token("inventory", wait=5.0) is not None

        def registered() -> bool:
            answer = httpx.get(f"{registry.url}/v1/catalog/services/orders", timeout=5.0)
            return any(i["port"] == 8124 for i in answer.json().get("instances", []))

        wait_until(registered, 10.0)
    assert not registered()  # close() deregistered, through the failed-over URL too


def test_the_command_line_fails_over(
    registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = closed()
    assert main(["services", "--json", "--registry", f"{dead},{registry.url}"]) == 0
    out, err = capsys.readouterr()
    assert isinstance(json.loads(out), list)  # the failover note is on stderr, not in the JSON
    assert "registry_failover" in err
    argv = ["token", "create", "cli-failover", "--admin-token", registry.admin_token]
    assert main([*argv, "--registry", f"{dead},{registry.url}"]) == 0
    assert capsys.readouterr().out.startswith("mjt_")
    assert main(["services", "--registry", f"{dead},{closed()}"]) == 1
    err = capsys.readouterr().err
    assert f"mesh services: cannot reach the registry at {dead}," in err
    assert main(["services", "--registry", f"{registry.url},ftp://nope"]) == 1
    assert "'ftp://nope'" in capsys.readouterr().err
