"""The ``mesh`` command line (DESIGN §5).

``mesh registry …`` · ``mesh token create SERVICE`` · ``mesh services [--json]`` ·
``mesh instances SERVICE [--json]`` · ``mesh stat [--window 60s] [--edges] [--json]`` ·
``mesh policy check FILE…`` · ``mesh policy schema`` ·
``mesh policy explain FILE --from S --method M --path P [--header K=V]… [--user ISS/SUB]
[--claim K=V]… [--json]`` ·
``mesh demo [--duration N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mesh_middleware._version import __version__
from mesh_middleware.errors import PolicyError

__all__ = ["main"]

_REGISTRY_TIMEOUT = 5.0


def _policy_check(args: argparse.Namespace) -> int:
    from mesh_middleware.policy.compiled import compile_policy_file

    failed = False
    for path in args.files:
        try:
            compiled = compile_policy_file(path)
        except PolicyError as exc:
            failed = True
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            continue
        rules = len(compiled.authorizer.rules)
        faults = len(compiled.loaded.policy.inbound.faults)
        print(f"{path}: ok (service {compiled.service}, {rules} rules, {faults} faults)")
    return 1 if failed else 0


def _policy_schema(args: argparse.Namespace) -> int:
    from mesh_middleware.policy.schema import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=2))
    return 0


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _policy_explain(args: argparse.Namespace) -> int:
    from mesh_middleware.policy.compiled import compile_policy_file
    from mesh_middleware.policy.explain import explain, split_principal

    try:
        compiled = compile_policy_file(args.file)
    except PolicyError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    headers: dict[str, str] = {}
    for name, value in args.header:
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    if args.claim and args.user is None:
        print("mesh policy explain: --claim needs --user ISSUER/SUBJECT", file=sys.stderr)
        return 2
    try:
        claims = _claims(args.claim)
        if args.user is not None:
            split_principal(args.user)
    except ValueError as exc:
        print(f"mesh policy explain: {exc}", file=sys.stderr)
        return 2
    result = explain(
        compiled,
        caller=args.caller,
        method=args.method,
        path=args.path,
        headers=headers,
        user=args.user,
        claims=claims,
    )
    if args.json:
        print(json.dumps(result))
    else:
        rule = f" rule {result['rule']!r}" if result["rule"] else ""
        print(f"{result['decision']} ({result['status']}){rule}: {result['reason']}")
        if "user" in result:
            print(f"  end user: {result['user']}")
        if "end_user" in result:
            print(f"  {result['end_user']}")
        for check in result.get("user_conditions", []):
            verdict = "held" if check["held"] else "did not hold"
            print(f"  {check['action']} rule {check['rule']!r}: end-user conditions {verdict}")
            for line in check["conditions"]:
                print(f"    {line}")
    return 0


def _claims(given: list[tuple[str, str]]) -> dict[str, Any]:
    """``--claim K=V`` pairs as a claims object: ``[a][b]`` keys nest, a repeated key makes a
    list, and a value starting with ``[`` or ``{`` is JSON, as is any value of ``K:=V`` (a
    number, ``true``: claims that are not strings, as httpie spells them)."""
    from mesh_middleware.policy.claims import parse_claim_path

    claims: dict[str, Any] = {}
    for given_key, raw in given:
        as_json = given_key.endswith(":")
        key = given_key[:-1] if as_json else given_key
        value: Any = raw
        if as_json or raw[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except ValueError:
                raise ValueError(f"--claim {key}: {raw!r} is not JSON") from None
        *outer, last = parse_claim_path(key)
        holder = claims
        for part in outer:
            nested = holder.setdefault(part, {})
            if not isinstance(nested, dict):
                raise ValueError(f"--claim {key}: {part!r} is given a value and nested claims")
            holder = nested
        if last in holder:
            before = holder[last]
            holder[last] = [*before, value] if isinstance(before, list) else [before, value]
        else:
            holder[last] = value
    return claims


def _registry(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mesh_middleware.registry.server import serve
    from mesh_middleware.registry.settings import RegistrySettings, default_data_dir

    config = RegistrySettings(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        store_url=args.store,
        store_key_file=Path(args.store_key_file) if args.store_key_file else None,
        dev=args.dev,
        trust_domain=args.trust_domain,
        cert_lifetime=args.cert_ttl,
        ca_root_lifetime=args.ca_root_ttl,
        ca_activate_after=args.ca_activate_after,
        ca_certificate=Path(args.ca_cert) if args.ca_cert else None,
        ca_key=Path(args.ca_key) if args.ca_key else None,
        tls_certificate=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
    )
    if (config.tls_certificate is None) != (config.tls_key is None):
        print("mesh registry: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if (config.ca_certificate is None) != (config.ca_key is None):
        print("mesh registry: --ca-cert and --ca-key go together", file=sys.stderr)
        return 2
    try:
        return serve(config)
    except (OSError, ValueError) as exc:
        print(f"mesh registry: {exc}", file=sys.stderr)
        return 2


def _ca_rotate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mesh_middleware.registry.client import RegistryError, admin_token

    if (args.cert is None) != (args.key is None):
        print("mesh ca rotate: --cert and --key go together", file=sys.stderr)
        return 2
    if args.key is not None and not _private_channel(args.registry):
        print(
            "mesh ca rotate: refusing to send a CA key to a registry over plain HTTP; use its "
            "https:// address, or run this on the registry's host (127.0.0.1)",
            file=sys.stderr,
        )
        return 2
    body: dict[str, str] = {}
    try:
        admin = admin_token(args.admin_token, data_dir=args.data_dir)
        if args.cert is not None:
            body.update(certificate=Path(args.cert).read_text(), key=Path(args.key).read_text())
        if args.activate_after is not None:
            body["activate_after"] = args.activate_after
        answer = _registry_call(args, "POST", "/v1/admin/ca/rotate", body=body, admin=admin)
    except (RegistryError, OSError) as exc:
        print(f"mesh ca rotate: {exc}", file=sys.stderr)
        return 1
    print(
        f"new root {str(answer['root'])[:16]}: trusted now, signs from "
        f"{_when(float(answer['signs_from']))}; the old root retires once its leaves expire"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from mesh_middleware.serving.run import RunOptions, run

    return run(
        RunOptions(
            app=args.app,
            server=args.server,
            host=args.host,
            port=args.port,
            plain_port=args.plain_port,
            workers=args.workers,
            policy=args.policy,
            cert_wait=args.cert_wait,
            timeout_keep_alive=args.timeout_keep_alive,
            app_dir=args.app_dir,
        )
    )


def _private_channel(urls: str) -> bool:
    """Whether every registry URL of the (comma-separated) list is HTTPS or on this host."""
    from urllib.parse import urlsplit

    from mesh_middleware.loopback import is_loopback_host

    def private(url: str) -> bool:
        parts = urlsplit(url.strip())
        if parts.scheme == "https":
            return True
        return is_loopback_host(parts.hostname or "")

    return all(private(url) for url in urls.split(","))


def _registry_call(
    args: argparse.Namespace,
    method: str,
    path: str,
    *,
    body: Any = None,
    admin: str | None = None,
) -> Any:
    """Call the registry named by ``--registry``: with several URLs (comma-separated), the same
    failover as the runtime's (``RegistryClient``); only a ``GET`` goes on to the next one after
    a request that may have been received. Raises the command line's ``RegistryError``.
    """
    import structlog

    from mesh_middleware.registry.client import RegistryError
    from mesh_middleware.runtime.registry_client import (
        RegistryClient,
        RegistryRefused,
        RegistryUnavailable,
    )

    try:
        client = RegistryClient(
            args.registry,
            admin,
            timeout=_REGISTRY_TIMEOUT,
            # A failover is worth a note, but stdout is the answer (--json is piped).
            logger=structlog.wrap_logger(structlog.PrintLogger(sys.stderr)),
        )
    except ValueError as exc:
        raise RegistryError(f"--registry: {exc}") from None
    try:
        return client.request(method, path, body=body, idempotent=method == "GET")
    except RegistryUnavailable as exc:
        raise RegistryError(f"cannot reach the registry at {args.registry}: {exc}") from None
    except RegistryRefused as exc:
        raise RegistryError(str(exc)) from None
    finally:
        client.close()


def _ca_show(args: argparse.Namespace) -> int:
    from mesh_middleware.registry.client import RegistryError

    try:
        body = _registry_call(args, "GET", "/v1/ca/bundle")
    except RegistryError as exc:
        print(f"mesh ca show: {exc}", file=sys.stderr)
        return 1
    if args.pem:
        print("".join(body["bundle"]), end="")
        return 0
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = [("ROOT", "STATE", "EXPIRES", "SIGNS FROM", "RETIRES")]
    for root in body["roots"]:
        retires = root.get("retires_at")
        rows.append(
            (
                str(root["id"])[:16],
                str(root["state"]),
                _when(float(root["not_after"])),
                _when(float(root["signs_from"])),
                _when(float(retires)) if retires is not None else "-",
            )
        )
    _table(rows)
    return 0


def _when(unix: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _token_create(args: argparse.Namespace) -> int:
    from mesh_middleware.registry.client import RegistryError, admin_token

    try:
        admin = admin_token(args.admin_token, data_dir=args.data_dir)
        answer = _registry_call(
            args, "POST", "/v1/admin/join-tokens", body={"service": args.service}, admin=admin
        )
        token = str(answer["token"])
    except RegistryError as exc:
        print(f"mesh token create: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"service": args.service, "token": token}))
    else:
        print(token)
        print(
            f"(join token for {args.service}, shown once: set it as MESH_JOIN_TOKEN)",
            file=sys.stderr,
        )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from mesh_middleware.registry.doctor import examine

    try:
        reports, problems = examine(args.registry)
    except ValueError as exc:
        print(f"mesh doctor: --registry: {exc}", file=sys.stderr)
        return 2
    _table([("REGISTRY", "STATE", "LEADS", "INDEX", "STORE / ERROR"), *(r.row() for r in reports)])
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(f"ok: {len(reports)} registr{'y' if len(reports) == 1 else 'ies'} agree")
    return 1 if problems else 0


def _services(args: argparse.Namespace) -> int:
    from mesh_middleware.registry.client import RegistryError

    try:
        body = _registry_call(args, "GET", "/v1/catalog/services")
    except RegistryError as exc:
        print(f"mesh services: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body["services"]))
        return 0
    rows = [("SERVICE", "INSTANCES", "HEALTHY")]
    rows += [(s["name"], str(s["instances"]), str(s["healthy"])) for s in body["services"]]
    _table(rows)
    return 0


def _instances(args: argparse.Namespace) -> int:
    from mesh_middleware.registry.client import RegistryError

    try:
        body = _registry_call(args, "GET", f"/v1/catalog/services/{args.service}")
    except RegistryError as exc:
        print(f"mesh instances: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body["instances"]))
        return 0
    rows = [("ID", "ADDRESS", "VERSION", "ZONE", "HEALTHY", "EXPIRES IN")]
    for i in body["instances"]:
        rows.append(
            (
                i["id"],
                f"{i['address']}:{i['port']}",
                i["version"] or "-",
                i["zone"] or "-",
                "yes" if i["healthy"] else "no",
                f"{i['expires_in']:.0f}s",
            )
        )
    _table(rows)
    return 0


def _stat(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from mesh_middleware.registry.client import RegistryError

    path = "/v1/telemetry/topology" if args.edges else "/v1/telemetry/services"
    try:
        body = _registry_call(args, "GET", f"{path}?window={quote(args.window, safe='')}")
    except RegistryError as exc:
        print(f"mesh stat: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body))
        return 0
    try:
        _stat_tables(body, edges=args.edges)
    except (KeyError, TypeError, ValueError, AttributeError):
        print(f"mesh stat: unexpected answer to {path} from {args.registry}", file=sys.stderr)
        return 1
    return 0


def _stat_tables(body: dict[str, object], *, edges: bool) -> None:
    """The services table (and the edges table) of a telemetry answer, drawn with rich."""

    from rich import box
    from rich.console import Console
    from rich.table import Table

    def rate(value: Any) -> str:
        return "-" if value is None else f"{float(value):.2f}"

    def percent(value: Any) -> str:
        return "-" if value is None else f"{float(value) * 100:.2f}%"

    def ms(value: Any) -> str:
        return "-" if value is None else f"{float(value) * 1000:.1f}"

    def golden(row: Any) -> list[str]:
        latency = row["latency"]
        return [
            rate(row["rps"]),
            percent(row["success_rate"]),
            ms(latency["p50"]),
            ms(latency["p95"]),
            ms(latency["p99"]),
        ]

    window = float(body["window_seconds"])  # type: ignore[arg-type]
    rows: Any = body["services"] if "services" in body else body["nodes"]
    services = [row for row in rows if row["service"] != "anonymous"]
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if not services:
        console.print(f"no services and no traffic in the last {window:g}s")
        return
    table = Table(title=f"services, last {window:g}s", title_justify="left", box=box.SIMPLE)
    for name in ("SERVICE", "RPS", "SUCCESS", "P50 ms", "P95 ms", "P99 ms", "INSTANCES"):
        table.add_column(name, justify="left" if name == "SERVICE" else "right", no_wrap=True)
    for row in services:
        instances = f"{row['healthy_instances']}/{row['instances']}" if row["registered"] else "-"
        table.add_row(str(row["service"]), *golden(row), instances)
    console.print(table)
    if not edges:
        return
    edge_rows: Any = body["edges"]
    if not edge_rows:
        console.print(f"no edges with traffic in the last {window:g}s")
        return
    table = Table(title=f"edges, last {window:g}s", title_justify="left", box=box.SIMPLE)
    for name in (
        "SOURCE",
        "DESTINATION",
        "RPS",
        "SUCCESS",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "SEEN BY",
    ):
        justify = "left" if name in ("SOURCE", "DESTINATION", "SEEN BY") else "right"
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in edge_rows:
        table.add_row(
            str(row["source"]), str(row["destination"]), *golden(row), str(row["reporter"])
        )
    console.print(table)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _demo(args: argparse.Namespace) -> int:
    try:
        from mesh_middleware.demo import run_demo
    except ImportError as exc:
        print(
            f"mesh demo: not available in this installation ({exc}); it runs from a source "
            "checkout: `./dev demo` there",
            file=sys.stderr,
        )
        return 2
    return run_demo(duration=args.duration)


def _duration(text: str) -> float:
    from mesh_middleware.policy.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 24h or 90s") from None


def _registry_option(parser: argparse.ArgumentParser) -> None:
    import os

    parser.add_argument(
        "--registry",
        default=os.environ.get("MESH_REGISTRY_URL", "http://127.0.0.1:7400"),
        metavar="URL[,URL…]",
        help=(
            "default $MESH_REGISTRY_URL or http://127.0.0.1:7400; several replicas, "
            "comma-separated, are tried in turn"
        ),
    )


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-token",
        default=None,
        help="default $MESH_ADMIN_TOKEN or the registry data dir's admin.token",
    )
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR", help="the registry's data dir (for admin.token)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh", description="mesh-middleware: the mesh in-process."
    )
    parser.add_argument("--version", action="version", version=f"mesh-middleware {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = commands.add_parser("policy", help="check, explain and describe policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_commands.add_parser("check", help="validate policy files (exit 1 on any error)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(run=_policy_check)
    schema = policy_commands.add_parser("schema", help="print the policy file's JSON Schema")
    schema.set_defaults(run=_policy_schema)
    explain = policy_commands.add_parser(
        "explain", help="what the policy decides for a request, and which rule and line decided"
    )
    explain.add_argument("file", metavar="FILE")
    explain.add_argument(
        "--from",
        dest="caller",
        required=True,
        metavar="SERVICE",
        help="caller service or 'anonymous'",
    )
    explain.add_argument("--method", required=True, metavar="M")
    explain.add_argument("--path", required=True, metavar="P")
    explain.add_argument(
        "--header", type=_header, action="append", default=[], metavar="K=V", help="repeatable"
    )
    explain.add_argument(
        "--user",
        metavar="ISS/SUB",
        help="the end user's principal (a valid token from issuer ISS for subject SUB); "
        "without it the end user is anonymous",
    )
    explain.add_argument(
        "--claim",
        type=_header,
        action="append",
        default=[],
        metavar="K=V",
        help="a claim of the end user's token (repeatable; a repeated K makes a list; "
        "[outer][inner]=V nests; V starting with [ or { is JSON; K:=V takes V as JSON, "
        "for numbers and booleans)",
    )
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")
    explain.set_defaults(run=_policy_explain)

    registry = commands.add_parser("registry", help="run the registry service")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=7400)
    registry.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help=(
            "sqlite:///PATH (default: in --data-dir), or etcd://H1:2379,H2:2379,H3:2379/PREFIX "
            "for replicas sharing one state"
        ),
    )
    registry.add_argument(
        "--store-key-file",
        default=None,
        metavar="FILE",
        help=(
            "etcd stores: the key (base64 of 32 bytes, file 0600) that wraps private keys "
            "before they reach etcd (default $MESH_STORE_KEY)"
        ),
    )
    registry.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="default $MESH_REGISTRY_DATA or ~/.local/state/mesh-registry",
    )
    registry.add_argument(
        "--dev", action="store_true", help="accept any service without a join token (demos only)"
    )
    registry.add_argument("--trust-domain", default="mesh.local")
    registry.add_argument(
        "--cert-ttl",
        type=_duration,
        default=24 * 3600.0,
        metavar="D",
        help="lifetime of instance certificates (default 24h; renewed at half life)",
    )
    registry.add_argument(
        "--ca-root-ttl",
        type=_duration,
        default=365 * 86400.0,
        metavar="D",
        help="lifetime of a CA root the registry creates (default 8760h, a year)",
    )
    registry.add_argument(
        "--ca-activate-after",
        type=_duration,
        default=600.0,
        metavar="D",
        help="how long a new root is trusted before it signs (default 10m)",
    )
    registry.add_argument("--ca-cert", default=None, metavar="FILE", help="an operator's CA (PEM)")
    registry.add_argument("--ca-key", default=None, metavar="FILE", help="its private key (PEM)")
    registry.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="serve the API over HTTPS with this certificate (clients: MESH_REGISTRY_CA)",
    )
    registry.add_argument("--tls-key", default=None, metavar="FILE", help="its private key")
    registry.set_defaults(run=_registry)

    run = commands.add_parser(
        "run",
        help="serve an app over the mesh's mutual TLS (uvicorn or gunicorn)",
        description=(
            "Get this instance's certificate from the registry's CA (MESH_REGISTRY_URL, "
            "MESH_JOIN_TOKEN), serve APP with it as the policy's inbound.mtls says, and renew "
            "it at half life without dropping connections."
        ),
    )
    run.add_argument("app", metavar="APP", help="module:attribute, e.g. myapp.main:app")
    run.add_argument("--server", choices=["uvicorn", "gunicorn"], default="uvicorn")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000, help="the TLS port (default 8000)")
    run.add_argument(
        "--plain-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve plaintext here (mtls: permissive; under strict only public paths answer)",
    )
    run.add_argument("--workers", type=int, default=1, help="gunicorn workers (default 1)")
    run.add_argument("--policy", default=None, metavar="FILE", help="default $MESH_POLICY")
    run.add_argument(
        "--cert-wait",
        type=_duration,
        default=30.0,
        metavar="D",
        help="how long to wait for the first certificate (default 30s)",
    )
    run.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=5,
        metavar="S",
        help="close idle connections after S seconds (default 5)",
    )
    run.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="where APP is imported from (default: the current directory)",
    )
    run.set_defaults(run=_run)

    ca = commands.add_parser("ca", help="the mesh CA: show its roots, rotate them")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    show = ca_commands.add_parser("show", help="the trusted roots and their states")
    _registry_option(show)
    show.add_argument("--json", action="store_true")
    show.add_argument("--pem", action="store_true", help="print the trust bundle as PEM")
    show.set_defaults(run=_ca_show)
    rotate = ca_commands.add_parser(
        "rotate", help="add a new root: trusted at once, signing after --activate-after"
    )
    _registry_option(rotate)
    rotate.add_argument("--cert", default=None, metavar="FILE", help="the operator's new CA")
    rotate.add_argument("--key", default=None, metavar="FILE", help="its private key")
    rotate.add_argument("--activate-after", default=None, metavar="D", help="default: 10m")
    _admin_options(rotate)
    rotate.set_defaults(run=_ca_rotate)

    token = commands.add_parser("token", help="join tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_commands.add_parser(
        "create", help="create a join token for a service (shown once)"
    )
    create.add_argument("service", metavar="SERVICE")
    _registry_option(create)
    _admin_options(create)
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=_token_create)

    doctor = commands.add_parser(
        "doctor",
        help="check that every registry URL answers and that they make one registry",
        description=(
            "Ask each URL of --registry (no failover) for its health, store, leadership, "
            "trust domain and signing keys; exit 1 on any problem."
        ),
    )
    _registry_option(doctor)
    doctor.set_defaults(run=_doctor)

    services = commands.add_parser("services", help="list registered services")
    _registry_option(services)
    services.add_argument("--json", action="store_true")
    services.set_defaults(run=_services)

    instances = commands.add_parser("instances", help="list a service's instances")
    instances.add_argument("service", metavar="SERVICE")
    _registry_option(instances)
    instances.add_argument("--json", action="store_true")
    instances.set_defaults(run=_instances)

    stat = commands.add_parser("stat", help="golden metrics per service (and per edge)")
    _registry_option(stat)
    stat.add_argument(
        "--window", default="60s", metavar="DURATION", help="how far back (10s to 5m; default 60s)"
    )
    stat.add_argument("--edges", action="store_true", help="also show each source -> destination")
    stat.add_argument("--json", action="store_true", help="print the registry's JSON answer")
    stat.set_defaults(run=_stat)

    demo = commands.add_parser(
        "demo", help="run the sample shop with a registry, drive traffic, check what it shows"
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="N",
        help="seconds of traffic (default: until Ctrl-C, at most 1 hour)",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mesh`` command; return its exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
