"""This instance's certificate from the mesh CA: obtained when needed, renewed at half life.

The certificate and its key live in one file (``identity.pem``, owner-only, in a private
directory), the trust bundle in another (``bundle.pem``); both are replaced atomically. A
:class:`CertificateManager` asks the registry's CA for them. :class:`TLSContexts` turns the
files into the client and server contexts the adapters and ``mesh run`` use, and swaps in new
ones when the files change: in the same process when it renewed them, or in gunicorn's workers
and under ``mesh run`` when the launcher did.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from mesh_middleware.identity.spiffe import parse_service_id, service_id
from mesh_middleware.identity.tls import SwappableContext, client_context, server_context
from mesh_middleware.identity.x509 import (
    build_csr,
    certificate_spiffe_ids,
    generate_key,
    key_pem,
    load_certificate,
)
from mesh_middleware.runtime.registry_client import (
    RegistryClient,
    RegistryRefused,
    RegistryUnavailable,
)
from mesh_middleware.telemetry import metrics

__all__ = ["CertificateManager", "TLSContexts", "TLSFiles", "private_directory"]

log = structlog.get_logger("mesh.runtime")

BUNDLE_REFRESH_SECONDS = 60.0
_MIN_RETRY_SECONDS = 0.5
_MAX_RETRY_SECONDS = 30.0


_PREFIX = "mesh-tls-"


def private_directory() -> Path:
    """A new owner-only directory, in memory (``/dev/shm``) where the system has one.

    Its name carries this process's pid; directories left by processes that died without
    cleaning up (``kill -9``) are removed on the way, so keys do not pile up.
    """
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    _sweep(base)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))


def _sweep(base: Path) -> None:
    with contextlib.suppress(OSError):
        for path in base.glob(f"{_PREFIX}*-*"):
            pid = path.name[len(_PREFIX) :].partition("-")[0]
            if pid.isdigit() and not _alive(int(pid)) and path.stat().st_uid == os.getuid():
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


class TLSFiles:
    """``identity.pem`` (certificate, then key) and ``bundle.pem`` in one directory."""

    IDENTITY = "identity.pem"
    BUNDLE = "bundle.pem"

    def __init__(self, directory: Path | None) -> None:
        """``directory=None``: a private one, made at the first write (and removed at exit)."""
        self._directory = directory
        self._owner = os.getpid()

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = private_directory()
            self._owner = os.getpid()  # perhaps a worker forked since this object was made
            atexit.register(self.remove)
        return self._directory

    @property
    def identity(self) -> Path:
        return self.directory / self.IDENTITY

    @property
    def bundle(self) -> Path:
        return self.directory / self.BUNDLE

    def write(self, certificate_pem: str, key: bytes, bundle: tuple[str, ...]) -> None:
        """Replace both files (bundle first: a new leaf may need a new root)."""
        self.write_bundle(bundle)
        self._replace(self.identity, certificate_pem.encode("ascii") + key)

    def write_bundle(self, bundle: tuple[str, ...]) -> None:
        self._replace(self.bundle, "".join(bundle).encode("ascii"))

    def _replace(self, path: Path, data: bytes) -> None:
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".new-")
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp: 0600
                handle.write(data)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def stamp(self) -> tuple[int, int] | None:
        """When both files last changed (``None`` while either is missing)."""
        if self._directory is None:
            return None
        try:
            return self.identity.stat().st_mtime_ns, self.bundle.stat().st_mtime_ns
        except OSError:
            return None

    def read_bundle(self) -> list[str]:
        """The trust bundle's certificates, one PEM string each."""
        text = self.bundle.read_text()
        marker = "-----END CERTIFICATE-----"
        return [
            part.strip() + "\n" + marker + "\n" for part in text.split(marker) if "BEGIN" in part
        ]

    def remove(self) -> None:
        """Delete the directory, if this process made these files: forked workers share them
        (and run their parent's exit handlers too), and only the maker removes the key."""
        if self._directory is not None and os.getpid() == self._owner:
            shutil.rmtree(self._directory, ignore_errors=True)


class TLSContexts:
    """The client and server contexts of this process, current with the files."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self.client = SwappableContext(ssl.PROTOCOL_TLS_CLIENT)
        self.server = SwappableContext(ssl.PROTOCOL_TLS_SERVER)
        self.expires_at: float | None = None
        self.spiffe_id: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """Whether a certificate is loaded (it may have expired, if renewals keep failing)."""
        return self.client.ready

    def reload_if_changed(self) -> bool:
        """Load the files if they changed since last time; ``True`` if new contexts are in use.

        A file that cannot be loaded leaves the contexts in use as they were (and is logged).
        """
        stamp = self.files.stamp()
        if stamp is None or stamp == self._stamp:
            return False
        with self._lock:
            if stamp == self._stamp:
                return False
            try:
                bundle = self.files.read_bundle()
                certificate = load_certificate(self.files.identity.read_bytes())
                ids = certificate_spiffe_ids(certificate)
                parsed = parse_service_id(ids[0]) if len(ids) == 1 else None
                if parsed is None:
                    raise ValueError(f"the certificate names no one mesh service: {ids}")
                # The trust domain is the one the CA wrote into this instance's certificate:
                # right even when the Mesh has not heard from the registry yet.
                domain, service = parsed
                client = client_context(domain, self.files.identity, self.files.identity, bundle)
                server = server_context(domain, self.files.identity, self.files.identity, bundle)
            except (OSError, ValueError, ssl.SSLError) as exc:
                # Half-written by another process, or removed: the contexts in use stay.
                log.warning(
                    "tls_files_unusable", directory=str(self.files.directory), error=str(exc)
                )
                return False
            self._stamp = stamp
            self.client.swap(client)
            self.server.swap(server)
            self.expires_at = certificate.not_valid_after_utc.timestamp()
            self.spiffe_id = ids[0]
            metrics.CERTIFICATE_EXPIRY.labels(service).set(self.expires_at)
        return True


class CertificateManager:
    """Gets this service's certificate from the registry's CA and renews it (thread-safe).

    Nothing happens until something wants a certificate (:meth:`want`): ``mesh run`` at
    start, or a client about to call a service that serves mutual TLS. From then on each
    :meth:`tick` (the Mesh's background thread) renews it at half its life, with jitter, and
    refetches the trust bundle every minute. Failures retry with backoff; the certificate in
    use stays in use meanwhile, and warnings say how long it has left.
    """

    def __init__(
        self,
        client: RegistryClient,
        service: Callable[[], str],
        trust_domain: Callable[[], str],
        files: TLSFiles | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.client = client
        self._service = service
        self._trust_domain = trust_domain
        self.files = files or TLSFiles(None)
        self.contexts = TLSContexts(self.files)
        self._clock = clock
        self._uniform = uniform
        self.wanted = False
        self._renew_at = float("-inf")
        self._bundle_at = float("-inf")
        self._retry = _MIN_RETRY_SECONDS
        self._failing_since: float | None = None
        self._lock = threading.Lock()

    def want(self) -> None:
        """From now on, hold a certificate and keep it fresh."""
        self.wanted = True

    def obtain(self, timeout: float | None = None) -> bool:
        """Get a certificate now if none is held (joining a fetch under way, waiting at most
        about ``timeout``); ``True`` once one is held.

        After a failure, callers do not ask again before the backoff says so: the background
        thread does.
        """
        self.wanted = True
        if self.contexts.ready:
            return True
        if self._failing_since is not None and self._clock() < self._renew_at:
            return False
        wait = -1 if timeout is None else timeout
        if not self._lock.acquire(timeout=wait):
            return self.contexts.ready
        try:
            if self.contexts.ready:
                return True  # another caller just got one
            return self._renew(timeout)
        finally:
            self._lock.release()

    def tick(self) -> None:
        """Renew and refetch what is due (background thread)."""
        if not self.wanted:
            return
        now = self._clock()
        if now >= self._renew_at:
            with self._lock:
                if self._clock() >= self._renew_at:
                    self._renew(None)
        elif now >= self._bundle_at:
            self._refresh_bundle()

    def _renew(self, timeout: float | None) -> bool:
        service = self._service()
        key = generate_key()
        csr = build_csr(key, service_id(service, self._trust_domain()))
        try:
            issued = self.client.certificate(service, csr, timeout=timeout)
            self.files.write(issued.certificate, key_pem(key), issued.bundle)
        except (RegistryUnavailable, RegistryRefused, OSError) as exc:
            self._failed(service, exc)
            return False
        self.contexts.reload_if_changed()
        now = self._clock()
        lifetime = max(issued.lifetime, 1.0)
        # Half its life from issue, jittered so that a fleet started together spreads out.
        self._renew_at = now + lifetime * 0.5 * self._uniform(0.9, 1.0)
        self._bundle_at = now + BUNDLE_REFRESH_SECONDS * self._uniform(0.9, 1.1)
        self._retry = _MIN_RETRY_SECONDS
        metrics.CERTIFICATE_RENEWALS.labels(service, "ok").inc()
        if self._failing_since is not None:
            log.info("certificate_renewed_after_failures", service=service, serial=issued.serial)
            self._failing_since = None
        else:
            log.info(
                "certificate_issued",
                service=service,
                serial=issued.serial,
                expires_in=round(lifetime, 1),
            )
        return True

    def _failed(self, service: str, exc: Exception) -> None:
        now = self._clock()
        result = (
            "refused"
            if isinstance(exc, RegistryRefused)
            else "unavailable"
            if isinstance(exc, RegistryUnavailable)
            else "unwritable"
        )
        metrics.CERTIFICATE_RENEWALS.labels(service, result).inc()
        expires_at = self.contexts.expires_at
        left = expires_at - time.time() if expires_at is not None else None
        first = self._failing_since is None
        if first:
            self._failing_since = now
        # Retry soon: well before the certificate in use runs out.
        cap = _MAX_RETRY_SECONDS if left is None else max(min(_MAX_RETRY_SECONDS, left / 8), 0.5)
        self._renew_at = now + min(self._retry, cap) * self._uniform(0.5, 1.0)
        self._retry = min(self._retry * 2, _MAX_RETRY_SECONDS)
        if first or (left is not None and left <= 0):
            emit = log.error if left is None or left <= 0 else log.warning
            emit(
                "certificate_renewal_failed",
                service=service,
                error=str(exc),
                expires_in=None if left is None else round(left, 1),
                effect=(
                    "no mesh certificate yet: mutual-TLS calls fail until one is issued"
                    if left is None
                    else "expired: mutual-TLS peers refuse this instance until it renews"
                    if left <= 0
                    else "the current certificate stays in use; retrying"
                ),
            )

    def _refresh_bundle(self) -> None:
        now = self._clock()
        self._bundle_at = now + BUNDLE_REFRESH_SECONDS * self._uniform(0.9, 1.1)
        try:
            _, bundle = self.client.ca_bundle()
            # Compared by content: a registry's index starts again after a restart.
            if tuple(self.files.read_bundle()) != bundle:
                self.files.write_bundle(bundle)
                self.contexts.reload_if_changed()
                log.info("trust_bundle_updated", roots=len(bundle))
        except (RegistryUnavailable, RegistryRefused, OSError):
            return  # the bundle in use stays; the next refresh or renewal tries again

    def close(self) -> None:
        """Delete the files, if this process made them (a forked worker leaves them)."""
        self.files.remove()
