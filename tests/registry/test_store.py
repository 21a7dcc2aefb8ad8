"""The embedded store: a SQLite file in WAL mode, owner-only, durable per call."""

from __future__ import annotations

import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import pytest

from mesh_middleware.registry.store import (
    InstanceRecord,
    JoinTokenRecord,
    KeyRecord,
    SQLiteStore,
    open_store,
)


def _record(instance_id: str = "i-1", index: int = 1, **changes: object) -> InstanceRecord:
    fields: dict[str, object] = {
        "service": "orders",
        "instance_id": instance_id,
        "address": "127.0.0.1",
        "port": 8001,
        "version": "v1",
        "zone": "eu-1",
        "metadata": {"k": "v"},
        "ttl": 15.0,
        "check": None,
        "modify_index": index,
    }
    fields.update(changes)
    return InstanceRecord(**fields)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_store_takes_a_sqlite_url(tmp_path: Path) -> None:
    """`sqlite:///PATH` opens that file; the store remembers its URL."""
    path = tmp_path / "r.db"
    store = open_store(f"sqlite:///{path}")
    try:
        assert isinstance(store, SQLiteStore)
        assert store.url == f"sqlite:///{path}"
        assert path.exists()
    finally:
        store.close()


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:2379", "postgres:///x", "sqlite://"])
def test_open_store_refuses_other_urls(url: str) -> None:
    """A URL that is not `sqlite:///PATH` is a clear ValueError."""
    with pytest.raises(ValueError, match="store"):
        open_store(url)


def test_new_file_and_folder_are_owner_only(tmp_path: Path) -> None:
    """The database is created 0600 in a folder created 0700 (it holds private keys)."""
    path = tmp_path / "state" / "registry.db"
    store = SQLiteStore(path)
    try:
        store.put_instance(_record())
        assert _mode(path.parent) == 0o700
        for file in path.parent.iterdir():
            assert _mode(file) == 0o600, file
    finally:
        store.close()


def test_existing_file_is_made_owner_only(tmp_path: Path) -> None:
    """A database file that was world-readable is tightened to 0600 when opened."""
    path = tmp_path / "registry.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    store = SQLiteStore(path)
    try:
        assert _mode(path) == 0o600
    finally:
        store.close()


def test_journal_is_wal(tmp_path: Path) -> None:
    """The file is in WAL mode, as another connection sees it."""
    path = tmp_path / "registry.db"
    store = SQLiteStore(path)
    try:
        with closing(sqlite3.connect(path)) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_empty_store_has_index_zero(tmp_path: Path) -> None:
    """A new store has no instances, tokens or keys, and index 0."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        assert store.load_index() == 0
        assert store.load_instances() == []
        assert store.load_join_tokens() == []
        assert store.load_keys() == []
    finally:
        store.close()


def test_instances_round_trip(tmp_path: Path) -> None:
    """An instance comes back field for field, including metadata, a check and null fields."""
    store = SQLiteStore(tmp_path / "r.db")
    check = {"http": "/healthz", "interval": 5.0, "timeout": 1.0}
    first = _record("a", 1, check=check)
    second = _record("b", 2, version=None, zone=None, metadata={})
    try:
        store.put_instance(first)
        store.put_instance(second)
        loaded = sorted(store.load_instances(), key=lambda r: r.instance_id)
        assert loaded == [first, second]
    finally:
        store.close()


def test_put_records_the_index_with_the_change(tmp_path: Path) -> None:
    """Storing or deleting an instance records the index that change produced."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store.put_instance(_record("a", 1))
        assert store.load_index() == 1
        store.put_instance(_record("b", 2))
        assert store.load_index() == 2
        store.delete_instance("orders", "a", 3)
        assert store.load_index() == 3
        assert [r.instance_id for r in store.load_instances()] == ["b"]
    finally:
        store.close()


def test_put_replaces_the_same_instance(tmp_path: Path) -> None:
    """Putting an instance again replaces it (one row per service and id)."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store.put_instance(_record("a", 1, port=1))
        store.put_instance(_record("a", 2, port=2))
        (only,) = store.load_instances()
        assert (only.port, only.modify_index) == (2, 2)
    finally:
        store.close()


def test_same_id_in_two_services_are_two_instances(tmp_path: Path) -> None:
    """Instance ids are scoped by service."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store.put_instance(_record("a", 1))
        store.put_instance(_record("a", 2, service="inventory"))
        assert {(r.service, r.instance_id) for r in store.load_instances()} == {
            ("orders", "a"),
            ("inventory", "a"),
        }
    finally:
        store.close()


def test_everything_survives_reopening(tmp_path: Path) -> None:
    """What one store object wrote, a new one on the same file reads back."""
    path = tmp_path / "r.db"
    token = JoinTokenRecord("abc123", "orders", "f" * 64, 1700000000.0)
    key = KeyRecord("kid-1", {"kty": "OKP", "crv": "Ed25519", "d": "x", "x": "y"}, 1.0, 2.0, None)
    store = SQLiteStore(path)
    store.put_instance(_record("a", 7))
    store.put_join_token(token)
    store.put_key(key)
    store.close()
    again = SQLiteStore(path)
    try:
        assert again.load_index() == 7
        assert [r.instance_id for r in again.load_instances()] == ["a"]
        assert again.load_join_tokens() == [token]
        assert again.load_keys() == [key]
    finally:
        again.close()


def test_committed_writes_are_visible_to_another_connection_at_once(tmp_path: Path) -> None:
    """Each call commits before it returns: another connection sees it while the store is open."""
    path = tmp_path / "r.db"
    store = SQLiteStore(path)
    try:
        store.put_instance(_record("a", 1))
        with closing(sqlite3.connect(path)) as other:
            rows = other.execute("SELECT instance_id FROM instances").fetchall()
            index = other.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
        assert rows == [("a",)]
        assert index == ("1",)
    finally:
        store.close()


def test_join_tokens_and_keys_are_deleted(tmp_path: Path) -> None:
    """Revoked join tokens and retired keys leave the store."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store.put_join_token(JoinTokenRecord("t1", "orders", "0" * 64, 1.0))
        store.put_key(KeyRecord("k1", {"kty": "OKP"}, 1.0, 1.0, 5.0))
        store.delete_join_token("t1")
        store.delete_key("k1")
        assert store.load_join_tokens() == []
        assert store.load_keys() == []
    finally:
        store.close()


def test_a_key_retirement_is_stored(tmp_path: Path) -> None:
    """Putting a key again with a retirement time replaces the stored record."""
    store = SQLiteStore(tmp_path / "r.db")
    try:
        store.put_key(KeyRecord("k1", {"kty": "OKP"}, 1.0, 1.0, None))
        store.put_key(KeyRecord("k1", {"kty": "OKP"}, 1.0, 1.0, 99.0))
        (key,) = store.load_keys()
        assert key.retire_at == 99.0
    finally:
        store.close()
