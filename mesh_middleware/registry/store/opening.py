"""Open the store a URL names: ``sqlite:///PATH`` (embedded) or ``etcd://HOSTS/PREFIX``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from mesh_middleware.registry.store.base import Store
from mesh_middleware.registry.store.sqlite import open_sqlite_store

__all__ = ["open_store"]


def open_store(url: str, *, store_key_file: Path | None = None) -> Store:
    """The store ``url`` names. An etcd store needs the operator's key that wraps private keys
    (``store_key_file``, else ``$MESH_STORE_KEY``)."""
    scheme = urlsplit(url).scheme
    if scheme in ("etcd", "etcds"):
        from mesh_middleware.registry.store.etcd import EtcdStore, load_store_key

        return EtcdStore(url, load_store_key(store_key_file))
    if scheme == "sqlite":
        return open_sqlite_store(url)
    raise ValueError(
        f"unsupported store {url!r}: expected sqlite:///PATH or etcd://HOST:PORT,.../PREFIX"
    )
