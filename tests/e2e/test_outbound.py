"""The outbound client against real processes: upstream uvicorn servers and a real registry.

Every test builds its own ``Mesh`` (its own balancer, outlier, budget and discovery state) on a
dev-mode registry shared by the module, and registers the shared upstream processes under a
service name of its own. Load loops are bounded by a request count and a deadline.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mesh_middleware import Mesh
from mesh_middleware.outbound.mirror import mirror_slots
from mesh_middleware.policy.compiled import compile_policy_text
from tests.e2e.outbound_support import (
    LoadResult,
    RecordingServer,
    Upstream,
    deltas,
    eventually,
    load,
    register,
    upstreams,
)
from tests.registry.support import Registry, start_registry, verify
from tests.support.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MeshFactory = Callable[..., Mesh]


# -- shared processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One dev-mode registry (no join tokens) for the module."""
    with start_registry(tmp_path_factory.mktemp("outbound") / "registry", dev=True) as running:
        yield running
        # The closed Meshes' watch threads may still hold a long-poll open; a SIGTERM would
        # wait out uvicorn's graceful shutdown for them. Nothing is left to keep: kill it.
        running.kill()


@pytest.fixture(scope="module")
def ups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    """The upstream processes every test draws from (started together)."""
    specs: dict[str, dict[str, str]] = {
        "a": {},
        "b": {},
        "c": {},
        "d": {},
        "slow": {"UPSTREAM_DELAY_MS": "100"},
        "f1": {"UPSTREAM_FAIL_PERCENT": "100"},
        "f2": {"UPSTREAM_FAIL_PERCENT": "100"},
        "k1": {},
        "k2": {},
        "k3": {},
    }
    with upstreams(specs, tmp_path_factory.mktemp("upstream-logs")) as started:
        yield started


@pytest.fixture
def make_mesh(registry: Registry) -> Iterator[MeshFactory]:
    """Meshes of service ``caller`` on the module's registry (closed after the test)."""
    made: list[Mesh] = []

    def make(outbound_yaml: str = "", registry_url: str | None = None) -> Mesh:
        text = f"service: caller\n{outbound_yaml}"
        mesh = Mesh(
            compile_policy_text(text), watch=False, registry_url=registry_url or registry.url
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def _join(registry_url: str, service: str, members: dict[str, tuple[Upstream, str]]) -> None:
    """Register ``instance id -> (upstream, version)`` as instances of ``service``."""
    for instance_id, (upstream, version) in members.items():
        register(registry_url, service, instance_id, upstream.port, version=version)


async def _settle(client: httpx.AsyncClient, url: str, instances: int, mesh: Mesh) -> None:
    """One call (starts the watch and fetches the token), then wait for every instance."""
    response = await client.get(url)
    assert response.status_code == 200, response.text
    service = httpx.URL(url).host
    await eventually(
        lambda: len(mesh.discovery.get(service) or ()) == instances,
        5.0,
        f"{service}: {instances} instances discovered",
    )


# -- 1. an instance dies under load ------------------------------------------------------------


class TornAnswer(Exception):
    """The instance sent an answer's head, then died before its body ended. The call had
    already answered, so nothing can retry it (nor can Envoy, which forwards a head as it
    comes); the load counts it apart from failures the mesh should have retried."""


def test_sigkill_of_one_of_three_instances_under_load_fails_no_get(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """kill -9 of one instance mid-load: every GET gets its answer (the tries that were in
    flight or refused are retried on the survivors; the outlier detector ejects the dead one).

    The one exception is an answer the victim had begun, head sent and body cut off by the
    kill: a few microseconds of each answer's life, hit once so far in this project's CI runs. Such
    answers are counted apart; there can be no more of them than calls in flight, and 99.9% of
    all GETs must succeed all the same (issue 4's bar)."""
    _join(registry.url, "killme", {k: (ups[k], "v1") for k in ("k1", "k2", "k3")})
    mesh = make_mesh()
    total, kill_at, concurrency = 2400, 800, 16
    victim = ups["k2"]
    at_kill: Counter[str] = Counter()

    def progress(result: LoadResult) -> None:
        if result.done == kill_at:
            at_kill.update(result.names)
            victim.kill()

    async def scenario() -> LoadResult:
        async with mesh.async_client(timeout=10) as client:

            async def get(i: int) -> httpx.Response:
                request = client.build_request("GET", f"http://killme/items/{i}")
                # The head is back once send returns: every retry is behind us by then.
                response = await client.send(request, stream=True)
                try:
                    await response.aread()
                except httpx.TransportError as exc:
                    raise TornAnswer(repr(exc)) from exc
                finally:
                    await response.aclose()
                return response

            await _settle(client, "http://killme/warm", 3, mesh)
            return await load(
                get,
                requests=total,
                concurrency=concurrency,
                seconds=90,
                on_progress=progress,
            )

    result = asyncio.run(scenario())
    torn = result.errors.pop(TornAnswer.__name__, 0)
    print(
        f"\nkill -9 mid-load: {result.ok}/{result.sent} GETs succeeded in {result.seconds:.1f} s"
        f" (answers by {dict(result.names)}; k2 answered {at_kill['k2']} before its kill;"
        f" {torn} answers torn by the kill)"
    )
    assert victim.proc.poll() is not None, "the instance was never killed"
    assert at_kill["k2"] > 0, "k2 was not serving before the kill"
    assert result.sent == total, "the load was cut short by its deadline"
    assert result.errors == Counter(), result.errors  # every failed try was retried
    assert torn <= concurrency, torn
    assert result.ok == total - torn, result.statuses
    assert result.ok >= 0.999 * total, result.ok


# -- 2. a slow instance -----------------------------------------------------------------------


def test_peak_ewma_sends_a_slow_instance_under_10_percent(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """With the default balancer (P2C over peak EWMA) an instance 100 ms slower than its two
    peers gets under 10% of the calls (a uniform balancer would give it a third).

    Four calls at a time: the client measures latency on its own event loop, so a client
    saturated with calls sees its own queueing in every instance's estimate (at 16 at a time
    on a busy 2-core machine the fast instances' peaks reached ~200 ms and the slow one got
    ~16% of the calls)."""
    _join(registry.url, "slowpoke", {k: (ups[k], "v1") for k in ("a", "b", "slow")})
    mesh = make_mesh()

    async def scenario() -> LoadResult:
        async with mesh.async_client(timeout=10) as client:
            await _settle(client, "http://slowpoke/warm", 3, mesh)
            return await load(
                lambda i: client.get(f"http://slowpoke/items/{i}"),
                requests=800,
                concurrency=4,
                seconds=60,
            )

    result = asyncio.run(scenario())
    share = result.names["slow"] / result.ok
    print(f"\nslow instance: {share:.1%} of {result.ok} calls ({dict(result.names)})")
    assert result.ok == result.sent == 800, (result.statuses, result.errors)
    assert share < 0.10
    assert result.names["a"] > 0 and result.names["b"] > 0, result.names


# -- 3. a weighted split ----------------------------------------------------------------------


def test_a_90_10_split_over_10000_calls_is_within_binomial_bounds(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """``to: [{version: v1, weight: 90}, {version: v2, weight: 10}]`` over 10,000 calls: the
    v2 count is within 4.5 standard deviations of 1,000 (a false alarm once in ~150,000 runs)."""
    _join(registry.url, "split", {"a": (ups["a"], "v1"), "b": (ups["b"], "v1")})
    _join(registry.url, "split", {"c": (ups["c"], "v2")})
    mesh = make_mesh(
        """
outbound:
  services:
    split:
      routes:
        - to: [{version: v1, weight: 90}, {version: v2, weight: 10}]
"""
    )
    total = 10_000

    async def scenario() -> LoadResult:
        async with mesh.async_client(timeout=10) as client:
            await _settle(client, "http://split/warm", 3, mesh)
            return await load(
                lambda i: client.get("http://split/items"),
                requests=total,
                concurrency=8,
                seconds=120,
            )

    result = asyncio.run(scenario())
    v2 = result.names["c"]
    mean, sigma = total * 0.1, math.sqrt(total * 0.1 * 0.9)
    print(
        f"\n90/10 split: v2 took {v2} of {result.ok} ({(v2 - mean) / sigma:+.2f} sigma),"
        f" {result.ok / result.seconds:.0f} calls/s"
    )
    assert result.ok == result.sent == total, (result.statuses, result.errors)
    assert result.names["a"] + result.names["b"] + v2 == total, result.names
    assert abs(v2 - mean) <= 4.5 * sigma


# -- 4. consistent hashing --------------------------------------------------------------------


def test_consistent_hashing_moves_few_keys_when_an_instance_joins(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """Hashing on ``x-user``: each key sticks to one instance; when a fourth instance joins in
    the registry, at most 1.5/N of the keys move, and every key that moves goes to it."""
    _join(registry.url, "sticky", {k: (ups[k], "v1") for k in ("a", "b", "c")})
    mesh = make_mesh(
        """
outbound:
  services:
    sticky:
      load_balancer: {consistent_hash: {header: x-user}}
"""
    )
    keys = [f"user-{i}" for i in range(400)]

    async def owners(client: httpx.AsyncClient) -> dict[str, str]:
        found: dict[str, str] = {}
        semaphore = asyncio.Semaphore(8)

        async def one(key: str) -> None:
            async with semaphore:
                response = await client.get("http://sticky/cart", headers={"x-user": key})
            assert response.status_code == 200, response.text
            found[key] = response.json()["name"]

        await asyncio.wait_for(asyncio.gather(*(one(k) for k in keys)), timeout=60)
        return found

    async def scenario() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        async with mesh.async_client(timeout=10) as client:
            await _settle(client, "http://sticky/warm", 3, mesh)
            before = await owners(client)
            again = await owners(client)
            register(registry.url, "sticky", "d", ups["d"].port)
            await eventually(
                lambda: len(mesh.discovery.get("sticky") or ()) == 4, 10.0, "the join is seen"
            )
            after = await owners(client)
            return before, again, after

    before, again, after = asyncio.run(scenario())
    moved = {k: after[k] for k in keys if after[k] != before[k]}
    print(
        f"\nconsistent hash: {len(moved)} of {len(keys)} keys moved when the 4th instance joined"
        f" (bound {1.5 / 4:.0%}); spread before {dict(Counter(before.values()))},"
        f" after {dict(Counter(after.values()))}"
    )
    assert again == before, "a key changed instance with no change in the instances"
    assert set(before.values()) == {"a", "b", "c"}
    assert 0 < len(moved) <= 1.5 / 4 * len(keys)
    assert set(moved.values()) == {"d"}, "a key moved between instances that were already there"


# -- 5. the retry budget ----------------------------------------------------------------------


def test_a_total_outage_never_gets_more_retries_than_the_budget(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """Every instance answers 503 and 503 is retried (2 retries): the instances receive at most
    requests + ratio x requests + min_per_second x window tries, not 3 x requests."""
    _join(registry.url, "outage", {"f1": (ups["f1"], "v1"), "f2": (ups["f2"], "v1")})
    ratio, per_second, window = 0.2, 1, 10
    mesh = make_mesh(
        f"""
outbound:
  services:
    outage:
      retries:
        attempts: 2
        on: [503]
        budget: {{ratio: {ratio}, min_per_second: {per_second}}}
"""
    )
    total = 600
    firsts = {name: ups[name].stats() for name in ("f1", "f2")}

    async def scenario() -> LoadResult:
        async with mesh.async_client(timeout=10) as client:
            response = await client.get("http://outage/warm")
            assert response.status_code == 503
            return await load(
                lambda i: client.get(f"http://outage/items/{i}"),
                requests=total,
                concurrency=16,
                seconds=60,
            )

    result = asyncio.run(scenario())
    requests = result.sent + 1  # and the warm-up call
    tries = sum(deltas(firsts[n], ups[n].stats())["GET"] for n in ("f1", "f2"))
    windows = math.ceil((result.seconds + 1) / window)  # buckets are whole seconds
    bound = requests + ratio * requests + per_second * window * windows
    print(
        f"\ntotal outage: {requests} requests -> {tries} tries ({tries - requests} retries) in"
        f" {result.seconds:.1f} s; budget bound {bound:.0f}; without a budget up to {3 * requests}"
    )
    assert result.statuses == Counter({503: total}), (result.statuses, result.errors)
    assert requests < tries <= bound


# -- 6. POST and Idempotency-Key --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["httpx-async", "httpx", "requests"])
def test_a_post_is_retried_only_with_an_idempotency_key(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory, kind: str
) -> None:
    """503 is retried (2 retries): a POST without ``Idempotency-Key`` reaches the upstream once,
    a POST with one three times; the caller sees the 503 either way."""
    service = f"post-{kind}"
    _join(registry.url, service, {"f1": (ups["f1"], "v1")})
    mesh = make_mesh(
        f"""
outbound:
  services:
    {service}:
      retries: {{attempts: 2, on: [503]}}
"""
    )
    url = f"http://{service}/orders"
    keyed = {"idempotency-key": "order-42"}

    def posts(send: Callable[[dict[str, str]], int], headers: dict[str, str]) -> int:
        before = ups["f1"].stats()
        assert send(headers) == 503
        return deltas(before, ups["f1"].stats())["POST"]

    if kind == "httpx-async":

        async def scenario() -> tuple[int, int]:
            async with mesh.async_client(timeout=10) as client:
                counts = []
                for headers in ({}, keyed):
                    before = ups["f1"].stats()
                    response = await client.post(url, json={"n": 1}, headers=headers)
                    assert response.status_code == 503
                    counts.append(deltas(before, ups["f1"].stats())["POST"])
                return counts[0], counts[1]

        plain, with_key = asyncio.run(scenario())
    elif kind == "httpx":
        with mesh.client(timeout=10) as client:

            def send(headers: dict[str, str]) -> int:
                return client.post(url, json={"n": 1}, headers=headers).status_code

            plain, with_key = posts(send, {}), posts(send, keyed)
    else:
        with mesh.requests_session() as session:

            def send(headers: dict[str, str]) -> int:
                return session.post(url, json={"n": 1}, headers=headers, timeout=10).status_code

            plain, with_key = posts(send, {}), posts(send, keyed)
    assert plain == 1, f"a POST without Idempotency-Key reached the upstream {plain} times"
    assert with_key == 3, f"a POST with Idempotency-Key reached the upstream {with_key} times"


# -- 7. registry outage -----------------------------------------------------------------------


def test_calls_keep_flowing_to_cached_instances_while_the_registry_is_down(
    tmp_path: Path, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """kill -9 of the registry: the watch notices, keeps its last answer, and every call still
    reaches the instances it knew."""
    with start_registry(tmp_path / "registry", dev=True) as own:
        _join(own.url, "cached", {"a": (ups["a"], "v1"), "b": (ups["b"], "v1")})
        mesh = make_mesh(registry_url=own.url)

        async def scenario() -> tuple[LoadResult, LoadResult]:
            async with mesh.async_client(timeout=10) as client:
                await _settle(client, "http://cached/warm", 2, mesh)
                up = await load(
                    lambda i: client.get("http://cached/items"),
                    requests=200,
                    concurrency=8,
                    seconds=30,
                )
                own.kill()
                await eventually(
                    lambda: mesh.discovery.snapshot()["cached"]["connected"] is False,
                    10.0,
                    "the watch notices the registry is gone",
                )
                down = await load(
                    lambda i: client.get("http://cached/items"),
                    requests=500,
                    concurrency=8,
                    seconds=30,
                )
                return up, down

        up, down = asyncio.run(scenario())
    view = mesh.discovery.snapshot()["cached"]
    print(f"\nregistry down: {down.ok}/{down.sent} calls answered ({dict(down.names)}); {view}")
    assert up.ok == up.sent == 200
    assert down.ok == down.sent == 500, (down.statuses, down.errors)
    # Answered by the instances it knew, and it still knows both. Not "each answered some":
    # peak EWMA rightly keeps away from an instance for seconds after one slow answer, and on
    # a loaded CI machine all 500 calls went to b (Counter({'b': 500})).
    assert set(down.names) <= {"a", "b"} and sum(down.names.values()) == 500, down.names
    assert view["instances"] == 2 and view["stale_seconds"] > 0


# -- 8. mirroring ------------------------------------------------------------------------------


def test_mirrored_calls_reach_the_mirror_marked_and_answers_come_from_the_primary(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """``mirror: {to: {version: v2}, percent: 100}``: each call is answered by the v1 primary
    and copied to v2 with ``x-mesh-shadow`` and host ``<service>-shadow``."""
    calls = 60
    with RecordingServer("mirror") as mirror:
        register(registry.url, "mirrored", "primary", ups["a"].port, version="v1")
        register(registry.url, "mirrored", "shadow", mirror.port, version="v2")
        mesh = make_mesh(
            """
outbound:
  services:
    mirrored:
      routes:
        - to: [{version: v1}]
      mirror: {to: {version: v2}, percent: 100}
"""
        )
        first = ups["a"].stats()
        dropped = mirror_slots.dropped

        async def scenario() -> LoadResult:
            async with mesh.async_client(timeout=10) as client:
                await _settle(client, "http://mirrored/warm", 2, mesh)
                result = await load(
                    lambda i: client.get(f"http://mirrored/items/{i}"),
                    requests=calls,
                    concurrency=4,
                    seconds=30,
                )
                await eventually(
                    lambda: len(mirror.seen()) >= calls + 1, 10.0, "every shadow arrived"
                )
                return result

        result = asyncio.run(scenario())
        shadows = mirror.seen()
    arrived = deltas(first, ups["a"].stats())
    print(f"\nmirror: {len(shadows)} shadows for {result.ok + 1} calls; primary saw {arrived}")
    assert result.names == Counter({"a": calls}), (result.names, result.errors)
    assert mirror_slots.dropped == dropped
    assert len(shadows) == calls + 1
    assert {path for _, path, _ in shadows} == {"/warm"} | {f"/items/{i}" for i in range(calls)}
    for method, _, headers in shadows:
        assert method == "GET"
        assert headers["host"] == "mirrored-shadow"
        assert headers["x-mesh-shadow"] == "1"
    assert arrived["GET"] == calls + 1
    assert arrived["GET shadow"] == 0


def test_a_dead_mirror_target_never_fails_a_call(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """The v2 mirror target refuses connections: every call still answers 200 from v1."""
    calls = 60
    register(registry.url, "mirror-dead", "primary", ups["b"].port, version="v1")
    register(registry.url, "mirror-dead", "gone", free_port(), version="v2")
    mesh = make_mesh(
        """
outbound:
  services:
    mirror-dead:
      routes:
        - to: [{version: v1}]
      mirror: {to: {version: v2}, percent: 100}
"""
    )
    failed = mirror_slots.failed

    async def scenario() -> LoadResult:
        async with mesh.async_client(timeout=10) as client:
            await _settle(client, "http://mirror-dead/warm", 2, mesh)
            result = await load(
                lambda i: client.get(f"http://mirror-dead/items/{i}"),
                requests=calls,
                concurrency=4,
                seconds=30,
            )
            await eventually(
                lambda: mirror_slots.failed - failed >= calls + 1,
                10.0,
                "every shadow was tried and failed",
            )
            return result

    result = asyncio.run(scenario())
    print(f"\ndead mirror: {result.ok}/{result.sent} calls answered; failed shadows counted")
    assert result.names == Counter({"b": calls}), (result.names, result.errors)
    assert result.ok == calls


# -- 9. identity ------------------------------------------------------------------------------


def test_mesh_hosts_get_an_identity_token_and_other_hosts_never_do(
    registry: Registry, ups: dict[str, Upstream], make_mesh: MeshFactory
) -> None:
    """Through one client: ``http://ident/`` carries a JWT-SVID from ``caller`` for ``ident``
    (verified against the registry's keys); ``http://127.0.0.1:<port>/`` carries none."""
    upstream = ups["c"]
    register(registry.url, "ident", "c", upstream.port)
    mesh = make_mesh()

    async def scenario() -> tuple[dict[str, str | None], dict[str, str | None]]:
        async with mesh.async_client(timeout=10) as client:
            response = await client.get("http://ident/hello")
            assert response.status_code == 200, response.text
            meshed = upstream.last_headers()
            response = await client.get(f"{upstream.url}/hello")
            assert response.status_code == 200, response.text
            plain = upstream.last_headers()
            return meshed, plain

    meshed, plain = asyncio.run(scenario())
    token = meshed["x-mesh-identity"]
    assert token is not None, meshed
    jwks = httpx.get(f"{registry.url}/v1/identity/jwks", timeout=5).json()
    caller = verify(token, jwks, "ident")
    assert caller.service == "caller"
    assert meshed["host"] == "ident"
    assert plain["host"] == f"127.0.0.1:{upstream.port}", plain
    assert plain["x-mesh-identity"] is None, plain
    assert plain["traceparent"] is not None, "other hosts still get trace context"
