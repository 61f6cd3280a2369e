"""``--sync``: round-aligned model gossip (p2pnode/sync.py) on bare snapshots and on two real nodes over the
in-memory transport."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p2pnode.config import ConfigError, GossipConfig
from p2pnode.sync import KEEP, RoundSnapshots
from p2pnode.transport import MemoryNetwork
from tests.unit.test_node import _node, _record


def test_a_snapshot_held_is_returned_at_once_and_one_ahead_is_waited_for() -> None:
    async def scenario() -> None:
        snaps = RoundSnapshots()
        snaps.add(1, torch.zeros(3))
        assert torch.equal(await snaps.wait_for(1, 0.0), torch.zeros(3))  # type: ignore[arg-type]
        waiter = asyncio.ensure_future(snaps.wait_for(2, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done(), "round 2 is not reached yet"
        snaps.add(2, torch.ones(3))
        assert torch.equal(await waiter, torch.ones(3))  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_a_round_not_reached_in_time_gone_or_never_coming_gives_none() -> None:
    async def scenario() -> None:
        snaps = RoundSnapshots()
        assert await snaps.wait_for(1, 0.05) is None, "not reached in time"
        for r in range(1, KEEP + 3):
            snaps.add(r, torch.full((2,), float(r)))
        assert await snaps.wait_for(1, 0.0) is None, "older than KEEP rounds"
        last = await snaps.wait_for(KEEP + 2, 0.0)
        assert last is not None
        assert torch.equal(last, torch.full((2,), float(KEEP + 2)))
        waiter = asyncio.ensure_future(snaps.wait_for(KEEP + 5, 30.0))
        await asyncio.sleep(0.01)
        snaps.close()
        assert await asyncio.wait_for(waiter, 1.0) is None, "the node finished: waiters are let go"

    asyncio.run(scenario())


def test_sync_is_for_model_gossip_only() -> None:
    GossipConfig(sync=True)
    with pytest.raises(ConfigError, match="gossip.sync"):
        GossipConfig(mode="spsa", sync=True)


@pytest.mark.parametrize("sync", [True, False])
def test_two_nodes_a_round_apart_merge_their_models_of_the_same_round_with_sync(sync: bool) -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b = _node(network, 0), _node(network, 1)
        for n, other in ((a, b), (b, a)):
            n.config.gossip.sync = sync
            n.snapshots = RoundSnapshots() if sync else None  # what --sync builds
            n.membership.peers.append(_record(other.identity.peer_id))  # type: ignore[attr-defined]
            await n.transport.start(n.serve)
        initial_b = b.trainer.get_flat()

        async def b_late() -> None:
            await asyncio.sleep(0.3)  # a pushes its round 1 while b has not trained at all
            await b.run_round()

        await asyncio.gather(a.run_round(), b_late())
        if sync:
            a1, b1 = a.snapshots._models[1], b.snapshots._models[1]  # type: ignore[union-attr]
            torch.testing.assert_close(a.trainer.get_flat(), (a1 + b1) / 2)
            torch.testing.assert_close(b.trainer.get_flat(), (a1 + b1) / 2)
        else:  # free-running: a merged b's live model, still the untrained one
            assert a.snapshots is None
            expected = (a._last_good + initial_b) / 2
            torch.testing.assert_close(a.trainer.get_flat(), expected)

    asyncio.run(scenario())


def test_only_pushes_of_this_round_are_merged_a_later_one_waits_and_an_older_one_goes() -> None:
    node = _node(MemoryNetwork(), 0)
    node.round = 5
    for peer, r in (("behind", 4), ("same", 5), ("ahead", 6)):
        node.inbox.put(peer, torch.full((2,), float(r)), r)
    assert list(node._same_round(node.inbox.drain_with_rounds())) == ["same"]
    left = node.inbox.drain_with_rounds()
    assert list(left) == ["ahead"]
    assert left["ahead"][1] == 6
