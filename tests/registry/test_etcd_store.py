"""The etcd store and its client, against the real 3-node etcd cluster of the test run."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware.identity.issuer import generate_signing_key
from mesh_middleware.registry.store import InstanceRecord, JoinTokenRecord, KeyRecord
from mesh_middleware.registry.store.etcd import (
    LEADER_MARGIN,
    LEADER_TTL,
    EtcdStore,
    StoreKey,
    load_store_key,
    parse_etcd_url,
)
from mesh_middleware.registry.store.etcd_client import (
    ATTEMPT_TIMEOUT,
    CALL_BUDGET,
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    prefix_end,
)
from tests.support.etcd_cluster import Cluster, cluster_from_env
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    return cluster_from_env()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"/test-{secrets.token_hex(6)}/"


@pytest.fixture
def client(cluster: Cluster) -> Iterator[EtcdClient]:
    etcd = EtcdClient(cluster.endpoints)
    yield etcd
    etcd.close()


class _Answering(BaseHTTPRequestHandler):
    status = 503
    hits = 0

    def do_POST(self) -> None:
        type(self).hits += 1
        body = b'{"message": "stub"}'
        self.send_response(self.status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Answering]]]:
    """An HTTP endpoint answering every call with ``handler.status``."""
    handler = type("Stub", (_Answering,), {"hits": 0, "status": 503})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


# -- the client ----------------------------------------------------------------------------


def test_a_dead_endpoint_is_passed_over_and_the_answering_one_is_kept(
    cluster: Cluster, prefix: str
) -> None:
    """Connection refused moves on to the next endpoint; the next call starts where it worked."""
    dead = f"http://127.0.0.1:{free_port()}"
    etcd = EtcdClient([dead, *cluster.endpoints])
    try:
        assert etcd.put(prefix + "a", b"1") > 0
        assert etcd.endpoint == cluster.endpoints[0]
        assert etcd.get(prefix + "a") is not None
        assert etcd.endpoint == cluster.endpoints[0]
    finally:
        etcd.close()


def test_a_5xx_fails_over_but_a_4xx_does_not(
    cluster: Cluster, prefix: str, stub: tuple[str, type[_Answering]]
) -> None:
    url, handler = stub
    etcd = EtcdClient([url, *cluster.endpoints])
    try:
        etcd.put(prefix + "a", b"1")
        assert handler.hits == 1 and etcd.endpoint == cluster.endpoints[0]
    finally:
        etcd.close()
    handler.status, handler.hits = 400, 0
    refusing = EtcdClient([url, *cluster.endpoints])
    try:
        with pytest.raises(EtcdError, match="400") as raised:
            refusing.put(prefix + "b", b"1")
        assert not isinstance(raised.value, EtcdUnavailable)
        assert refusing.endpoint == url  # nothing else was tried
    finally:
        refusing.close()


def test_every_endpoint_down_is_unavailable_quickly() -> None:
    etcd = EtcdClient([f"http://127.0.0.1:{free_port()}" for _ in range(3)])
    start = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="no endpoint answered"):
        etcd.get("/x")
    assert time.monotonic() - start < 2.0
    etcd.close()


def test_compare_and_swap_on_mod_revision(client: EtcdClient, prefix: str) -> None:
    key = prefix + "cas"
    created, revision = client.put_if(key, b"first", mod_revision=0)
    assert created
    again, _ = client.put_if(key, b"second", mod_revision=0)
    assert not again  # it exists: a create-only put loses
    stale, _ = client.put_if(key, b"stale", mod_revision=revision - 1)
    assert not stale
    swapped, _ = client.put_if(key, b"third", mod_revision=revision)
    assert swapped
    current = client.get(key)
    assert current is not None and current.value == b"third"


def test_leases_keep_keys_alive_until_they_end(client: EtcdClient, prefix: str) -> None:
    lease = client.grant(2)
    client.put(prefix + "leased", b"x", lease=lease)
    for _ in range(3):
        time.sleep(1.0)
        assert client.keepalive(lease) > 0
    assert client.get(prefix + "leased") is not None
    client.revoke(lease)
    assert client.get(prefix + "leased") is None
    assert client.keepalive(lease) == 0  # gone: the caller re-registers
    client.revoke(lease)  # revoking twice is fine (a retried revoke)


def test_a_watch_sees_puts_and_deletes_in_order(client: EtcdClient, prefix: str) -> None:
    start, _ = client.get_prefix(prefix)
    stop = threading.Event()
    seen: list[tuple[bool, str, int]] = []

    def watch() -> None:
        for _, events in client.watch(prefix, start + 1, stop):
            seen.extend((e.deleted, e.kv.key, e.kv.mod_revision) for e in events)
            if len(seen) >= 3:
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    r1 = client.put(prefix + "a", b"1")
    r2 = client.put(prefix + "b", b"2")
    r3 = client.delete(prefix + "a")
    client.put("/elsewhere-" + prefix.strip("/"), b"not under the prefix")
    thread.join(timeout=5)
    stop.set()
    assert seen == [(False, prefix + "a", r1), (False, prefix + "b", r2), (True, prefix + "a", r3)]


def test_a_watch_from_compacted_history_says_so(client: EtcdClient, prefix: str) -> None:
    first = client.put(prefix + "k", b"1")
    latest = client.put(prefix + "k", b"2")
    client.call("kv/compaction", {"revision": str(latest)})
    with pytest.raises(Compacted) as raised:
        next(iter(client.watch(prefix, first, threading.Event())))
    assert raised.value.revision >= latest


@given(st.text(min_size=1, max_size=8), st.text(max_size=8))
def test_prefix_end_bounds_exactly_the_keys_under_the_prefix(prefix: str, rest: str) -> None:
    end = prefix_end(prefix)
    inside = (prefix + rest).encode()
    assert prefix.encode() <= inside < end
    # A key that does not start with the prefix falls outside [prefix, end).
    other = rest.encode()
    if not other.startswith(prefix.encode()):
        assert not (prefix.encode() <= other < end)


# -- the store's URL and key ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoints", "prefix"),
    [
        ("etcd://h1:2379,h2:2379/team-a", ["http://h1:2379", "http://h2:2379"], "/team-a/"),
        ("etcd://h1/", ["http://h1:2379"], "/mesh/"),
        ("etcds://10.0.0.1:2379/a/b", ["https://10.0.0.1:2379"], "/a/b/"),
    ],
)  # fmt: skip
def test_store_urls(url: str, endpoints: list[str], prefix: str) -> None:
    assert parse_etcd_url(url) == (endpoints, prefix)


@pytest.mark.parametrize("url", ["etcd:///x", "etcd://user@h:1/x", "sqlite:///x"])
def test_bad_store_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"etcd|HOST"):
        parse_etcd_url(url)


def test_wrapped_keys_unwrap_only_with_their_key_and_their_name() -> None:
    key = StoreKey(secrets.token_bytes(32))
    wrapped = key.wrap("secret", "/mesh/keys/a")
    assert "secret" not in wrapped
    assert key.unwrap(wrapped, "/mesh/keys/a") == "secret"
    with pytest.raises(ValueError, match="store key"):
        key.unwrap(wrapped, "/mesh/keys/b")  # moved to another record
    with pytest.raises(ValueError, match="store key"):
        StoreKey(secrets.token_bytes(32)).unwrap(wrapped, "/mesh/keys/a")


def test_the_store_key_file_must_be_private_and_32_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.key"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_store_key(path)
    path.chmod(0o600)
    load_store_key(path)
    path.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        load_store_key(path)
    monkeypatch.delenv("MESH_STORE_KEY", raising=False)
    with pytest.raises(ValueError, match="MESH_STORE_KEY"):
        load_store_key(None)


# -- the store -------------------------------------------------------------------------------


def _store(cluster: Cluster, prefix: str, key: StoreKey) -> EtcdStore:
    return EtcdStore(f"etcd://{cluster.store_hosts}{prefix.rstrip('/')}", key)


def test_private_keys_never_reach_etcd_in_plaintext(
    cluster: Cluster, client: EtcdClient, prefix: str
) -> None:
    wrapping = StoreKey(secrets.token_bytes(32))
    store = _store(cluster, prefix, wrapping)
    try:
        signing = generate_signing_key()
        private = signing.as_dict(private=True)
        store.put_key(KeyRecord("k1", private, 1.0, 1.0, None))
        _, stored = client.get_prefix(prefix)
        raw = b"".join(kv.value for kv in stored)
        assert private["d"].encode() not in raw
        assert store.load_keys()[0].private_jwk == private
        # Another replica with the same key reads it; one with another key cannot.
        same, other = (
            _store(cluster, prefix, wrapping),
            _store(cluster, prefix, StoreKey(secrets.token_bytes(32))),
        )
        try:
            assert same.load_keys()[0].private_jwk == private
            with pytest.raises(ValueError, match="store key"):
                other.load_keys()
        finally:
            same.close()
            other.close()
    finally:
        store.close()


def test_two_stores_see_each_others_writes_through_the_watch(cluster: Cluster, prefix: str) -> None:
    key = StoreKey(secrets.token_bytes(32))
    a, b = _store(cluster, prefix, key), _store(cluster, prefix, key)
    seen = threading.Event()
    b.start(lambda revision, events: seen.set(), lambda revision: None)
    try:
        a.put_join_token(JoinTokenRecord("t1", "orders", "hash", 1.0))
        assert seen.wait(2.0)
        assert [t.token_id for t in b.load_join_tokens()] == ["t1"]
        record = InstanceRecord("orders", "i-1", "127.0.0.1", 8001, "v1", None, {}, 5.0, None, 0)
        revision = a.register(record, True)
        deadline = time.monotonic() + 2
        while b.revision < revision and time.monotonic() < deadline:
            time.sleep(0.01)
        [stored] = b.stored_instances()
        assert stored.record.modify_index == revision and stored.lease
        a.delete_join_token("t1")
        deadline = time.monotonic() + 2
        while b.load_join_tokens() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.load_join_tokens() == []
    finally:
        a.close()
        b.close()


def test_one_of_two_stores_leads_and_the_other_takes_over(cluster: Cluster, prefix: str) -> None:
    key = StoreKey(secrets.token_bytes(32))
    a, b = _store(cluster, prefix, key), _store(cluster, prefix, key)
    for store in (a, b):
        store.start(lambda revision, events: None, lambda revision: None)
    try:
        deadline = time.monotonic() + 8
        while not (a.leads() or b.leads()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.leads() != b.leads()
        leader, other = (a, b) if a.leads() else (b, a)
        leader.close()  # revokes its session: the other leads within one renewal
        deadline = time.monotonic() + 8
        while not other.leads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.leads()
    finally:
        a.close()
        b.close()


def test_the_first_replica_sets_the_shared_admin_token(cluster: Cluster, prefix: str) -> None:
    key = StoreKey(secrets.token_bytes(32))
    a, b = _store(cluster, prefix, key), _store(cluster, prefix, key)
    try:
        assert a.shared_secret("admin", "hash-a") == "hash-a"
        assert b.shared_secret("admin", "hash-b") == "hash-a"
    finally:
        a.close()
        b.close()


def test_the_gateway_answers_as_the_client_expects(cluster: Cluster) -> None:
    """The v3 JSON gateway's shape this client relies on (int64 as strings, base64 keys)."""
    answer = httpx.post(f"{cluster.endpoints[0]}/v3/kv/range", json={"key": "eA=="}, timeout=2)
    body = json.loads(answer.text)
    assert answer.status_code == 200 and isinstance(body["header"]["revision"], str)


def test_a_member_that_never_answers_costs_one_attempt_within_the_call_budget(
    cluster: Cluster, prefix: str
) -> None:
    """A listening socket that never answers (a stopped member): the call moves on after one
    attempt and ends within the call's budget, well under the mesh clients' 2 s."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        etcd = EtcdClient([f"http://127.0.0.1:{silent.getsockname()[1]}", *cluster.endpoints])
        start = time.monotonic()
        etcd.put(prefix + "a", b"1")
        took = time.monotonic() - start
        etcd.close()
        assert ATTEMPT_TIMEOUT - 0.1 < took < CALL_BUDGET + 0.2
    finally:
        silent.close()


def test_a_write_the_watch_already_passed_does_not_come_back(cluster: Cluster, prefix: str) -> None:
    """A own write whose answer arrives after the watch brought a later deletion of the same
    key is not put back into the mirror (a revoked token would come back to life)."""
    store = _store(cluster, prefix, StoreKey(secrets.token_bytes(32)))
    try:
        key = prefix + "tokens/t1"
        deleted = KeyValue(key, b"", store.revision + 2, 0, 0)
        store._apply(store.revision + 2, [WatchEvent(True, deleted)])
        store._mirror_put(key, b'{"token_id": "t1"}', store.revision - 1)
        assert store.load_join_tokens() == []
    finally:
        store.close()


def test_a_deregistered_instance_cannot_be_renewed(cluster: Cluster, prefix: str) -> None:
    """Deregistering revokes the instance's lease: no keepalive can renew a key that is gone."""
    store = _store(cluster, prefix, StoreKey(secrets.token_bytes(32)))
    try:
        record = InstanceRecord("orders", "i-1", "127.0.0.1", 8001, None, None, {}, 30.0, None, 0)
        store.register(record, True)
        [kv] = store.client.get_prefix(prefix + "instances/")[1]
        assert store.renew(kv.lease)
        assert store.deregister("orders", "i-1", kv.lease) is not None
        assert not store.renew(kv.lease)
        assert store.client.get_prefix(prefix + "instances/")[1] == []
        assert store.deregister("orders", "i-1", kv.lease) is None  # gone already
    finally:
        store.close()


def test_leadership_lapses_when_the_session_is_not_confirmed(cluster: Cluster, prefix: str) -> None:
    """A leader that could not confirm its session for longer than it lives stops leading
    by itself, before another replica can have taken over."""
    store = _store(cluster, prefix, StoreKey(secrets.token_bytes(32)))
    try:
        store._leader, store._confirmed = True, time.monotonic()
        assert store.leads()
        store._confirmed = time.monotonic() - LEADER_TTL + LEADER_MARGIN
        assert not store.leads()
    finally:
        store.close()
