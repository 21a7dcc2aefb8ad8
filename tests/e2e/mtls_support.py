"""Pieces of the mutual-TLS end-to-end tests: `mesh run` processes, a loopback capture, and
client contexts made the way a stranger (or a confused service) would make them."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from mesh_middleware.identity.tls import client_context
from mesh_middleware.identity.x509 import build_csr, generate_key, key_pem
from tests.support.servers import REPO, stop


def with_mtls(policy_text: str, mode: str) -> str:
    """A policy with ``inbound.mtls`` set to ``mode``."""
    marker = "inbound:\n"
    assert marker in policy_text
    return policy_text.replace(marker, f"{marker}  mtls: {mode}\n", 1)


def mesh_run_argv(
    app: str,
    port: int,
    *,
    plain_port: int | None = None,
    server: str = "uvicorn",
    workers: int = 1,
) -> list[str]:
    argv = [sys.executable, "-m", "mesh_middleware", "run", app, "--port", str(port)]
    if plain_port is not None:
        argv += ["--plain-port", str(plain_port)]
    if server != "uvicorn":
        argv += ["--server", server, "--workers", str(workers)]
    return argv


def registered(registry_url: str, service: str, port: int) -> dict[str, object] | None:
    """The catalog's entry for the instance of ``service`` on ``port``, if there is one."""
    try:
        answer = httpx.get(f"{registry_url}/v1/catalog/services/{service}", timeout=2.0)
    except httpx.TransportError:
        return None
    for instance in answer.json().get("instances", []):
        if instance["port"] == port:
            return dict(instance)
    return None


@contextmanager
def mesh_run(
    argv: list[str],
    *,
    env: Mapping[str, str],
    registry_url: str,
    service: str,
    port: int,
    log_path: Path,
    timeout: float = 30.0,
    pythonpath: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `mesh run`, wait until the instance is in the catalog, stop it (group) after."""
    full_env = {**os.environ, **env}
    if pythonpath:
        full_env["PYTHONPATH"] = str(REPO)
    else:
        full_env.pop("PYTHONPATH", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, env=full_env, cwd=REPO, stdout=log, stderr=log, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while registered(registry_url, service, port) is None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mesh run exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service} not registered after {timeout}s")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def dev_certificate(registry_url: str, service: str, directory: Path) -> ssl.SSLContext:
    """A client context holding a certificate for ``service`` from a ``--dev`` registry."""
    key = generate_key()
    answer = httpx.post(
        f"{registry_url}/v1/ca/certificates",
        json={"csr": build_csr(key, ""), "service": service},
        timeout=10.0,
    )
    answer.raise_for_status()
    body = answer.json()
    path = directory / f"{service}-{body['serial']}.pem"
    path.write_bytes(body["certificate"].encode() + key_pem(key))
    return client_context("mesh.local", path, path, body["bundle"])


def dev_token(registry_url: str, service: str, audience: str) -> str:
    answer = httpx.post(
        f"{registry_url}/v1/identity/token",
        json={"service": service, "audience": audience},
        timeout=10.0,
    )
    answer.raise_for_status()
    return str(answer.json()["token"])


# -- a capture on loopback -------------------------------------------------------------------


@dataclass
class Segment:
    source_port: int
    destination_port: int
    payload: bytes


@contextmanager
def loopback_capture(ports: list[int], path: Path) -> Iterator[list[Segment]]:
    """tcpdump on ``lo`` for ``ports`` while the block runs; the TCP segments after it."""
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        raise RuntimeError("tcpdump is needed (.ci/run installs Debian's tcpdump)")
    expression = " or ".join(f"tcp port {port}" for port in ports)
    err_path = path.with_suffix(".stderr")
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [tcpdump, "-i", "lo", "-n", "-U", "-s", "0", "-w", str(path), expression],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    segments: list[Segment] = []
    try:
        deadline = time.monotonic() + 10
        while b"listening on" not in err_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump did not start: {err_path.read_text()}")
            time.sleep(0.05)
        yield segments
        time.sleep(0.3)  # the last packets reach the file (-U writes each one at once)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=10)
    segments.extend(read_pcap(path))


def read_pcap(path: Path) -> list[Segment]:
    """The TCP segments with a payload in a classic pcap file (Ethernet or Linux cooked)."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    link_type = struct.unpack(endian + "I", data[20:24])[0]
    link_header = {1: 14, 113: 16, 276: 20}[link_type]
    segments = []
    offset = 24
    while offset + 16 <= len(data):
        captured = struct.unpack(endian + "I", data[offset + 8 : offset + 12])[0]
        packet = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        ip = packet[link_header:]
        if not ip or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        total = struct.unpack(">H", ip[2:4])[0]
        payload = tcp[(tcp[12] >> 4) * 4 : total - (ip[0] & 0x0F) * 4]
        if payload:
            source, destination = struct.unpack(">HH", tcp[:4])
            segments.append(Segment(source, destination, payload))
    return segments
