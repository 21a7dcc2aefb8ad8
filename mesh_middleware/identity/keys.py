"""Verification keys: a JWKS from a file or URL, refreshed off the request path.

Only Ed25519 public keys are kept. A failed refresh keeps the last good keys (static
stability). An unknown ``kid`` may trigger a refetch, at most once per
``min_refetch_seconds``; concurrent callers share one fetch. Several sources (the same JWKS at
each registry replica) are tried in turn until one answers; that one is tried first next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import structlog
from joserfc.jwk import OKPKey

from mesh_middleware import defaults
from mesh_middleware.identity.registry_trust import registry_verify

__all__ = ["KeyStore", "KeyStoreBase", "parse_jwks"]

log = structlog.get_logger("mesh.identity")

K = TypeVar("K", bound=Any)


def _fingerprint(keys: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (kid, json.dumps(key.as_dict(private=False), sort_keys=True)) for kid, key in keys.items()
    }


def parse_jwks(document: Any) -> dict[str, OKPKey]:
    """Return the Ed25519 public keys of a JWKS document by ``kid``; raise ``ValueError``."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is an object with a 'keys' list")
    keys: dict[str, OKPKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or "d" in entry:
            continue  # private keys never belong in a JWKS; a key without kid cannot be picked
        public = {k: entry[k] for k in ("kty", "crv", "x", "kid") if k in entry}
        keys[kid] = OKPKey.import_key(public)
    return keys


class KeyStoreBase(Generic[K]):
    """Verification keys by key id, from sources tried in turn, refreshed off the request path.

    Subclasses say how a source becomes keys (:meth:`_load`).
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path] | None = None,
        *,
        keys: dict[str, K] | None = None,
        min_refetch_seconds: float = defaults.JWKS_MIN_REFETCH_SECONDS,
        fetch_timeout: float = defaults.JWKS_FETCH_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sources = _sources(source)
        self._keys: dict[str, K] = dict(keys or {})
        self._min_refetch = min_refetch_seconds
        self._timeout = fetch_timeout
        self._clock = clock
        self._fetch_lock = threading.Lock()  # one fetch at a time; never taken by a request
        self._state_lock = threading.Lock()  # guards the in-flight refetch, held briefly
        self._inflight: Future[bool] | None = None
        self._last_unknown_kid_fetch = float("-inf")
        self._file_stamp: tuple[int, int] | None = None
        self.generation = 0
        self.last_error: str | None = None
        self.listeners: list[Callable[[], None]] = []
        ref = weakref.ref(self)

        def finish_before_fork() -> None:
            # A fork in the middle of a fetch would copy whatever lock its thread held (in
            # httpx, ssl, an import) into the child, locked for good: let the fetch end first
            # (bounded by its own deadline).
            store = ref()
            future = store._inflight if store is not None else None
            if future is not None and store is not None:
                with contextlib.suppress(Exception):
                    future.result(timeout=store._timeout + 1.0)

        def reset_in_child() -> None:
            # A fetch still under way in the parent has no thread in the child: start afresh.
            store = ref()
            if store is not None:
                store._fetch_lock = threading.Lock()
                store._state_lock = threading.Lock()
                store._inflight = None

        os.register_at_fork(before=finish_before_fork, after_in_child=reset_in_child)

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source, in the order the next fetch tries them."""
        return self._sources

    @sources.setter
    def sources(self, sources: Sequence[str]) -> None:
        with self._state_lock:
            self._sources = _sources(sources)

    @property
    def source(self) -> str | None:
        """The source the next fetch tries first (``None`` without one)."""
        sources = self._sources
        return sources[0] if sources else None

    @source.setter
    def source(self, source: str | Path | None) -> None:
        self.sources = _sources(source)

    @property
    def is_url(self) -> bool:
        return self.source is not None and self.source.startswith(("http://", "https://"))

    def get(self, kid: str) -> K | None:
        """The key with this id, or ``None``."""
        return self._keys.get(kid)

    @property
    def fetching(self) -> bool:
        """Whether a fetch started by :meth:`refetch_for` or :meth:`fetch_in_background` runs."""
        return self._inflight is not None

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def all(self) -> list[K]:
        """Every key held now."""
        return list(self._keys.values())

    def replace(self, keys: dict[str, K]) -> None:
        """Install a new key set (and tell listeners, e.g. to drop cached verifications)."""
        changed = _fingerprint(keys) != _fingerprint(self._keys)
        self._keys = dict(keys)
        if changed:
            self.generation += 1
            for listener in self.listeners:
                listener()

    def refresh(self) -> bool:
        """Fetch the source now; return whether it succeeded. Keeps the old keys on failure."""
        if self.source is None:
            return False
        with self._fetch_lock:
            return self._fetch_locked()

    def refresh_if_changed(self) -> None:
        """Background check: reload a JWKS file when it changed on disk."""
        if self.source is None or self.is_url:
            return
        try:
            stat = Path(self.source).stat()
        except OSError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._file_stamp:
            with self._fetch_lock:
                self._fetch_locked()

    def refetch_for(self, kid: str) -> Future[bool] | None:
        """Start (or join) a refetch because a token named ``kid``; never blocks.

        Returns a future that completes when the fetch ends (``True`` if it succeeded), or
        ``None`` when there is no source or a refetch ran less than ``min_refetch_seconds``
        ago. Concurrent callers share one fetch, which runs in its own daemon thread.
        """
        with self._state_lock:
            if kid in self._keys:
                done: Future[bool] = Future()
                done.set_result(True)
                return done
            if self.source is None:
                return None
            if self._inflight is not None:
                return self._inflight
            now = self._clock()
            if now - self._last_unknown_kid_fetch < self._min_refetch:
                return None
            self._last_unknown_kid_fetch = now
            return self._start_fetch_locked()

    def fetch_in_background(self) -> Future[bool] | None:
        """Start (or join) a fetch in a daemon thread now; ``None`` without a source."""
        with self._state_lock:
            if self.source is None:
                return None
            if self._inflight is not None:
                return self._inflight
            return self._start_fetch_locked()

    def _start_fetch_locked(self) -> Future[bool]:
        future: Future[bool] = Future()
        self._inflight = future
        threading.Thread(
            target=self._run_refetch, args=(future,), name="mesh-jwks-refetch", daemon=True
        ).start()
        return future

    def _run_refetch(self, future: Future[bool]) -> None:
        ok = False
        try:
            with self._fetch_lock:
                ok = self._fetch_locked()
        finally:
            with self._state_lock:
                self._inflight = None
            future.set_result(ok)

    def refresh_for_unknown_kid(
        self, kid: str, timeout: float = defaults.UNKNOWN_KID_WAIT_SECONDS
    ) -> bool:
        """Blocking form of :meth:`refetch_for`: wait at most ``timeout``; is ``kid`` known now?"""
        future = self.refetch_for(kid)
        if future is not None:
            with contextlib.suppress(TimeoutError):
                future.result(timeout)
        return kid in self._keys

    def _fetch_locked(self) -> bool:
        sources = self._sources
        assert sources
        errors: list[str] = []
        for source in sources:
            try:
                keys = self._load(source)
            except Exception as exc:  # a bad source must never take verification down with it
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if errors:
                self._failed_over(sources, source, errors[0])
            self.last_error = None
            self.replace(keys)
            return True
        if len(sources) == 1:
            self.last_error = errors[0]
        else:
            self.last_error = "; ".join(f"{s}: {e}" for s, e in zip(sources, errors, strict=True))
        log.warning("jwks_fetch_failed", source=", ".join(sources), error=self.last_error)
        return False

    def _failed_over(self, sources: tuple[str, ...], source: str, error: str) -> None:
        """Start the next fetch at ``source``, unless the sources were replaced meanwhile."""
        at = sources.index(source)
        with self._state_lock:
            if self._sources is not sources:
                return
            self._sources = sources[at:] + sources[:at]
        log.warning("jwks_failover", **{"from": sources[0]}, to=source, error=error)

    def _load(self, source: str) -> dict[str, K]:
        """The keys ``source`` holds now; raises on any failure."""
        raise NotImplementedError

    def _read_file(self, source: str) -> Any:
        path = Path(source)
        stat = path.stat()
        with open(path, "rb") as handle:
            raw = handle.read(defaults.MAX_JWKS_BYTES + 1)
        if len(raw) > defaults.MAX_JWKS_BYTES:
            raise ValueError("JWKS file is too large")
        self._file_stamp = (stat.st_mtime_ns, stat.st_size)
        return json.loads(raw)

    def _verify(self) -> Any:
        """What httpx verifies the source's certificate with."""
        return True

    def _read_url(self, source: str) -> Any:
        # httpx's timeouts are per operation; a source that trickles bytes is cut off by an
        # overall deadline, and a document over the size cap is refused as it streams.
        deadline = time.monotonic() + self._timeout
        body = bytearray()
        with (
            httpx.Client(timeout=self._timeout, verify=self._verify()) as client,
            client.stream("GET", source, headers={"accept": "application/json"}) as r,
        ):
            r.raise_for_status()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > defaults.MAX_JWKS_BYTES:
                    raise ValueError("JWKS document is too large")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"JWKS fetch took longer than {self._timeout}s")
        return json.loads(bytes(body))


class KeyStore(KeyStoreBase[OKPKey]):
    """The verification keys of a trust domain, by key id.

    ``source`` is a JWKS file or URL, or a sequence of them holding the same key set (one per
    registry replica): a fetch tries them in order until one succeeds, and starts with that
    one the next time.
    """

    def _load(self, source: str) -> dict[str, OKPKey]:
        is_url = source.startswith(("http://", "https://"))
        return parse_jwks(self._read_url(source) if is_url else self._read_file(source))

    def _verify(self) -> Any:
        return registry_verify()


def _sources(source: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
    if source is None:
        return ()
    if isinstance(source, str | Path):
        return (str(source),)
    return tuple(str(each) for each in source)
