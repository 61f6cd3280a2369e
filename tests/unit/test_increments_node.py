"""--mode increments on the in-process swarm: one global model everywhere, learning, refused increments."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pnode.config import GossipConfig
from p2pnode.errors import ConfigError, MessageRejected
from p2pnode.identity import Identity
from p2pnode.increments_node import KIND_ACK, KIND_INCREMENT, WINDOW, IncrementsNode, warmup_codec
from p2pnode.inproc import InprocOptions, InprocSwarm
from protocols.codecs import make_codec
from protocols.envelope import open_envelope, seal


def _swarm(codec: str, nodes: int = 4, rounds: int = 4) -> tuple[InprocSwarm, list[IncrementsNode]]:
    opts = InprocOptions(nodes=nodes, rounds=rounds, task="digits", mode="increments", codec=codec,
                         final_eval_samples=400)
    swarm = InprocSwarm(opts)
    nodes_ = [n for n in swarm.nodes if isinstance(n, IncrementsNode)]
    assert len(nodes_) == nodes
    return swarm, nodes_


@pytest.mark.parametrize("codec", ["dense", "topk:0.01"])
def test_every_node_holds_the_same_global_model_and_it_learns(codec: str) -> None:
    swarm, nodes = _swarm(codec)
    before = nodes[0].trainer.evaluate(400)[0]

    results = asyncio.run(swarm.run())

    first = nodes[0].global_model
    assert all(torch.equal(n.global_model, first) for n in nodes)  # bit-identical, not merely close
    assert all(torch.equal(n.trainer.get_flat(), first) for n in nodes)  # the model evaluated is G
    assert all(n.applied == 4 and not n.held for n in nodes)  # applied rounds leave the pending table
    assert min(r["test_accuracy"] for r in results) > max(0.6, before + 0.4)  # digits from a random init
    assert all(r["messages_rejected"] == 0 and r["increments_missing"] == 0 for r in results)
    assert all(r["increments_late"] == 0 and r["equivocations"] == 0 for r in results)


def test_topk_sends_a_small_fraction_of_dense_and_feeds_the_rest_back() -> None:
    dense, _ = _swarm("dense", nodes=2, rounds=3)
    topk, nodes = _swarm("topk:0.01", nodes=2, rounds=3)

    dense_bytes = asyncio.run(dense.run())[0]["bytes_sent"]
    topk_bytes = asyncio.run(topk.run())[0]["bytes_sent"]

    assert topk_bytes * 20 < dense_bytes
    assert all(float(n.residual.abs().sum()) > 0 for n in nodes)  # what was not sent is kept


def test_warm_up_keeps_4x_then_2x_the_topk_ratio_and_leaves_other_codecs_alone() -> None:
    topk, dense = make_codec("topk:0.01"), make_codec("dense")

    ratios = [getattr(warmup_codec(topk, r, 2), "ratio", None) for r in (1, 2, 3, 4)]

    assert ratios == pytest.approx([0.04, 0.02, 0.01, 0.01])
    assert warmup_codec(topk, 3, 2) is topk
    assert warmup_codec(dense, 1, 2) is dense
    assert getattr(warmup_codec(make_codec("topk:0.5"), 1, 2), "ratio", None) == 1.0  # capped


def test_refused_increments_are_counted_and_the_node_keeps_going() -> None:
    async def scenario() -> tuple[IncrementsNode, list[dict[str, object]]]:
        swarm, nodes = _swarm("dense", nodes=3, rounds=3)
        a = nodes[0]
        for n in nodes:
            await n.transport.start(n.serve)
        await asyncio.gather(*(n.run_round() for n in nodes))
        mallory = Identity.generate()
        zeros = a.codec.encode(torch.zeros_like(a.global_model), a.layout)
        ones = a.codec.encode(torch.ones_like(a.global_model), a.layout)

        def env(round: int, payload: bytes, kind: str = KIND_INCREMENT, seq: int = 1) -> bytes:
            return seal(mallory, kind=kind, swarm="inproc", round=round, seq=seq, payload=payload)

        reply = await a.serve(mallory.peer_id, env(2, zeros))  # accepted: a signed, acknowledged increment
        assert open_envelope(reply, max_bytes=1 << 20, swarm="inproc", kinds=(KIND_ACK,)).sender == \
            a.identity.peer_id
        await a.serve(mallory.peer_id, env(1, zeros))  # for a round already applied: dropped, not refused
        refused = [env(2, zeros, seq=2),  # duplicate
                   env(0, zeros),  # round 0 is never a round
                   env(2, ones, seq=3),  # equivocation
                   env(2 + WINDOW, zeros),  # beyond the window
                   env(3, zeros[:-4] + b"\xff\xff\xff\x7f"),  # garbage (a NaN in the payload)
                   env(3, b"not a payload"),  # garbage
                   env(3, zeros, kind="push"),  # wrong kind
                   seal(Identity.generate(), kind=KIND_INCREMENT, swarm="inproc", round=3, seq=1,
                        payload=zeros)]  # signed by someone else than the connection's peer
        for request in refused:
            with pytest.raises(MessageRejected):
                await a.serve(mallory.peer_id, request)
        assert a.messages_rejected == len(refused)
        assert a.equivocations == 1
        assert a.increments_late == 1
        assert set(a.held[2]) == {mallory.peer_id}  # nothing of a refused increment was kept
        await asyncio.gather(*(n.run_round() for n in nodes))
        await asyncio.gather(*(n.run_round() for n in nodes))
        return a, [n.counters() for n in nodes]

    a, counters = asyncio.run(scenario())

    assert a.applied == 3
    assert not a.held
    assert torch.isfinite(a.global_model).all()
    assert a.trainer.evaluate(400)[0] > 0.5
    assert [c["messages_rejected"] for c in counters] == [8, 0, 0]


def test_a_late_increment_is_added_to_its_round_so_the_node_catches_up_with_those_that_had_it() -> None:
    async def scenario() -> tuple[IncrementsNode, IncrementsNode, IncrementsNode]:
        swarm, (a, b, c) = _swarm("dense", nodes=3, rounds=3)
        for n in (a, b, c):
            await n.transport.start(n.serve)
        await asyncio.gather(*(n.run_round() for n in (a, b, c)))
        extra = Identity.generate()  # a contributor the three do not wait for
        payload = a.codec.encode(torch.full_like(a.global_model, 0.01), a.layout)
        late = seal(extra, kind=KIND_INCREMENT, swarm="inproc", round=2, seq=1, payload=payload)
        await a.serve(extra.peer_id, late)  # on time for a: part of its round-2 mean
        await asyncio.gather(*(n.run_round() for n in (a, b, c)))
        await b.serve(extra.peer_id, late)  # after b applied round 2: added late
        with pytest.raises(MessageRejected):
            await b.serve(extra.peer_id, late)  # and only once
        return a, b, c

    a, b, c = asyncio.run(scenario())

    assert (a.increments_late, b.increments_late, c.increments_late) == (0, 1, 0)
    assert torch.allclose(b.global_model, a.global_model, rtol=0, atol=1e-6)  # b caught up with a
    assert not torch.allclose(c.global_model, a.global_model, rtol=0, atol=1e-4)  # c never got it


def test_increments_mode_refuses_a_robust_defense() -> None:
    with pytest.raises(ConfigError, match="gossip.defense"):
        GossipConfig(mode="increments", defense="median")
    with pytest.raises(ConfigError, match="gossip.mode"):
        GossipConfig(mode="nonsense")
    assert GossipConfig(mode="increments").increments_warmup == 2
