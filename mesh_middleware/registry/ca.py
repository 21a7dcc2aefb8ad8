"""The mesh CA: roots (created or supplied), leaf certificates from CSRs, rotation, warnings.

Rotation never breaks running traffic. A new root joins the trust bundle at once but signs
only from ``activate_at`` (instances refetch the bundle every minute and with every renewal,
so by then every running instance trusts it); a replaced root stays in the bundle until the
last leaf it signed has expired. A root the registry created rotates itself once two thirds of
its life are gone; an operator's root only warns, long before it expires.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh_middleware import defaults
from mesh_middleware.identity.spiffe import service_id
from mesh_middleware.identity.x509 import generate_key, key_pem, load_certificate
from mesh_middleware.registry.store import CARootRecord, Store

__all__ = ["CSRError", "CertificateAuthority", "IssuedCertificate", "load_supplied_root"]

log = structlog.get_logger("mesh.registry")

_BACKDATE_SECONDS = 60  # a leaf is valid a minute before it is signed: small clock skews
_MIN_LEAF_SECONDS = 2
_MAX_WARNING_SECONDS = 60 * 86400.0  # warn 60 days before a root expires (as `linkerd check`)
_BUNDLE_PROPAGATION_SECONDS = 70.0  # instances refetch the bundle every 60 s (+10% jitter)


class CSRError(ValueError):
    """A certificate signing request the CA will not sign."""


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed leaf: its PEM, serial, SPIFFE ID and validity (unix times)."""

    certificate_pem: str
    serial: str
    spiffe_id: str
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class _Root:
    record: CARootRecord
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    not_before: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def _fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def load_supplied_root(certificate_pem: str, key_pem_text: str) -> tuple[str, str]:
    """Check an operator's CA certificate and key; return the certificate re-encoded and the
    key as given (PEM text).

    ``ValueError`` says what is wrong: not a self-signed CA, key and certificate do not match,
    an unsupported key type, or already expired.
    """
    try:
        certificate = load_certificate(certificate_pem)
    except ValueError:
        raise ValueError("the CA certificate is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem_text.encode("ascii"), password=None)
    except (ValueError, TypeError):
        raise ValueError("the CA key is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the CA key must be an EC or RSA key")
    public = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != mine:
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise ValueError("the CA certificate has no basicConstraints: it is not a CA") from None
    if not constraints.value.ca:
        raise ValueError("the CA certificate says CA:FALSE")
    if certificate.issuer != certificate.subject:
        raise ValueError(
            "the CA certificate must be a self-signed root (an intermediate would need its "
            "chain served with every leaf)"
        )
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError("the CA certificate's self-signature does not verify") from None
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("the CA certificate's key usage does not allow signing certificates")
    if certificate.not_valid_after_utc.timestamp() <= time.time():
        raise ValueError("the CA certificate has expired")
    text = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return text, key_pem_text


class CertificateAuthority:
    """The trust domain's CA: which root signs now, which roots are trusted."""

    def __init__(
        self,
        store: Store,
        *,
        trust_domain: str,
        leaf_lifetime: float,
        root_lifetime: float,
        activate_after: float,
        supplied: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self.trust_domain = trust_domain
        self.leaf_lifetime = leaf_lifetime
        self.root_lifetime = root_lifetime
        self.activate_after = activate_after
        if activate_after < self.min_activate_after:
            raise ValueError(_too_soon(self.min_activate_after))
        self._roots: dict[str, _Root] = {}
        self._retired: set[str] = set()  # kept (without their keys) so they never come back
        for record in store.load_ca_roots():
            if record.key_pem:
                self._roots[record.root_id] = _load(record)
            else:
                self._retired.add(record.root_id)
        self.index = 1  # moves whenever the bundle changes (within one registry process)
        supplied_id = _fingerprint(load_certificate(supplied[0])) if supplied else None
        if supplied_id in self._retired:
            raise ValueError(
                f"the CA certificate given (root {str(supplied_id)[:16]}) was rotated out and "
                "retired: it is never trusted again; remove --ca-cert/--ca-key or give a new root"
            )
        if supplied is not None and supplied_id not in self._roots:
            # A new operator root at restart is a rotation: trusted now, signing later.
            first = not self._roots
            added = self._add(supplied[0], supplied[1], supplied=True, activate_now=first)
            if not first:
                self._retire_others(added)
            log.info("ca_root_supplied", root=added.record.root_id[:16], signs_at_once=first)
        if not self._roots:
            # The first root signs at once: nobody trusts anything yet.
            self._add(*self._new_root(), supplied=False, activate_now=True)
            log.info("ca_root_created", root=self.signing_root_id())

    def reload(self) -> None:
        """Take the roots from the store again (another replica changed them)."""
        roots: dict[str, _Root] = {}
        retired: set[str] = set()
        for record in self._store.load_ca_roots():
            if not record.key_pem:
                retired.add(record.root_id)
                continue
            known = self._roots.get(record.root_id)
            roots[record.root_id] = known if known and known.record == record else _load(record)
        if {r: root.record for r, root in roots.items()} != {
            r: root.record for r, root in self._roots.items()
        }:
            self.index += 1
        self._roots, self._retired = roots, retired

    # -- roots ---------------------------------------------------------------------------

    def _new_root(self) -> tuple[str, str]:
        key = generate_key()
        now = datetime.datetime.fromtimestamp(self._clock(), tz=datetime.UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"mesh-middleware root CA {now:%Y-%m-%d %H:%M:%S}"
                ),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=_BACKDATE_SECONDS))
            .not_valid_after(now + datetime.timedelta(seconds=self.root_lifetime))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return pem, key_pem(key).decode("ascii")

    def _add(
        self, certificate_pem: str, key_text: str, *, supplied: bool, activate_now: bool
    ) -> _Root:
        now = self._clock()
        certificate = load_certificate(certificate_pem)
        record = CARootRecord(
            root_id=_fingerprint(certificate),
            certificate_pem=certificate_pem,
            key_pem=key_text,
            created_at=now,
            activate_at=now if activate_now else now + self.activate_after,
            retire_at=None,
            supplied=supplied,
        )
        self._store.put_ca_root(record)
        root = _load(record)
        self._roots[record.root_id] = root
        self.index += 1
        return root

    def _retire_others(self, newest: _Root) -> None:
        """Every root but ``newest`` retires once the leaves it can still sign have expired."""
        retire_at = newest.record.activate_at + self.leaf_lifetime + defaults.CLOCK_LEEWAY_SECONDS
        for root in list(self._roots.values()):
            record = root.record
            if record.root_id == newest.record.root_id or record.retire_at is not None:
                continue
            retired = CARootRecord(
                record.root_id,
                record.certificate_pem,
                record.key_pem,
                record.created_at,
                record.activate_at,
                retire_at,
                record.supplied,
            )
            self._store.put_ca_root(retired)
            self._roots[record.root_id] = _Root(
                retired, root.certificate, root.key, root.not_before, root.not_after
            )

    def rotate(
        self, *, supplied: tuple[str, str] | None = None, activate_after: float | None = None
    ) -> CARootRecord:
        """Add a new root (created, or the operator's): trusted now, signing after
        ``activate_after`` (default: the registry's); the others retire after it."""
        if activate_after is not None and activate_after < self.min_activate_after:
            raise ValueError(_too_soon(self.min_activate_after))
        if activate_after is not None:
            saved, self.activate_after = self.activate_after, activate_after
        try:
            if supplied is not None:
                if _fingerprint(load_certificate(supplied[0])) in self._roots:
                    raise ValueError("that CA certificate is already a root of this mesh")
                root = self._add(*supplied, supplied=True, activate_now=False)
            else:
                root = self._add(*self._new_root(), supplied=False, activate_now=False)
        finally:
            if activate_after is not None:
                self.activate_after = saved
        self._retire_others(root)
        log.info(
            "ca_root_rotated",
            root=root.record.root_id[:16],
            signs_from=root.record.activate_at,
            supplied=supplied is not None,
        )
        return root.record

    @property
    def min_activate_after(self) -> float:
        """The shortest delay before a new root may sign: every instance must have fetched
        the bundle holding it (each refetches it every minute, and with every renewal)."""
        return min(_BUNDLE_PROPAGATION_SECONDS, self.leaf_lifetime)

    def _signing(self) -> _Root:
        # The root added last among those whose signing began: a root superseded before its
        # turn (rotated again meanwhile) never signs.
        now = self._clock()
        active = [r for r in self._roots.values() if r.record.activate_at <= now]
        return max(active, key=lambda r: (r.record.created_at, r.record.activate_at))

    def signing_root_id(self) -> str:
        """The fingerprint (SHA-256, hex) of the root that signs now."""
        return self._signing().record.root_id

    def bundle(self) -> list[str]:
        """The PEM of every trusted root, oldest first."""
        now = self._clock()
        roots = sorted(self._roots.values(), key=lambda r: (r.record.activate_at, r.not_after))
        return [
            r.record.certificate_pem
            for r in roots
            if r.record.retire_at is None or r.record.retire_at > now
        ]

    def roots(self) -> list[dict[str, Any]]:
        """What ``/v1/ca/bundle`` and ``/healthz`` say about each trusted root."""
        now = self._clock()
        signing = self.signing_root_id()
        views = []
        for root in sorted(self._roots.values(), key=lambda r: (r.record.activate_at, r.not_after)):
            record = root.record
            if record.retire_at is not None and record.retire_at <= now:
                continue
            if record.root_id == signing:
                state = "signing"
            elif record.activate_at > now:
                state = "pending"
            else:
                state = "retiring"
            views.append(
                {
                    "id": record.root_id,
                    "state": state,
                    "supplied": record.supplied,
                    "not_before": root.not_before,
                    "not_after": root.not_after,
                    "signs_from": record.activate_at,
                    "retires_at": record.retire_at,
                    "certificate": record.certificate_pem,
                }
            )
        return views

    # -- leaves --------------------------------------------------------------------------

    def issue(self, csr_pem: str, service: str) -> IssuedCertificate:
        """Sign a leaf for ``service`` with the public key of ``csr_pem``.

        The CSR proves possession of the key; its names are ignored: the SAN is the SPIFFE ID
        of the service the caller authenticated as. ``CSRError`` if the CSR is unusable.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise CSRError("csr is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise CSRError("the CSR's signature does not verify")
        public = csr.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.name not in ("secp256r1", "secp384r1"):
                raise CSRError(f"EC keys must be P-256 or P-384, not {public.curve.name}")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise CSRError("RSA keys must have at least 2048 bits")
        else:
            raise CSRError("the key must be EC (P-256, P-384) or RSA")
        root = self._signing()
        now = self._clock()
        not_after = min(now + self.leaf_lifetime, root.not_after)
        if not_after - now < _MIN_LEAF_SECONDS:
            raise CSRError("the signing root has (almost) expired: rotate the CA")
        spiffe_id = service_id(service, self.trust_domain)
        serial = x509.random_serial_number()
        start = datetime.datetime.fromtimestamp(now - _BACKDATE_SECONDS, tz=datetime.UTC)
        end = datetime.datetime.fromtimestamp(not_after, tz=datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                        x509.NameAttribute(NameOID.COMMON_NAME, service),
                    ]
                )
            )
            .issuer_name(root.certificate.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                _authority_key_identifier(root.certificate),
                critical=False,
            )
            .sign(root.key, hashes.SHA256())
        )
        return IssuedCertificate(
            certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            format(serial, "x"),
            spiffe_id,
            start.timestamp(),
            not_after,
        )

    # -- upkeep --------------------------------------------------------------------------

    def maintain(self) -> None:
        """Forget retired roots; rotate a created root with a third of its life left."""
        now = self._clock()
        for root in list(self._roots.values()):
            if root.record.retire_at is not None and root.record.retire_at <= now:
                # The key is destroyed; the certificate is kept so that it is never re-added.
                self._store.put_ca_root(dataclasses.replace(root.record, key_pem=""))
                self._retired.add(root.record.root_id)
                del self._roots[root.record.root_id]
                self.index += 1
                log.info("ca_root_retired", root=root.record.root_id[:16])
        newest = max(self._roots.values(), key=lambda r: (r.record.activate_at, r.not_after))
        if not newest.record.supplied and now >= newest.not_after - newest.lifetime / 3:
            self.rotate()

    def warnings(self) -> list[str]:
        """What an operator must hear about: roots expiring soon, leaves cut short."""
        now = self._clock()
        found = []
        for view in self.roots():
            lifetime = view["not_after"] - view["not_before"]
            left = view["not_after"] - now
            if view["state"] == "retiring":
                continue  # on its way out: its leaves end before it does
            if left < min(_MAX_WARNING_SECONDS, lifetime / 4):
                found.append(
                    f"CA root {view['id'][:16]} ({view['state']}) expires in "
                    f"{_human(left)}: rotate it (mesh ca rotate)"
                )
        signing = self._signing()
        if signing.not_after - now < self.leaf_lifetime:
            found.append(
                f"the signing CA root expires in {_human(signing.not_after - now)}, sooner than a "
                "leaf certificate lives: new leaves are cut short"
            )
        return found


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # The issuer's own subject key identifier when it has one (an operator's root may not
    # derive it from the key as RFC 5280 suggests), so that chain building finds it.
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _too_soon(floor: float) -> str:
    return (
        f"activate_after must be at least {floor:g}s: every instance must fetch the new root "
        "before it signs (each refetches the trust bundle every minute)"
    )


def _load(record: CARootRecord) -> _Root:
    certificate = load_certificate(record.certificate_pem)
    key = serialization.load_pem_private_key(record.key_pem.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"CA root {record.root_id[:16]}: unsupported key type")
    return _Root(
        record,
        certificate,
        key,
        certificate.not_valid_before_utc.timestamp(),
        certificate.not_valid_after_utc.timestamp(),
    )


def _human(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 7200:
        return f"{seconds / 3600:.0f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"
