"""Real upstream processes for the outbound adapters' tests, shared by a module fixture."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx

from mesh_middleware import Mesh
from mesh_middleware.policy.compiled import compile_policy_text
from tests.support.servers import free_port, running, uvicorn_argv


@dataclass
class Upstreams:
    """Where each kind of upstream listens; ``dead`` is a port nothing listens on."""

    ok: list[int]
    failing: int  # always 503
    slow: int  # 400 ms per answer
    dead: int

    def stats(self, port: int) -> dict[str, int]:
        counts: dict[str, int] = httpx.get(f"http://127.0.0.1:{port}/stats").json()["counts"]
        return counts

    def reset(self) -> None:
        for port in (*self.ok, self.failing, self.slow):
            httpx.post(f"http://127.0.0.1:{port}/reset")


@contextmanager
def upstreams() -> Iterator[Upstreams]:
    kinds = {"ok0": {}, "ok1": {}, "failing": {"UPSTREAM_FAIL_PERCENT": "100"}}
    kinds["slow"] = {"UPSTREAM_DELAY_MS": "400"}
    ports = {name: free_port() for name in kinds}
    with ExitStack() as stack:
        for name, env in kinds.items():
            port = ports[name]
            stack.enter_context(
                running(
                    uvicorn_argv("tests.support.upstream:app", port),
                    port=port,
                    env={"UPSTREAM_NAME": name, **env},
                )
            )
        yield Upstreams(
            ok=[ports["ok0"], ports["ok1"]],
            failing=ports["failing"],
            slow=ports["slow"],
            dead=free_port(),
        )


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def endpoints(*ports: int) -> str:
    """Static endpoint lines of a policy's ``outbound.services.<name>.endpoints``."""
    return "".join(f"        - url: {url(p)}\n" for p in ports)


def mesh_for(services: str, defaults: str = "") -> Mesh:
    """A standalone Mesh (static endpoints) whose policy has these outbound sections."""
    text = "service: orders\ninbound: {authentication: permissive}\noutbound:\n"
    if defaults:
        text += f"  defaults:\n{defaults}"
    text += f"  services:\n{services}"
    return Mesh(compile_policy_text(text), watch=False)
