"""The OpenAPI 3.1 description served at ``/openapi.json``, built from the request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mesh_middleware._version import __version__
from mesh_middleware.registry.models import (
    CertificateRequest,
    JoinTokenRequest,
    Registration,
    RootRotation,
    TokenRequest,
)
from mesh_middleware.registry.telemetry import TelemetryReport

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_SERVICE = {
    "name": "service",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"},
}
_INSTANCE = {
    "name": "instance_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        },
    }


def _answers(ok: int, *refusals: int, description: str = "OK") -> dict[str, Any]:
    out: dict[str, Any] = {
        str(ok): {
            "description": description,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
    for status in (*refusals, 503):
        out[str(status)] = {
            "description": "refused",
            "content": {"application/json": {"schema": _ERROR}},
        }
    return out


_WINDOW = {
    "name": "window",
    "in": "query",
    "schema": {"type": "string", "pattern": "^[0-9]{1,3}(s|m)$", "default": "60s"},
}

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def openapi_document() -> dict[str, Any]:
    """The API description; request bodies are the same models the handlers validate with."""
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "reason"],
            "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
        }
    }
    for model in (
        Registration,
        TokenRequest,
        CertificateRequest,
        RootRotation,
        JoinTokenRequest,
        TelemetryReport,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths: dict[str, Any] = {
        "/v1/catalog/services": {"get": {"summary": "List services", "responses": _answers(200)}},
        "/v1/catalog/services/{service}": {
            "get": {
                "summary": "List a service's instances, or watch them (index + wait)",
                "parameters": [
                    _SERVICE,
                    {
                        "name": "healthy",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                    {"name": "index", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {
                        "name": "wait",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,2}(ms|s)$"},
                    },
                ],
                "responses": _answers(200, 400),
            }
        },
        "/v1/catalog/services/{service}/instances/{instance_id}": {
            "put": {
                "summary": "Register or renew an instance (idempotent)",
                "parameters": [_SERVICE, _INSTANCE],
                "security": _BEARER,
                "requestBody": _body(Registration),
                "responses": _answers(200, 400, 401, 403, 413),
            },
            "delete": {
                "summary": "Deregister an instance",
                "parameters": [_SERVICE, _INSTANCE],
                "security": _BEARER,
                "responses": _answers(200, 400, 401, 403, 404),
            },
        },
        "/v1/identity/trust": {
            "get": {"summary": "Trust domain, issuer, JWKS location", "responses": _answers(200)}
        },
        "/v1/identity/jwks": {
            "get": {"summary": "Verification keys (JWKS)", "responses": _answers(200)}
        },
        "/v1/identity/token": {
            "post": {
                "summary": "Issue a JWT-SVID for the join token's service",
                "security": _BEARER,
                "requestBody": _body(TokenRequest),
                "responses": _answers(200, 400, 401, 413),
            }
        },
        "/v1/ca/certificates": {
            "post": {
                "summary": "Sign a CSR: a leaf certificate for the join token's service",
                "security": _BEARER,
                "requestBody": _body(CertificateRequest),
                "responses": _answers(200, 400, 401, 403, 413),
            }
        },
        "/v1/ca/bundle": {
            "get": {
                "summary": "The trust bundle: every trusted CA root and its state",
                "responses": _answers(200),
            }
        },
        "/v1/admin/join-tokens": {
            "post": {
                "summary": "Create a join token (shown once)",
                "security": _BEARER,
                "requestBody": _body(JoinTokenRequest),
                "responses": _answers(201, 400, 401, 413, description="Created"),
            },
            "get": {
                "summary": "List join tokens",
                "security": _BEARER,
                "responses": _answers(200, 401),
            },
        },
        "/v1/admin/join-tokens/{token_id}": {
            "delete": {
                "summary": "Revoke a join token",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "token_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": _answers(200, 401, 404),
            }
        },
        "/v1/admin/keys/rotate": {
            "post": {
                "summary": "Rotate the signing key",
                "security": _BEARER,
                "responses": _answers(200, 401),
            }
        },
        "/v1/admin/ca/rotate": {
            "post": {
                "summary": "Rotate the CA root (to a new one, or to the operator's)",
                "security": _BEARER,
                "requestBody": {**_body(RootRotation), "required": False},
                "responses": _answers(200, 400, 401, 413),
            }
        },
        "/v1/telemetry/reports": {
            "post": {
                "summary": "Report edge telemetry (one window of one process)",
                "security": _BEARER,
                "requestBody": _body(TelemetryReport),
                "responses": _answers(202, 400, 401, 403, 413, description="Accepted"),
            }
        },
        "/v1/telemetry/services": {
            "get": {
                "summary": "Golden metrics per service over a window",
                "parameters": [_WINDOW],
                "responses": _answers(200, 400),
            }
        },
        "/v1/telemetry/topology": {
            "get": {
                "summary": "Services and edges with their golden metrics over a window",
                "parameters": [_WINDOW],
                "responses": _answers(200, 400),
            }
        },
        "/v1/telemetry/denials": {
            "get": {
                "summary": "Requests the services refused, newest first, with the rule that "
                "decided (admin or viewer token)",
                "security": _BEARER,
                "parameters": [_WINDOW],
                "responses": _answers(200, 400, 401),
            }
        },
        "/healthz": {
            "get": {"summary": "Liveness, dev mode, store, index", "responses": _answers(200)}
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mesh-middleware registry", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
