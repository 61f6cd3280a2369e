"""The node's round loop and exchange handler over the in-memory transport (no libp2p, no DHT)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import torch

from defenses import make_aggregator
from p2pnode.config import NodeConfig, TaskConfig
from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.node import KIND_PUSH, Node
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.envelope import seal
from protocols.exchange import pack_exchange
from protocols.model import encode_model
from protocols.records import MembershipRecord


class StaticView:
    """A fixed membership view (what the DHT would return), recording what the node reports."""

    def __init__(self, peers: list[MembershipRecord]) -> None:
        self.peers = peers
        self.rejected = 0
        self.unreachable: list[str] = []

    def live(self) -> list[MembershipRecord]:
        return [p for p in self.peers if p.peer_id not in self.unreachable]

    def sample(self, k: int) -> list[MembershipRecord]:
        return self.live()[:k]

    def mark_unreachable(self, peer_id: str) -> None:
        self.unreachable.append(peer_id)

    def mark_alive(self, peer_id: str) -> None:
        if peer_id in self.unreachable:
            self.unreachable.remove(peer_id)

    async def refresh(self) -> list[MembershipRecord]:
        return self.live()

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()


def _record(peer_id: str) -> MembershipRecord:
    return MembershipRecord(peer_id=peer_id, swarm="t", maddrs=(), round=0, mode="gossip", codec="dense",
                            model_fingerprint=b"", timestamp=time.time())


def _node(network: MemoryNetwork, shard: int, *, fanout: int = 1, identity: Identity | None = None) -> Node:
    task_cfg = TaskConfig(name="digits", shard=shard, num_shards=2, local_steps=5)
    config = NodeConfig(device="cpu", task=task_cfg)
    config.network.swarm = "t"
    config.gossip.fanout = fanout
    task = make_task("digits")
    trainer = LocalTrainer(task.build_model(0), task.load(ShardSpec(index=shard, count=2)), lr=0.05,
                           momentum=0.9, batch_size=16, device=torch.device("cpu"), seed=shard)
    identity = identity or Identity.generate()
    transport = MemoryTransport(network, identity.peer_id)
    return Node(config, identity, trainer, transport, StaticView([]), make_aggregator("mean"))


async def _pair() -> tuple[Node, Node]:
    network = MemoryNetwork()
    a, b = _node(network, 0), _node(network, 1)
    a.membership.peers.append(_record(b.identity.peer_id))  # type: ignore[attr-defined]
    b.membership.peers.append(_record(a.identity.peer_id))  # type: ignore[attr-defined]
    for n in (a, b):
        await n.transport.start(n.serve)
    return a, b


def test_a_round_merges_own_and_pulled_model_as_their_mean() -> None:
    async def scenario() -> None:
        a, b = await _pair()
        theta_b = b.trainer.get_flat()
        a_before = a.trainer.get_flat()

        report = await a.run_round()

        a_after = a.trainer.get_flat()
        assert report.pulled == 1
        # A trained (so it moved), pushed its model to B, pulled B's and applied the mean as a delta
        pushed = b.inbox.drain()
        assert list(pushed) == [a.identity.peer_id]
        assert not torch.equal(pushed[a.identity.peer_id], a_before)
        torch.testing.assert_close(a_after, (pushed[a.identity.peer_id] + theta_b) / 2)
        assert a.transport.stats.bytes_sent > 4 * a.trainer.num_params
        assert a.messages_rejected == 0

    asyncio.run(scenario())


def test_models_pushed_to_a_node_are_merged_in_its_next_round() -> None:
    async def scenario() -> None:
        a, b = await _pair()
        await a.run_round()  # B now holds A's pushed model in its inbox
        b.membership.peers.clear()  # type: ignore[attr-defined]  # B pulls from nobody this round

        report = await b.run_round()

        assert report.pushed_to_us == 1
        assert report.pulled == 0

    asyncio.run(scenario())


def _sealed_push(sender: Identity, node: Node, flat: torch.Tensor, *, seq: int) -> bytes:
    payload = pack_exchange(encode_model(flat, fingerprint=node.fingerprint, round=1))
    return seal(sender, kind=KIND_PUSH, swarm="t", round=1, seq=seq, payload=payload)


@pytest.mark.parametrize("attack", ["garbage", "replay", "impostor", "nan", "wrong-size"])
def test_bad_pushes_are_rejected_counted_and_the_node_keeps_serving(attack: str) -> None:
    async def scenario() -> None:
        a, b = await _pair()
        good = _sealed_push(a.identity, b, a.trainer.get_flat(), seq=1)
        await a.transport.exchange(b.identity.peer_id, good, timeout=5)
        flat = a.trainer.get_flat()
        bad = {
            "garbage": b"\x93\x01\x02garbage",
            "replay": good,
            "impostor": _sealed_push(Identity.generate(), b, flat, seq=2),  # signed by someone else
            "nan": _sealed_push(a.identity, b, torch.full_like(flat, float("nan")), seq=2),
            "wrong-size": seal(a.identity, kind=KIND_PUSH, swarm="t", round=1, seq=2,
                               payload=pack_exchange(encode_model(flat[:-1], fingerprint=b.fingerprint,
                                                                  round=1))),
        }[attack]

        with pytest.raises(MessageRejected):
            await a.transport.exchange(b.identity.peer_id, bad, timeout=5)

        assert b.messages_rejected == 1
        assert len(b.inbox) == 1, "only the good push was kept"
        later = _sealed_push(a.identity, b, flat, seq=3)
        reply = await a.transport.exchange(b.identity.peer_id, later, timeout=5)
        assert len(reply) > 4 * b.trainer.num_params

    asyncio.run(scenario())


def test_a_request_refused_by_the_transport_is_counted_in_messages_rejected() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        node = _node(network, 0)
        node.transport.max_message_bytes = 1000  # type: ignore[attr-defined]
        await node.transport.start(node.serve)
        caller = MemoryTransport(network, "caller", max_message_bytes=10_000)

        with pytest.raises(MessageRejected, match="exceeds max_message_bytes"):
            await caller.exchange(node.identity.peer_id, bytes(1001), timeout=5)

        assert node.messages_rejected == 0, "the handler never saw it"
        assert node.counters()["messages_rejected"] == 1

    asyncio.run(scenario())


def test_an_unreachable_peer_is_marked_and_the_round_still_completes() -> None:
    async def scenario() -> None:
        a, b = await _pair()
        await b.transport.close()

        report = await a.run_round()

        assert report.pulled == 0
        assert a.membership.unreachable == [b.identity.peer_id]  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_a_node_whose_local_training_diverges_restores_its_last_finite_model() -> None:
    async def scenario() -> None:
        a, b = await _pair()
        await a.run_round()
        good = a.trainer.get_flat()

        def diverge(steps: int) -> float:
            a.trainer.set_flat_(torch.full_like(good, float("nan")))
            return float("nan")

        a.local_training = diverge  # type: ignore[method-assign]
        report = await a.run_round()

        assert a.local_divergences == 1
        assert torch.isfinite(a.trainer.get_flat()).all()
        assert report.pulled == 1, "the node kept exchanging"
        assert b.messages_rejected == 0, "it never sent the non-finite model"
        assert not a.trainer.optimizer.state, "momentum buffers were dropped"

    asyncio.run(scenario())


def test_with_overlap_the_next_local_steps_run_during_the_exchange_and_are_kept() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = _node(network, 0), _node(network, 1)
        a.membership.peers.append(_record(b.identity.peer_id))  # type: ignore[attr-defined]
        a.config.gossip.overlap, a.config.gossip.rounds = True, 3

        async def slow_serve(sender: str, request: bytes) -> bytes:
            await asyncio.sleep(0.5)  # a slow peer: A's next 5 steps finish before the reply comes
            return await b.serve(sender, request)

        await a.transport.start(a.serve)
        await b.transport.start(slow_serve)
        trained: list[torch.Tensor] = []
        train = a.local_training

        def recording(steps: int) -> float:
            loss = train(steps)
            trained.append(a.trainer.get_flat())
            return loss

        a.local_training = recording  # type: ignore[method-assign]
        theta_b = b.trainer.get_flat()

        await a.run_round()

        sent = b.inbox.drain()[a.identity.peer_id]
        assert a.trainer.steps_done == 10  # round 1's 5 steps, and round 2's 5 during the exchange
        assert len(trained) == 2
        merged = (sent + theta_b) / 2
        # the merge landed as a delta on the model the overlapped steps produced: they are kept
        torch.testing.assert_close(a.trainer.get_flat(), trained[1] + (merged - sent))
        await a.run_round()  # consumes the overlapped steps: no new steps before its exchange
        assert a.trainer.steps_done == 15

    asyncio.run(scenario())
