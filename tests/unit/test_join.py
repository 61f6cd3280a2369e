"""Joining a running swarm over the in-memory transport: the joiner starts from the coordinate-wise median
of its donors' models, so one lying donor among three cannot poison it; a dead donor is skipped; a node
restarted under the same key is not mistaken for a replayer."""

from __future__ import annotations

import asyncio
import time

import torch

from defenses import make_aggregator
from p2pnode.byzantine import make_node
from p2pnode.config import AttackConfig, NodeConfig, TaskConfig
from p2pnode.identity import Identity
from p2pnode.node import Node
from p2pnode.outputs import MetricsWriter
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.records import MembershipRecord
from tests.unit.test_node import StaticView

TASK = make_task("digits")


def _node(network: MemoryNetwork, shard: int, *, attack: str = "", identity: Identity | None = None) -> Node:
    task = TaskConfig(name="digits", shard=shard, num_shards=4, local_steps=10)
    config = NodeConfig(device="cpu", task=task, attack=AttackConfig(name=attack))
    config.network.swarm = "t"
    trainer = LocalTrainer(TASK.build_model(0), TASK.load(ShardSpec(index=shard, count=4)), lr=0.05,
                           momentum=0.9, batch_size=16, device=torch.device("cpu"), seed=shard)
    identity = identity or Identity.generate()
    return make_node(config, identity, trainer, MemoryTransport(network, identity.peer_id), StaticView([]),
                     make_aggregator("mean"), num_classes=10)


def _record(node: Node) -> MembershipRecord:
    return MembershipRecord(peer_id=node.identity.peer_id, swarm="t", maddrs=(), round=node.round,
                            mode="gossip", codec="dense", model_fingerprint=b"", timestamp=time.time())


def _connect(nodes: list[Node]) -> None:
    for n in nodes:
        n.membership.peers[:] = [_record(m) for m in nodes if m is not n]  # type: ignore[attr-defined]


async def _running_swarm(network: MemoryNetwork, *, attack_last: str = "") -> list[Node]:
    donors = [_node(network, i, attack=attack_last if i == 2 else "") for i in range(3)]
    _connect(donors[:2] if attack_last else donors)  # a liar trains alone: it lies only to the joiner
    for n in donors:
        await n.transport.start(n.serve)
    for n in donors:
        n.config.gossip.rounds = 3
    await asyncio.gather(*(n.run_rounds(MetricsWriter(None)) for n in donors))
    return donors


async def _joiner(network: MemoryNetwork, donors: list[Node]) -> Node:
    joiner = _node(network, 3)
    joiner.membership.peers[:] = [_record(d) for d in donors]  # type: ignore[attr-defined]
    await joiner.transport.start(joiner.serve)
    return joiner


def test_a_joiner_starts_from_the_median_of_its_donors() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        donors = await _running_swarm(network)
        joiner = await _joiner(network, donors)
        assert await joiner.join_swarm()
        assert joiner.join_donors_used == 3
        expected = torch.stack([d.trainer.get_flat() for d in donors]).median(dim=0).values
        assert torch.equal(joiner.trainer.get_flat(), expected)
        accs = [d.trainer.evaluate(None)[0] for d in donors]
        assert joiner.trainer.evaluate(None)[0] >= min(accs) - 0.02

    asyncio.run(scenario())


def test_one_lying_donor_among_three_cannot_poison_the_join() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        donors = await _running_swarm(network, attack_last="gaussian:100")
        honest = [d for d in donors if d.role == "honest"]
        liar = next(d for d in donors if d.role != "honest")
        joiner = await _joiner(network, donors)
        assert await joiner.join_swarm()
        flat = joiner.trainer.get_flat()
        lo = torch.minimum(*(d.trainer.get_flat() for d in honest))
        hi = torch.maximum(*(d.trainer.get_flat() for d in honest))
        assert bool(((flat >= lo) & (flat <= hi)).all())  # inside the honest donors' range, coordinate-wise
        poisoned = liar.outgoing_model(liar.trainer.get_flat())
        assert (poisoned - flat).norm() > 10 * (honest[0].trainer.get_flat() - flat).norm()
        honest_acc = min(d.trainer.evaluate(None)[0] for d in honest)
        assert joiner.trainer.evaluate(None)[0] >= honest_acc - 0.05

    asyncio.run(scenario())


def test_a_dead_donor_is_skipped_and_a_fresh_swarm_is_not_joined() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        donors = await _running_swarm(network)
        await donors[0].transport.close()
        joiner = await _joiner(network, donors)
        assert await joiner.join_swarm()
        assert joiner.join_donors_used == 2

        fresh = [_node(network, i) for i in range(2)]
        _connect(fresh)
        for n in fresh:
            await n.transport.start(n.serve)
        before = fresh[0].trainer.get_flat()
        assert not await fresh[0].join_swarm()  # every peer at round 0: nothing to join
        assert torch.equal(fresh[0].trainer.get_flat(), before)

    asyncio.run(scenario())


def test_a_node_restarted_under_the_same_key_is_not_taken_for_a_replayer() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = _node(network, 0), _node(network, 1)
        _connect([a, b])
        for n in (a, b):
            await n.transport.start(n.serve)
        a.config.gossip.rounds = b.config.gossip.rounds = 2
        await asyncio.gather(a.run_rounds(MetricsWriter(None)), b.run_rounds(MetricsWriter(None)))
        await a.transport.close()
        restarted = _node(MemoryNetwork(), 0, identity=a.identity)  # same key, fresh process state
        restarted.transport = MemoryTransport(network, a.identity.peer_id)
        await restarted.transport.start(restarted.serve)
        _connect([restarted, b])
        rejected = b.messages_rejected
        restarted.config.gossip.rounds = 2
        reports = [await restarted.run_round() for _ in range(2)]
        assert b.messages_rejected == rejected
        assert all(r.pulled == 1 for r in reports)

    asyncio.run(scenario())


def test_first_sequence_numbers_grow_across_restarts() -> None:
    first = Node.first_seq()
    time.sleep(0.002)
    assert Node.first_seq() > first + 1000
