"""The JSON error answers of the shop's FastAPI apps: ``{"error": ..., "reason": ...}``, never
an HTML page or a traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["error", "install_json_errors"]


def error(status: int, name: str, reason: str) -> JSONResponse:
    """A JSON error answer."""
    return JSONResponse({"error": name, "reason": reason}, status_code=status)


def install_json_errors(app: FastAPI) -> None:
    """FastAPI's own errors (404, 405, 422, a crash) in the shop's ``{"error": ...}`` shape."""

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, "http_error", str(exc.detail))

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        reason = "; ".join(str(e.get("msg", e)) for e in exc.errors())
        return error(422, "invalid_request", reason)

    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return error(500, "internal_error", type(exc).__name__)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, crashed)
