"""--mode spsa on the in-process swarm: dissemination, exactly-once, equivocation, join and resync."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import torch

from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.inproc import InprocOptions, InprocSwarm
from p2pnode.spsa_node import KIND_GOSSIP, MAX_BATCHES_PER_BODY, SpsaNode
from protocols.envelope import seal
from protocols.spsa import ScalarBatch, seal_batch

SPSA = {"lr": 1e-3, "eps": 1e-3, "drain_rounds": 2, "probe_every": 1}


def _swarm(nodes: int = 4, steps: int = 60, **spsa: Any) -> InprocSwarm:
    opts = InprocOptions(nodes=nodes, rounds=3, task="digits", fanout=1, mode="spsa", local_steps=steps,
                         final_eval_samples=400, extra={"spsa": {**SPSA, **spsa}})
    return InprocSwarm(opts)


def _spsa_nodes(swarm: InprocSwarm) -> list[SpsaNode]:
    nodes = [n for n in swarm.nodes if isinstance(n, SpsaNode)]
    assert len(nodes) == len(swarm.nodes)
    return nodes


async def _rounds(nodes: list[SpsaNode], count: int, *, produce: bool = True) -> None:
    for _ in range(count):
        await asyncio.gather(*(n.run_round(produce=produce) for n in nodes))


def _max_diff(nodes: list[SpsaNode]) -> float:
    models = torch.stack([n.trainer.get_flat() for n in nodes])
    return float((models - models[0]).abs().max())


def test_every_node_applies_every_scalar_once_and_the_models_agree_and_learn() -> None:
    swarm = _swarm(steps=150, lr=2e-3)
    nodes = _spsa_nodes(swarm)
    before = nodes[0].trainer.evaluate(400)[0]

    results = asyncio.run(swarm.run())

    produced = sum(n.scalars_produced for n in nodes)
    assert produced == 4 * 3 * 150
    assert all(n.scalars_applied == produced for n in nodes)
    assert all(n.log.summary() == nodes[0].log.summary() for n in nodes)
    assert _max_diff(nodes) < 1e-5
    assert min(r["test_accuracy"] for r in results) > before + 0.2  # digits from a random init: it learns
    assert all(n.equivocations == 0 and n.messages_rejected == 0 for n in nodes)


def test_an_origin_that_signs_two_values_for_one_step_is_banned() -> None:
    async def scenario() -> tuple[SpsaNode, SpsaNode]:
        swarm = _swarm(nodes=2)
        a, b = _spsa_nodes(swarm)
        for n in (a, b):
            await n.transport.start(n.serve)
        await _rounds([a, b], 1)
        # a signs a second, different batch for its step 0 and pushes it to b
        liar = ScalarBatch(origin=a.identity.peer_id, start=0, k=1, codes=bytes([7]) * 60)
        sealed = seal_batch(a.identity, liar, swarm=a.config.network.swarm)
        a.log = type(a.log)(k=1)
        a._fresh = ScalarBatch(origin=liar.origin, start=0, k=1, codes=liar.codes, sealed=sealed)
        a.log.add(a._fresh)
        (peer,) = a.membership.sample(1)
        await a._gossip_with(peer, probe=False)  # a request pushes the requester's fresh batch
        return a, b

    a, b = asyncio.run(scenario())
    assert b.equivocations == 1
    assert a.identity.peer_id in b.log.banned


def test_a_batch_sealed_by_someone_else_than_its_origin_is_refused() -> None:
    async def scenario() -> SpsaNode:
        swarm = _swarm(nodes=3)
        a, b, c = _spsa_nodes(swarm)
        for n in (a, b, c):
            await n.transport.start(n.serve)
        forged = ScalarBatch(origin=c.identity.peer_id, start=0, k=1, codes=b"\x01" * 10)
        with pytest.raises(ValueError, match="origin"):
            seal_batch(a.identity, forged, swarm="inproc")
        return b

    asyncio.run(scenario())


def test_a_node_joining_mid_run_fetches_the_state_and_matches_within_rounds() -> None:
    async def scenario() -> tuple[list[SpsaNode], SpsaNode]:
        swarm = _swarm(nodes=4)
        *old, joiner = _spsa_nodes(swarm)
        record = swarm.registry.pop(joiner.identity.peer_id)  # not in anyone's view yet
        for n in old:
            await n.transport.start(n.serve)
        await _rounds(old, 3)
        swarm.registry[record.peer_id] = record
        await joiner.transport.start(joiner.serve)
        joiner.config.spsa.join = True
        await _rounds([*old, joiner], 2)
        await _rounds([*old, joiner], 3, produce=False)
        return old, joiner

    old, joiner = asyncio.run(scenario())
    assert joiner.resyncs == 1
    assert joiner.log.summary() == old[0].log.summary()
    assert _max_diff([*old, joiner]) < 1e-5


def test_a_node_whose_model_drifted_resyncs_from_its_peers() -> None:
    async def scenario() -> list[SpsaNode]:
        swarm = _swarm(nodes=3)
        nodes = _spsa_nodes(swarm)
        for n in nodes:
            await n.transport.start(n.serve)
        await _rounds(nodes, 2)
        await _rounds(nodes, 2, produce=False)
        nodes[2].trainer.add_flat_(torch.full((nodes[2].trainer.num_params,), 0.01))  # silent corruption
        await _rounds(nodes, 3, produce=False)
        return nodes

    nodes = asyncio.run(scenario())
    assert sum(n.probe_mismatches for n in nodes) >= 1
    assert nodes[2].resyncs >= 1
    assert _max_diff(nodes) < 1e-5


def _poisoned_state(node: SpsaNode, honest: bytes, poison: str) -> bytes:
    """``node``'s state payload ``honest`` with one part replaced by what a lying donor could send."""
    model, log, pending, step = msgpack.unpackb(honest, raw=False)
    if poison == "log-not-a-map":
        log = [1, 2]
    elif poison == "origins-not-a-map":
        log["origins"] = [log["origins"]]
    elif poison == "codes-as-a-huge-int":  # bytes(2**40) would allocate a TiB
        origin = next(iter(log["origins"]))
        log["origins"][origin]["codes"] = [[0, 2**40]]
    elif poison == "banned-not-strings":
        log["banned"] = [7]
    elif poison == "pending-code-300":  # accepted, then the worker thread fails on it mid-round
        pending = [[node.identity.peer_id, 10**6, 0, 300]]
    elif poison == "pending-infinite-step":
        pending = [[node.identity.peer_id, float("inf"), 0, 1]]
    elif poison == "pending-not-4-tuples":
        pending = [[1]]
    return msgpack.packb([model, log, pending, step], use_bin_type=True)


@pytest.mark.parametrize("poison", ["log-not-a-map", "origins-not-a-map", "codes-as-a-huge-int",
                                    "banned-not-strings", "pending-code-300", "pending-infinite-step",
                                    "pending-not-4-tuples"])
def test_a_joiner_refuses_malformed_states_and_keeps_running(poison: str) -> None:
    async def scenario() -> SpsaNode:
        swarm = _swarm(nodes=3)
        *donors, joiner = _spsa_nodes(swarm)
        for n in (*donors, joiner):
            await n.transport.start(n.serve)
        await _rounds(donors, 1)
        for donor in donors:
            honest = donor._state_payload
            donor._state_payload = (  # type: ignore[method-assign]
                lambda d=donor, h=honest: _poisoned_state(d, h(), poison))
        assert not await joiner.fetch_state(joiner.membership.sample(3))
        await _rounds([*donors, joiner], 1)  # the joiner still runs rounds
        return joiner

    joiner = asyncio.run(scenario())
    assert joiner.resyncs == 0
    assert joiner.round == 1


def test_a_gossip_body_with_too_many_batches_is_refused_before_any_is_verified() -> None:
    # every batch of a body is verified: 65,536 forged ones (6.8 MB) kept a node's event loop busy for 15 s
    async def scenario() -> SpsaNode:
        a, b = _spsa_nodes(_swarm(nodes=2))
        for n in (a, b):
            await n.transport.start(n.serve)
        liar = Identity.generate()
        one = seal_batch(liar, ScalarBatch(origin=liar.peer_id, start=0, k=1, codes=b"\x01"), swarm="inproc")
        forged = one[:-64] + bytes(64)  # a bad signature: only verifying it tells
        body = msgpack.packb([b"", [forged] * (MAX_BATCHES_PER_BODY + 1), None, False], use_bin_type=True)
        request = seal(a.identity, kind=KIND_GOSSIP, swarm="inproc", round=0, seq=2**62, payload=body)
        with pytest.raises(MessageRejected, match="max_array_len"):
            await a.transport.exchange(b.identity.peer_id, request, timeout=30)
        return b

    b = asyncio.run(scenario())
    assert b.messages_rejected == 1, "one refusal for the body, no batch verified"


def test_replies_carry_at_most_the_body_cap_and_a_lagging_peer_catches_up() -> None:
    steps = MAX_BATCHES_PER_BODY + 500

    async def scenario() -> list[int]:
        a, b = _spsa_nodes(_swarm(nodes=2))
        for n in (a, b):
            await n.transport.start(n.serve)
        origin = a.identity.peer_id
        for t in range(steps):  # a holds one signed batch per step of its own
            batch = ScalarBatch(origin=origin, start=t, k=1, codes=bytes([t % 256]))
            a.log.add(ScalarBatch(origin=origin, start=t, k=1, codes=batch.codes,
                                  sealed=seal_batch(a.identity, batch, swarm="inproc")))
        (peer,) = b.membership.sample(1)
        held = []
        for _ in range(3):
            await b._gossip_with(peer, probe=False)
            held.append(b.log.summary().get(origin, -1) + 1)
        return held

    assert asyncio.run(scenario()) == [MAX_BATCHES_PER_BODY, steps, steps]
