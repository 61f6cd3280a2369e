"""The straggler cutoff: a round stops waiting for a slow sampled peer, and its late reply is merged next
round (p2pnode/stragglers.py), on bare futures and on real nodes over the in-memory transport."""

from __future__ import annotations

import asyncio

import pytest

from p2pnode.stragglers import MIN_SAMPLES, StragglerCutoff, timed, wait_for_replies
from p2pnode.transport import MemoryNetwork
from tests.unit.test_node import _node, _record


async def _reply(value: str | None, after: float) -> str | None:
    await asyncio.sleep(after)
    return value


def test_the_cutoff_needs_history_honours_its_floor_and_can_be_off() -> None:
    cut = StragglerCutoff(factor=4.0, min_s=1.0)
    for _ in range(MIN_SAMPLES - 1):
        cut.record(0.5)
    assert cut.cutoff() is None, "no cutoff before the node has timed a few exchanges"
    cut.record(0.5)
    assert cut.cutoff() == pytest.approx(2.0)
    for _ in range(40):
        cut.record(0.01)
    assert cut.cutoff() == pytest.approx(1.0), "the floor"
    off = StragglerCutoff(factor=0.0, min_s=1.0)
    for _ in range(10):
        off.record(0.5)
    assert off.cutoff() is None


def test_without_a_cutoff_every_reply_is_awaited() -> None:
    async def scenario() -> None:
        tasks = {"a": asyncio.ensure_future(_reply("A", 0.0)), "b": asyncio.ensure_future(_reply("B", 0.2))}
        assert await wait_for_replies(tasks, None, lambda p, r: None) == {"a": "A", "b": "B"}

    asyncio.run(scenario())


def test_a_straggler_is_left_behind_and_its_late_reply_delivered() -> None:
    async def scenario() -> None:
        late: list[tuple[str, str]] = []
        tasks = {"fast": asyncio.ensure_future(_reply("F", 0.0)),
                 "slow": asyncio.ensure_future(_reply("S", 0.5))}
        replies = await wait_for_replies(tasks, 0.05, lambda p, r: late.append((p, r)))
        assert replies == {"fast": "F"}
        assert not tasks["slow"].done()
        assert late == []
        await tasks["slow"]
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration
        assert late == [("slow", "S")]

    asyncio.run(scenario())


def test_past_the_cutoff_the_round_still_waits_for_a_first_reply() -> None:
    async def scenario() -> None:
        # the failed exchange (None) is not an answer; the first real one ends the wait, the slowest is late
        tasks = {"failed": asyncio.ensure_future(_reply(None, 0.0)),
                 "first": asyncio.ensure_future(_reply("1", 0.2)),
                 "slow": asyncio.ensure_future(_reply("2", 5.0))}
        replies = await wait_for_replies(tasks, 0.01, lambda p, r: None)
        assert replies == {"first": "1"}
        assert not tasks["slow"].done()
        tasks["slow"].cancel()

    asyncio.run(scenario())


def test_an_unexpected_error_cancels_the_other_exchanges_and_is_raised() -> None:
    async def boom() -> str | None:
        raise RuntimeError("bug")

    async def scenario() -> None:
        tasks = {"bad": asyncio.ensure_future(boom()), "slow": asyncio.ensure_future(_reply("S", 5.0))}
        with pytest.raises(RuntimeError, match="bug"):
            await wait_for_replies(tasks, None, lambda p, r: None)
        await asyncio.sleep(0)
        assert tasks["slow"].cancelled()

    asyncio.run(scenario())


def test_timed_records_only_exchanges_that_brought_a_reply() -> None:
    async def scenario() -> None:
        times: list[float] = []
        assert await timed(times.append, _reply("x", 0.0)) == "x"
        assert await timed(times.append, _reply(None, 0.0)) is None
        assert len(times) == 1

    asyncio.run(scenario())


def test_a_node_goes_on_without_a_slow_peer_merges_its_reply_next_round_and_does_not_resample_it() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, fast, slow = _node(network, 0, fanout=2), _node(network, 1), _node(network, 1)
        answered = asyncio.Event()

        async def slow_serve(sender: str, request: bytes) -> bytes:
            await asyncio.sleep(1.5)
            reply = await slow.serve(sender, request)
            answered.set()
            return reply

        for peer in (fast, slow):
            a.membership.peers.append(_record(peer.identity.peer_id))  # type: ignore[attr-defined]
        await a.transport.start(a.serve)
        await fast.transport.start(fast.serve)
        await slow.transport.start(slow_serve)
        for _ in range(MIN_SAMPLES):
            a.stragglers.record(0.01)  # what a few quick exchanges would have left: cutoff = the 0.05 s floor
        a.stragglers.min_s = 0.05

        first = await a.run_round()
        assert first.pulled == 1, "the fast peer's reply is merged this round"
        assert not answered.is_set(), "the round did not wait for the slow peer"
        assert a.counters()["exchanges_cut"] == 1
        # while the slow exchange is in flight, the next round samples only the fast peer
        assert [p.peer_id for p in a._pick_peers(a.trainer.get_flat(), 2)] == [fast.identity.peer_id]

        await asyncio.wait_for(answered.wait(), 10)
        for _ in range(100):  # the reply travels back and is decoded
            if len(a.inbox):
                break
            await asyncio.sleep(0.01)
        second = await a.run_round()
        assert second.pushed_to_us == 1, "the slow peer's late reply is merged in the next round"
        assert a.counters()["exchanges_cut"] == 2, "the slow peer was sampled again, and left behind again"

    asyncio.run(scenario())
