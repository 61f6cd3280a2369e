"""The node's PeerGuard over the in-memory transport: garbage gets a peer banned and refused unread,
honest exchange goes on; rate limits, penalties for bad replies, identity proof of work."""

from __future__ import annotations

import asyncio

import pytest

from p2pnode import node as node_module
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity, grind_identity
from p2pnode.node import KIND_PULL, Node
from p2pnode.peerguard import BANNED, NO_POW, RATE, GuardLimits, PeerGuard
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.envelope import seal
from protocols.pow import pow_bits_of
from tests.unit.test_node import _node, _record, _sealed_push


def _frozen(node: Node, limits: GuardLimits | None = None) -> Node:
    """Give ``node`` a guard whose clock stands still (no refill, no recovery while the test runs)."""
    node.guard = PeerGuard(limits or node.guard.limits, clock=lambda: 1000.0)
    return node


async def _pair(network: MemoryNetwork) -> tuple[Node, Node]:
    a, b = _frozen(_node(network, 0)), _frozen(_node(network, 1))
    a.membership.peers.append(_record(b.identity.peer_id))  # type: ignore[attr-defined]
    b.membership.peers.append(_record(a.identity.peer_id))  # type: ignore[attr-defined]
    for n in (a, b):
        await n.transport.start(n.serve)
    return a, b


class EnvelopeCount:
    """Counts the envelopes the node starts to parse (``open_envelope`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = node_module.open_envelope

        def counting(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(node_module, "open_envelope", counting)


def test_a_peer_sending_garbage_is_banned_then_refused_unread_and_honest_exchange_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = EnvelopeCount(monkeypatch)

    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = await _pair(network)
        mallory = Identity.generate()
        sender = MemoryTransport(network, mallory.peer_id)
        ban_after = int(b.config.network.ban_after)

        for _ in range(ban_after):
            with pytest.raises(MessageRejected, match="malformed|shorter|version"):
                await sender.exchange(b.identity.peer_id, b"\x93\x01\x02garbage", timeout=5)
        assert b.guard.is_banned(mallory.peer_id)
        assert parsed.calls == ban_after
        assert b.counters()["peers_banned"] == 1  # in every metrics row and in telemetry

        valid = _sealed_push(mallory, b, a.trainer.get_flat(), seq=1)  # even a valid push is refused now
        with pytest.raises(MessageRejected, match="refused: banned"):
            await sender.exchange(b.identity.peer_id, valid, timeout=5)

        assert parsed.calls == ban_after, "refused before the envelope was parsed"
        assert b.messages_rejected == ban_after + 1
        assert b.guard.reasons(mallory.peer_id) == {"malformed": ban_after}
        assert b.guard.refused == {BANNED: 1}
        assert len(b.inbox) == 0
        # honest traffic is untouched: a pushes to b and pulls b's model
        report = await a.run_round()
        assert report.pulled == 1
        assert list(b.inbox.drain()) == [a.identity.peer_id]
        assert b.guard.penalty(a.identity.peer_id) == 0.0
        assert a.guard.penalty(b.identity.peer_id) == 0.0

    asyncio.run(scenario())


def test_a_banned_peer_in_the_view_is_not_contacted() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = await _pair(network)
        mallory = Identity.generate()
        MemoryTransport(network, mallory.peer_id)  # on the network, but it would never answer
        b.membership.peers.append(_record(mallory.peer_id))  # type: ignore[attr-defined]
        b.config.gossip.fanout = 2
        for _ in range(int(b.config.network.ban_after)):
            b.guard.penalize(mallory.peer_id, "bad-signature")

        report = await b.run_round()

        assert report.pulled == 1
        assert b.membership.unreachable == [], "the banned peer was skipped, not tried"  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_a_peer_over_its_request_rate_is_refused_then_banned() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = await _pair(network)
        _frozen(b, GuardLimits(rate=0.001, burst=2.0, ban_after=3.0))
        flat = a.trainer.get_flat()
        verdicts = []
        for seq in range(1, 7):
            try:
                await a.transport.exchange(b.identity.peer_id, _sealed_push(a.identity, b, flat, seq=seq),
                                           timeout=5)
                verdicts.append("ok")
            except MessageRejected as exc:
                verdicts.append(str(exc).split(": ")[2].split(" ")[0])

        assert verdicts == ["ok", "ok", RATE, RATE, RATE, BANNED]
        assert b.guard.is_banned(a.identity.peer_id)
        assert b.messages_rejected == 4

    asyncio.run(scenario())


def test_a_garbage_reply_costs_the_peer_that_sent_it_a_penalty_point() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a = _frozen(_node(network, 0))
        liar = Identity.generate()
        transport = MemoryTransport(network, liar.peer_id)

        async def garbage(sender: str, request: bytes) -> bytes:
            sealed = bytearray(seal(liar, kind=KIND_PULL, swarm="t", round=1, seq=1, payload=b"model"))
            sealed[-65] ^= 1  # the payload's last byte: the signature no longer verifies
            return bytes(sealed)

        await transport.start(garbage)
        await a.transport.start(a.serve)
        a.membership.peers.append(_record(liar.peer_id))  # type: ignore[attr-defined]

        report = await a.run_round()

        assert report.pulled == 0
        assert a.messages_rejected == 1
        assert a.guard.penalty(liar.peer_id) == 1.0
        assert a.guard.reasons(liar.peer_id) == {"bad-signature": 1}

    asyncio.run(scenario())


def test_with_identity_pow_bits_only_ground_ids_are_served() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = await _pair(network)
        _frozen(b, GuardLimits(pow_bits=6))
        plain = next(i for i in iter(Identity.generate, None) if pow_bits_of(i.public_bytes) < 6)
        ground, _ = grind_identity(6)
        flat = a.trainer.get_flat()

        with pytest.raises(MessageRejected, match="refused: identity-pow"):
            await MemoryTransport(network, plain.peer_id).exchange(
                b.identity.peer_id, _sealed_push(plain, b, flat, seq=1), timeout=5)
        reply = await MemoryTransport(network, ground.peer_id).exchange(
            b.identity.peer_id, _sealed_push(ground, b, flat, seq=1), timeout=5)

        assert len(reply) > 4 * b.trainer.num_params
        assert b.guard.refused == {NO_POW: 1}
        assert b.messages_rejected == 1
        assert list(b.inbox.drain()) == [ground.peer_id]

    asyncio.run(scenario())
