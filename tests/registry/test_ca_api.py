"""The CA over HTTP: who may get a certificate for what, the bundle, rotation, health, metrics."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mesh_middleware.identity.x509 import (
    build_csr,
    certificate_spiffe_ids,
    generate_key,
    load_certificate,
)
from tests.registry.support import Registry, bearer, create_join_token, start_registry


def csr() -> str:
    return build_csr(generate_key(), "spiffe://mesh.local/svc/whatever")


def test_a_join_token_gets_a_certificate_for_its_own_service_only(
    registry: Registry, client: httpx.Client
) -> None:
    token = create_join_token(client, registry, "inventory")
    answer = client.post(
        f"{registry.url}/v1/ca/certificates", json={"csr": csr()}, headers=bearer(token)
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    leaf = load_certificate(body["certificate"])
    assert certificate_spiffe_ids(leaf) == ["spiffe://mesh.local/svc/inventory"]
    assert body["spiffe_id"] == "spiffe://mesh.local/svc/inventory"
    assert body["expires_at"] - body["not_before"] == pytest.approx(24 * 3600 + 60)
    roots = [load_certificate(pem) for pem in body["bundle"]]
    leaf.verify_directly_issued_by(next(r for r in roots if r.subject == leaf.issuer))
    other = client.post(
        f"{registry.url}/v1/ca/certificates",
        json={"csr": csr(), "service": "payments"},
        headers=bearer(token),
    )
    assert other.status_code == 403
    assert other.json()["error"] == "forbidden"


def test_no_credential_no_certificate(registry: Registry, client: httpx.Client) -> None:
    for headers, body in [
        ({}, {"csr": csr()}),
        ({}, {"csr": csr(), "service": "inventory"}),
        (bearer("mjt_nope.nope"), {"csr": csr()}),
    ]:
        answer = client.post(f"{registry.url}/v1/ca/certificates", json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"] == "unauthenticated"


def test_a_bad_csr_is_a_400_with_the_reason(registry: Registry, client: httpx.Client) -> None:
    token = create_join_token(client, registry, "inventory")
    for body, reason in [
        ({"csr": "hello"}, "not a PEM certificate signing request"),
        ({}, "csr"),
        ({"csr": csr(), "extra": 1}, "extra"),
    ]:
        answer = client.post(f"{registry.url}/v1/ca/certificates", json=body, headers=bearer(token))
        assert answer.status_code == 400, answer.text
        assert reason in answer.json()["reason"]


def test_dev_mode_signs_for_the_service_named(dev_registry: Registry, client: httpx.Client) -> None:
    answer = client.post(
        f"{dev_registry.url}/v1/ca/certificates", json={"csr": csr(), "service": "orders"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["spiffe_id"] == "spiffe://mesh.local/svc/orders"


def test_rotation_over_the_api_and_what_health_and_metrics_say(
    registry: Registry, client: httpx.Client
) -> None:
    before = client.get(f"{registry.url}/v1/ca/bundle").json()
    assert len(before["bundle"]) == 1
    assert before["roots"][0]["state"] == "signing"
    refused = client.post(f"{registry.url}/v1/admin/ca/rotate", json={})
    assert refused.status_code == 401
    rotated = client.post(
        f"{registry.url}/v1/admin/ca/rotate",
        json={"activate_after": "1h"},
        headers=registry.admin(),
    )
    assert rotated.status_code == 200, rotated.text
    after = client.get(f"{registry.url}/v1/ca/bundle").json()
    assert after["index"] > before["index"]
    assert [r["state"] for r in after["roots"]] == ["signing", "pending"]
    assert after["roots"][1]["id"] == rotated.json()["root"]
    health = client.get(f"{registry.url}/healthz").json()
    assert health["ca"]["signing_root"] == before["roots"][0]["id"]
    assert [r["state"] for r in health["ca"]["roots"]] == ["signing", "pending"]
    assert health["ca"]["warnings"] == []
    metrics = client.get(f"{registry.url}/metrics").text
    assert "mesh_registry_ca_root_expiry_timestamp_seconds" in metrics
    assert "mesh_registry_ca_warnings 0.0" in metrics


def test_an_operator_root_given_at_start_signs(tmp_path: Path, client: httpx.Client) -> None:
    from tests.registry.test_ca import operator_root

    certificate, key = operator_root(lifetime_days=400, age_days=380)
    (tmp_path / "ca.pem").write_text(certificate)
    (tmp_path / "ca.key").write_text(key)
    extra = ["--ca-cert", str(tmp_path / "ca.pem"), "--ca-key", str(tmp_path / "ca.key")]
    with start_registry(tmp_path / "data", dev=True, extra=extra) as registry:
        answer = client.post(
            f"{registry.url}/v1/ca/certificates", json={"csr": csr(), "service": "orders"}
        )
        assert answer.status_code == 200, answer.text
        leaf = load_certificate(answer.json()["certificate"])
        leaf.verify_directly_issued_by(load_certificate(certificate))
        health = client.get(f"{registry.url}/healthz").json()
        # 20 days left of an operator's root: said in /healthz, metrics and the log.
        assert health["warnings"] and "expires in 20 days" in health["warnings"][0]
        assert "mesh_registry_ca_warnings 1.0" in client.get(f"{registry.url}/metrics").text
    assert "ca_warning" in registry.stdout_path.read_text() + registry.stderr()
