"""The keys of end-user issuers, kept by a Mesh across policy reloads and refreshed in the
background (never on a request): every 5 minutes, sooner after a failure, each fetch in a
thread of its own."""

from __future__ import annotations

import json
import os
import random
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import Future
from functools import partial

from mesh_middleware import defaults
from mesh_middleware.identity.oidc import IssuerKeys, parse_issuer_jwks
from mesh_middleware.policy.schema import EndUserIssuer

__all__ = ["EndUserKeyring"]


class EndUserKeyring:
    """The key sets of every issuer a Mesh's policies name, kept across policy reloads."""

    def __init__(self, *, fetch_timeout: float = defaults.JWKS_FETCH_TIMEOUT_SECONDS) -> None:
        self._stores: dict[tuple[str, str | None, str | None], IssuerKeys] = {}
        self._fetch_timeout = fetch_timeout
        self._due: dict[tuple[str, str | None, str | None], float] = {}
        self._failures: dict[tuple[str, str | None, str | None], int] = {}
        ref = weakref.ref(self)

        def due_in_child() -> None:
            # Fetches the parent had under way never end in a forked child: all due now.
            keyring = ref()
            if keyring is not None:
                keyring._due = dict.fromkeys(keyring._due, 0.0)

        os.register_at_fork(after_in_child=due_in_child)

    def keys_for(self, spec: EndUserIssuer) -> IssuerKeys:
        """The key set for ``spec``: the one held already, or a new one fetched at once."""
        key = _store_key(spec)
        store = self._stores.get(key)
        if store is None:
            if spec.jwks is not None:
                store = IssuerKeys(spec.issuer, keys=parse_issuer_jwks(spec.jwks))
            else:
                store = IssuerKeys(
                    spec.issuer, jwks_uri=spec.jwks_uri, fetch_timeout=self._fetch_timeout
                )
                future = store.fetch_in_background()
                self._due[key] = float("inf")
                if future is not None:
                    future.add_done_callback(partial(self._fetched, key))
            self._stores[key] = store
        return store

    def stores(self) -> list[IssuerKeys]:
        return list(self._stores.values())

    def retain(self, specs: Iterable[EndUserIssuer]) -> None:
        """Forget the key sets of issuers no policy in force names any more."""
        keep = {_store_key(spec) for spec in specs}
        for key in [k for k in self._stores if k not in keep]:
            del self._stores[key]
            self._due.pop(key, None)
            self._failures.pop(key, None)

    def tick(self, now: float | None = None) -> None:
        """Start refreshes of the key sets that are due, each in its own thread (never blocks).

        A failed refresh keeps the last good keys and is tried again soon, then less often
        (5 s doubling to 60 s); a good one is repeated every 5 minutes (jittered).
        """
        now = time.monotonic() if now is None else now
        for key, store in list(self._stores.items()):
            if store.source is None or now < self._due.get(key, 0.0):
                continue
            future = store.fetch_in_background()
            if future is None:
                continue
            self._due[key] = float("inf")  # until this fetch ends
            future.add_done_callback(partial(self._fetched, key))

    def _fetched(self, key: tuple[str, str | None, str | None], future: Future[bool]) -> None:
        now = time.monotonic()
        if not future.exception() and future.result():
            self._failures.pop(key, None)
            self._due[key] = now + defaults.JWKS_REFRESH_SECONDS * _jitter()
            return
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        self._due[key] = now + min(60.0, 5.0 * 2 ** (failures - 1)) * _jitter()


def _store_key(spec: EndUserIssuer) -> tuple[str, str | None, str | None]:
    inline = json.dumps(spec.jwks, sort_keys=True) if spec.jwks is not None else None
    return (spec.issuer, spec.jwks_uri, inline)


def _jitter() -> float:
    return random.uniform(0.9, 1.1)
