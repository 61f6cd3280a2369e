"""Bounded lead (``--max-lead L``): a node does not start a round more than L rounds ahead of its peers.

Gossip nodes run their rounds freely. On a machine (or swarm) where nodes get unequal shares of the CPU,
the fast ones run ahead: they merge models that are rounds old, and the CPU they spend running ahead is
taken from the slow ones. Stale synchronous parallel training (Ho et al., "More Effective Distributed ML
via a Stale Synchronous Parallel Parameter Server", NIPS 2013) bounds that lead; this is the same bound
for gossip, without a server.

Before starting round r + 1 a node checks the latest round it knows of every live peer (from the signed
envelopes the peer sent it: pushes, pull replies, pongs). A peer known to work on a round below
r + 1 − L is sent an ``await`` request (:data:`KIND_AWAIT`, 8 bytes: the round to wait for and the
longest wait in milliseconds); the peer answers with a pong as soon as it starts that round, or when the
wait ends. The node starts its round when every such peer has answered at or above the round, or after
``--max-lead-wait-s`` at most.

What a slow or lying peer can cost: a peer that does not reach the round in time (or says it is behind,
or never answers) is excused for the next :data:`EXCUSE_ROUNDS` rounds, so it delays at most one round
in that many. Awaits served at once are capped (:data:`MAX_AWAITS_SERVED`); beyond it a node answers at
once. A node running ``--overlap`` does not hold (its next round's steps are already running).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable, Iterable

from protocols.errors import ProtocolError

KIND_AWAIT = "await"
AWAIT_FORMAT = struct.Struct(">II")  # round to wait for, longest wait in ms
MAX_AWAIT_MS = 30_000
MAX_AWAITS_SERVED = 256
EXCUSE_ROUNDS = 10
MAX_TRACKED = 16_384  # peers whose round (and excuse) is remembered; a flood of identities drops the oldest


def encode_await(round: int, wait_s: float) -> bytes:
    return AWAIT_FORMAT.pack(round, min(MAX_AWAIT_MS, max(0, round_ms(wait_s))))


def round_ms(seconds: float) -> int:
    return int(seconds * 1000 + 0.5)


def decode_await(payload: bytes) -> tuple[int, float]:
    """``(round, wait_s)`` of an await request; ProtocolError unless it is exactly 8 bytes in range."""
    if len(payload) != AWAIT_FORMAT.size:
        raise ProtocolError(f"await carries {len(payload)} bytes, expected {AWAIT_FORMAT.size}")
    round, wait_ms = AWAIT_FORMAT.unpack(payload)
    if wait_ms > MAX_AWAIT_MS:
        raise ProtocolError(f"await asks for a {wait_ms} ms wait, at most {MAX_AWAIT_MS} allowed")
    return round, wait_ms / 1000


class Pacer:
    """One node's view of its peers' rounds, the await requests it serves, and its hold before a round.

    Parameters
    ----------
    max_lead
        L (0 turns holding off; peers' rounds are still tracked and awaits still served).
    wait_s
        Longest hold before one round.
    """

    def __init__(self, max_lead: int, wait_s: float) -> None:
        self.max_lead = max_lead
        self.wait_s = wait_s
        self.peer_rounds: dict[str, int] = {}
        self.excused_until: dict[str, int] = {}
        self.holds = 0  # rounds that waited for someone
        self.timeouts = 0  # holds that ended because the wait ran out
        self.waited_s = 0.0
        self._round = 0
        self._advanced = asyncio.Event()
        self._serving = 0

    # -- what we learn and what we serve ---------------------------------------------------------
    def saw(self, peer: str, round: int) -> None:
        """A verified envelope from ``peer`` said it works on ``round`` (only ever raises the record)."""
        if round > self.peer_rounds.get(peer, -1):
            self.peer_rounds[peer] = round
            _bound(self.peer_rounds)

    def advanced(self, round: int) -> None:
        """Our node started ``round``: wake the awaits it satisfies."""
        self._round = round
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def serve_await(self, round: int, wait_s: float, *, finished: Callable[[], bool]) -> None:
        """Return when our node works on ``round`` or later, when it has no more rounds to run
        (``finished``), or after ``wait_s``; at once when too many awaits are being served."""
        if self._serving >= MAX_AWAITS_SERVED:
            return
        self._serving += 1
        try:
            deadline = time.monotonic() + wait_s
            while self._round < round and not finished():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                try:
                    await asyncio.wait_for(self._advanced.wait(), left)
                except TimeoutError:
                    return
        finally:
            self._serving -= 1

    # -- our hold -----------------------------------------------------------------------------------
    def behind(self, own_round: int, peers: Iterable[str]) -> list[str]:
        """Live peers we must wait for before starting round ``own_round + 1`` (none when holding is off)."""
        if self.max_lead <= 0:
            return []
        need = own_round + 1 - self.max_lead
        return [p for p in peers
                if self.peer_rounds.get(p, -1) < need and self.excused_until.get(p, -1) < own_round]

    async def hold(self, own_round: int, peers: Iterable[str],
                   await_peer: Callable[[str, int, float], Awaitable[None]]) -> float:
        """Wait (at most ``wait_s``) until no live peer is more than L rounds behind; return the seconds
        waited. ``await_peer(peer, round, wait_s)`` sends the await request and records the answer."""
        late = self.behind(own_round, peers)
        if not late:
            return 0.0
        need = own_round + 1 - self.max_lead
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.wait_s + 1.0):
                await asyncio.gather(*(await_peer(p, need, self.wait_s) for p in late))
        except TimeoutError:
            pass
        still = [p for p in late if self.peer_rounds.get(p, -1) < need]
        for p in still:
            self.excused_until[p] = own_round + EXCUSE_ROUNDS
        _bound(self.excused_until)
        waited = time.monotonic() - began
        self.holds += 1
        self.timeouts += bool(still)
        self.waited_s += waited
        return waited


def _bound(table: dict[str, int]) -> None:
    """Keep ``table`` at most :data:`MAX_TRACKED` entries, dropping the oldest half when it overflows."""
    if len(table) > MAX_TRACKED:
        for stale in list(table)[: len(table) // 2]:
            del table[stale]
