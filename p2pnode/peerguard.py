"""Per-peer admission control: token buckets, a misbehaviour score and temporary bans.

DESIGN §6: "a misbehaving peer is scored down and banned for a while; a bad message costs the sender,
never the receiver's progress". :class:`PeerGuard` keeps, per sender peer id (which the transport
authenticated), two token buckets (requests/s and bytes/s) and a *penalty*: every rejected message
adds one point (bad signature, malformed, replay, oversized, non-finite or misshapen payload, over its
rate), points drain at one per ``recovery_s`` seconds, and a peer whose penalty reaches ``ban_after``
is banned for ``ban_s`` seconds. A ban ends half-way to the next one (penalty ``ban_after / 2``), so a
peer that goes on misbehaving is banned again after half as many bad messages.

:meth:`PeerGuard.admit` is the cheap check that runs on every incoming request *before* its body is
read: a dictionary lookup, a cached identity proof-of-work check, two bucket updates. The table is an
LRU of at most ``capacity`` peers, so a flood of fresh identities cannot grow memory; an evicted peer
(banned or not) starts over with a clean record, which costs the flooder ``capacity`` other identities.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pnode.config import NetworkConfig
from protocols.errors import BadSignature, PayloadMismatch, ProtocolError, Replay, TooLarge
from protocols.pow import peer_id_has_pow

logger = logging.getLogger(__name__)

BANNED, NO_POW, RATE, BANDWIDTH = "banned", "identity-pow", "rate", "bandwidth"
_REASONS: tuple[tuple[type[ProtocolError], str], ...] = (
    (BadSignature, "bad-signature"), (Replay, "replay"), (TooLarge, "oversized"),
    (PayloadMismatch, "bad-payload"),  # non-finite values, wrong shape, dtype or fingerprint
)


def reason_of(exc: BaseException) -> str:
    """The penalty reason for a rejected message's error (``"malformed"`` for any other one)."""
    for cls, reason in _REASONS:
        if isinstance(exc, cls):
            return reason
    return "malformed"


@dataclass(kw_only=True, slots=True)
class GuardLimits:
    """What :class:`PeerGuard` allows one peer; a rate of 0 turns that bucket off."""

    rate: float = 50.0  # requests per second
    burst: float = 100.0  # requests at once
    bytes_rate: float = 2.0**30  # bytes per second
    bytes_burst: float = 2.0**31  # bytes at once (at least the largest message, or nothing passes)
    ban_after: float = 10.0  # penalty points that ban
    recovery_s: float = 30.0  # seconds per point recovered
    ban_s: float = 300.0
    pow_bits: int = 0  # identity proof of work required of senders (protocols/pow.py)
    capacity: int = 4096  # peers tracked (LRU)

    def __post_init__(self) -> None:
        for name in ("rate", "burst", "bytes_rate", "bytes_burst", "ban_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ban_after <= 0 or self.recovery_s <= 0 or self.capacity < 1:
            raise ValueError("ban_after and recovery_s must be > 0 and capacity >= 1")


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second of ``now`` (a monotonic clock reading)."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens, self.stamp = capacity, now

    def take(self, amount: float, *, rate: float, capacity: float, now: float) -> bool:
        """Refill, then take ``amount`` tokens if there are that many; False (nothing taken) if not."""
        self.tokens = min(capacity, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


@dataclass(slots=True)
class PeerRecord:
    """What the guard remembers of one peer."""

    requests: TokenBucket
    bytes: TokenBucket
    penalty: float = 0.0
    stamp: float = 0.0  # when ``penalty`` was last brought up to date
    banned_until: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)


class PeerGuard:
    """Rate limits, scores and bans peers by id; see the module docstring.

    Parameters
    ----------
    limits
        The per-peer limits.
    clock
        Monotonic seconds (injected by tests).
    """

    def __init__(self, limits: GuardLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.refused: Counter[str] = Counter()  # requests refused by admit(), by reason
        self.penalties: Counter[str] = Counter()  # penalty points given, by reason
        self.bans = 0  # bans given over this guard's life
        self._peers: OrderedDict[str, PeerRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: str) -> bool:
        return peer in self._peers

    # -- checks ------------------------------------------------------------------------------------
    def is_banned(self, peer: str) -> bool:
        """Whether ``peer`` is banned now (never adds it to the table)."""
        rec = self._peers.get(peer)
        return rec is not None and self._banned(rec, self.clock())

    def admit(self, peer: str, size: int) -> str | None:
        """Screen one incoming request of ``size`` bytes from ``peer``: None admits it, else the reason.

        Refused: a banned peer, a peer id without the required proof of work, a peer over its request
        or byte rate (which also costs it a penalty point). Every refusal is counted in ``refused``.
        """
        now = self.clock()
        reason = self._refusal(peer, size, now)
        if reason is not None:
            self.refused[reason] += 1
        return reason

    def _refusal(self, peer: str, size: int, now: float) -> str | None:
        rec = self._peers.get(peer)
        if rec is not None and self._banned(rec, now):
            self._peers.move_to_end(peer)  # a banned peer that keeps knocking stays remembered
            return BANNED
        if not peer_id_has_pow(peer, self.limits.pow_bits):
            return NO_POW  # not tracked: such ids cost nothing to make, so they get no table entry
        rec = self._touch(peer, now)
        lim = self.limits
        if lim.rate > 0 and not rec.requests.take(1, rate=lim.rate, capacity=lim.burst, now=now):
            self._penalize(peer, rec, RATE, now)
            return RATE
        if lim.bytes_rate > 0 and not rec.bytes.take(size, rate=lim.bytes_rate, capacity=lim.bytes_burst,
                                                      now=now):
            self._penalize(peer, rec, BANDWIDTH, now)
            return BANDWIDTH
        return None

    # -- scoring -----------------------------------------------------------------------------------
    def penalize(self, peer: str, reason: str) -> bool:
        """Add a penalty point to ``peer`` for a rejected message; True if that banned it."""
        now = self.clock()
        return self._penalize(peer, self._touch(peer, now), reason, now)

    def penalty(self, peer: str) -> float:
        """``peer``'s current penalty (0 for a peer not in the table); ``ban_after`` or more bans."""
        rec = self._peers.get(peer)
        if rec is None:
            return 0.0
        self._decay(rec, self.clock())
        return rec.penalty

    def reasons(self, peer: str) -> dict[str, int]:
        """Penalty points ``peer`` was given, by reason (empty for a peer not in the table)."""
        rec = self._peers.get(peer)
        return dict(rec.reasons) if rec is not None else {}

    def _penalize(self, peer: str, rec: PeerRecord, reason: str, now: float) -> bool:
        self.penalties[reason] += 1
        rec.reasons[reason] += 1
        if self._banned(rec, now):
            return False
        self._decay(rec, now)
        rec.penalty += 1.0
        if rec.penalty < self.limits.ban_after:
            return False
        rec.banned_until = now + self.limits.ban_s
        self.bans += 1
        logger.warning("banned peer %s for %.0f s (penalty %.1f; %s)", peer, self.limits.ban_s, rec.penalty,
                       ", ".join(f"{k} {v}" for k, v in rec.reasons.most_common()))
        return True

    def _banned(self, rec: PeerRecord, now: float) -> bool:
        if rec.banned_until == 0.0:
            return False
        if now < rec.banned_until:
            return True
        rec.banned_until = 0.0  # the ban is over: half-way to the next one
        rec.penalty, rec.stamp = self.limits.ban_after / 2, now
        return False

    def _decay(self, rec: PeerRecord, now: float) -> None:
        rec.penalty = max(0.0, rec.penalty - max(0.0, now - rec.stamp) / self.limits.recovery_s)
        rec.stamp = now

    def _touch(self, peer: str, now: float) -> PeerRecord:
        """``peer``'s record, created if new, moved to the most recently used end of the LRU."""
        rec = self._peers.get(peer)
        if rec is None:
            lim = self.limits
            rec = PeerRecord(requests=TokenBucket(lim.burst, now), bytes=TokenBucket(lim.bytes_burst, now),
                             stamp=now)
            self._peers[peer] = rec
            if len(self._peers) > lim.capacity:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        return rec


def guard_limits(net: NetworkConfig) -> GuardLimits:
    """The limits ``--peer-rate``, ``--peer-burst``, ``--peer-mb-s``, ``--ban-after``, ``--score-recovery-s``,
    ``--ban-s`` and ``--identity-pow-bits`` set; the table tracks 4 × ``--max-peers`` peers (others than
    those in our view push to us)."""
    bytes_rate = net.peer_mb_s * 2**20
    return GuardLimits(rate=net.peer_rate, burst=net.peer_burst, bytes_rate=bytes_rate,
                       bytes_burst=max(2 * bytes_rate, float(net.max_message_bytes)),
                       ban_after=net.ban_after, recovery_s=net.score_recovery_s, ban_s=net.ban_s,
                       pow_bits=net.identity_pow_bits, capacity=4 * net.max_peers)
