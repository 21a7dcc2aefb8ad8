"""The issuer: signing keys rotated without downtime, join tokens kept hashed, the admin token."""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from joserfc import jws

from mesh_middleware import defaults
from mesh_middleware.errors import IdentityError, UnknownSigningKey
from mesh_middleware.registry.identity import AdminToken, JoinTokens, KeyRing, hash_secret
from mesh_middleware.registry.store import SQLiteStore
from tests.registry.support import verify

LIFETIME = 600
LEAD = 60.0
ROTATION = 3600.0


class WallClock:
    """A wall clock the test moves by hand, starting now."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> WallClock:
    """The issuer's clock."""
    return WallClock()


def _ring(store: SQLiteStore, clock: WallClock) -> KeyRing:
    return KeyRing(
        store,
        trust_domain="mesh.local",
        issuer="spiffe://mesh.local",
        token_lifetime=LIFETIME,
        publish_lead=LEAD,
        rotation=ROTATION,
        clock=clock,
    )


def _kid(token: str) -> str:
    return str(jws.extract_compact(token.encode()).protected["kid"])


def _kids(ring: KeyRing) -> list[str]:
    return [k["kid"] for k in ring.jwks()["keys"]]


def test_first_key_signs_at_once(store: SQLiteStore, clock: WallClock) -> None:
    """A new trust domain has one published key, and tokens it signs verify."""
    ring = _ring(store, clock)
    token, expires_at = ring.mint("orders", "inventory")
    assert _kids(ring) == [_kid(token)]
    assert expires_at == int(clock.now) + LIFETIME
    caller = verify(token, ring.jwks(), "inventory", clock=clock)
    assert caller.service == "orders"
    assert caller.spiffe_id == "spiffe://mesh.local/svc/orders"


def test_token_for_one_audience_is_refused_by_another(store: SQLiteStore, clock: WallClock) -> None:
    """A JWT-SVID names its audience; another service does not accept it."""
    ring = _ring(store, clock)
    token, _ = ring.mint("orders", "inventory")
    with pytest.raises(IdentityError, match="audience"):
        verify(token, ring.jwks(), "payments", clock=clock)


def test_jwks_holds_public_keys_only(store: SQLiteStore, clock: WallClock) -> None:
    """The JWKS has Ed25519 public keys with kids and never the private part."""
    ring = _ring(store, clock)
    ring.rotate()
    for key in ring.jwks()["keys"]:
        assert key["kty"] == "OKP"
        assert key["crv"] == "Ed25519"
        assert key["kid"]
        assert "d" not in key


def test_new_key_is_published_before_it_signs(store: SQLiteStore, clock: WallClock) -> None:
    """After a rotation the new key is in the JWKS at once but signs only after the lead."""
    ring = _ring(store, clock)
    old = ring.signing_key().kid
    new = ring.rotate()
    assert new.activate_at == clock.now + LEAD
    assert set(_kids(ring)) == {old, new.kid}
    clock.advance(LEAD - 1)
    token, _ = ring.mint("orders", "inventory")
    assert _kid(token) == old
    clock.advance(1)
    token, _ = ring.mint("orders", "inventory")
    assert _kid(token) == new.kid


def test_old_key_stays_published_until_its_last_token_expired(
    store: SQLiteStore, clock: WallClock
) -> None:
    """The replaced key's last token verifies until it expires; then the key leaves the JWKS."""
    ring = _ring(store, clock)
    old = ring.signing_key().kid
    new = ring.rotate()
    clock.advance(LEAD - 0.5)
    last, expires_at = ring.mint("orders", "inventory")
    assert _kid(last) == old
    clock.now = expires_at - 1
    ring.maintain()
    assert old in _kids(ring)
    assert verify(last, ring.jwks(), "inventory", clock=clock).service == "orders"
    clock.now = expires_at + defaults.CLOCK_LEEWAY_SECONDS + 1
    ring.maintain()
    assert _kids(ring) == [new.kid]
    assert [k.kid for k in store.load_keys()] == [new.kid]
    with pytest.raises(UnknownSigningKey):
        verify(last, ring.jwks(), "inventory", clock=clock)


def test_every_live_token_verifies_through_many_rotations(
    store: SQLiteStore, clock: WallClock
) -> None:
    """Stepping through hours of rotations (by hand and by maintenance), every unexpired token
    verifies against the JWKS of that moment, and each key was published for at least the lead
    before its first signature."""
    ring = _ring(store, clock)
    first_seen: dict[str, float] = {}
    initial = ring.signing_key().kid
    minted: list[tuple[str, int]] = []
    start = clock.now
    step = 0
    while clock.now - start < 4 * ROTATION:
        step += 1
        for kid in _kids(ring):
            first_seen.setdefault(kid, clock.now)
        if step % 17 == 0 and clock.now - start < 2 * ROTATION:
            ring.rotate()  # faster than tokens expire: several keys are in flight
            for kid in _kids(ring):
                first_seen.setdefault(kid, clock.now)
        token, expires_at = ring.mint("orders", "inventory")
        kid = _kid(token)
        if kid != initial:
            assert clock.now - first_seen[kid] >= LEAD, "a key signed before it was published"
        minted.append((token, expires_at))
        minted = [(t, exp) for t, exp in minted if exp > clock.now]
        jwks = ring.jwks()
        for live, _ in minted[::4]:
            verify(live, jwks, "inventory", clock=clock)
        clock.advance(23)
        if step % 20 == 0:
            ring.maintain()
    assert len(first_seen) > 4  # it did rotate, both by hand and on schedule
    assert len(ring.jwks()["keys"]) <= 2  # and retired keys left


def test_maintenance_rotates_an_old_key(store: SQLiteStore, clock: WallClock) -> None:
    """Once the newest key is older than the rotation period, maintenance publishes a new one."""
    ring = _ring(store, clock)
    clock.advance(ROTATION - 1)
    ring.maintain()
    assert len(_kids(ring)) == 1
    clock.advance(1)
    ring.maintain()
    assert len(_kids(ring)) == 2


def test_keys_survive_a_new_ring_on_the_same_store(store: SQLiteStore, clock: WallClock) -> None:
    """A registry restart (a new ring on the store) keeps the keys: old tokens still verify."""
    ring = _ring(store, clock)
    token, _ = ring.mint("orders", "inventory")
    ring.rotate()
    again = _ring(store, clock)
    assert set(_kids(again)) == set(_kids(ring))
    assert again.signing_key().kid == ring.signing_key().kid
    assert verify(token, again.jwks(), "inventory", clock=clock).service == "orders"


def test_join_token_is_shown_once_and_stored_hashed(tmp_path: Path, store: SQLiteStore) -> None:
    """A join token names its service; the store keeps only its SHA-256."""
    tokens = JoinTokens(store)
    token, record = tokens.create("orders")
    assert token.startswith("mjt_")
    assert record.service == "orders"
    assert tokens.service_of(token) == "orders"
    (stored,) = store.load_join_tokens()
    secret = token.partition(".")[2]
    assert stored.secret_hash == hash_secret(secret)
    assert secret not in stored.secret_hash
    for file in tmp_path.glob("registry.db*"):
        assert secret.encode() not in file.read_bytes()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t[:-1],
        lambda t: t.replace("mjt_", "xyz_"),
        lambda t: t.partition(".")[0],
        lambda t: "mjt_nope." + t.partition(".")[2],
        lambda t: "",
    ],
    ids=["appended", "truncated", "prefix", "no-secret", "unknown-id", "empty"],
)
def test_altered_join_tokens_name_no_service(
    store: SQLiteStore, mangle: Callable[[str], str]
) -> None:
    """A join token with any part changed is not valid."""
    tokens = JoinTokens(store)
    token, _ = tokens.create("orders")
    assert tokens.service_of(mangle(token)) is None


def test_revoked_join_token_stops_working_and_stays_revoked(store: SQLiteStore) -> None:
    """Revoking removes a join token for good, also for a registry loading the store later."""
    tokens = JoinTokens(store)
    kept, _ = tokens.create("orders")
    gone, record = tokens.create("orders")
    assert tokens.revoke(record.token_id)
    assert not tokens.revoke(record.token_id)
    assert tokens.service_of(gone) is None
    reloaded = JoinTokens(store)
    assert reloaded.service_of(gone) is None
    assert reloaded.service_of(kept) == "orders"
    assert [r.token_id for r in reloaded.list()] == [r.token_id for r in tokens.list()]


def test_admin_token_is_created_once_owner_only(tmp_path: Path) -> None:
    """The admin token is written 0600 at first start and reused (not re-created) after."""
    path = tmp_path / "data" / "admin.token"
    first = AdminToken(path)
    assert first.created
    shown = first.token_shown_once
    assert shown is not None
    assert path.read_text().strip() == shown
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first.matches(shown)
    assert not first.matches(shown + "x")
    second = AdminToken(path)
    assert not second.created
    assert second.matches(shown)
    assert path.read_text().strip() == shown
