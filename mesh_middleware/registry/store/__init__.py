"""Where the registry keeps what it acknowledged: an interface and its SQLite implementation."""

from mesh_middleware.registry.store.base import (
    CARootRecord,
    InstanceRecord,
    JoinTokenRecord,
    KeyRecord,
    Store,
)
from mesh_middleware.registry.store.sqlite import SQLiteStore, open_store

__all__ = [
    "CARootRecord",
    "InstanceRecord",
    "JoinTokenRecord",
    "KeyRecord",
    "SQLiteStore",
    "Store",
    "open_store",
]
