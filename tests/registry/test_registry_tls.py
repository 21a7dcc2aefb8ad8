"""A registry served over HTTPS: apps reach it when told which CA signed it (MESH_REGISTRY_CA),
and refuse it otherwise."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_middleware import Mesh
from mesh_middleware.policy.compiled import compile_policy_text
from mesh_middleware.runtime.registry_client import RegistryClient, RegistryUnavailable
from tests.registry.support import start_registry


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_server_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(tz=datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test registry CA"))
        .issuer_name(_name("test registry CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("registry"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_apps_use_an_https_registry_with_the_ca_they_are_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, certificate, key = write_server_certificate(tmp_path)
    extra = ["--tls-cert", str(certificate), "--tls-key", str(key)]
    monkeypatch.setenv("MESH_REGISTRY_CA", str(ca))
    with start_registry(tmp_path / "data", dev=True, extra=extra, scheme="https") as registry:
        assert registry.url.startswith("https://")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{registry.url}/healthz", timeout=5.0)  # the system does not trust it
        policy = compile_policy_text("service: orders\noutbound:\n  services:\n    inventory: {}\n")
        with Mesh(policy, registry_url=registry.url, watch=False) as mesh:
            assert mesh.registry_connected
            assert mesh.identity_token("inventory") is not None
            assert mesh.client_tls() is not None  # a certificate from the CA, over HTTPS
        monkeypatch.delenv("MESH_REGISTRY_CA")
        with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            RegistryClient(registry.url).trust()
