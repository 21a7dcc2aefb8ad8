"""What the command line needs besides registry calls (those go through RegistryClient): the
admin token, and the error it reports."""

from __future__ import annotations

import os
from pathlib import Path

from mesh_middleware.registry.settings import default_data_dir

__all__ = ["RegistryError", "admin_token"]


class RegistryError(Exception):
    """The registry could not be reached, or refused the call (with its reason)."""


def admin_token(given: str | None, data_dir: str | None = None) -> str:
    """The admin token: given, ``$MESH_ADMIN_TOKEN``, or the local registry's admin.token file
    (in ``data_dir``, else the default data directory)."""
    if given:
        return given
    from_env = os.environ.get("MESH_ADMIN_TOKEN")
    if from_env:
        return from_env
    path = (Path(data_dir) if data_dir else default_data_dir()) / "admin.token"
    try:
        return Path(path).read_text().strip()
    except OSError:
        raise RegistryError(
            f"no admin token: pass --admin-token, set MESH_ADMIN_TOKEN, or run where {path} is"
        ) from None
