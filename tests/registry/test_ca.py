"""The mesh CA: leaves from CSRs, roots kept across restarts, rotation, operator roots, warnings."""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from mesh_middleware import defaults
from mesh_middleware.identity.x509 import (
    build_csr,
    certificate_spiffe_ids,
    generate_key,
    key_pem,
    load_certificate,
    peer_spiffe_id,
)
from mesh_middleware.registry.ca import CertificateAuthority, CSRError, load_supplied_root
from mesh_middleware.registry.store import SQLiteStore
from tests.registry.test_identity import WallClock

LEAF = 3600.0
ROOT = 365 * 86400.0
AFTER = 600.0


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


def authority(store: SQLiteStore, clock: WallClock, **options: object) -> CertificateAuthority:
    settings: dict[str, object] = {
        "trust_domain": "mesh.local",
        "leaf_lifetime": LEAF,
        "root_lifetime": ROOT,
        "activate_after": AFTER,
        "clock": clock,
        **options,
    }
    return CertificateAuthority(store, **settings)  # type: ignore[arg-type]


def csr_for(claimed: str = "spiffe://mesh.local/svc/someone-else") -> str:
    return build_csr(generate_key(), claimed)


def issuer_of(ca: CertificateAuthority, pem: str) -> x509.Certificate:
    leaf = load_certificate(pem)
    for root_pem in ca.bundle():
        root = load_certificate(root_pem)
        if root.subject == leaf.issuer:
            leaf.verify_directly_issued_by(root)
            return root
    raise AssertionError("no root in the bundle issued this leaf")


def operator_root(
    lifetime_days: int = 3650, *, ca: bool = True, age_days: int = 0
) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator root")])
    now = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(days=age_days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=lifetime_days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem(key).decode(),
    )


# -- leaves ------------------------------------------------------------------------------


def test_a_leaf_names_the_authenticated_service_not_what_the_csr_claims(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock)
    issued = ca.issue(csr_for("spiffe://mesh.local/svc/payments"), "inventory")
    leaf = load_certificate(issued.certificate_pem)
    assert certificate_spiffe_ids(leaf) == ["spiffe://mesh.local/svc/inventory"]
    assert issued.spiffe_id == "spiffe://mesh.local/svc/inventory"
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued.not_after == clock.now + LEAF
    assert leaf.not_valid_after_utc.timestamp() == clock.now + LEAF
    issuer_of(ca, issued.certificate_pem)  # chains to a root of the bundle


def test_every_leaf_has_its_own_serial(store: SQLiteStore, clock: WallClock) -> None:
    ca = authority(store, clock)
    serials = {ca.issue(csr_for(), "inventory").serial for _ in range(20)}
    assert len(serials) == 20


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        ("not a csr", "not a PEM certificate signing request"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "PEM"),
    ],
)
def test_garbage_is_not_signed(store: SQLiteStore, clock: WallClock, csr: str, reason: str) -> None:
    with pytest.raises(CSRError, match=reason):
        authority(store, clock).issue(csr, "inventory")


def test_weak_or_odd_keys_are_not_signed(store: SQLiteStore, clock: WallClock) -> None:
    ca = authority(store, clock)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    weak = builder.sign(small, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CSRError, match="at least 2048"):
        ca.issue(weak, "inventory")
    odd = builder.sign(ec.generate_private_key(ec.SECP521R1()), hashes.SHA256())
    with pytest.raises(CSRError, match="P-256 or P-384"):
        ca.issue(odd.public_bytes(serialization.Encoding.PEM).decode(), "inventory")


def test_a_csr_signed_by_another_key_is_refused(store: SQLiteStore, clock: WallClock) -> None:
    good = x509.load_pem_x509_csr(csr_for().encode())
    other = x509.load_pem_x509_csr(csr_for().encode())
    # Splice one request's signature onto the other's body: the signature no longer verifies.
    forged_der = good.tbs_certrequest_bytes
    tampered = other.public_bytes(serialization.Encoding.DER).replace(
        other.tbs_certrequest_bytes, forged_der
    )
    forged = x509.load_der_x509_csr(tampered)
    assert not forged.is_signature_valid
    with pytest.raises(CSRError, match="does not verify"):
        authority(store, clock).issue(
            forged.public_bytes(serialization.Encoding.PEM).decode(), "inventory"
        )


# -- roots -------------------------------------------------------------------------------


def test_the_root_survives_a_restart(tmp_path: Path, clock: WallClock) -> None:
    first = SQLiteStore(tmp_path / "r.db")
    ca = authority(first, clock)
    root = ca.signing_root_id()
    leaf = ca.issue(csr_for(), "orders").certificate_pem
    first.close()
    again = SQLiteStore(tmp_path / "r.db")
    try:
        reopened = authority(again, clock)
        assert reopened.signing_root_id() == root
        issuer_of(reopened, leaf)  # what was issued before the restart still chains
    finally:
        again.close()


def test_rotation_trusts_the_new_root_first_and_retires_the_old_one_last(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock)
    old = ca.signing_root_id()
    index = ca.index
    new = ca.rotate().root_id
    assert ca.index > index
    # Trusted at once, but not signing: instances have not all fetched it yet.
    assert len(ca.bundle()) == 2
    assert ca.signing_root_id() == old
    assert {r["id"]: r["state"] for r in ca.roots()} == {old: "signing", new: "pending"}
    assert issuer_of(ca, ca.issue(csr_for(), "orders").certificate_pem) is not None
    clock.advance(AFTER)
    assert ca.signing_root_id() == new
    assert {r["id"]: r["state"] for r in ca.roots()} == {old: "retiring", new: "signing"}
    leaf = ca.issue(csr_for(), "orders").certificate_pem
    assert load_certificate(leaf).issuer == load_certificate(ca.bundle()[1]).subject
    # The old root stays trusted while a leaf it signed before the switch may live.
    clock.advance(LEAF + defaults.CLOCK_LEEWAY_SECONDS - 1)
    ca.maintain()
    assert len(ca.bundle()) == 2
    clock.advance(1)
    ca.maintain()
    assert [r["id"] for r in ca.roots()] == [new]
    kept = {r.root_id: bool(r.key_pem) for r in store.load_ca_roots()}
    assert kept == {new: True, old: False}  # the old one remembered, its key destroyed


def test_a_created_root_rotates_itself_with_a_third_of_its_life_left(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock, root_lifetime=300 * 86400.0)
    clock.advance(199 * 86400.0)
    ca.maintain()
    assert len(ca.bundle()) == 1
    clock.advance(2 * 86400.0)
    ca.maintain()
    assert len(ca.bundle()) == 2
    ca.maintain()
    assert len(ca.bundle()) == 2  # once, not at every pass


def test_an_operator_root_signs_and_is_never_rotated_by_the_registry(
    store: SQLiteStore, clock: WallClock
) -> None:
    supplied = load_supplied_root(*operator_root(lifetime_days=30))
    ca = authority(store, clock, supplied=supplied)
    assert len(ca.bundle()) == 1
    assert ca.roots()[0]["supplied"] is True
    issuer_of(ca, ca.issue(csr_for(), "orders").certificate_pem)
    clock.advance(25 * 86400.0)
    ca.maintain()
    assert len(ca.bundle()) == 1
    assert any("expires in" in w for w in ca.warnings())


def test_a_new_operator_root_at_restart_is_a_rotation(tmp_path: Path, clock: WallClock) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    try:
        ca = authority(store, clock)
        created = ca.signing_root_id()
        ca = authority(store, clock, supplied=load_supplied_root(*operator_root()))
        assert ca.signing_root_id() == created  # not before instances trust the new one
        assert len(ca.bundle()) == 2
        clock.advance(AFTER)
        assert ca.signing_root_id() != created
    finally:
        store.close()


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: (operator_root(ca=False)[0], operator_root()[1]), "does not belong"),
        (lambda: operator_root(ca=False), "CA:FALSE"),
        (lambda: ("junk", operator_root()[1]), "not a PEM certificate"),
        (lambda: (operator_root()[0], "junk"), "not an unencrypted PEM private key"),
    ],
)
def test_an_unusable_operator_root_is_refused_with_the_reason(make: object, error: str) -> None:
    certificate, key = make()  # type: ignore[operator]
    with pytest.raises(ValueError, match=error):
        load_supplied_root(certificate, key)


def test_warnings_come_long_before_expiry(store: SQLiteStore, clock: WallClock) -> None:
    ca = authority(store, clock, root_lifetime=400 * 86400.0)
    assert ca.warnings() == []
    # 60 days before the end: long before, and still before its own rotation would be late.
    clock.advance(339 * 86400.0)
    assert ca.warnings() == []
    clock.advance(2 * 86400.0)
    assert ca.warnings() and "expires in 59 days" in ca.warnings()[0]


def test_leaves_are_cut_short_rather_than_outlive_their_root(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock, root_lifetime=2 * LEAF)
    clock.advance(1.5 * LEAF)
    issued = ca.issue(csr_for(), "orders")
    assert issued.not_after <= clock.now + 0.5 * LEAF + 60
    assert any("cut short" in w for w in ca.warnings())


# -- the SPIFFE ID of a TLS peer ---------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["URI", "DNS", "email", "IP Address"]),
            st.one_of(st.just("spiffe://mesh.local/svc/a"), st.text(max_size=30)),
        ),
        max_size=5,
    )
)
def test_the_peer_id_is_the_one_spiffe_uri_or_none(names: list[tuple[str, str]]) -> None:
    spiffe = [v for k, v in names if k == "URI" and v.startswith("spiffe://")]
    found = peer_spiffe_id({"subjectAltName": tuple(names)})
    assert found == (spiffe[0] if len(spiffe) == 1 else None)


def test_no_certificate_means_no_peer() -> None:
    assert peer_spiffe_id(None) is None
    assert peer_spiffe_id({}) is None


# -- what the review of the first version found ------------------------------------------


def test_a_root_superseded_before_its_turn_never_signs(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock)
    first = ca.signing_root_id()
    superseded = ca.rotate().root_id  # signs in 600 s...
    clock.advance(1)
    latest = ca.rotate(activate_after=100).root_id  # ...but another rotation comes first
    clock.advance(100)
    assert ca.signing_root_id() == latest
    clock.advance(AFTER)
    assert ca.signing_root_id() == latest  # not the older pending root, whose time came
    states = {r["id"]: r["state"] for r in ca.roots()}
    assert states[latest] == "signing"
    assert states[first] == states[superseded] == "retiring"


def test_a_new_root_may_not_sign_before_instances_can_know_it(
    store: SQLiteStore, clock: WallClock
) -> None:
    ca = authority(store, clock)
    with pytest.raises(ValueError, match="at least 70s"):
        ca.rotate(activate_after=30)
    with pytest.raises(ValueError, match="at least 70s"):
        authority(store, clock, activate_after=5)
    short = authority(store, clock, leaf_lifetime=4.0)
    assert short.rotate(activate_after=5).activate_at == clock.now + 5  # leaves renew faster


def test_a_retired_operator_root_is_never_trusted_again(tmp_path: Path, clock: WallClock) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    try:
        old = load_supplied_root(*operator_root())
        ca = authority(store, clock, supplied=old)
        ca.rotate()
        clock.advance(AFTER + LEAF + defaults.CLOCK_LEEWAY_SECONDS)
        ca.maintain()
        assert len(ca.bundle()) == 1
        retired = [r for r in store.load_ca_roots() if not r.key_pem]
        assert len(retired) == 1  # remembered, its key destroyed
        with pytest.raises(ValueError, match="rotated out and retired"):
            authority(store, clock, supplied=old)
    finally:
        store.close()


def test_an_intermediate_or_forged_root_is_refused() -> None:
    root_pem, root_key_pem = operator_root()
    root = load_certificate(root_pem)
    root_key = serialization.load_pem_private_key(root_key_pem.encode(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(tz=datetime.UTC)
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = intermediate.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(ValueError, match="self-signed root"):
        load_supplied_root(pem, key_pem(key).decode())


def test_leaves_name_an_operator_roots_own_key_identifier(
    store: SQLiteStore, clock: WallClock, tmp_path: Path
) -> None:
    """A root whose subject key identifier is not derived from its key (RFC 7093 allows other
    methods): leaves must carry that identifier, or OpenSSL finds no issuer."""
    import ssl

    from mesh_middleware.identity.tls import client_context, server_context

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd SKI root")])
    now = datetime.datetime.now(tz=datetime.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier(b"\x01" * 20), critical=False)
        .sign(key, hashes.SHA256())
    )
    supplied = (root.public_bytes(serialization.Encoding.PEM).decode(), key_pem(key).decode())
    ca = authority(store, clock, supplied=load_supplied_root(*supplied))
    paths = []
    for service in ("inventory", "orders"):
        leaf_key = generate_key()
        issued = ca.issue(build_csr(leaf_key, ""), service)
        path = tmp_path / f"{service}.pem"
        path.write_bytes(issued.certificate_pem.encode() + key_pem(leaf_key))
        paths.append(path)
    server = server_context("mesh.local", paths[0], paths[0], ca.bundle())
    client = client_context("mesh.local", paths[1], paths[1], ca.bundle())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    back_in, back_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(back_in, outgoing, server_hostname="inventory")
    server_side = server.wrap_bio(incoming, back_out, server_side=True)
    for _ in range(10):  # a handshake in memory: the chain must build from the AKI
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        incoming.write(outgoing.read())
        back_in.write(back_out.read())
    assert peer_spiffe_id(client_side.getpeercert()) == "spiffe://mesh.local/svc/inventory"
