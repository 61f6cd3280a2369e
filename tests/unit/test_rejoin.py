"""Merging the DHT after a healed partition: which peers are pinged, and what a ping does in the DHT process
(fakes for the DHT and its node; the real thing is tests/faults/test_netns_faults.py)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.dht.node import Blacklist
from hivemind.p2p import PeerID

from p2pnode.identity import Identity
from p2pnode.membership import Membership
from p2pnode.rejoin import Rejoiner, ping_in_dht
from protocols.records import MembershipRecord


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_peers_that_left_the_view_are_pinged_every_other_heartbeat() -> None:
    # Prepare
    clock = Clock()
    rejoiner = Rejoiner(every=2, batch=8, forget_s=100.0, clock=clock, rng=random.Random(0))
    # Execute / Assert
    assert rejoiner.due(["a", "b", "c"]) == []  # first heartbeat: not due
    assert rejoiner.due(["a", "b", "c"]) == []  # due, but nobody is missing
    assert rejoiner.due(["a"]) == []  # not due
    assert sorted(rejoiner.due(["a"])) == ["b", "c"]
    rejoiner.due(["a", "b"])
    assert rejoiner.due(["a", "b"]) == ["c"]  # b is back in the view


def test_peers_gone_longer_than_forget_s_are_not_pinged_and_batches_are_bounded() -> None:
    clock = Clock()
    rejoiner = Rejoiner(every=1, batch=3, forget_s=100.0, clock=clock, rng=random.Random(0))
    rejoiner.due([f"p{i}" for i in range(10)])
    clock.now = 50.0
    assert len(rejoiner.due([])) == 3
    rejoiner.due(["p0"])
    clock.now = 120.0  # p1 … p9 were last seen at 0 s, p0 at 50 s
    assert rejoiner.due([]) == ["p0"]
    clock.now = 200.0
    assert rejoiner.due([]) == []
    with pytest.raises(ValueError, match="every >= 1"):
        Rejoiner(every=0)


def _peer_ids(n: int) -> list[str]:
    return [Identity.generate().peer_id for _ in range(n)]


def _fake_dht_node(answering: set[str], raising: frozenset[str] = frozenset()) -> SimpleNamespace:
    async def call_ping(peer: PeerID) -> Any:
        if peer.to_base58() in raising:
            raise ConnectionError("dial failed")
        return object() if peer.to_base58() in answering else None

    return SimpleNamespace(protocol=SimpleNamespace(call_ping=call_ping), blacklist=Blacklist(5.0, 2.0))


def test_ping_in_dht_returns_the_responders_and_clears_their_blacklisting() -> None:
    # Prepare
    alive, dead, broken = _peer_ids(3)
    node = _fake_dht_node({alive}, raising=frozenset({broken}))
    for pid in (alive, dead):
        node.blacklist.register_failure(PeerID.from_base58(pid))
    # Execute
    answered = asyncio.run(ping_in_dht(None, node, [alive, dead, broken]))
    # Assert
    assert answered == [alive]
    assert PeerID.from_base58(alive) not in node.blacklist
    assert PeerID.from_base58(dead) in node.blacklist


class FakeDHT:
    """``run_coroutine`` runs the function here, against a fake DHT node."""

    def __init__(self, node: SimpleNamespace) -> None:
        self.node = node
        self.calls: list[list[str]] = []

    def run_coroutine(self, fn: Any, return_future: bool = False) -> Any:
        self.calls.append(list(fn.keywords["peers"]))
        return asyncio.ensure_future(fn(self, self.node))


def _record(peer_id: str) -> MembershipRecord:
    return MembershipRecord(peer_id=peer_id, swarm="s", maddrs=(), round=1, mode="gossip", codec="dense",
                            model_fingerprint=b"\0" * 32, timestamp=0.0)


def test_membership_rejoin_pings_the_peers_that_left_its_view() -> None:
    async def scenario() -> tuple[list[str], list[list[str]]]:
        me, back, gone = Identity.generate(), *_peer_ids(2)
        dht = FakeDHT(_fake_dht_node({back}))
        membership = Membership(dht, me, swarm="s", heartbeat_s=2.0, ttl_s=8.0,  # type: ignore[arg-type]
                                unreachable_s=10.0, dht_timeout=5.0, rng=random.Random(0))
        membership._live = [_record(back), _record(gone)]
        await membership.rejoin()  # first heartbeat: notes the view
        membership._live = []  # a partition: both vanished
        answered = await membership.rejoin()
        return answered == [back], dht.calls

    ok, calls = asyncio.run(scenario())
    assert ok
    assert len(calls) == 1
    assert len(calls[0]) == 2
