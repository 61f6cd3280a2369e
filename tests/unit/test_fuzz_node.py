"""The live fuzzer's messages (``p2pnode.bench.fuzz_messages``) against a node's handler in-process (the
in-memory transport): every bad one is refused and counted, every valid one answered with the node's model."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import torch

from p2pnode.bench.fuzz_messages import ACCEPT, CASES, Lane, MessageFactory, Target
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.node import KIND_PULL, Node
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.envelope import open_envelope
from protocols.exchange import unpack_exchange
from protocols.model import decode_model
from tests.unit.test_node import _node

MESSAGES = 1_500


def _unguarded(node: Node) -> None:
    """No per-peer rate limit or ban where the node has them: every message must reach the decoders."""
    for name, value in (("ban_after", 1e12), ("peer_rate", 0.0), ("peer_mb_s", 0.0)):
        if hasattr(node.config.network, name):
            setattr(node.config.network, name, value)
    guard = getattr(node, "guard", None)
    if guard is not None:
        from p2pnode.peerguard import PeerGuard, guard_limits

        node.guard = PeerGuard(guard_limits(node.config.network))


async def _fuzz(seed: int) -> tuple[Node, Counter[str], list[str]]:
    network = MemoryNetwork()
    node = _node(network, 0)
    _unguarded(node)
    await node.transport.start(node.serve)
    limit = node.transport.max_message_bytes  # type: ignore[attr-defined]
    target = Target(swarm="t", peer_id=node.identity.peer_id, fingerprint=node.fingerprint,
                    init=node.trainer.get_flat(), max_message_bytes=limit)
    identity = Identity.generate()
    sender = MemoryTransport(network, identity.peer_id, max_message_bytes=2 * target.max_message_bytes)
    factory = MessageFactory(target, Lane(identity=identity, rng=random.Random(seed)))
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    for _ in range(MESSAGES):
        msg = factory.next()
        if msg.frame is not None:  # raw frames need a stream: the live fuzz sends them
            continue
        try:
            reply = await sender.exchange(node.identity.peer_id, msg.data, timeout=10)
        except MessageRejected as exc:
            outcome = "internal" if "internal error" in str(exc) else "rejected"
        else:
            env = open_envelope(reply, max_bytes=2**24, swarm="t", kinds=(KIND_PULL,))
            model, _ = unpack_exchange(env.payload, max_bytes=2**24)
            decoded = decode_model(model, expected_numel=target.numel, fingerprint=target.fingerprint)
            factory.lane.model = decoded.flat
            outcome = "ok"
        outcomes[outcome] += 1
        if outcome != ("ok" if msg.expect == ACCEPT else "rejected"):
            wrong.append(f"{msg.category}: {outcome}")
    return node, outcomes, wrong


def test_every_fuzzed_message_gets_the_answer_it_was_built_for_and_is_counted() -> None:
    node, outcomes, wrong = asyncio.run(_fuzz(seed=1))

    assert wrong == []
    assert outcomes["internal"] == 0
    assert outcomes["ok"] > 0
    assert node.counters()["messages_rejected"] == outcomes["rejected"] > 0.9 * MESSAGES - 100
    assert bool(torch.isfinite(node.trainer.get_flat()).all())


def test_the_cases_cover_every_layer() -> None:
    prefixes = Counter(name.split("-")[0] for name in CASES)
    assert {"wire", "exchange", "model", "random", "frame"} <= set(prefixes)
    assert {"valid", "replay", "other-signer", "wrong-swarm", "wrong-kind", "envelope-layout"} <= set(CASES)
