"""Small synchronous calls to a registry, for the command line (never used on a request path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from mesh_middleware.registry.settings import default_data_dir
from mesh_middleware.runtime.registry_client import registry_verify

__all__ = ["RegistryError", "admin_token", "create_join_token", "get_json"]

_TIMEOUT = 5.0


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


def _call(method: str, url: str, path: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(
            method, url.rstrip("/") + path, timeout=_TIMEOUT, verify=registry_verify(), **kwargs
        )
    except httpx.HTTPError as exc:
        raise RegistryError(f"cannot reach the registry at {url}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        reason = body.get("reason") if isinstance(body, dict) else None
        raise RegistryError(f"{response.status_code}: {reason or response.text[:200]}")
    return body


def get_json(url: str, path: str) -> Any:
    return _call("GET", url, path)


def create_join_token(url: str, admin: str, service: str) -> str:
    body = _call(
        "POST",
        url,
        "/v1/admin/join-tokens",
        json={"service": service},
        headers={"authorization": f"Bearer {admin}"},
    )
    return str(body["token"])


def rotate_ca(
    url: str,
    admin: str,
    *,
    certificate: str | None = None,
    key: str | None = None,
    activate_after: str | None = None,
) -> dict[str, Any]:
    """Rotate the CA root (to the operator's when ``certificate`` and ``key`` are given)."""
    body: dict[str, str] = {}
    if certificate is not None and key is not None:
        body.update(certificate=certificate, key=key)
    if activate_after is not None:
        body["activate_after"] = activate_after
    answer = _call(
        "POST",
        url,
        "/v1/admin/ca/rotate",
        json=body,
        headers={"authorization": f"Bearer {admin}"},
    )
    return dict(answer)
