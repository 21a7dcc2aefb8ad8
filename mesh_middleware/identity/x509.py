"""X.509 pieces shared by the registry's CA and the instances: keys, CSRs, SPIFFE URI SANs.

Keys are ECDSA P-256, as Linkerd's and Istio's workload certificates can be: small, fast to
sign and to verify in a handshake, and understood by every TLS stack Python runs on.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "build_csr",
    "certificate_spiffe_ids",
    "generate_key",
    "key_pem",
    "load_certificate",
    "peer_spiffe_id",
]


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 private key (it never leaves the process that made it)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, for files only its owner can read."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> str:
    """A PEM certificate signing request for ``spiffe_id`` (the CA decides the SAN anyway)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """One PEM certificate; ``ValueError`` if it is not one."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def certificate_spiffe_ids(certificate: x509.Certificate) -> list[str]:
    """The ``spiffe://`` URI SANs of a certificate (a mesh leaf has exactly one)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return [uri for uri in uris if uri.startswith("spiffe://")]


def peer_spiffe_id(peer: dict[str, Any] | None) -> str | None:
    """The one SPIFFE ID in ``ssl``'s ``getpeercert()`` dict, or ``None`` (none, or several)."""
    if not peer:
        return None
    found = [
        value
        for kind, value in peer.get("subjectAltName", ())
        if kind == "URI" and value.startswith("spiffe://")
    ]
    return found[0] if len(found) == 1 else None
