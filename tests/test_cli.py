"""The `mesh` command: policy check, schema and explain (DESIGN §5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh_middleware.cli import main
from tests.conftest import PolicyWriter

GOOD = """\
service: inventory
inbound:
  authentication: permissive
  authorization:
    rules:
      - name: orders-reserve
        action: allow
        from: [orders]
        methods: [POST]
        paths: [/reserve]
"""


def test_check_accepts_good_files(
    write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid files exit 0 and say so."""
    path = write_policy(GOOD)
    assert main(["policy", "check", str(path)]) == 0
    assert f"{path}: ok" in capsys.readouterr().out


def test_check_rejects_bad_files_with_line_and_field(
    write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any invalid file makes the exit status 1; errors name file, line and field."""
    good = write_policy(GOOD)
    bad = write_policy("service: inventory\ninbound:\n  authentication: maybe\n")
    assert main(["policy", "check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3: inbound.authentication: Input should be 'strict' or 'permissive'" in err


def test_check_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file is an error, not a traceback."""
    assert main(["policy", "check", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read the file" in capsys.readouterr().err


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`mesh policy schema` prints the JSON Schema."""
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "mesh-middleware policy file"


def test_explain_json_shape(write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]) -> None:
    """`--json` prints exactly decision, status, rule and reason."""
    path = write_policy(GOOD)
    argv = [
        "policy",
        "explain",
        str(path),
        "--from",
        "orders",
        "--method",
        "POST",
        "--path",
        "/reserve",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"decision", "status", "rule", "reason"}
    assert (result["decision"], result["status"], result["rule"]) == (
        "allow",
        200,
        "orders-reserve",
    )
    assert f"{path}:6" in result["reason"]


def test_explain_text_and_headers(
    write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json the decision is one readable line; --header feeds header rules."""
    path = write_policy(
        """\
        service: a
        inbound:
          authorization:
            rules:
              - {name: tenant, action: allow, headers: {x-tenant: {values: [acme]}}}
        """
    )
    argv = ["policy", "explain", str(path), "--from", "b", "--method", "GET", "--path", "/"]
    assert main([*argv, "--header", "X-Tenant=acme"]) == 0
    assert capsys.readouterr().out.startswith("allow (200) rule 'tenant'")
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("deny (403)")


def test_explain_invalid_policy_exits_1(
    write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    """Explaining against a broken file reports its errors."""
    path = write_policy("service: BAD\n")
    assert (
        main(["policy", "explain", str(path), "--from", "a", "--method", "GET", "--path", "/"]) == 1
    )
    assert "not a service name" in capsys.readouterr().err


def test_the_console_script_runs(write_policy: PolicyWriter) -> None:
    """`python -m mesh_middleware` is the same command as `mesh`."""
    path = write_policy(GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "mesh_middleware", "policy", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_explain_encodes_a_typed_path_like_a_client(
    write_policy: PolicyWriter, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--path /café` is asked about as a client would send it: /caf%C3%A9."""
    path = write_policy(
        """\
        service: a
        inbound:
          authorization:
            rules:
              - {name: no-cafe, action: deny, paths: ['/caf%C3%A9']}
        """
    )
    argv = ["policy", "explain", str(path), "--from", "b", "--method", "GET", "--json"]
    assert main([*argv, "--path", "/café"]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "no-cafe"
