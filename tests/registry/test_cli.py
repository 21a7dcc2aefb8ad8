"""`mesh token create`, `mesh services` and `mesh instances` against a real registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware.cli import main
from tests.registry.support import Registry, create_join_token, register, start_registry
from tests.support.servers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(30)]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for this module's commands."""
    with start_registry(tmp_path_factory.mktemp("cli") / "data") as registry:
        yield registry


@pytest.fixture
def env(running: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """The environment a user of the registry's host has: its URL and its data dir."""
    monkeypatch.setenv("MESH_REGISTRY_URL", running.url)
    monkeypatch.setenv("MESH_REGISTRY_DATA", str(running.data_dir))
    monkeypatch.delenv("MESH_ADMIN_TOKEN", raising=False)
    return running


def test_token_create_prints_a_working_join_token(
    env: Registry, client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh token create SERVICE` prints only the token on stdout; the token registers SERVICE."""
    assert main(["token", "create", "cli-orders"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("mjt_")
    assert "\n" not in token
    assert "shown once" in err
    assert register(client, env, "cli-orders", "i-1", token).status_code == 200
    assert register(client, env, "cli-other", "i-1", token).status_code == 403


def test_token_create_json(
    env: Registry, client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json` prints {"service", "token"}."""
    assert main(["token", "create", "cli-json", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["service"] == "cli-json"
    assert register(client, env, "cli-json", "i-1", created["token"]).status_code == 200


def test_token_create_with_explicit_admin_token_and_registry(
    running: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--registry` and `--admin-token` work without any environment."""
    monkeypatch.delenv("MESH_REGISTRY_URL", raising=False)
    monkeypatch.setenv("MESH_REGISTRY_DATA", "/nonexistent")
    argv = ["token", "create", "cli-flags", "--registry", running.url]
    assert main([*argv, "--admin-token", running.admin_token]) == 0
    assert capsys.readouterr().out.startswith("mjt_")


def test_token_create_with_a_wrong_admin_token_fails(
    env: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refused admin token is exit 1 with the registry's reason, not a traceback."""
    assert main(["token", "create", "cli-x", "--admin-token", "mat_wrong"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "401" in err
    assert "admin token" in err
    assert "Traceback" not in err


def test_token_create_without_any_admin_token_fails(
    env: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no admin token to be found the command says where it looked, exit 1."""
    monkeypatch.setenv("MESH_REGISTRY_DATA", str(tmp_path / "empty"))
    assert main(["token", "create", "cli-x"]) == 1
    assert "no admin token" in capsys.readouterr().err


def test_token_create_for_an_invalid_service_fails(
    env: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid service name is refused by the registry: exit 1 with its reason."""
    assert main(["token", "create", "Not_Valid"]) == 1
    assert "400" in capsys.readouterr().err


def test_services_table_and_json(
    env: Registry, client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh services` lists each service with its counts; `--json` as a list of objects."""
    token = create_join_token(client, env, "cli-listed")
    for n in range(2):
        assert register(client, env, "cli-listed", f"i-{n}", token).status_code == 200
    assert main(["services"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SERVICE", "INSTANCES", "HEALTHY"]
    assert ["cli-listed", "2", "2"] in [line.split() for line in lines[1:]]
    assert main(["services", "--json"]) == 0
    services = json.loads(capsys.readouterr().out)
    assert {"name": "cli-listed", "instances": 2, "healthy": 2} in services


def test_instances_table_and_json(
    env: Registry, client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mesh instances SERVICE` shows id, address, version, zone, health, lease; `--json` too."""
    token = create_join_token(client, env, "cli-inst")
    register(client, env, "cli-inst", "a-1", token, port=9001, version="v2", zone="eu-1")
    register(client, env, "cli-inst", "b-2", token, port=9002, ttl="1m")
    assert main(["instances", "cli-inst"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["ID", "ADDRESS", "VERSION", "ZONE", "HEALTHY", "EXPIRES", "IN"]
    assert rows[1][:5] == ["a-1", "127.0.0.1:9001", "v2", "eu-1", "yes"]
    assert rows[2][:5] == ["b-2", "127.0.0.1:9002", "-", "-", "yes"]
    assert rows[2][5].endswith("s")
    assert main(["instances", "cli-inst", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(i["id"], i["port"], i["version"]) for i in listed] == [
        ("a-1", 9001, "v2"),
        ("b-2", 9002, None),
    ]


def test_instances_of_an_unknown_service_is_empty(
    env: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown service has no instances: a header only, or `[]`."""
    assert main(["instances", "cli-nobody", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_instances_of_an_invalid_service_fails(
    env: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid service name is exit 1 with the registry's reason."""
    assert main(["instances", "Bad_Name"]) == 1
    assert "400" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["token", "create", "orders", "--admin-token", "mat_x"],
        ["services"],
        ["services", "--json"],
        ["instances", "orders"],
        ["instances", "orders", "--json"],
    ],
)
def test_unreachable_registry_is_a_clear_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening at the registry URL: exit 1 and one line saying so, no traceback."""
    monkeypatch.setenv("MESH_REGISTRY_URL", f"http://127.0.0.1:{free_port()}")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot reach the registry" in err
    assert "Traceback" not in err


def test_commands_run_as_a_process(running: Registry, tmp_path: Path) -> None:
    """The same commands through `python -m mesh_middleware`, configured by the environment
    only; an unreachable registry is exit status 1 there too."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MESH_REGISTRY_URL": running.url,
        "MESH_REGISTRY_DATA": str(running.data_dir),
    }
    env.pop("MESH_ADMIN_TOKEN", None)

    def mesh(*argv: str, **changes: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh_middleware", *argv],
            env={**env, **changes},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    created = mesh("token", "create", "cli-proc")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    with httpx.Client(timeout=10.0) as http:
        assert register(http, running, "cli-proc", "p-1", token).status_code == 200
    services = mesh("services", "--json")
    assert services.returncode == 0
    assert {"name": "cli-proc", "instances": 1, "healthy": 1} in json.loads(services.stdout)
    instances = mesh("instances", "cli-proc", "--json")
    assert [i["id"] for i in json.loads(instances.stdout)] == ["p-1"]
    down = mesh("services", MESH_REGISTRY_URL=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "cannot reach the registry" in down.stderr
    assert "Traceback" not in down.stderr
