"""The embedded store: one SQLite file in WAL mode, owner-only permissions.

``synchronous=NORMAL`` with WAL: a committed transaction survives the registry process being
killed (kill -9); only a power loss can take the last commits. Every write is one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

from mesh_middleware.registry.store.base import (
    CARootRecord,
    InstanceRecord,
    JoinTokenRecord,
    KeyRecord,
)

__all__ = ["SQLiteStore", "open_sqlite_store"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    version TEXT,
    zone TEXT,
    metadata TEXT NOT NULL,
    ttl REAL NOT NULL,
    health_check TEXT,
    modify_index INTEGER NOT NULL,
    PRIMARY KEY (service, instance_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    private_jwk TEXT NOT NULL,
    created_at REAL NOT NULL,
    activate_at REAL NOT NULL,
    retire_at REAL
);
CREATE TABLE IF NOT EXISTS ca_roots (
    root_id TEXT PRIMARY KEY,
    certificate_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    created_at REAL NOT NULL,
    activate_at REAL NOT NULL,
    retire_at REAL,
    supplied INTEGER NOT NULL
);
"""


def open_sqlite_store(url: str) -> SQLiteStore:
    """Open the store a URL names (``sqlite:///absolute/path.db``)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ValueError(f"unsupported store {url!r}: expected sqlite:///PATH")
    path = parts.path
    if not path:
        raise ValueError(f"store URL {url!r} names no file")
    return SQLiteStore(Path(path), url=url)


class SQLiteStore:
    """The registry's state in one SQLite file."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Created owner-only: it holds private signing keys and token hashes.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def _write(self, sql: str, params: tuple[object, ...], index: int | None = None) -> None:
        with self._lock:
            if index is None:
                self._db.execute(sql, params)
                return
            # The change and the index it produced commit together.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(sql, params)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (str(index),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def load_instances(self) -> list[InstanceRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT service, instance_id, address, port, version, zone, metadata, ttl,"
                " health_check, modify_index FROM instances"
            ).fetchall()
        return [
            InstanceRecord(
                service=r[0],
                instance_id=r[1],
                address=r[2],
                port=int(r[3]),
                version=r[4],
                zone=r[5],
                metadata=json.loads(r[6]),
                ttl=float(r[7]),
                check=json.loads(r[8]) if r[8] else None,
                modify_index=int(r[9]),
            )
            for r in rows
        ]

    def put_instance(self, record: InstanceRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.service,
                record.instance_id,
                record.address,
                record.port,
                record.version,
                record.zone,
                json.dumps(record.metadata, sort_keys=True),
                record.ttl,
                json.dumps(record.check, sort_keys=True) if record.check else None,
                record.modify_index,
            ),
            index=record.modify_index,
        )

    def delete_instance(self, service: str, instance_id: str, index: int) -> None:
        self._write(
            "DELETE FROM instances WHERE service = ? AND instance_id = ?",
            (service, instance_id),
            index=index,
        )

    def load_index(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'index'").fetchone()
        return int(row[0]) if row else 0

    def set_index(self, index: int) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (str(index),))

    def load_join_tokens(self) -> list[JoinTokenRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT token_id, service, secret_hash, created_at FROM join_tokens"
            ).fetchall()
        return [JoinTokenRecord(r[0], r[1], r[2], float(r[3])) for r in rows]

    def put_join_token(self, record: JoinTokenRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO join_tokens VALUES (?, ?, ?, ?)",
            (record.token_id, record.service, record.secret_hash, record.created_at),
        )

    def delete_join_token(self, token_id: str) -> None:
        self._write("DELETE FROM join_tokens WHERE token_id = ?", (token_id,))

    def load_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kid, private_jwk, created_at, activate_at, retire_at FROM signing_keys"
            ).fetchall()
        return [KeyRecord(r[0], json.loads(r[1]), float(r[2]), float(r[3]), r[4]) for r in rows]

    def put_key(self, record: KeyRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO signing_keys VALUES (?, ?, ?, ?, ?)",
            (
                record.kid,
                json.dumps(record.private_jwk),
                record.created_at,
                record.activate_at,
                record.retire_at,
            ),
        )

    def delete_key(self, kid: str) -> None:
        self._write("DELETE FROM signing_keys WHERE kid = ?", (kid,))

    def load_ca_roots(self) -> list[CARootRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT root_id, certificate_pem, key_pem, created_at, activate_at, retire_at,"
                " supplied FROM ca_roots"
            ).fetchall()
        return [
            CARootRecord(r[0], r[1], r[2], float(r[3]), float(r[4]), r[5], bool(r[6])) for r in rows
        ]

    def put_ca_root(self, record: CARootRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO ca_roots VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.root_id,
                record.certificate_pem,
                record.key_pem,
                record.created_at,
                record.activate_at,
                record.retire_at,
                int(record.supplied),
            ),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
