"""A Byzantine node next to an honest one over the in-memory transport (p2pnode.byzantine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import torch

from defenses import make_aggregator
from p2pnode.byzantine import ByzantineNode, make_node
from p2pnode.config import AttackConfig, NodeConfig, TaskConfig
from p2pnode.errors import ConfigError
from p2pnode.identity import Identity
from p2pnode.node import Node
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.records import MembershipRecord


class StaticView:
    """A fixed membership view (what the DHT would return)."""

    def __init__(self) -> None:
        self.peers: list[MembershipRecord] = []
        self.rejected = 0

    def live(self) -> list[MembershipRecord]:
        return list(self.peers)

    def sample(self, k: int) -> list[MembershipRecord]:
        return self.peers[:k]

    def mark_unreachable(self, peer_id: str) -> None:
        pass

    def mark_alive(self, peer_id: str) -> None:
        pass

    async def refresh(self) -> list[MembershipRecord]:
        return self.live()

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()


class RecordingNode(Node):
    """An honest node that remembers what it received each round (test-only spy)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.received: list[dict[str, torch.Tensor]] = []

    def observe(self, received: dict[str, torch.Tensor]) -> None:
        self.received.append(dict(received))


def _record(peer_id: str) -> MembershipRecord:
    return MembershipRecord(peer_id=peer_id, swarm="t", maddrs=(), round=0, mode="gossip", codec="dense",
                            model_fingerprint=b"", timestamp=time.time())


def _parts(network: MemoryNetwork, shard: int, attack: str = "") -> tuple[NodeConfig, Identity, LocalTrainer,
                                                                        MemoryTransport, StaticView]:
    task_cfg = TaskConfig(name="digits", shard=shard, num_shards=2, local_steps=3)
    config = NodeConfig(device="cpu", task=task_cfg, attack=AttackConfig(name=attack))
    config.network.swarm = "t"
    config.gossip.fanout = 1
    task = make_task("digits")
    trainer = LocalTrainer(task.build_model(0), task.load(ShardSpec(index=shard, count=2)), lr=0.05,
                           momentum=0.9, batch_size=16, device=torch.device("cpu"), seed=shard)
    identity = Identity.generate()
    return config, identity, trainer, MemoryTransport(network, identity.peer_id), StaticView()


async def _honest_and_attacker(attack: str) -> tuple[RecordingNode, ByzantineNode]:
    network = MemoryNetwork()
    honest = RecordingNode(*_parts(network, 0), make_aggregator("mean"))
    node = make_node(*_parts(network, 1, attack), make_aggregator("mean"))
    assert isinstance(node, ByzantineNode)
    honest.membership.peers.append(_record(node.identity.peer_id))  # type: ignore[attr-defined]
    node.membership.peers.append(_record(honest.identity.peer_id))  # type: ignore[attr-defined]
    for n in (honest, node):
        await n.transport.start(n.serve)
    return honest, node


def test_the_honest_node_receives_the_sign_flipped_model_over_the_real_protocol() -> None:
    async def scenario() -> None:
        honest, attacker = await _honest_and_attacker("sign-flip")
        attacker_initial = attacker.trainer.get_flat()

        await honest.run_round()  # the attacker has observed nothing yet: it replies −own
        honest_model = honest.trainer.get_flat()
        await attacker.run_round()  # it pulls the honest model and observes it
        await honest.run_round()  # now it replies −mean(observed) = −honest_model

        first, second = (r[attacker.identity.peer_id] for r in honest.received)
        assert torch.equal(first, -attacker_initial)
        assert torch.equal(second, -honest_model)
        assert attacker.observed
        assert torch.equal(attacker.observed[0], honest_model)
        assert honest.messages_rejected == 0, "the attack speaks the real protocol"
        assert (honest.role, attacker.role) == ("honest", "byzantine")
        assert attacker.counters()["role"] == "byzantine"

    asyncio.run(scenario())


def test_make_node_is_honest_without_an_attack_and_rejects_bad_specs() -> None:
    network = MemoryNetwork()

    honest = make_node(*_parts(network, 0), make_aggregator("mean"))

    assert type(honest) is Node
    assert honest.role == "honest"
    with pytest.raises(ValueError, match="attacker-only"):
        make_node(*_parts(network, 0), make_aggregator("mean"), observed_source=list)
    with pytest.raises(ConfigError, match="valid: .*sign-flip"):
        make_node(*_parts(network, 0, "nope"), make_aggregator("mean"))


def test_a_label_flipping_node_trains_on_flipped_labels_from_the_start() -> None:
    config, identity, trainer, transport, view = _parts(MemoryNetwork(), 1, "label-flip")
    labels = trainer.train_y.clone()

    node = make_node(config, identity, trainer, transport, view, make_aggregator("mean"))

    assert isinstance(node, ByzantineNode)
    assert torch.equal(trainer.train_y, 9 - labels), "digits has 10 classes, read off the model"
    assert torch.equal(node.outgoing_model(trainer.get_flat()), trainer.get_flat()), "it gossips honestly"


def test_the_omniscient_channel_replaces_what_the_attacker_received() -> None:
    honest_models = [torch.full((3,), 1.0), torch.full((3,), 3.0)]
    parts = _parts(MemoryNetwork(), 1, "sign-flip")
    node = make_node(*parts, make_aggregator("mean"), observed_source=lambda: honest_models)
    own = node.trainer.get_flat()
    node.observe({"peer": torch.zeros_like(own)})  # ignored: the omniscient view wins

    crafted = node.outgoing_model(own[:3].clone())

    assert torch.equal(crafted, torch.full((3,), -2.0))


def test_a_free_rider_echoes_the_latest_model_and_skips_training() -> None:
    node = make_node(*_parts(MemoryNetwork(), 1, "free-rider"), make_aggregator("mean"))
    assert isinstance(node, ByzantineNode)
    own = node.trainer.get_flat()
    older, latest = torch.zeros_like(own), torch.ones_like(own)

    node.observe({"a": older, "b": latest})
    loss = node.local_training(5)

    assert torch.equal(node.outgoing_model(own), latest)
    assert loss == 0.0
    assert node.trainer.steps_done == 0


def test_observed_models_are_bounded_and_an_empty_round_keeps_the_last_ones() -> None:
    config, identity, trainer, transport, view = _parts(MemoryNetwork(), 1, "sign-flip")
    config.gossip.max_inbox = 2
    node = make_node(config, identity, trainer, transport, view, make_aggregator("mean"))
    assert isinstance(node, ByzantineNode)

    node.observe({f"p{i}": torch.full((2,), float(i)) for i in range(4)})
    node.observe({})

    assert [float(m[0]) for m in node.observed] == [2.0, 3.0]


def test_the_crafted_model_is_cached_per_round_and_own_model() -> None:
    node = make_node(*_parts(MemoryNetwork(), 1, "gaussian:0.1"), make_aggregator("mean"))
    own = node.trainer.get_flat()

    first, again = node.outgoing_model(own), node.outgoing_model(own)
    other = node.outgoing_model(own.clone())

    assert first is again, "every push of one round carries the same crafted model"
    assert not torch.equal(first, other), "a fresh own model (a later pull reply) is crafted anew"
    assert first.dtype == torch.float32
    assert first.device.type == "cpu"
