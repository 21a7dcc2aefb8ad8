"""The registry's HTTP API against a real `mesh registry` process (docs/registry-api.md)."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.registry.support import (
    Registry,
    bearer,
    body,
    create_join_token,
    instance_ids,
    instance_path,
    register,
    start_registry,
    verify,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for the tests of this module that do not depend on a fresh state."""
    with start_registry(tmp_path_factory.mktemp("api") / "data") as running:
        yield running


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Assert a JSON refusal `{"error", "reason"}` with ``status``; return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert set(answer) == {"error", "reason"}
    assert answer["reason"]
    return dict(answer)


def _gauge(registry: Registry, client: httpx.Client, name: str) -> float:
    text = client.get(f"{registry.url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


# -- registration ------------------------------------------------------------------------------


def test_register_then_renew_is_idempotent(shared: Registry, client: httpx.Client) -> None:
    """The same PUT twice: both 200, one instance, and the renewal does not move the index."""
    token = create_join_token(client, shared, "idem")
    fields = {"version": "v1", "zone": "eu-1", "metadata": {"k": "v"}, "ttl": "15s"}
    first = register(client, shared, "idem", "i-1", token, **fields)
    assert first.status_code == 200, first.text
    instance = first.json()["instance"]
    assert instance["service"] == "idem"
    assert instance["id"] == "i-1"
    assert (instance["address"], instance["port"]) == ("127.0.0.1", 8001)
    assert (instance["version"], instance["zone"], instance["metadata"]) == (
        "v1",
        "eu-1",
        {"k": "v"},
    )
    assert instance["healthy"] is True
    assert instance["ttl"] == 15.0
    time.sleep(0.3)
    second = register(client, shared, "idem", "i-1", token, **fields)
    assert second.status_code == 200
    assert second.json()["index"] == first.json()["index"]
    assert second.json()["instance"]["expires_in"] > 14.8  # the lease started again
    listed = client.get(f"{shared.url}/v1/catalog/services/idem").json()
    assert [i["id"] for i in listed["instances"]] == ["i-1"]
    assert listed["index"] == first.json()["index"]


def test_changed_body_moves_the_index(shared: Registry, client: httpx.Client) -> None:
    """Re-registering with different data is a change: the index moves and the data is new."""
    token = create_join_token(client, shared, "changed")
    first = register(client, shared, "changed", "i-1", token, version="v1")
    second = register(client, shared, "changed", "i-1", token, version="v2")
    assert second.json()["index"] > first.json()["index"]
    listed = client.get(f"{shared.url}/v1/catalog/services/changed").json()
    assert [i["version"] for i in listed["instances"]] == ["v2"]
    assert listed["index"] == second.json()["index"]


def test_services_list_counts_instances(shared: Registry, client: httpx.Client) -> None:
    """`GET /v1/catalog/services` names each service with its instance and healthy counts."""
    token = create_join_token(client, shared, "counted")
    for n in range(3):
        assert register(client, shared, "counted", f"i-{n}", token).status_code == 200
    answer = client.get(f"{shared.url}/v1/catalog/services")
    assert answer.status_code == 200
    services = {s["name"]: s for s in answer.json()["services"]}
    assert services["counted"] == {"name": "counted", "instances": 3, "healthy": 3}
    assert answer.headers["x-mesh-index"] == str(answer.json()["index"])


def test_unknown_service_is_an_empty_list(shared: Registry, client: httpx.Client) -> None:
    """A service nobody registered answers 200 with no instances (so it can be watched)."""
    answer = client.get(f"{shared.url}/v1/catalog/services/nobody-here")
    assert answer.status_code == 200
    assert answer.json() == {"service": "nobody-here", "index": 0, "instances": []}
    assert answer.headers["x-mesh-index"] == "0"


@pytest.mark.parametrize(
    ("service", "instance_id"),
    [
        ("Orders", "i-1"),
        ("-orders", "i-1"),
        ("orders-", "i-1"),
        ("or_ders", "i-1"),
        ("o" * 64, "i-1"),
        ("orders", "bad%20id"),
        ("orders", "x" * 129),
        ("orders", "caf%C3%A9"),
    ],
)
def test_invalid_names_are_400(
    shared: Registry, client: httpx.Client, service: str, instance_id: str
) -> None:
    """Service names that are not DNS labels and bad instance ids are clear 400s."""
    answer = client.put(
        f"{shared.url}/v1/catalog/services/{service}/instances/{instance_id}",
        json=body(),
        headers=shared.admin(),
    )
    assert _error(answer, 400)["error"] == "bad_request"


def test_invalid_service_name_when_listing_is_400(shared: Registry, client: httpx.Client) -> None:
    """Listing the instances of an invalid service name is a 400, not an empty list."""
    _error(client.get(f"{shared.url}/v1/catalog/services/Not_A_Name"), 400)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b'{"address": "127.0.0.1", "port": 1', b"\xff\xfe{}", b"", b"[]", b'"x"'],
)
def test_malformed_json_is_400(shared: Registry, client: httpx.Client, raw: bytes) -> None:
    """A body that is not a JSON object is a 400 saying so."""
    answer = client.put(
        f"{shared.url}{instance_path('malformed', 'i-1')}",
        content=raw,
        headers={**shared.admin(), "content-type": "application/json"},
    )
    _error(answer, 400)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"ttl": "1s"}, "ttl"),
        ({"ttl": "11m"}, "ttl"),
        ({"ttl": "soon"}, "ttl"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": "8001"}, "port"),
        ({"address": "not an address!"}, "address"),
        ({"colour": "blue"}, "colour"),
        ({"metadata": {f"k{n}": "v" for n in range(65)}}, "metadata"),
        ({"check": {"http": "no-slash"}}, "check"),
        ({"check": {"http": "/h", "failures_before_unhealthy": 0}}, "check"),
    ],
)
def test_bad_values_are_400_naming_the_field(
    shared: Registry, client: httpx.Client, fields: dict[str, Any], named: str
) -> None:
    """A value out of range or of the wrong type is a 400 whose reason names the field."""
    answer = client.put(
        f"{shared.url}{instance_path('values', 'i-1')}",
        json=body(**fields),
        headers=shared.admin(),
    )
    assert named in _error(answer, 400)["reason"]


def test_missing_address_is_400(shared: Registry, client: httpx.Client) -> None:
    """A registration without address or port is a 400."""
    answer = client.put(
        f"{shared.url}{instance_path('values', 'i-1')}", json={"port": 1}, headers=shared.admin()
    )
    assert "address" in _error(answer, 400)["reason"]


def _padded(size: int) -> bytes:
    """A valid registration body of exactly ``size`` bytes (padded with spaces)."""
    raw = json.dumps(body()).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_body_of_64_kib_is_accepted(shared: Registry, client: httpx.Client) -> None:
    """A body of exactly 64 KiB is within the limit."""
    answer = client.put(
        f"{shared.url}{instance_path('sized', 'i-1')}",
        content=_padded(64 * 1024),
        headers={**shared.admin(), "content-type": "application/json"},
    )
    assert answer.status_code == 200, answer.text


def test_oversized_body_is_413(shared: Registry, client: httpx.Client) -> None:
    """A body over 64 KiB (with Content-Length) is a 413 JSON refusal."""
    answer = client.put(
        f"{shared.url}{instance_path('sized', 'i-2')}",
        content=_padded(64 * 1024 + 1),
        headers={**shared.admin(), "content-type": "application/json"},
    )
    assert _error(answer, 413)["error"] == "too_large"
    assert "i-2" not in instance_ids(client, shared, "sized")


def test_oversized_chunked_body_is_413(shared: Registry, client: httpx.Client) -> None:
    """A body over 64 KiB sent chunked (no Content-Length) is refused as it streams in."""
    raw = _padded(80 * 1024)
    chunks = iter([raw[i : i + 8192] for i in range(0, len(raw), 8192)])
    answer = client.put(
        f"{shared.url}{instance_path('sized', 'i-3')}",
        content=chunks,
        headers={**shared.admin(), "content-type": "application/json"},
    )
    _error(answer, 413)
    assert "i-3" not in instance_ids(client, shared, "sized")


def test_oversized_token_request_is_413(shared: Registry, client: httpx.Client) -> None:
    """The size limit holds on every body, also the token endpoint's and the admin ones."""
    raw = b'{"audience": "x"' + b" " * (70 * 1024) + b"}"
    for path in ("/v1/identity/token", "/v1/admin/join-tokens"):
        answer = client.post(
            f"{shared.url}{path}",
            content=raw,
            headers={**shared.admin(), "content-type": "application/json"},
        )
        _error(answer, 413)


# -- credentials -------------------------------------------------------------------------------


def test_registration_without_a_join_token_is_401(shared: Registry, client: httpx.Client) -> None:
    """Outside dev mode a registration needs a credential."""
    answer = register(client, shared, "guarded", "i-1", None)
    assert _error(answer, 401)["error"] == "unauthenticated"
    assert instance_ids(client, shared, "guarded") == set()


@pytest.mark.parametrize(
    "header",
    ["Bearer mjt_nope.secret", "Bearer nonsense", "Basic dXNlcjpwYXNz", "Bearer", "Token x"],
)
def test_unknown_or_malformed_credentials_are_401(
    shared: Registry, client: httpx.Client, header: str
) -> None:
    """An unknown join token or a header that is not a bearer token is a 401."""
    answer = client.put(
        f"{shared.url}{instance_path('guarded', 'i-1')}",
        json=body(),
        headers={"authorization": header},
    )
    _error(answer, 401)


def test_join_token_of_another_service_is_403(shared: Registry, client: httpx.Client) -> None:
    """A join token registers its own service only."""
    token = create_join_token(client, shared, "owner")
    answer = register(client, shared, "someone-else", "i-1", token)
    assert _error(answer, 403)["error"] == "forbidden"
    assert instance_ids(client, shared, "someone-else") == set()
    assert register(client, shared, "owner", "i-1", token).status_code == 200


def test_revoked_join_token_is_401(shared: Registry, client: httpx.Client) -> None:
    """Once revoked, a join token registers nothing and obtains no identity."""
    created = client.post(
        f"{shared.url}/v1/admin/join-tokens", json={"service": "revoked"}, headers=shared.admin()
    ).json()
    token = created["token"]
    assert register(client, shared, "revoked", "i-1", token).status_code == 200
    gone = client.delete(
        f"{shared.url}/v1/admin/join-tokens/{created['id']}", headers=shared.admin()
    )
    assert gone.status_code == 200
    _error(register(client, shared, "revoked", "i-2", token), 401)
    _error(
        client.post(
            f"{shared.url}/v1/identity/token", json={"audience": "x"}, headers=bearer(token)
        ),
        401,
    )
    again = client.delete(
        f"{shared.url}/v1/admin/join-tokens/{created['id']}", headers=shared.admin()
    )
    _error(again, 404)


ADMIN_CALLS = [
    ("POST", "/v1/admin/join-tokens", {"service": "adm"}),
    ("GET", "/v1/admin/join-tokens", None),
    ("DELETE", "/v1/admin/join-tokens/abc", None),
    ("POST", "/v1/admin/keys/rotate", None),
]


@pytest.mark.parametrize(("method", "path", "payload"), ADMIN_CALLS)
def test_admin_calls_need_the_admin_token(
    shared: Registry, client: httpx.Client, method: str, path: str, payload: Any
) -> None:
    """Every /v1/admin/* call is a 401 without the admin token, also with a join token."""
    join = create_join_token(client, shared, "adm")
    for headers in ({}, bearer(join), bearer("mat_wrong"), {"authorization": "Basic x"}):
        answer = client.request(method, f"{shared.url}{path}", json=payload, headers=headers)
        _error(answer, 401)


def test_admin_lists_join_tokens_without_their_secrets(
    shared: Registry, client: httpx.Client
) -> None:
    """The join token list shows ids, services and times, never a token or its hash."""
    token = create_join_token(client, shared, "listed")
    answer = client.get(f"{shared.url}/v1/admin/join-tokens", headers=shared.admin())
    assert answer.status_code == 200
    entries = answer.json()["join_tokens"]
    assert any(e["service"] == "listed" for e in entries)
    for entry in entries:
        assert set(entry) == {"id", "service", "created_at"}
    secret = token.partition(".")[2]
    assert secret not in answer.text


def test_create_join_token_answer(shared: Registry, client: httpx.Client) -> None:
    """Creating a join token answers 201 with the token (once), its id and service."""
    answer = client.post(
        f"{shared.url}/v1/admin/join-tokens", json={"service": "fresh"}, headers=shared.admin()
    )
    assert answer.status_code == 201
    created = answer.json()
    assert set(created) == {"token", "id", "service"}
    assert created["service"] == "fresh"
    assert created["token"].startswith("mjt_")
    _error(
        client.post(
            f"{shared.url}/v1/admin/join-tokens", json={"service": "Bad"}, headers=shared.admin()
        ),
        400,
    )


def test_deregistration(shared: Registry, client: httpx.Client) -> None:
    """Own join token or admin may deregister; another service's token may not; unknown is 404."""
    token = create_join_token(client, shared, "leaving")
    other = create_join_token(client, shared, "stranger")
    for n in range(2):
        assert register(client, shared, "leaving", f"i-{n}", token).status_code == 200
    url = f"{shared.url}{instance_path('leaving', 'i-0')}"
    _error(client.delete(url), 401)
    _error(client.delete(url, headers=bearer(other)), 403)
    before = client.get(f"{shared.url}/v1/catalog/services/leaving").json()["index"]
    done = client.delete(url, headers=bearer(token))
    assert done.status_code == 200
    assert done.json()["index"] > before
    assert instance_ids(client, shared, "leaving") == {"i-1"}
    _error(client.delete(url, headers=bearer(token)), 404)
    by_admin = client.delete(
        f"{shared.url}{instance_path('leaving', 'i-1')}", headers=shared.admin()
    )
    assert by_admin.status_code == 200
    assert instance_ids(client, shared, "leaving") == set()


# -- identity ----------------------------------------------------------------------------------


def test_token_endpoint_issues_a_verifiable_svid(shared: Registry, client: httpx.Client) -> None:
    """A join token gets JWT-SVIDs for its own service and the asked audience."""
    token = create_join_token(client, shared, "caller")
    answer = client.post(
        f"{shared.url}/v1/identity/token", json={"audience": "callee"}, headers=bearer(token)
    )
    assert answer.status_code == 200, answer.text
    issued = answer.json()
    assert (issued["service"], issued["audience"]) == ("caller", "callee")
    assert abs(issued["expires_at"] - (time.time() + 600)) < 5
    jwks = client.get(f"{shared.url}/v1/identity/jwks").json()
    caller = verify(issued["token"], jwks, "callee")
    assert caller.spiffe_id == "spiffe://mesh.local/svc/caller"
    assert abs(caller.expires_at - issued["expires_at"]) < 1


def test_token_is_for_the_join_tokens_service_only(shared: Registry, client: httpx.Client) -> None:
    """Naming another service in the body never yields a token for that service."""
    token = create_join_token(client, shared, "honest")
    answer = client.post(
        f"{shared.url}/v1/identity/token",
        json={"audience": "callee", "service": "victim"},
        headers=bearer(token),
    )
    if answer.status_code == 200:
        jwks = client.get(f"{shared.url}/v1/identity/jwks").json()
        assert verify(answer.json()["token"], jwks, "callee").service == "honest"
    else:
        _error(answer, 403)


def test_token_binds_the_callers_confirmation_key(shared: Registry, client: httpx.Client) -> None:
    """A public Ed25519 key in `cnf` is bound into the token (RFC 7800), public parts only."""
    from joserfc.jwk import OKPKey

    key = OKPKey.generate_key("Ed25519").as_dict(private=False)
    cnf = {"kty": "OKP", "crv": "Ed25519", "x": key["x"]}
    token = create_join_token(client, shared, "caller")
    answer = client.post(
        f"{shared.url}/v1/identity/token",
        json={"audience": "callee", "cnf": cnf},
        headers=bearer(token),
    )
    assert answer.status_code == 200, answer.text
    jwks = client.get(f"{shared.url}/v1/identity/jwks").json()
    assert verify(answer.json()["token"], jwks, "callee").confirmation == key["x"]


_PRIVATE = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


@pytest.mark.parametrize(
    ("payload", "headers", "status"),
    [
        ({"audience": "callee"}, {}, 401),
        (
            {
                "audience": "callee",
                "cnf": {**_PRIVATE, "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"},
            },
            None,
            400,
        ),
        (
            {"audience": "callee", "cnf": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}},
            None,
            400,
        ),
        ({"audience": "callee", "cnf": {"kty": "OKP", "crv": "Ed25519", "x": "!" * 43}}, None, 400),
        ({"audience": "callee", "cnf": "key"}, None, 400),
        ({"audience": "callee", "service": "caller"}, {}, 401),
        ({"audience": "Callee"}, None, 400),
        ({}, None, 400),
        ({"audience": "callee", "lifetime": 99999}, None, 400),
    ],
)
def test_token_endpoint_refusals(
    shared: Registry,
    client: httpx.Client,
    payload: dict[str, Any],
    headers: dict[str, str] | None,
    status: int,
) -> None:
    """No join token is a 401 (outside dev mode); an invalid audience or body is a 400."""
    if headers is None:
        headers = bearer(create_join_token(client, shared, "caller"))
    answer = client.post(f"{shared.url}/v1/identity/token", json=payload, headers=headers)
    _error(answer, status)


def test_trust_description(shared: Registry, client: httpx.Client) -> None:
    """`/v1/identity/trust` names the trust domain, the issuer, the JWKS and the lifetime."""
    assert client.get(f"{shared.url}/v1/identity/trust").json() == {
        "trust_domain": "mesh.local",
        "issuer": "spiffe://mesh.local",
        "jwks_uri": "/v1/identity/jwks",
        "token_lifetime": 600,
    }


def test_key_rotation_publishes_a_second_key_and_tokens_keep_verifying(
    registry: Registry, client: httpx.Client
) -> None:
    """After POST /v1/admin/keys/rotate the JWKS has two keys; old and new tokens verify."""
    token = create_join_token(client, registry, "rotating")
    url = f"{registry.url}/v1/identity/token"

    def mint() -> str:
        answer = client.post(url, json={"audience": "callee"}, headers=bearer(token))
        assert answer.status_code == 200
        return str(answer.json()["token"])

    before = mint()
    (old_key,) = client.get(f"{registry.url}/v1/identity/jwks").json()["keys"]
    _error(client.post(f"{registry.url}/v1/admin/keys/rotate"), 401)
    rotated = client.post(f"{registry.url}/v1/admin/keys/rotate", headers=registry.admin())
    assert rotated.status_code == 200
    assert rotated.json()["signs_from"] > time.time()  # published before it signs
    jwks = client.get(f"{registry.url}/v1/identity/jwks").json()
    assert {k["kid"] for k in jwks["keys"]} == {old_key["kid"], rotated.json()["kid"]}
    after = mint()
    for minted in (before, after):
        assert verify(minted, jwks, "callee").service == "rotating"


# -- operations --------------------------------------------------------------------------------


def test_healthz_outside_dev_mode(registry: Registry, client: httpx.Client) -> None:
    """`/healthz` says ok, not dev mode, which store, and the index; no DEV MODE banner."""
    health = client.get(f"{registry.url}/healthz").json()
    assert health["ok"] is True
    assert health["dev_mode"] is False
    assert "warning" not in health
    assert health["store"] == f"sqlite:///{registry.data_dir / 'registry.db'}"
    assert health["index"] == 0
    assert "DEV MODE" not in registry.stderr()


def test_first_start_prints_the_admin_token_once(registry: Registry) -> None:
    """At first start the admin token is printed on stderr and stored in DATA_DIR/admin.token."""
    assert registry.admin_token.startswith("mat_")
    assert registry.admin_token in registry.stderr()


def test_data_is_owner_only(registry: Registry, client: httpx.Client) -> None:
    """The data dir is 0700; admin.token and the database files are 0600."""
    token = create_join_token(client, registry, "perm")
    assert register(client, registry, "perm", "i-1", token).status_code == 200
    assert stat.S_IMODE(registry.data_dir.stat().st_mode) == 0o700
    files = sorted(registry.data_dir.iterdir())
    assert {f.name for f in files} >= {"admin.token", "registry.db"}
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_metrics_are_prometheus_text(shared: Registry, client: httpx.Client) -> None:
    """`/metrics` serves the registry's own Prometheus metrics."""
    answer = client.get(f"{shared.url}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    for name in ("mesh_registry_requests_total", "mesh_registry_watchers", "mesh_registry_index"):
        assert name in answer.text


def test_openapi_describes_the_api(shared: Registry, client: httpx.Client) -> None:
    """`/openapi.json` is an OpenAPI 3.1 document naming every route of the contract."""
    document = client.get(f"{shared.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) >= {
        "/v1/catalog/services",
        "/v1/catalog/services/{service}",
        "/v1/catalog/services/{service}/instances/{instance_id}",
        "/v1/identity/trust",
        "/v1/identity/jwks",
        "/v1/identity/token",
        "/v1/admin/join-tokens",
        "/v1/admin/join-tokens/{token_id}",
        "/v1/admin/keys/rotate",
        "/healthz",
    }


# -- dev mode ----------------------------------------------------------------------------------


def test_dev_mode_says_so_loudly(dev_registry: Registry, client: httpx.Client) -> None:
    """`--dev` prints a DEV MODE banner on stderr and /healthz says dev_mode with a warning."""
    assert "DEV MODE" in dev_registry.stderr()
    health = client.get(f"{dev_registry.url}/healthz").json()
    assert health["dev_mode"] is True
    assert "DEV MODE" in health["warning"]


def test_dev_mode_registers_and_issues_without_a_join_token(
    dev_registry: Registry, client: httpx.Client
) -> None:
    """In dev mode any service registers and gets tokens with no credential at all."""
    answer = register(client, dev_registry, "demo", "i-1", None)
    assert answer.status_code == 200, answer.text
    assert instance_ids(client, dev_registry, "demo") == {"i-1"}
    issued = client.post(
        f"{dev_registry.url}/v1/identity/token", json={"audience": "other", "service": "demo"}
    )
    assert issued.status_code == 200, issued.text
    jwks = client.get(f"{dev_registry.url}/v1/identity/jwks").json()
    assert verify(issued.json()["token"], jwks, "other").service == "demo"


def test_dev_mode_still_needs_the_admin_token_for_admin_calls(
    dev_registry: Registry, client: httpx.Client
) -> None:
    """Dev mode opens registration and tokens, not administration."""
    _error(client.post(f"{dev_registry.url}/v1/admin/join-tokens", json={"service": "x"}), 401)
    _error(client.post(f"{dev_registry.url}/v1/admin/keys/rotate"), 401)


# -- leases ------------------------------------------------------------------------------------


def test_unrenewed_lease_expires_within_ttl_plus_one_second(
    registry: Registry, client: httpx.Client
) -> None:
    """With ttl 5s: a renewed instance stays; one that stops renewing is gone within 6 s."""
    token = create_join_token(client, registry, "leased")
    assert register(client, registry, "leased", "kept", token, ttl="5s").status_code == 200
    assert register(client, registry, "leased", "dropped", token, ttl="5s").status_code == 200
    acknowledged = time.monotonic()
    gone_after = None
    while time.monotonic() - acknowledged < 7.0:
        assert register(client, registry, "leased", "kept", token, ttl="5s").status_code == 200
        ids = instance_ids(client, registry, "leased")
        elapsed = time.monotonic() - acknowledged
        assert "kept" in ids
        if "dropped" not in ids:
            gone_after = elapsed
            break
        time.sleep(0.1)
    assert gone_after is not None, "the unrenewed instance never expired"
    assert 4.5 <= gone_after <= 6.0
    assert instance_ids(client, registry, "leased") == {"kept"}


# -- watches -----------------------------------------------------------------------------------


def _watch_in_thread(url: str, params: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def watch() -> None:
        with httpx.Client(timeout=20.0) as watcher:
            answer = watcher.get(url, params=params)
        result["at"] = time.monotonic()
        result["answer"] = answer

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, result


def test_registration_wakes_a_blocked_watch_within_100ms(
    shared: Registry, client: httpx.Client
) -> None:
    """A watch at the current index blocks; a registration answers it within 100 ms."""
    token = create_join_token(client, shared, "watched")
    url = f"{shared.url}/v1/catalog/services/watched"
    index = client.get(url).json()["index"]
    waiting = _gauge(shared, client, "mesh_registry_watchers")
    thread, result = _watch_in_thread(url, {"index": index, "wait": "10s"})
    wait_until(lambda: _gauge(shared, client, "mesh_registry_watchers") > waiting, 5.0)
    time.sleep(0.2)
    assert thread.is_alive(), "the watch answered without a change"
    sent = time.monotonic()
    assert register(client, shared, "watched", "i-1", token).status_code == 200
    thread.join(5.0)
    latency = result["at"] - sent
    assert latency < 0.1, f"the watch woke {latency * 1000:.0f} ms after the registration"
    answer = result["answer"]
    assert answer.status_code == 200
    assert answer.json()["index"] > index
    assert [i["id"] for i in answer.json()["instances"]] == ["i-1"]
    assert answer.headers["x-mesh-index"] == str(answer.json()["index"])


def test_renewal_does_not_wake_a_watch(shared: Registry, client: httpx.Client) -> None:
    """A renewal that changes nothing leaves watches waiting until their wait ends."""
    token = create_join_token(client, shared, "quiet")
    index = register(client, shared, "quiet", "i-1", token).json()["index"]
    url = f"{shared.url}/v1/catalog/services/quiet"
    started = time.monotonic()
    thread, result = _watch_in_thread(url, {"index": index, "wait": "1s"})
    for _ in range(5):
        time.sleep(0.1)
        assert register(client, shared, "quiet", "i-1", token).status_code == 200
    thread.join(5.0)
    assert result["at"] - started >= 1.0
    assert result["answer"].json()["index"] == index


def test_idle_watch_loop_makes_at_most_one_request_per_wait(
    shared: Registry, client: httpx.Client
) -> None:
    """A client re-issuing the watch with the returned index makes ≤ 1 request per wait."""
    token = create_join_token(client, shared, "idle")
    index = register(client, shared, "idle", "i-1", token).json()["index"]
    url = f"{shared.url}/v1/catalog/services/idle"
    start = time.monotonic()
    requests = 0
    while time.monotonic() - start < 3.5:
        sent = time.monotonic()
        answer = client.get(url, params={"index": index, "wait": "1s"})
        took = time.monotonic() - sent
        requests += 1
        assert answer.status_code == 200
        assert answer.json()["index"] == index
        assert 1.0 <= took <= 1.0 + 1.0 / 16 + 0.15, f"an idle watch took {took:.3f}s"
        index = answer.json()["index"]
    assert requests <= 4


def test_index_ahead_of_the_registry_answers_at_once(
    shared: Registry, client: httpx.Client
) -> None:
    """An index greater than the registry's (it went backwards) answers at once with its own."""
    token = create_join_token(client, shared, "reset")
    index = register(client, shared, "reset", "i-1", token).json()["index"]
    sent = time.monotonic()
    answer = client.get(
        f"{shared.url}/v1/catalog/services/reset", params={"index": 10**12, "wait": "10s"}
    )
    assert time.monotonic() - sent < 0.5
    assert answer.json()["index"] == index


def test_wait_is_capped_and_parsed(shared: Registry, client: httpx.Client) -> None:
    """`wait` takes durations like 250ms; a watch behind the index answers at once."""
    token = create_join_token(client, shared, "capped")
    index = register(client, shared, "capped", "i-1", token).json()["index"]
    url = f"{shared.url}/v1/catalog/services/capped"
    sent = time.monotonic()
    answer = client.get(url, params={"index": index, "wait": "250ms"})
    assert 0.25 <= time.monotonic() - sent < 0.6
    sent = time.monotonic()
    answer = client.get(url, params={"index": index - 1, "wait": "5m"})
    assert time.monotonic() - sent < 0.5
    assert answer.json()["index"] == index


@pytest.mark.parametrize(
    "params",
    [
        {"index": "-1"},
        {"index": "abc"},
        {"index": "1.5"},
        {"index": "²"},
        {"index": "1", "wait": "soon"},
        {"index": "1", "wait": "-5s"},
        {"healthy": "maybe"},
    ],
)
def test_bad_watch_parameters_are_400(
    shared: Registry, client: httpx.Client, params: dict[str, str]
) -> None:
    """A malformed index, wait or healthy flag is a 400, never a server error."""
    answer = client.get(f"{shared.url}/v1/catalog/services/params", params=params)
    _error(answer, 400)


def test_unknown_path_and_wrong_method_are_not_server_errors(
    shared: Registry, client: httpx.Client
) -> None:
    """Paths and methods outside the API are 4xx."""
    assert client.get(f"{shared.url}/v1/nothing").status_code == 404
    assert client.post(f"{shared.url}/v1/catalog/services").status_code == 405
