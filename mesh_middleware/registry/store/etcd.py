"""The replicated store: the registry's state in etcd, shared by every registry replica.

Layout under the prefix (``/mesh/`` unless the URL names another):

- ``instances/<service>/<instance>``: the instance as JSON (with its health), attached to an
  etcd lease of the instance's TTL. A renewal is a keepalive of that lease; when it runs out,
  etcd deletes the key and every replica's watch sees it go.
- ``tokens/<id>``: join tokens (hashes only); ``keys/<kid>``: signing keys; ``ca/<root>``: CA
  roots. Private keys are wrapped (AES-256-GCM, the key named in the etcd key as associated
  data) with the operator's store key: etcd never holds them in plaintext.
- ``secrets/<name>``: the admin and viewer tokens' hashes, created once by whichever replica
  came first (compare-and-swap), so that one admin token works on every replica.
- ``leader``: the replica that runs health checks and key rotation, under its session lease.
- ``telemetry/<replica>/<n>``: each edge report a replica took, for the other replicas to
  merge too (one telemetry view), under a lease that ends with the registry's retention.

The store mirrors the prefix in memory (one range at start, then a watch), so that reads never
wait on etcd. The etcd revision is the catalog's change index on every replica alike.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mesh_middleware.registry.store.base import (
    CARootRecord,
    InstanceRecord,
    JoinTokenRecord,
    KeyRecord,
)
from mesh_middleware.registry.store.etcd_client import (
    Compacted,
    EtcdClient,
    EtcdError,
    KeyValue,
    WatchEvent,
)
from mesh_middleware.registry.telemetry import RETENTION_SECONDS

__all__ = ["EtcdStore", "StoreKey", "StoredInstance", "load_store_key", "parse_etcd_url"]

log = structlog.get_logger("mesh.registry")

# The leader's session: renewed every LEADER_RENEW seconds, lost LEADER_TTL after a crash.
LEADER_TTL = 6
LEADER_RENEW = 2.0
LEADER_MARGIN = 1.0
STORE_KEY_ENV = "MESH_STORE_KEY"
# Telemetry reports are shared for as long as the registry keeps them (5 minutes): keys under
# one lease per replica, a new lease every TELEMETRY_LEASE_EVERY seconds.
TELEMETRY_LEASE_EVERY = 30.0
MAX_SHARED_REPORT_BYTES = 512 * 1024  # etcd takes 1.5 MiB per request; reports are KiBs

Listener = Callable[[int, list[WatchEvent]], object]


def parse_etcd_url(url: str) -> tuple[list[str], str]:
    """``etcd://h1:2379,h2:2379/prefix`` → endpoints (``http://h:p``) and the key prefix.

    ``etcds://`` talks to etcd over HTTPS.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("etcd", "etcds"):
        raise ValueError(f"not an etcd store URL: {url!r}")
    scheme = "https" if parts.scheme == "etcds" else "http"
    hosts = [h.strip() for h in parts.netloc.split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"store URL {url!r} names no etcd endpoint (etcd://HOST:PORT,.../PREFIX)")
    endpoints = []
    for host in hosts:
        if "@" in host or "/" in host:
            raise ValueError(f"store URL {url!r}: {host!r} is not HOST:PORT")
        endpoints.append(f"{scheme}://{host if ':' in host.strip('[]') else host + ':2379'}")
    prefix = "/" + parts.path.strip("/") + "/" if parts.path.strip("/") else "/mesh/"
    return endpoints, prefix


class StoreKey:
    """The operator's key that wraps private keys before they go to etcd (AES-256-GCM)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError(f"the store key must be 32 bytes (base64 of them), got {len(key)}")
        self._aead = AESGCM(key)

    def wrap(self, plaintext: str, name: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), name.encode("utf-8"))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def unwrap(self, wrapped: str, name: str) -> str:
        raw = base64.b64decode(wrapped)
        try:
            return self._aead.decrypt(raw[:12], raw[12:], name.encode("utf-8")).decode("utf-8")
        except Exception:
            raise ValueError(
                f"cannot unwrap {name}: the store key is not the one it was wrapped with"
            ) from None


def load_store_key(path: Path | None) -> StoreKey:
    """The store key from ``path`` (a file holding base64 of 32 bytes) or ``$MESH_STORE_KEY``."""
    if path is not None:
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path} must be readable by its owner only (chmod 600)")
        text = path.read_text().strip()
    else:
        text = os.environ.get(STORE_KEY_ENV, "").strip()
        if not text:
            raise ValueError(
                "an etcd store needs a key to wrap private keys with: --store-key-file FILE or "
                f"${STORE_KEY_ENV} (base64 of 32 random bytes: head -c 32 /dev/urandom | base64)"
            )
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("the store key is not base64") from None
    return StoreKey(raw)


@dataclasses.dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance as etcd holds it: the record (``modify_index`` = mod revision), its health
    and its lease."""

    record: InstanceRecord
    healthy: bool
    lease: int


class EtcdStore:
    """The Store interface on etcd, plus what replicas need: leases, watches, a leader."""

    replicated = True

    def __init__(self, url: str, store_key: StoreKey, *, client: EtcdClient | None = None) -> None:
        endpoints, self.prefix = parse_etcd_url(url)
        self.url = url
        self.client = client or EtcdClient(endpoints)
        self._key = store_key
        self.replica_id = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leader = False
        self._session = 0
        self._confirmed = 0.0
        self._report_lock = threading.Lock()
        try:
            # The first read may be large: it gets more time than a call on the way.
            self.revision, kvs = self.client.get_prefix(self.prefix, deadline=time.monotonic() + 30)
        except BaseException:
            self.client.close()
            raise
        # Reports are merged into the telemetry windows, not kept in the mirror.
        self._initial_reports = [kv for kv in kvs if self.kind_of(kv.key) == "telemetry"]
        self._kvs: dict[str, KeyValue] = {
            kv.key: kv for kv in kvs if self.kind_of(kv.key) != "telemetry"
        }
        self._tombstones: dict[str, int] = {}
        self._reports_sent = 0
        self._report_lease = (0, 0.0)  # lease, when granted (monotonic)

    # -- the mirror --------------------------------------------------------------------

    def _k(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _mirror_put(self, key: str, value: bytes, revision: int, lease: int = 0) -> None:
        with self._lock:
            if revision <= self.revision:
                return  # the watch brought this revision (and maybe later ones) already
            current = self._kvs.get(key)
            if current is None or current.mod_revision < revision:
                self._kvs[key] = KeyValue(key, value, revision, revision, lease)
                self._tombstones.pop(key, None)

    def _mirror_delete(self, key: str, revision: int) -> None:
        with self._lock:
            if revision <= self.revision:
                return
            current = self._kvs.get(key)
            if current is not None and current.mod_revision < revision:
                del self._kvs[key]
            self._tombstones[key] = max(revision, self._tombstones.get(key, 0))

    def _apply(self, revision: int, events: list[WatchEvent]) -> None:
        """Fold watched events into the mirror (older than what a own write put there: skip)."""
        with self._lock:
            for event in events:
                key, at = event.kv.key, event.kv.mod_revision
                if self.kind_of(key) == "telemetry":
                    continue
                current = self._kvs.get(key)
                if (current is not None and current.mod_revision >= at) or (
                    self._tombstones.get(key, 0) >= at
                ):
                    continue
                if event.deleted:
                    self._kvs.pop(key, None)
                else:
                    self._kvs[key] = event.kv
            self.revision = max(self.revision, revision)
            # No event older than this revision can come any more.
            self._tombstones = {k: r for k, r in self._tombstones.items() if r > revision}

    def _values(self, kind: str) -> list[KeyValue]:
        start = self._k(kind) + "/"
        with self._lock:
            return [kv for key, kv in self._kvs.items() if key.startswith(start)]

    def kind_of(self, key: str) -> str:
        """``instances``, ``keys``, ``tokens``, ``ca``, ``secrets`` or ``leader``."""
        return key[len(self.prefix) :].split("/", 1)[0]

    # -- watching and leading ------------------------------------------------------------

    def start(self, listener: Listener, resync: Callable[[int], object]) -> None:
        """Watch the prefix from the revision loaded (calling ``listener`` on a thread of its
        own after the mirror took the events; ``resync`` after a re-list), and campaign to
        lead."""
        for target, name in (
            (lambda: self._watch(listener, resync), "watch"),
            (self._lead, "lead"),
        ):
            thread = threading.Thread(target=target, name=f"mesh-etcd-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, listener: Listener, resync: Callable[[int], object]) -> None:
        while not self._stop.is_set():
            try:
                for revision, events in self.client.watch(
                    self.prefix, self.revision + 1, self._stop
                ):
                    self._apply(revision, events)
                    listener(revision, events)
            except Compacted as exc:
                log.warning("etcd_watch_compacted", revision=exc.revision)
                self._relist(resync)
            except Exception:
                log.exception("etcd_watch_failed")
                self._stop.wait(1.0)

    def _relist(self, resync: Callable[[int], object]) -> None:
        while not self._stop.is_set():
            try:
                revision, kvs = self.client.get_prefix(self.prefix)
            except EtcdError as exc:
                log.warning("etcd_relist_failed", error=str(exc))
                self._stop.wait(1.0)
                continue
            with self._lock:
                self._kvs = {kv.key: kv for kv in kvs}
                self._tombstones = {}
                self.revision = revision
            resync(revision)
            return

    def leads(self) -> bool:
        """Whether this replica runs the checks and the rotations now: it won the leader key,
        and its session was last confirmed recently enough that it cannot have run out (so two
        replicas never both lead, even when this one lost etcd)."""
        return self._leader and time.monotonic() < self._confirmed + LEADER_TTL - LEADER_MARGIN

    def _lead(self) -> None:
        key = self._k("leader")
        me = self.replica_id.encode()
        while not self._stop.is_set():
            try:
                sent = time.monotonic()
                if not self._session or self.client.keepalive(self._session) <= 0:
                    self._session = self.client.grant(LEADER_TTL)
                self._confirmed = sent  # the session lives at least LEADER_TTL from `sent`
                won, _ = self.client.put_if(key, me, mod_revision=0, lease=self._session)
                if not won:
                    holder = self.client.get(key)
                    # A retried create that had succeeded also lands here: it is still ours.
                    won = holder is not None and holder.value == me
                if won != self._leader:
                    log.info("registry_leadership", leader=won, replica=self.replica_id)
                self._leader = won
            except EtcdError as exc:
                if self._leader:
                    log.warning("registry_leadership_lost", error=str(exc))
                self._leader = False
            self._stop.wait(LEADER_RENEW)

    # -- instances -----------------------------------------------------------------------

    def stored_instances(self) -> list[StoredInstance]:
        return [self._instance(kv) for kv in self._values("instances")]

    def _instance(self, kv: KeyValue) -> StoredInstance:
        data = json.loads(kv.value)
        record = InstanceRecord(
            service=data["service"],
            instance_id=data["id"],
            address=data["address"],
            port=int(data["port"]),
            version=data.get("version"),
            zone=data.get("zone"),
            metadata=dict(data.get("metadata") or {}),
            ttl=float(data["ttl"]),
            check=data.get("check"),
            modify_index=kv.mod_revision,
        )
        return StoredInstance(record, bool(data.get("healthy", True)), kv.lease)

    def instance_event(self, event: WatchEvent) -> tuple[str, str, StoredInstance | None]:
        """(service, instance, what it is now, or ``None`` if it is gone) for a watched event."""
        _, service, instance_id = event.kv.key[len(self.prefix) :].split("/", 2)
        return service, instance_id, None if event.deleted else self._instance(event.kv)

    @staticmethod
    def _instance_value(record: InstanceRecord, healthy: bool) -> bytes:
        data = {
            "service": record.service,
            "id": record.instance_id,
            "address": record.address,
            "port": record.port,
            "version": record.version,
            "zone": record.zone,
            "metadata": record.metadata,
            "ttl": record.ttl,
            "check": record.check,
            "healthy": healthy,
        }
        return json.dumps(data, sort_keys=True).encode()

    def register(self, record: InstanceRecord, healthy: bool) -> int:
        """Store the instance under a new lease of its TTL; return the revision."""
        deadline = self.client.deadline()  # the grant and the put share one call's time
        lease = self.client.grant(record.ttl, deadline=deadline)
        key = self._k("instances", record.service, record.instance_id)
        value = self._instance_value(record, healthy)
        return self.client.put(key, value, lease=lease, deadline=deadline)

    def release(self, lease: int) -> None:
        """End a lease no key uses any more (an instance re-registered under a new one)."""
        with contextlib.suppress(EtcdError):  # else it ends by itself at its TTL
            self.client.revoke(lease)

    def renew(self, lease: int) -> bool:
        """Keep the instance's lease alive; ``False`` if it is gone."""
        return self.client.keepalive(lease) > 0

    def current_revision(self) -> int:
        """etcd's revision now (linearizable)."""
        return self.client.revision()

    def set_health(self, stored: StoredInstance, healthy: bool) -> int | None:
        """Flip health if nobody changed the instance meanwhile (compare-and-swap on its mod
        revision); the revision, or ``None`` if it had changed."""
        key = self._k("instances", stored.record.service, stored.record.instance_id)
        won, revision = self.client.put_if(
            key,
            self._instance_value(stored.record, healthy),
            mod_revision=stored.record.modify_index,
            lease=stored.lease,
        )
        return revision if won else None

    def deregister(self, service: str, instance_id: str, lease: int) -> int | None:
        """Remove the instance: revoke its lease, which deletes its key at once (so that no
        keepalive can renew an instance whose key is gone). The revision of the removal, or
        ``None`` if it was gone already."""
        if lease:
            revision = self.client.revoke(lease)
            if revision is not None:
                return revision
        revision, existed = self.client.delete_existing(self._k("instances", service, instance_id))
        return revision if existed else None

    # -- the Store interface (what the single-process registry writes through) ----------

    def load_instances(self) -> list[InstanceRecord]:
        return [s.record for s in self.stored_instances()]

    def put_instance(self, record: InstanceRecord) -> None:
        self.register(record, True)

    def delete_instance(self, service: str, instance_id: str, index: int) -> None:
        self.client.delete(self._k("instances", service, instance_id))

    def load_index(self) -> int:
        return self.revision

    def set_index(self, index: int) -> None:
        """Nothing to do: the etcd revision is the index."""

    def _put(self, key: str, value: dict[str, Any]) -> None:
        raw = json.dumps(value, sort_keys=True).encode()
        self._mirror_put(key, raw, self.client.put(key, raw))

    def _delete(self, key: str) -> None:
        self._mirror_delete(key, self.client.delete(key))

    def load_join_tokens(self) -> list[JoinTokenRecord]:
        return [
            JoinTokenRecord(d["token_id"], d["service"], d["secret_hash"], float(d["created_at"]))
            for d in (json.loads(kv.value) for kv in self._values("tokens"))
        ]

    def put_join_token(self, record: JoinTokenRecord) -> None:
        self._put(self._k("tokens", record.token_id), dataclasses.asdict(record))

    def delete_join_token(self, token_id: str) -> None:
        self._delete(self._k("tokens", token_id))

    def load_keys(self) -> list[KeyRecord]:
        records = []
        for kv in self._values("keys"):
            d = json.loads(kv.value)
            private = json.loads(self._key.unwrap(d["wrapped_jwk"], kv.key))
            records.append(
                KeyRecord(d["kid"], private, d["created_at"], d["activate_at"], d["retire_at"])
            )
        return records

    def put_key(self, record: KeyRecord) -> None:
        key = self._k("keys", record.kid)
        value = {
            "kid": record.kid,
            "wrapped_jwk": self._key.wrap(json.dumps(record.private_jwk), key),
            "created_at": record.created_at,
            "activate_at": record.activate_at,
            "retire_at": record.retire_at,
        }
        self._put(key, value)

    def delete_key(self, kid: str) -> None:
        self._delete(self._k("keys", kid))

    def load_ca_roots(self) -> list[CARootRecord]:
        records = []
        for kv in self._values("ca"):
            d = json.loads(kv.value)
            key_pem = self._key.unwrap(d["wrapped_key"], kv.key) if d["wrapped_key"] else ""
            records.append(
                CARootRecord(
                    d["root_id"],
                    d["certificate_pem"],
                    key_pem,
                    d["created_at"],
                    d["activate_at"],
                    d["retire_at"],
                    bool(d["supplied"]),
                )
            )
        return records

    def put_ca_root(self, record: CARootRecord) -> None:
        key = self._k("ca", record.root_id)
        value = dataclasses.asdict(record)
        del value["key_pem"]
        value["wrapped_key"] = self._key.wrap(record.key_pem, key) if record.key_pem else ""
        self._put(key, value)

    def shared_secret(self, name: str, proposed_hash: str) -> str:
        """The hash of the registry-wide secret ``name``: ``proposed_hash`` if this replica is
        the first to propose one, else the one already there."""
        key = self._k("secrets", name)
        deadline = time.monotonic() + 10
        while True:
            won, _ = self.client.put_if(key, proposed_hash.encode(), mod_revision=0)
            if won:
                return proposed_hash
            current = self.client.get(key)
            if current is not None:
                return current.value.decode()
            if time.monotonic() > deadline:
                raise EtcdError(f"cannot settle the shared {name} token")

    # -- telemetry -----------------------------------------------------------------------

    def share_report(self, report: dict[str, Any]) -> None:
        """Put an edge report this replica took where the other replicas merge it from."""
        value = json.dumps({"received_at": time.time(), "report": report}).encode()
        if len(value) > MAX_SHARED_REPORT_BYTES:
            log.warning("telemetry_report_not_shared", bytes=len(value))
            return
        with self._report_lock:  # reports come from several worker threads
            lease, granted = self._report_lease
            if not lease or time.monotonic() - granted >= TELEMETRY_LEASE_EVERY:
                lease = self.client.grant(RETENTION_SECONDS + TELEMETRY_LEASE_EVERY)
                self._report_lease = (lease, time.monotonic())
            self._reports_sent += 1
            key = self._k("telemetry", self.replica_id, str(self._reports_sent))
        self.client.put(key, value, lease=lease)

    def shared_report(self, kv: KeyValue) -> tuple[dict[str, Any], float] | None:
        """(report, seconds since its replica took it) for another replica's report, else
        ``None`` (this replica's own, which it merged already, or not a report)."""
        if kv.key.startswith(self._k("telemetry", self.replica_id) + "/") or not kv.value:
            return None
        try:
            data = json.loads(kv.value)
            return dict(data["report"]), max(0.0, time.time() - float(data["received_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    def take_initial_reports(self) -> list[KeyValue]:
        """The reports etcd held at start (once)."""
        reports, self._initial_reports = self._initial_reports, []
        return reports

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` says about the store."""
        return {
            "replica": self.replica_id,
            "leader": self.leads(),
            "etcd_endpoint": self.client.endpoint,
            "revision": self.revision,
        }

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._leader and self._session:
            with contextlib.suppress(EtcdError):
                self.client.revoke(self._session)  # hand leadership over at once
        for thread in self._threads:
            thread.join(timeout=1)  # daemons: a watch blocked on a quiet stream is left to end
        self.client.close()
