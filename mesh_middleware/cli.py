"""The ``mesh`` command line (DESIGN §5).

``mesh policy check FILE…`` · ``mesh policy schema`` · ``mesh policy explain FILE --from S
--method M --path P [--header K=V]… [--json]`` · ``mesh demo [--duration N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mesh_middleware._version import __version__
from mesh_middleware.errors import PolicyError

__all__ = ["main"]


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
    from mesh_middleware.policy.explain import explain

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
    result = explain(
        compiled, caller=args.caller, method=args.method, path=args.path, headers=headers
    )
    if args.json:
        print(json.dumps(result))
    else:
        rule = f" rule {result['rule']!r}" if result["rule"] else ""
        print(f"{result['decision']} ({result['status']}){rule}: {result['reason']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mesh_middleware.demo import run_demo

    return run_demo(duration=args.duration)


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
    explain.add_argument("--json", action="store_true", help="print the decision as JSON")
    explain.set_defaults(run=_policy_explain)

    demo = commands.add_parser("demo", help="run sample apps with the mesh and drive traffic")
    demo.add_argument(
        "--duration", type=float, default=None, metavar="N", help="stop after N seconds"
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
