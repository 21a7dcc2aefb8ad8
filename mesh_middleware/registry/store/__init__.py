"""Where the registry keeps what it acknowledged: an interface, an embedded SQLite
implementation, and a replicated one on etcd (``store.etcd``, imported when a URL names it)."""

from mesh_middleware.registry.store.base import (
    CARootRecord,
    InstanceRecord,
    JoinTokenRecord,
    KeyRecord,
    Store,
)
from mesh_middleware.registry.store.opening import open_store
from mesh_middleware.registry.store.sqlite import SQLiteStore

__all__ = [
    "CARootRecord",
    "InstanceRecord",
    "JoinTokenRecord",
    "KeyRecord",
    "SQLiteStore",
    "Store",
    "open_store",
]
