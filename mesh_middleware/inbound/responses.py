"""The JSON bodies of every answer the inbound side gives instead of the app."""

from __future__ import annotations

import json
from http import HTTPStatus

__all__ = ["error_body", "status_line"]


def error_body(error: str, reason: str, **extra: str | None) -> bytes:
    """``{"error": ..., "reason": ..., ...}`` as compact UTF-8 JSON."""
    document: dict[str, str | None] = {"error": error, "reason": reason}
    document.update(extra)
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def status_line(status: int) -> str:
    """``"403 Forbidden"``, for WSGI's ``start_response``."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Status {status}"
