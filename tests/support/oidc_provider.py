"""A small OpenID Connect provider for tests, run as a real process on loopback.

It issues end-user JWTs through a real OAuth 2.0 ``client_credentials`` token endpoint and
publishes its keys through OIDC discovery and a JWKS, so tests can exercise end-user JWT
authentication (Istio ``RequestAuthentication``-like) against a real issuer.

Run it directly::

    python tests/support/oidc_provider.py --port 8765 [--issuer URL] [--algs RS256,ES256]

or, from a test, through the handle (the process is started and stopped for you)::

    from tests.support.oidc_provider import oidc_provider

    def test_something(tmp_path: Path) -> None:
        with oidc_provider(tmp_path) as idp:
            token = idp.token("alice", audience="orders", claims={"scope": "read"})
            ...

For one provider per test module, wrap it in a module-scoped fixture in that module::

    @pytest.fixture(scope="module")
    def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
        with oidc_provider(tmp_path_factory.mktemp("idp")) as provider:
            yield provider

Endpoints (``{issuer}`` defaults to ``http://127.0.0.1:PORT``):

``GET /.well-known/openid-configuration``
    The discovery document; ``jwks_uri`` is ``{issuer}/jwks``, ``token_endpoint`` is
    ``{issuer}/token``.
``GET /jwks``
    The public JWKS of every published key (``kid``, ``alg``, ``use: sig``; never private parts).
``POST /token``
    ``client_credentials`` grant, client ``mesh-tests`` / ``mesh-tests-secret`` by
    ``client_secret_basic`` or ``client_secret_post``. Test-only form fields: ``sub`` (required),
    ``claims`` (a JSON object merged over the payload last; it may override anything, and a
    ``null`` value removes that claim), ``audience`` (a string or a JSON list), ``lifetime``
    (seconds, default 300, may be negative for already-expired tokens), ``alg`` (one of the
    provider's algorithms; default the first) and ``kid`` (any key this process ever made,
    including ones rotated out or retired from the JWKS).
``POST /rotate``
    A new signing key per algorithm; the old ones stay published (grace) until ``POST /retire``,
    which unpublishes all but the newest per algorithm. Both answer
    ``{"kids": [published kids], "signing": {alg: kid}}``.
``POST /outage`` with ``{"on": true|false}``
    While on, discovery and JWKS answer 503 (tokens can still be minted).
``GET /stats``
    ``{"discovery": n, "jwks": n, "token": n}``: requests that reached each endpoint, whatever
    the answer (503s during an outage and refused token requests count too).
``GET /healthz``
    Readiness.

Keys are made at start-up and live in memory only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import secrets
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import httpx
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CLIENT_ID = "mesh-tests"
CLIENT_SECRET = "mesh-tests-secret"
DEFAULT_ALGS: tuple[str, ...] = ("RS256", "ES256")
DEFAULT_LIFETIME = 300
HTTP_TIMEOUT = 5.0

SigningKey = RSAKey | ECKey | OKPKey

#: Every algorithm the provider can sign with, and the key each one needs.
_KEY_SPECS: dict[str, tuple[str, str | int]] = {
    "RS256": ("RSA", 2048),
    "RS384": ("RSA", 2048),
    "RS512": ("RSA", 2048),
    "PS256": ("RSA", 2048),
    "PS384": ("RSA", 2048),
    "PS512": ("RSA", 2048),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    "Ed25519": ("OKP", "Ed25519"),
}
SUPPORTED_ALGS: tuple[str, ...] = tuple(_KEY_SPECS)

_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _generate_key(alg: str) -> SigningKey:
    kty, size = _KEY_SPECS[alg]
    key: SigningKey
    if kty == "RSA":
        key = RSAKey.generate_key(int(size), private=True)
    elif kty == "EC":
        key = ECKey.generate_key(str(size), private=True)
    else:
        key = OKPKey.generate_key("Ed25519", private=True)
    return key


@dataclass
class _Key:
    alg: str
    kid: str
    key: SigningKey

    def public_jwk(self) -> dict[str, Any]:
        jwk = {
            name: value
            for name, value in self.key.as_dict(private=False).items()
            if name not in _PRIVATE_MEMBERS
        }
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.description = description

    def response(self) -> JSONResponse:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        headers = {"cache-control": "no-store", "pragma": "no-cache"}
        if self.status == 401:
            headers["www-authenticate"] = f'Basic realm="{CLIENT_ID}"'
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Provider:
    """The provider's state: keys (every one ever made, and which are published), outage, counts."""

    def __init__(self, issuer: str, algs: Sequence[str]) -> None:
        self.issuer = issuer
        self.algs = list(algs)
        self.keys: dict[str, _Key] = {}  # every key ever made, by kid, oldest first
        self.published: list[str] = []  # kids in the JWKS, oldest first
        self.signing: dict[str, str] = {}  # alg -> kid signing from now on
        self.outage = False
        self.counts: Counter[str] = Counter({"discovery": 0, "jwks": 0, "token": 0})
        self.rotate()

    def rotate(self) -> None:
        for alg in self.algs:
            material = _generate_key(alg)
            key = _Key(alg=alg, kid=f"{alg.lower()}-{material.thumbprint()[:16]}", key=material)
            self.keys[key.kid] = key
            self.published.append(key.kid)
            self.signing[alg] = key.kid

    def retire(self) -> None:
        newest = set(self.signing.values())
        self.published = [kid for kid in self.published if kid in newest]

    def key_state(self) -> dict[str, Any]:
        return {"kids": list(self.published), "signing": dict(self.signing)}

    def discovery(self) -> dict[str, Any]:
        base = self.issuer.rstrip("/")
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{base}/jwks",
            "token_endpoint": f"{base}/token",
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": list(self.algs),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.keys[kid].public_jwk() for kid in self.published]}

    def mint(self, form: dict[str, str]) -> dict[str, Any]:
        sub = form.get("sub")
        if not sub:
            raise _OAuthError(400, "invalid_request", "sub is required")
        try:
            lifetime = int(form.get("lifetime", DEFAULT_LIFETIME))
        except ValueError:
            raise _OAuthError(400, "invalid_request", "lifetime must be an integer") from None
        overrides = _json_field(form, "claims", dict)
        key = self._signing_key(form.get("alg"), form.get("kid"))

        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.issuer, "sub": sub}
        audience = _audience(form.get("audience"))
        if audience is not None:
            payload["aud"] = audience
        payload.update(iat=now, exp=now + lifetime, jti=uuid.uuid4().hex)
        for name, value in (overrides or {}).items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value

        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        with warnings.catch_warnings():
            # joserfc flags "EdDSA" as deprecated by RFC 9864; the tests ask for it on purpose.
            warnings.simplefilter("ignore", SecurityWarning)
            token = jwt.encode(header, payload, key.key, algorithms=[key.alg])
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}

    def _signing_key(self, alg: str | None, kid: str | None) -> _Key:
        if kid:
            key = self.keys.get(kid)
            if key is None:
                raise _OAuthError(400, "invalid_request", f"unknown kid {kid!r}")
            if alg and alg != key.alg:
                raise _OAuthError(400, "invalid_request", f"kid {kid!r} is a {key.alg} key")
            return key
        alg = alg or self.algs[0]
        if alg not in self.signing:
            raise _OAuthError(400, "invalid_request", f"no {alg} key (have {self.algs})")
        return self.keys[self.signing[alg]]


def _json_field(form: dict[str, str], name: str, kind: type) -> Any:
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise _OAuthError(400, "invalid_request", f"{name} is not JSON") from None
    if not isinstance(value, kind):
        raise _OAuthError(400, "invalid_request", f"{name} must be a JSON {kind.__name__}")
    return value


def _audience(raw: str | None) -> str | list[str] | None:
    if raw is None or raw == "":
        return None
    if not raw.lstrip().startswith("["):
        return raw
    value = _json_field({"audience": raw}, "audience", list)
    if not all(isinstance(item, str) for item in value):
        raise _OAuthError(400, "invalid_request", "audience must be a list of strings")
    return list(value)


def _authenticate_client(request: Request, form: dict[str, str]) -> None:
    """``client_secret_basic`` (RFC 6749 §2.3.1, form-encoded parts) or ``client_secret_post``."""
    authorization = request.headers.get("authorization")
    in_body = "client_id" in form or "client_secret" in form
    if authorization is not None:
        if in_body:
            raise _OAuthError(400, "invalid_request", "use one client authentication method")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise _OAuthError(401, "invalid_client")
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _OAuthError(401, "invalid_client") from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise _OAuthError(401, "invalid_client")
        client_id, client_secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    else:
        client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
    ok_id = secrets.compare_digest(client_id.encode(), CLIENT_ID.encode())
    ok_secret = secrets.compare_digest(client_secret.encode(), CLIENT_SECRET.encode())
    if not (ok_id and ok_secret):
        raise _OAuthError(401, "invalid_client")


def create_app(issuer: str, algs: Sequence[str] = DEFAULT_ALGS) -> Starlette:
    """The provider as an ASGI app (its state lives in the app)."""
    unknown = [alg for alg in algs if alg not in _KEY_SPECS]
    if unknown or not algs or len(set(algs)) != len(algs):
        raise ValueError(f"algs must be distinct, non-empty, from {SUPPORTED_ALGS}: {list(algs)}")
    provider = _Provider(issuer, algs)
    unavailable = {"error": "temporarily_unavailable"}

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "issuer": provider.issuer})

    async def discovery(request: Request) -> Response:
        provider.counts["discovery"] += 1
        if provider.outage:
            return JSONResponse(unavailable, status_code=503)
        return JSONResponse(provider.discovery())

    async def jwks(request: Request) -> Response:
        provider.counts["jwks"] += 1
        if provider.outage:
            return JSONResponse(unavailable, status_code=503)
        return JSONResponse(provider.jwks(), media_type="application/jwk-set+json")

    async def token(request: Request) -> Response:
        provider.counts["token"] += 1
        try:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/x-www-form-urlencoded":
                raise _OAuthError(400, "invalid_request", "form-encoded body required")
            body = (await request.body()).decode("utf-8", errors="strict")
            form = dict(parse_qsl(body, keep_blank_values=True))
            _authenticate_client(request, form)
            grant_type = form.get("grant_type")
            if not grant_type:
                raise _OAuthError(400, "invalid_request", "grant_type is required")
            if grant_type != "client_credentials":
                raise _OAuthError(400, "unsupported_grant_type")
            answer = provider.mint(form)
        except UnicodeDecodeError:
            return _OAuthError(400, "invalid_request", "body is not UTF-8").response()
        except _OAuthError as error:
            return error.response()
        return JSONResponse(answer, headers={"cache-control": "no-store", "pragma": "no-cache"})

    async def rotate(request: Request) -> Response:
        provider.rotate()
        return JSONResponse(provider.key_state())

    async def retire(request: Request) -> Response:
        provider.retire()
        return JSONResponse(provider.key_state())

    async def outage(request: Request) -> Response:
        try:
            on = (await request.json())["on"]
        except (ValueError, KeyError, TypeError):
            on = None
        if not isinstance(on, bool):
            return JSONResponse({"error": 'send {"on": true|false}'}, status_code=400)
        provider.outage = on
        return JSONResponse({"outage": on})

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(provider.counts))

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/.well-known/openid-configuration", discovery),
            Route("/jwks", jwks),
            Route("/token", token, methods=["POST"]),
            Route("/rotate", rotate, methods=["POST"]),
            Route("/retire", retire, methods=["POST"]),
            Route("/outage", outage, methods=["POST"]),
            Route("/stats", stats),
        ]
    )


def _parse_algs(value: str) -> list[str]:
    algs = [alg.strip() for alg in value.split(",") if alg.strip()]
    unknown = [alg for alg in algs if alg not in _KEY_SPECS]
    if unknown or not algs or len(set(algs)) != len(algs):
        raise argparse.ArgumentTypeError(
            f"distinct algorithms from {', '.join(SUPPORTED_ALGS)} (got {value!r})"
        )
    return algs


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="A small OpenID Connect provider for tests.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer", help="issuer URL (default http://127.0.0.1:PORT)")
    parser.add_argument("--algs", type=_parse_algs, default=list(DEFAULT_ALGS))
    args = parser.parse_args(argv)
    issuer = args.issuer or f"http://127.0.0.1:{args.port}"
    app = create_app(issuer, args.algs)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------------------------
# The handle for tests
# --------------------------------------------------------------------------------------------


def oauth2_client(
    *,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    auth_method: str = "client_secret_basic",
) -> Any:
    """Authlib's httpx ``OAuth2Client`` for the provider's client (use it as a context manager).

    Authlib warns once, at import, when it falls back from ``httpx2`` to ``httpx``; the project
    depends on ``httpx``, so that one notice is expected and is kept out of warnings-as-errors
    runs. ``auth_method`` is ``client_secret_basic`` or ``client_secret_post``.
    """
    import authlib.deprecate  # installs Authlib's own "always" filter first; ours goes ahead

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The httpx module is deprecated",
            category=authlib.deprecate.AuthlibDeprecationWarning,
        )
        from authlib.integrations.httpx_client import OAuth2Client
    return OAuth2Client(
        client_id, client_secret, token_endpoint_auth_method=auth_method, timeout=HTTP_TIMEOUT
    )


@dataclass
class OidcProvider:
    """A running provider process; every call goes to it over loopback with a timeout."""

    issuer: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        """Where the process listens (may differ from :attr:`issuer` when that was overridden)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token"

    def token(
        self,
        sub: str,
        *,
        claims: dict[str, Any] | None = None,
        audience: str | list[str] | None = None,
        lifetime: int = DEFAULT_LIFETIME,
        alg: str | None = None,
        kid: str | None = None,
    ) -> str:
        """A signed access token for ``sub``, fetched with Authlib's OAuth 2.0 client."""
        extra: dict[str, str] = {"sub": sub, "lifetime": str(lifetime)}
        if claims is not None:
            extra["claims"] = json.dumps(claims)
        if audience is not None:
            extra["audience"] = audience if isinstance(audience, str) else json.dumps(audience)
        if alg is not None:
            extra["alg"] = alg
        if kid is not None:
            extra["kid"] = kid
        with oauth2_client() as client:
            answer = client.fetch_token(
                self.token_endpoint, grant_type="client_credentials", **extra
            )
        return str(answer["access_token"])

    def rotate(self) -> dict[str, Any]:
        return self._post("/rotate")

    def retire(self) -> dict[str, Any]:
        return self._post("/retire")

    def outage(self, on: bool) -> None:
        self._post("/outage", {"on": on})

    def stats(self) -> dict[str, int]:
        return {name: int(count) for name, count in self._get("/stats").items()}

    def jwks(self) -> dict[str, Any]:
        return self._get("/jwks")

    def discovery(self) -> dict[str, Any]:
        return self._get("/.well-known/openid-configuration")

    def _get(self, path: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{path}", timeout=HTTP_TIMEOUT)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(f"{self.url}{path}", json=body, timeout=HTTP_TIMEOUT)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer


@contextmanager
def oidc_provider(
    log_dir: Path, *, algs: Sequence[str] = DEFAULT_ALGS, issuer: str | None = None
) -> Iterator[OidcProvider]:
    """Run a provider process on a free loopback port (log in ``log_dir``); stop it after."""
    from tests.support.servers import free_port, running

    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--port", str(port)]
    argv += ["--algs", ",".join(algs)]
    if issuer is not None:
        argv += ["--issuer", issuer]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"oidc-provider-{port}.log"
    with running(argv, port=port, log_path=log_path) as process:
        yield OidcProvider(issuer=issuer or f"http://127.0.0.1:{port}", port=port, process=process)


if __name__ == "__main__":
    main()
