"""Mutual TLS between real processes: sample services under `mesh run`, a registry's CA, and a
capture of loopback traffic that must show TLS and no plaintext."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import Mesh
from tests.e2e.mtls_support import (
    dev_certificate,
    dev_token,
    loopback_capture,
    mesh_run,
    mesh_run_argv,
    registered,
    with_mtls,
)
from tests.registry.support import Registry, start_registry
from tests.support.policies import SERVER_POLICY
from tests.support.servers import REPO, free_port, running, uvicorn_argv

INVENTORY_POLICY = (REPO / "sample_apps" / "inventory" / "policy.yaml").read_text()
GATEWAY_POLICY = REPO / "sample_apps" / "gateway" / "policy.yaml"
CLIENT_POLICY = """\
service: gateway
inbound:
  authentication: permissive
outbound:
  services:
    inventory: {}
"""


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with start_registry(tmp_path / "registry", dev=True) as running_registry:
        yield running_registry


def run_env(registry: Registry, policy: Path, **more: str) -> dict[str, str]:
    return {
        "MESH_POLICY": str(policy),
        "MESH_REGISTRY_URL": registry.url,
        "MESH_REPORT_INTERVAL": "1s",
        **more,
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def as_service(context: ssl.SSLContext, port: int, headers: dict[str, str]) -> httpx.Response:
    """GET /items/1 from inventory's TLS port, presenting the certificate in ``context``."""
    with httpx.Client(verify=context, timeout=10.0) as client:
        return client.get(
            f"https://127.0.0.1:{port}/items/1",
            headers=headers,
            extensions={"sni_hostname": "inventory"},
        )


def test_sample_services_talk_over_mutual_tls_and_nothing_in_plaintext(
    registry: Registry, tmp_path: Path
) -> None:
    """gateway → inventory (v1 and v2, `mtls: strict` under `mesh run`): a capture on loopback
    shows TLS handshakes and no plaintext HTTP; a client without a mesh certificate is refused."""
    policy = write(tmp_path / "inventory.yaml", with_mtls(INVENTORY_POLICY, "strict"))
    ports = {"v1": free_port(), "v2": free_port()}
    gateway_port = free_port()
    with (
        mesh_run(
            mesh_run_argv("sample_apps.inventory.app:app", ports["v1"]),
            env=run_env(registry, policy, MESH_VERSION="v1"),
            registry_url=registry.url,
            service="inventory",
            port=ports["v1"],
            log_path=tmp_path / "inventory-v1.log",
        ),
        mesh_run(
            mesh_run_argv("sample_apps.inventory.app:app", ports["v2"]),
            env=run_env(registry, policy, MESH_VERSION="v2"),
            registry_url=registry.url,
            service="inventory",
            port=ports["v2"],
            log_path=tmp_path / "inventory-v2.log",
        ),
        running(
            uvicorn_argv("sample_apps.gateway.app:app", gateway_port),
            port=gateway_port,
            env={
                **run_env(registry, GATEWAY_POLICY),
                "MESH_ADVERTISE": f"127.0.0.1:{gateway_port}",
            },
            log_path=tmp_path / "gateway.log",
        ),
    ):
        assert registered(registry.url, "inventory", ports["v1"])["metadata"]["mtls"] == "strict"  # type: ignore[index]
        with loopback_capture(list(ports.values()), tmp_path / "inventory.pcap") as segments:
            # The gateway's canary sends 10% of reads to v2: 40 requests miss v2 once in 70
            # runs, so go on (up to 300, a miss once in 10^13) until both versions answered.
            answered = set()
            for n in range(300):
                answer = httpx.get(
                    f"http://127.0.0.1:{gateway_port}/shop/items/{1 + n % 3}", timeout=10.0
                )
                assert answer.status_code == 200, answer.text
                answered.add(answer.json()["inventory"]["version"])
                if n >= 39 and answered == {"v1", "v2"}:
                    break
        assert answered == {"v1", "v2"}
    to_servers = [s for s in segments if s.destination_port in ports.values()]
    from_servers = [s for s in segments if s.source_port in ports.values()]
    assert to_servers and from_servers, "the capture saw no traffic to inventory"
    hellos = [s for s in to_servers if s.payload[:1] == b"\x16" and s.payload[5:6] == b"\x01"]
    assert hellos, "no TLS ClientHello to inventory in the capture"
    everything = b"".join(s.payload for s in segments)
    for plaintext in (b"HTTP/1.1", b"GET /items", b"x-mesh-identity", b"espresso", b"traceparent"):
        assert plaintext not in everything, f"{plaintext!r} crossed loopback in the clear"
    # Every record on the wire is TLS: handshake, change cipher spec, alert or application data.
    assert {s.payload[0] for s in to_servers + from_servers if len(s.payload) >= 5} <= {
        0x14,
        0x15,
        0x16,
        0x17,
    }


@pytest.fixture
def strict_inventory(registry: Registry, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """tests.support.asgi_app under `mesh run`, `mtls: strict`, with a plaintext port for
    public paths: yields (TLS port, plaintext port)."""
    policy = write(tmp_path / "strict.yaml", with_mtls(SERVER_POLICY, "strict"))
    port, plain = free_port(), free_port()
    with mesh_run(
        mesh_run_argv("tests.support.asgi_app:app", port, plain_port=plain),
        env=run_env(registry, policy),
        registry_url=registry.url,
        service="inventory",
        port=port,
        log_path=tmp_path / "strict.log",
    ):
        yield port, plain


def test_a_client_without_a_mesh_certificate_is_refused(
    strict_inventory: tuple[int, int], registry: Registry, tmp_path: Path
) -> None:
    port, _ = strict_inventory
    token = dev_token(registry.url, "gateway", "inventory")
    headers = {"x-mesh-identity": token}
    no_certificate = ssl.create_default_context()
    no_certificate.check_hostname = False
    no_certificate.verify_mode = ssl.CERT_NONE
    for verify in (no_certificate, False):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://127.0.0.1:{port}/items/1", headers=headers, verify=verify)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/items/1", headers=headers)
    # The same token over the same TLS port with a mesh certificate gets through.
    mine = dev_certificate(registry.url, "gateway", tmp_path)
    answer = as_service(mine, port, headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["caller"] == "gateway"


def test_the_token_must_name_the_service_of_the_certificate(
    strict_inventory: tuple[int, int], registry: Registry, tmp_path: Path
) -> None:
    port, _ = strict_inventory
    gateway = dev_certificate(registry.url, "gateway", tmp_path)
    orders_token = dev_token(registry.url, "orders", "inventory")
    answer = as_service(gateway, port, {"x-mesh-identity": orders_token})
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthenticated"
    assert "svc/orders but the connection's certificate names" in answer.json()["reason"]


def test_strict_answers_only_public_paths_in_plaintext(
    strict_inventory: tuple[int, int], registry: Registry
) -> None:
    _, plain = strict_inventory
    assert httpx.get(f"http://127.0.0.1:{plain}/healthz").status_code == 200
    token = dev_token(registry.url, "gateway", "inventory")
    refused = httpx.get(f"http://127.0.0.1:{plain}/items/1", headers={"x-mesh-identity": token})
    assert refused.status_code == 403
    assert "mtls is strict" in refused.json()["reason"]


def test_permissive_serves_mesh_clients_over_tls_and_others_in_plaintext(
    registry: Registry, tmp_path: Path
) -> None:
    policy = write(tmp_path / "permissive.yaml", with_mtls(SERVER_POLICY, "permissive"))
    port, plain = free_port(), free_port()
    with mesh_run(
        mesh_run_argv("tests.support.asgi_app:app", port, plain_port=plain),
        env=run_env(registry, policy),
        registry_url=registry.url,
        service="inventory",
        port=port,
        log_path=tmp_path / "permissive.log",
    ):
        metadata = registered(registry.url, "inventory", port)["metadata"]  # type: ignore[index]
        assert metadata["mtls"] == "permissive" and metadata["plain_port"] == str(plain)
        # A mesh client that holds no certificate on purpose (mtls: off) takes the plain port;
        # one that may (the default) gets a certificate and goes over TLS.
        for mode, expected in (("off", plain), ("permissive", port)):
            client_policy = write(tmp_path / f"client-{mode}.yaml", with_mtls(CLIENT_POLICY, mode))
            ports: list[int] = []

            def connected(event: str, info: dict[str, object], ports: list[int] = ports) -> None:
                if event == "connection.connect_tcp.complete":
                    sock = info["return_value"].get_extra_info("socket")  # type: ignore[attr-defined]
                    ports.append(sock.getpeername()[1])

            with (
                Mesh(client_policy, registry_url=registry.url) as mesh,
                mesh.client(timeout=10.0) as client,
            ):
                answer = client.get("http://inventory/items/1", extensions={"trace": connected})
                assert answer.status_code == 200, answer.text
                assert answer.json()["caller"] == "gateway"
            assert ports == [expected], (mode, ports)


def test_gunicorn_workers_serve_mutual_tls_and_see_the_peer(
    registry: Registry, tmp_path: Path
) -> None:
    policy = write(tmp_path / "wsgi.yaml", with_mtls(SERVER_POLICY, "strict"))
    port = free_port()
    with (
        mesh_run(
            mesh_run_argv("tests.support.wsgi_app:app", port, server="gunicorn", workers=2),
            env=run_env(registry, policy),
            registry_url=registry.url,
            service="inventory",
            port=port,
            log_path=tmp_path / "gunicorn.log",
        ),
    ):
        client_policy = write(tmp_path / "client.yaml", CLIENT_POLICY)
        with Mesh(client_policy, registry_url=registry.url) as mesh:
            session = mesh.requests_session()
            for n in range(6):
                answer = session.get(f"http://inventory/items/{n}", timeout=10)
                assert answer.status_code == 200, answer.text
                assert answer.json()["caller"] == "gateway"
            session.close()
        gateway = dev_certificate(registry.url, "gateway", tmp_path)
        mismatch = as_service(
            gateway, port, {"x-mesh-identity": dev_token(registry.url, "orders", "inventory")}
        )
        assert mismatch.status_code == 401, mismatch.text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://127.0.0.1:{port}/items/1", verify=False)
    assert os.path.exists(tmp_path / "gunicorn.log")


def test_websockets_over_mutual_tls_carry_the_peer_too(
    strict_inventory: tuple[int, int], registry: Registry, tmp_path: Path
) -> None:
    """A websocket upgrade on the TLS port is admitted under strict (it came over mTLS), and
    its token must name the certificate's service like any request."""
    import json

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port, _ = strict_inventory
    gateway = dev_certificate(registry.url, "gateway", tmp_path)
    url = f"wss://127.0.0.1:{port}/ws"
    token = dev_token(registry.url, "gateway", "inventory")
    with connect(
        url, ssl=gateway, server_hostname="inventory", additional_headers={"x-mesh-identity": token}
    ) as websocket:
        assert json.loads(websocket.recv(timeout=10)) == {"caller": "gateway"}
    orders_token = dev_token(registry.url, "orders", "inventory")
    with pytest.raises(InvalidStatus) as refused:
        connect(
            url,
            ssl=gateway,
            server_hostname="inventory",
            additional_headers={"x-mesh-identity": orders_token},
        )
    assert refused.value.response.status_code == 401


def test_a_client_that_cannot_do_mtls_fails_fast_and_blames_no_instance(
    strict_inventory: tuple[int, int], registry: Registry, tmp_path: Path
) -> None:
    from mesh_middleware.adapters.httpx import MeshTransport, NoMeshCertificate

    policy = write(tmp_path / "off.yaml", with_mtls(CLIENT_POLICY, "off"))
    with Mesh(policy, registry_url=registry.url) as mesh, mesh.client(timeout=10.0) as client:
        with pytest.raises(NoMeshCertificate, match=r"takes only mutual TLS .*mtls: off"):
            client.get("http://inventory/items/1")
        destination = mesh.outbound.destination("inventory")
        assert destination is not None
        endpoints = destination.endpoints()
        assert endpoints is not None
        assert all(e.consecutive_failures == 0 and e.in_flight == 0 for e in endpoints.endpoints)
    # A transport given for the rest never carries mTLS tries: the mesh's own pool does,
    # presenting the certificate and checking the server's SPIFFE ID.
    policy = write(tmp_path / "on.yaml", CLIENT_POLICY)
    with (
        Mesh(policy, registry_url=registry.url) as mesh,
        httpx.Client(
            transport=MeshTransport(mesh, transport=httpx.HTTPTransport(verify=False)),
            timeout=10.0,
        ) as client,
    ):
        answer = client.get("http://inventory/items/1")
        assert answer.status_code == 200, answer.text
        assert answer.json()["caller"] == "gateway"
