"""``mesh run``: serve an app over the mesh's mutual TLS, with certificates from the registry.

The launcher reads the app's policy (``MESH_POLICY``): its service name, and ``inbound.mtls``.

- ``strict``: one listener, TLS only, requiring a client certificate from the mesh CA.
- ``permissive``: the same, plus plaintext on ``--plain-port`` for callers not on mTLS yet.
- ``off``: plaintext on ``--port``, no certificate (as running the server by hand).

Before the server starts, the launcher gets the instance's certificate from the registry's CA
(``MESH_REGISTRY_URL``, ``MESH_JOIN_TOKEN``), then renews it at half life in a thread of its
own. It writes the certificate, key and trust bundle into a private directory
(``MESH_TLS_DIR``), which the app's Mesh reads for its own outbound calls; new connections get
the new certificate at once, open ones are not touched. The instance registers the TLS port with
``mtls`` (and ``plain_port``) metadata, so that callers know to use TLS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any

from mesh_middleware.errors import PolicyError
from mesh_middleware.policy.compiled import compile_policy_file
from mesh_middleware.runtime.certificates import CertificateManager, TLSFiles, private_directory
from mesh_middleware.runtime.registry_client import RegistryClient, RegistryError

if TYPE_CHECKING:
    from mesh_middleware.serving.uvicorn_tls import LinkedServer

__all__ = ["RunOptions", "run"]

_TICK_SECONDS = 0.5
_WILDCARDS = {"0.0.0.0", "::", ""}


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What ``mesh run`` was asked to do."""

    app: str  # "module:attribute"
    server: str = "uvicorn"  # uvicorn | gunicorn
    host: str = "127.0.0.1"
    port: int = 8000
    plain_port: int | None = None
    workers: int = 1
    policy: str | None = None
    cert_wait: float = 30.0
    timeout_keep_alive: int = 5  # seconds an idle connection is kept (uvicorn's default)
    app_dir: str = "."  # put first on sys.path, as uvicorn's and gunicorn's commands do


def _say(message: str) -> None:
    print(f"mesh run: {message}", file=sys.stderr, flush=True)


def run(options: RunOptions) -> int:
    """Serve until a signal; return the exit status (2: bad setup, 1: no certificate)."""
    sys.path.insert(0, os.path.abspath(options.app_dir))
    policy_file = options.policy or os.environ.get("MESH_POLICY")
    if not policy_file:
        _say("set MESH_POLICY (or --policy) to the app's policy file")
        return 2
    os.environ["MESH_POLICY"] = policy_file
    try:
        policy = compile_policy_file(policy_file)
    except PolicyError as exc:
        _say(str(exc))
        return 2
    mode = policy.mtls
    if mode == "off":
        if options.plain_port is not None:
            _say("--plain-port is for mtls: strict or permissive; this policy says mtls: off")
            return 2
        return _serve(options, None, mode)
    registry = os.environ.get("MESH_REGISTRY_URL")
    if not registry:
        _say(f"mtls: {mode} needs certificates from a registry: set MESH_REGISTRY_URL")
        return 2
    try:
        client = RegistryClient(registry, os.environ.get("MESH_JOIN_TOKEN") or None)
    except ValueError as exc:
        _say(f"MESH_REGISTRY_URL: {exc}")
        return 2
    manager = _certificate(client, policy.service, options.cert_wait)
    if manager is None:
        return 1
    os.environ["MESH_TLS_DIR"] = str(manager.files.directory)
    os.environ["MESH_MTLS_SERVING"] = mode
    if options.plain_port is not None:
        os.environ["MESH_PLAIN_PORT"] = str(options.plain_port)
    os.environ.setdefault("MESH_ADVERTISE", f"{_advertised_host(options.host)}:{options.port}")
    renewer = _Renewer(manager)
    try:
        return _serve(options, manager, mode)
    finally:
        renewer.stop()
        manager.close()
        client.close()


def _certificate(client: RegistryClient, service: str, wait: float) -> CertificateManager | None:
    """The first certificate, asked for until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    delay = 0.25
    domain: str | None = None
    error = "no answer"
    manager: CertificateManager | None = None
    while True:
        try:
            if domain is None:
                domain = client.trust().trust_domain
                manager = CertificateManager(
                    client,
                    partial(str, service),
                    partial(str, domain),
                    TLSFiles(private_directory()),
                )
            assert manager is not None
            if manager.obtain(timeout=min(5.0, max(deadline - time.monotonic(), 0.5))):
                _say(f"certificate for spiffe://{domain}/svc/{service} from {client.base_url}")
                return manager
            error = "the CA did not sign (see the log above)"
        except RegistryError as exc:
            error = str(exc)
        if time.monotonic() + delay > deadline:
            _say(f"no certificate from {', '.join(client.base_urls)} within {wait:g}s: {error}")
            if manager is not None:
                manager.close()
            return None
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


class _Renewer:
    """The launcher's thread that keeps the certificate fresh.

    gunicorn forks its workers from this process: a fork waits for a renewal under way to
    finish (bounded), so that no worker inherits a lock held at that moment (a log file's,
    say). Workers do not renew; they reload what this thread writes.
    """

    def __init__(self, manager: CertificateManager) -> None:
        self._manager = manager
        self._stop = threading.Event()
        self._ticking = threading.Lock()
        self._held = False
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork,
            after_in_child=self._in_child,
        )
        self._thread = threading.Thread(target=self._run, name="mesh-run-certificates", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_TICK_SECONDS):
            with self._ticking:
                try:
                    self._manager.tick()
                except Exception as exc:  # the thread must outlive any one failure
                    _say(f"certificate renewal failed unexpectedly: {exc!r}")

    def _before_fork(self) -> None:
        self._held = self._ticking.acquire(timeout=5.0)

    def _after_fork(self) -> None:
        if self._held:
            self._held = False
            self._ticking.release()

    def _in_child(self) -> None:
        self._ticking = threading.Lock()
        self._held = False
        self._stop.set()  # the thread did not come along; nothing to renew here

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _advertised_host(host: str) -> str:
    # As the Mesh's own rule (docs/runtime.md): a wildcard bind is advertised as loopback,
    # right on one machine; on several, MESH_ADVERTISE says which address callers reach.
    return "127.0.0.1" if host in _WILDCARDS else host


def _serve(options: RunOptions, manager: CertificateManager | None, mode: str) -> int:
    if options.server == "gunicorn":
        from mesh_middleware.serving.gunicorn_tls import serve_gunicorn

        return serve_gunicorn(options, manager)
    return _serve_uvicorn(options, manager, mode)


def _serve_uvicorn(options: RunOptions, manager: CertificateManager | None, mode: str) -> int:
    import uvicorn

    from mesh_middleware.serving.uvicorn_tls import LinkedServer, tell_peer

    common: dict[str, Any] = {
        "log_level": "warning",
        "timeout_graceful_shutdown": 5,
        "timeout_keep_alive": options.timeout_keep_alive,
    }
    servers: list[LinkedServer] = []
    if manager is None:
        servers.append(
            LinkedServer(
                uvicorn.Config(options.app, host=options.host, port=options.port, **common)
            )
        )
    else:
        context = manager.contexts.server
        tls = uvicorn.Config(
            options.app,
            host=options.host,
            port=options.port,
            ssl_context_factory=lambda config, default: context,
            **common,
        )
        tell_peer(tls)
        servers.append(LinkedServer(tls))
        if options.plain_port is not None:
            plain = uvicorn.Config(
                options.app, host=options.host, port=options.plain_port, lifespan="off", **common
            )
            servers.append(LinkedServer(plain))
        listening = f"https://{options.host}:{options.port} (mtls: {mode})"
        if options.plain_port is not None:
            listening += f", plaintext http://{options.host}:{options.plain_port}"
        _say(f"serving {options.app} on {listening}")

    def stop_all(signum: int, frame: FrameType | None) -> None:
        for server in servers:
            server.handle_exit(signum, frame)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # The loop uvicorn would choose (uvloop when installed), for all the servers.
        loop_factory = servers[0].config.get_loop_factory()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_together(servers))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if all(server.started for server in servers) else 3


async def _together(servers: list[LinkedServer]) -> None:
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True  # one stopped (a port in use, say): stop the others too
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()
