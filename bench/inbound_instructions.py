"""Instructions per request: the inbound mesh's cost counted by valgrind, immune to machine noise.

On a shared VM the requests/s of ``bench/inbound.py`` move by more than a hot-path change saves,
so a change is judged here first: the benchmark's app (``bench/apps.py``) is called in-process
as an ASGI callable, one asyncio task per request as uvicorn makes them, under
``valgrind --tool=callgrind``, and the instructions executed are read from its summary. Each
variant runs twice, with ``--warm`` + ``--requests`` requests and with ``--warm`` alone, and the
difference divided by ``--requests`` is the cost of one request, start-up and imports excluded.
The count is the same from run to run within about 1%.

Variants are those of ``bench/inbound.py``: ``bare``, ``mesh`` (identity, the 20 rules, metrics,
a span context per request) and ``mesh+log`` (and an access line per request, written to a file).
No server, socket or HTTP parser runs here: what uvicorn does per request is not counted, and an
instruction costs more time on a live server, whose caches are colder between requests.

``--end-users`` adds ``mesh+users``: mesh's policy plus end-user authentication (an inline JWKS
of an RSA key) and user and claim conditions on the admitting rule, every request carrying an
RS256 user token in ``Authorization: Bearer``; it is printed against ``mesh``. The key and the
token are made once, outside valgrind (RSA key generation costs a random number of
instructions), and written for each child.

    python bench/inbound_instructions.py                 # bare, mesh, mesh+log
    python bench/inbound_instructions.py --end-users     # and mesh+users
    python bench/inbound_instructions.py --requests 4000 # steadier, slower
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
VARIANTS = ("bare", "mesh", "mesh+log", "mesh+users")
DEFAULT_VARIANTS = VARIANTS[:3]
USERS_POLICY = "policy-mesh-users.yaml"  # written by the parent for mesh+users
USERS_TOKEN = "user-token"
_REFS = re.compile(r"refs:\s*([\d,]+)")


def serve(variant: str, requests: int, directory: Path) -> None:
    """Run in the child under valgrind: build the app for ``variant`` and serve ``requests``."""
    sys.path.insert(0, str(BENCH_DIR))
    import inbound

    policies, jwks, token, _ = inbound.write_mesh_files(directory, inbound.POLICY)
    os.environ["BENCH_JWKS"] = str(jwks)
    os.environ["BENCH_MESH"] = "0" if variant == "bare" else "1"
    extra: list[tuple[bytes, bytes]] = []
    if variant == inbound.MESH_USERS:
        os.environ["BENCH_POLICY"] = str(directory / USERS_POLICY)
        user_token = (directory / USERS_TOKEN).read_text()
        extra.append((b"authorization", f"Bearer {user_token}".encode()))
    else:
        os.environ["BENCH_POLICY"] = str(
            policies[inbound.MESH_LOG if variant == "mesh+log" else "mesh"]
        )
    sys.stderr = (directory / "access.log").open("w")  # where mesh+log writes its lines
    from apps import create_app

    app = create_app()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": inbound.ITEM_PATH,
        "raw_path": inbound.ITEM_PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (inbound.IDENTITY_HEADER.encode(), token.encode()),
            (b"traceparent", inbound.TRACEPARENT.encode()),
            *extra,
        ],
    }
    statuses: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    async def one() -> None:
        await app(dict(scope), receive, send)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(requests):
            await loop.create_task(one())

    asyncio.run(main())
    if statuses.count(200) != requests:
        raise SystemExit(f"{variant}: expected {requests} answers 200, got {statuses[-3:]}")


def instructions(variant: str, requests: int, files: dict[str, str] | None = None) -> int:
    """Instructions valgrind counted for a whole child process serving ``requests``; ``files``
    are written into its directory first."""
    with tempfile.TemporaryDirectory(prefix="mesh-ir-") as tmp:
        for name, text in (files or {}).items():
            Path(tmp, name).write_text(text)
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out",
            sys.executable, *(["-S"] if sys.flags.no_site else []),
            __file__, "--serve", variant, str(requests), tmp,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{variant}: valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="requests counted (2000)")
    parser.add_argument("--warm", type=int, default=300, help="requests before them (300)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: the first three, and"
        " mesh+users with --end-users)",
    )
    parser.add_argument(
        "--end-users",
        action="store_true",
        help="also count mesh+users (end-user token, user and claim conditions) against mesh",
    )
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        variant, requests, directory = args.serve
        serve(variant, int(requests), Path(directory))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is required: apt-get install -y valgrind", file=sys.stderr)
        return 1
    if not (1 <= args.requests <= 100_000 and 1 <= args.warm <= 10_000):
        parser.error("--requests 1..100000, --warm 1..10000")
    wanted = (
        args.variants.split(",")
        if args.variants
        else [*DEFAULT_VARIANTS, *(["mesh+users"] if args.end_users else [])]
    )
    variants = [v for v in VARIANTS if v in wanted]
    if not variants:
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    files: dict[str, str] = {}
    if "mesh+users" in variants:
        sys.path.insert(0, str(BENCH_DIR))
        import inbound

        users = inbound.end_user_tokens()
        policy, _ = inbound.with_end_users(inbound.POLICY, users.jwks)
        files = {USERS_POLICY: policy, USERS_TOKEN: users.token}
    per_request: dict[str, float] = {}
    for variant in variants:
        written = files if variant == "mesh+users" else None
        whole = instructions(variant, args.warm + args.requests, written)
        start = instructions(variant, args.warm, written)
        per_request[variant] = (whole - start) / args.requests
        print(f"{variant:<10} {per_request[variant]:10,.0f} instructions per request", flush=True)
    bare = per_request.get("bare")
    if bare is not None:
        for variant in variants[1:]:
            added = per_request[variant] - bare
            print(
                f"{variant} adds {added:,.0f} instructions per request ({added / bare:.0%} of bare)"
            )
    mesh, with_users = per_request.get("mesh"), per_request.get("mesh+users")
    if mesh is not None and with_users is not None:
        added = with_users - mesh
        print(
            f"mesh+users adds {added:,.0f} instructions per request to mesh"
            f" (mesh+users/mesh = {with_users / mesh:.3f}x the instructions per request"
            + (f"; {added / (mesh - bare):.0%} of what mesh adds to bare" if bare else "")
            + ")"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
