"""`mesh run` set-up errors, `mtls: off`, and the `mesh ca` commands, against real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mesh_middleware.cli import main
from tests.e2e.mtls_support import mesh_run, registered, with_mtls
from tests.registry.support import start_registry
from tests.support.policies import SERVER_POLICY
from tests.support.servers import REPO, free_port

pytestmark = pytest.mark.timeout(60)


def mesh_run_status(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `mesh run` to its end; its exit status and what it printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    done = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "run", *argv],
        env={**environment, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr


def test_setup_errors_say_what_to_do(tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(with_mtls(SERVER_POLICY, "strict"))
    off = tmp_path / "off.yaml"
    off.write_text(with_mtls(SERVER_POLICY, "off"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("service: inventory\ninbound:\n  mtls: sometimes\n")
    app = "tests.support.asgi_app:app"
    cases = [
        ([app], {}, 2, "set MESH_POLICY"),
        ([app], {"MESH_POLICY": str(broken)}, 2, "broken.yaml:3: inbound.mtls"),
        ([app], {"MESH_POLICY": str(strict)}, 2, "set MESH_REGISTRY_URL"),
        ([app, "--plain-port", "9"], {"MESH_POLICY": str(off)}, 2, "mtls: off"),
        (
            [app, "--cert-wait", "1s"],
            {"MESH_POLICY": str(strict), "MESH_REGISTRY_URL": f"http://127.0.0.1:{free_port()}"},
            1,
            "no certificate from",
        ),
    ]
    for argv, env, status, said in cases:
        code, printed = mesh_run_status(argv, env)
        assert (code, said in printed) == (status, True), (argv, code, printed)


def test_mtls_off_serves_plaintext_and_registers_no_tls(tmp_path: Path) -> None:
    """Also: the `mesh` command (not `python -m`) finds APP from the current directory, as
    uvicorn's and gunicorn's commands do, with no PYTHONPATH."""
    policy = tmp_path / "off.yaml"
    policy.write_text(with_mtls(SERVER_POLICY, "off"))
    port = free_port()
    mesh = str(Path(sys.executable).parent / "mesh")
    command = [mesh, "run", "tests.support.asgi_app:app", "--port", str(port)]
    with (
        start_registry(tmp_path / "registry", dev=True) as registry,
        mesh_run(
            command,
            env={"MESH_POLICY": str(policy), "MESH_REGISTRY_URL": registry.url},
            pythonpath=False,
            registry_url=registry.url,
            service="inventory",
            port=port,
            log_path=tmp_path / "off.log",
        ),
    ):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5.0).status_code == 200
        metadata = registered(registry.url, "inventory", port)["metadata"]  # type: ignore[index]
        assert "mtls" not in metadata


def test_ca_show_and_rotate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with start_registry(tmp_path / "registry") as registry:
        monkeypatch.setenv("MESH_REGISTRY_URL", registry.url)
        monkeypatch.setenv("MESH_REGISTRY_DATA", str(registry.data_dir))
        monkeypatch.delenv("MESH_ADMIN_TOKEN", raising=False)
        assert main(["ca", "show"]) == 0
        shown = capsys.readouterr().out
        assert "signing" in shown and "pending" not in shown
        assert main(["ca", "rotate", "--activate-after", "2h"]) == 0
        assert "trusted now, signs from" in capsys.readouterr().out
        assert main(["ca", "show"]) == 0
        assert "pending" in capsys.readouterr().out
        assert main(["ca", "show", "--pem"]) == 0
        assert capsys.readouterr().out.count("BEGIN CERTIFICATE") == 2
        monkeypatch.setenv("MESH_ADMIN_TOKEN", "mat_wrong")
        assert main(["ca", "rotate"]) == 1
        assert "401" in capsys.readouterr().err


def test_a_ca_key_never_travels_in_plaintext(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.registry.test_ca import operator_root

    certificate, key = operator_root()
    (tmp_path / "ca.pem").write_text(certificate)
    (tmp_path / "ca.key").write_text(key)
    argv = ["ca", "rotate", "--cert", str(tmp_path / "ca.pem"), "--key", str(tmp_path / "ca.key")]
    assert main([*argv, "--registry", "http://10.1.2.3:7400", "--admin-token", "mat_x"]) == 2
    assert "over plain HTTP" in capsys.readouterr().err
