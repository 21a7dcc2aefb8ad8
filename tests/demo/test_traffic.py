"""The traffic generator: its mix, what it tallies from the gateway's answers, and its bounds."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx

from mesh_middleware.demo.traffic import MIX, Kind, TrafficGenerator, TrafficTally, interleave


def test_one_round_of_the_mix_has_the_contracts_shares_spread_out() -> None:
    """20 requests: 12 reads, 3 orders, 3 chaos orders, 2 reserve-direct, never bunched."""
    deck = interleave(MIX)
    assert Counter(deck) == {Kind.ITEM: 12, Kind.ORDER: 3, Kind.CHAOS_ORDER: 3, Kind.RESERVE: 2}
    runs = [len(run) for run in "".join("r" if k is Kind.ITEM else "." for k in deck).split(".")]
    assert max(runs) <= 3
    assert deck.index(Kind.RESERVE) != deck.index(Kind.RESERVE, deck.index(Kind.RESERVE) + 1) - 1


def test_the_tally_reads_versions_denials_and_customer_success_from_answers() -> None:
    """v2 share from inventory.version, the deciding rule from 403s; reserve-direct is not
    customer traffic."""
    tally = TrafficTally()
    for version in ["v1"] * 9 + ["v2"]:
        body = {"item": {}, "inventory": {"version": version, "instance": "x"}}
        tally.record(Kind.ITEM, 200, body, json.dumps(body))
    tally.record(Kind.ORDER, 201, {"order": "1"}, "")
    tally.record(Kind.CHAOS_ORDER, 502, {"error": "payment_failed"}, '{"error": "x"}')
    refused = {"error": "forbidden", "by": "inventory", "rule": "r1", "reason": "because"}
    tally.record(Kind.RESERVE, 403, refused, "")
    tally.record(Kind.RESERVE, 403, refused, "")
    tally.record_error(Kind.ITEM, "ReadTimeout", "timed out")
    assert tally.v2_share() == 0.1
    assert tally.customer() == (11, 13)
    assert tally.denials == {("inventory", "r1"): 2}
    assert tally.denial_reasons[("inventory", "r1")] == "because"
    assert tally.kinds[Kind.CHAOS_ORDER].examples["502"] == '{"error": "x"}'
    assert tally.kinds[Kind.ITEM].sent == 11
    assert tally.sent == 15
    assert TrafficTally().v2_share() is None


def _gateway(request: httpx.Request) -> httpx.Response:
    if request.url.path.startswith("/shop/items/"):
        return httpx.Response(200, json={"item": {}, "inventory": {"version": "v1"}})
    if request.url.path == "/shop/orders":
        return httpx.Response(201, json={"order": "1"})
    return httpx.Response(403, json={"error": "forbidden", "by": "inventory", "rule": "r"})


def test_the_generator_keeps_its_rate_and_stops_by_itself() -> None:
    """At 100/s for 1 s: about 100 requests in the mix's shares, then it ends on its own."""
    traffic = TrafficGenerator("http://gateway", rate=100, transport=httpx.MockTransport(_gateway))
    began = time.monotonic()
    traffic.start(1.0)
    assert traffic.wait(10)
    took = time.monotonic() - began
    traffic.stop()
    tally = traffic.snapshot()
    assert 1.0 <= took < 3.0
    assert 80 <= tally.sent <= 102
    assert tally.kinds[Kind.ITEM].statuses[200] >= 0.55 * tally.sent
    assert tally.kinds[Kind.RESERVE].statuses[403] >= 0.08 * tally.sent
    assert tally.customer()[0] == tally.customer()[1]
    assert tally.elapsed == 1.0


def test_requests_past_the_in_flight_cap_are_skipped_not_queued() -> None:
    """With 2 slots and a gateway that never answers in time, the rest is skipped."""
    release = threading.Event()

    def stuck(request: httpx.Request) -> httpx.Response:
        release.wait(5)
        return _gateway(request)

    traffic = TrafficGenerator(
        "http://gateway", rate=50, concurrency=2, transport=httpx.MockTransport(stuck)
    )
    traffic.start(0.5)
    time.sleep(1.0)
    assert traffic.snapshot().skipped >= 15
    assert traffic.snapshot().sent == 0  # the two in flight are still waiting
    release.set()
    traffic.stop()
    assert traffic.snapshot().sent == 2


def test_stop_ends_a_long_run_at_once() -> None:
    """stop() does not wait for the duration."""
    traffic = TrafficGenerator("http://gateway", rate=20, transport=httpx.MockTransport(_gateway))
    traffic.start(3600)
    time.sleep(0.2)
    began = time.monotonic()
    traffic.stop()
    assert time.monotonic() - began < 2
    assert not traffic.running
    assert traffic.snapshot().elapsed < 5


def test_the_recent_v2_share_only_counts_the_last_seconds() -> None:
    """Reads older than the window drop out, so a changed split shows at once."""
    tally = TrafficTally()
    for version in ("v1", "v1", "v2", "v2"):
        tally.record(Kind.ITEM, 200, {"inventory": {"version": version}}, "")
    now = time.monotonic()
    assert tally.recent_v2_share(10, now) == 0.5
    tally.recent[0] = (now - 20, "v1")
    tally.recent[1] = (now - 20, "v1")
    assert tally.recent_v2_share(10, now) == 1.0
    assert tally.recent_v2_share(10, now + 60) is None
    assert tally.v2_share() == 0.5
