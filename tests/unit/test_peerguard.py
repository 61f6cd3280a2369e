"""PeerGuard: token buckets, penalty decay, bans and their expiry, the LRU bound (injected clock)."""

from __future__ import annotations

import pytest

from p2pnode.config import NetworkConfig
from p2pnode.errors import ConfigError
from p2pnode.identity import Identity, grind_identity
from p2pnode.peerguard import (
    BANDWIDTH,
    BANNED,
    NO_POW,
    RATE,
    GuardLimits,
    PeerGuard,
    TokenBucket,
    guard_limits,
    reason_of,
)
from protocols.errors import BadSignature, PayloadMismatch, ProtocolError, Replay, TooLarge
from protocols.pow import pow_bits_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(clock: Clock, **limits: float) -> PeerGuard:
    defaults: dict = {"rate": 0.0, "bytes_rate": 0.0, "ban_after": 3.0, "recovery_s": 10.0, "ban_s": 60.0}
    defaults.update(limits)
    return PeerGuard(GuardLimits(**defaults), clock=clock)


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(2.0, now=0.0)

    taken = [bucket.take(1, rate=1.0, capacity=2.0, now=0.0) for _ in range(3)]
    assert taken == [True, True, False]
    assert not bucket.take(1, rate=1.0, capacity=2.0, now=0.5), "half a token is not enough"
    assert bucket.take(1, rate=1.0, capacity=2.0, now=1.0)
    assert bucket.take(1, rate=1.0, capacity=2.0, now=100.0)
    assert bucket.take(1, rate=1.0, capacity=2.0, now=100.0)
    assert not bucket.take(1, rate=1.0, capacity=2.0, now=100.0), "a long pause refills to capacity, no more"
    assert not bucket.take(3, rate=1.0, capacity=2.0, now=1000.0), "more than the capacity never passes"


def test_requests_over_the_rate_are_refused_and_cost_a_penalty_point() -> None:
    clock = Clock()
    guard = _guard(clock, rate=2.0, burst=4.0, ban_after=100.0)

    verdicts = [guard.admit("p", 10) for _ in range(6)]

    assert verdicts == [None] * 4 + [RATE] * 2
    assert guard.penalty("p") == 2.0
    clock.now += 1.0  # two tokens back
    assert [guard.admit("p", 10) for _ in range(3)] == [None, None, RATE]
    assert guard.refused == {RATE: 3}
    assert guard.admit("q", 10) is None, "each peer has its own bucket"


def test_bytes_over_the_byte_rate_are_refused() -> None:
    clock = Clock()
    guard = _guard(clock, bytes_rate=1000.0, bytes_burst=2000.0)

    assert guard.admit("p", 1500) is None
    assert guard.admit("p", 1000) == BANDWIDTH
    clock.now += 0.5  # 500 + 500 bytes of tokens
    assert guard.admit("p", 1000) is None
    assert guard.reasons("p") == {BANDWIDTH: 1}


def test_penalty_points_decay_one_per_recovery_period() -> None:
    clock = Clock()
    guard = _guard(clock, ban_after=10.0, recovery_s=10.0)
    for _ in range(4):
        guard.penalize("p", "malformed")
    assert guard.penalty("p") == 4.0

    clock.now += 25.0
    assert guard.penalty("p") == pytest.approx(1.5)
    clock.now += 1000.0
    assert guard.penalty("p") == 0.0, "never below zero"
    assert guard.penalty("stranger") == 0.0


def test_a_peer_reaching_ban_after_is_banned_for_ban_s_then_starts_half_way() -> None:
    clock = Clock()
    guard = _guard(clock, ban_after=4.0, recovery_s=1000.0, ban_s=60.0)
    banned = [guard.penalize("p", "bad-signature") for _ in range(4)]

    assert banned == [False, False, False, True]
    assert guard.is_banned("p")
    assert guard.bans == 1
    assert guard.admit("p", 1) == BANNED
    assert not guard.penalize("p", "replay"), "a banned peer is not banned again"
    clock.now += 59.0
    assert guard.is_banned("p")

    clock.now += 1.0
    assert not guard.is_banned("p")
    assert guard.admit("p", 1) is None
    assert guard.penalty("p") == 2.0, "half-way to the next ban"
    assert [guard.penalize("p", "replay") for _ in range(2)] == [False, True], "re-banned twice as fast"
    assert guard.reasons("p") == {"bad-signature": 4, "replay": 3}


def test_is_banned_never_adds_a_peer_and_the_table_is_a_bounded_lru() -> None:
    clock = Clock()
    guard = _guard(clock, ban_after=1.0, capacity=100)
    assert not guard.is_banned("nobody")
    assert len(guard) == 0

    guard.penalize("offender", "malformed")  # banned at once
    for i in range(99):
        assert guard.admit(f"fresh-{i}", 1) is None
    assert guard.is_banned("offender")
    assert len(guard) == 100
    guard.admit("offender", 1)  # touched: now the most recently used
    guard.admit("one-more", 1)

    assert len(guard) == 100
    assert "fresh-0" not in guard, "the least recently used peer was evicted"
    assert guard.is_banned("offender")
    for i in range(10_000):
        guard.admit(f"flood-{i}", 1)
    assert len(guard) == 100, "a flood of identities does not grow the table"
    assert not guard.is_banned("offender"), "evicted, so it starts over (the price of a bounded table)"


def test_ids_without_the_identity_proof_of_work_are_refused_untracked() -> None:
    clock = Clock()
    guard = _guard(clock, pow_bits=6)
    ground, _ = grind_identity(6)
    plain = next(i for i in iter(Identity.generate, None) if pow_bits_of(i.public_bytes) < 6)

    assert guard.admit(ground.peer_id, 1) is None
    assert guard.admit(plain.peer_id, 1) == NO_POW
    assert guard.admit("not-a-peer-id", 1) == NO_POW
    assert plain.peer_id not in guard
    assert "not-a-peer-id" not in guard
    assert guard.refused == {NO_POW: 2}


@pytest.mark.parametrize(("exc", "reason"), [
    (BadSignature("x"), "bad-signature"), (Replay("x"), "replay"), (TooLarge("x"), "oversized"),
    (PayloadMismatch("non-finite"), "bad-payload"), (ProtocolError("x"), "malformed"),
])
def test_rejections_map_to_penalty_reasons(exc: Exception, reason: str) -> None:
    assert reason_of(exc) == reason


def test_limits_from_the_network_config() -> None:
    net = NetworkConfig(peer_rate=5.0, peer_burst=7.0, peer_mb_s=1.0, max_message_mb=8.0, ban_after=4.0,
                        score_recovery_s=2.0, ban_s=9.0, identity_pow_bits=3, max_peers=10)

    lim = guard_limits(net)

    assert (lim.rate, lim.burst, lim.ban_after, lim.recovery_s, lim.ban_s, lim.pow_bits) == (5, 7, 4, 2, 9, 3)
    assert lim.bytes_rate == 2**20
    assert lim.bytes_burst == 8 * 2**20, "the byte bucket always holds the largest message"
    assert lim.capacity == 40
    assert guard_limits(NetworkConfig(peer_mb_s=64.0)).bytes_burst == 256 * 2**20


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        GuardLimits(rate=-1.0)
    with pytest.raises(ValueError, match="capacity"):
        GuardLimits(capacity=0)


@pytest.mark.parametrize(("field", "value"), [
    ("max_peers", 0), ("peer_rate", -1.0), ("peer_burst", 0.5), ("peer_mb_s", -1.0), ("ban_after", 0.0),
    ("score_recovery_s", 0.0), ("ban_s", -1.0), ("identity_pow_bits", 33), ("identity_pow_bits", -1),
])
def test_bad_guard_settings_are_config_errors_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"network.{field}"):
        NetworkConfig(**{field: value})
