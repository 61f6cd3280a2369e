"""Bounded lead (p2pnode/pacing.py): a node with --max-lead 1 never starts a round more than one ahead
of a slow peer (and runs ahead without it); a silent peer costs one bounded wait, then is excused;
await requests are checked before anything is allocated or awaited."""

from __future__ import annotations

import asyncio
import time

import pytest

from p2pnode.config import GossipConfig
from p2pnode.errors import ConfigError
from p2pnode.outputs import MetricsWriter
from p2pnode.pacing import EXCUSE_ROUNDS, MAX_AWAIT_MS, Pacer, decode_await, encode_await
from protocols.errors import ProtocolError
from tests.unit.test_node import _pair, _record


def _slow_down(node, seconds: float) -> None:  # type: ignore[no-untyped-def]
    train = node.local_training

    def slow(steps: int) -> float:
        time.sleep(seconds)
        return train(steps)

    node.local_training = slow


def _lead_at_round_starts(max_lead: int) -> list[int]:
    """Run fast node a and slow node b for 4 rounds each; a's lead over b whenever a starts a round."""
    async def scenario() -> list[int]:
        a, b = await _pair()
        for n in (a, b):
            n.config.gossip.rounds = 4
        a.pacer = Pacer(max_lead, 10.0)
        _slow_down(b, 0.4)
        leads: list[int] = []
        run_round = a.run_round

        async def watched():  # type: ignore[no-untyped-def]
            leads.append(a.round + 1 - b.round)
            return await run_round()

        a.run_round = watched
        both = asyncio.gather(a.run_rounds(MetricsWriter(None)), b.run_rounds(MetricsWriter(None)))
        await asyncio.wait_for(both, 120)
        return leads

    return asyncio.run(scenario())


def test_a_fast_node_stays_within_max_lead_of_a_slow_peer_and_runs_ahead_without_it() -> None:
    bounded = _lead_at_round_starts(1)
    assert len(bounded) == 4
    assert max(bounded) <= 1, bounded
    free = _lead_at_round_starts(0)
    assert max(free) >= 3, free  # the check above can fail: unbounded, a is rounds ahead


def test_a_silent_peer_costs_one_bounded_wait_then_is_excused() -> None:
    async def scenario() -> None:
        a, _ = await _pair()
        ghost = _record("12D3KooWghost")  # in view, never answers (the memory network has no such node)
        a.membership.peers.append(ghost)  # type: ignore[attr-defined]
        a.pacer = Pacer(1, 0.5)
        a.round = 3
        a.pacer.saw(a.membership.peers[0].peer_id, 3)  # the real peer is level with us
        began = time.monotonic()
        assert await a.hold_lead() < 2.0
        assert time.monotonic() - began < 2.0
        assert a.pacer.timeouts == 1
        assert a.pacer.excused_until[ghost.peer_id] == 3 + EXCUSE_ROUNDS
        assert a.pacer.behind(4, [ghost.peer_id]) == []  # not waited for during the next rounds
        assert a.pacer.behind(3 + EXCUSE_ROUNDS, [ghost.peer_id]) == []
        assert a.pacer.behind(4 + EXCUSE_ROUNDS, [ghost.peer_id]) == [ghost.peer_id]

    asyncio.run(scenario())


def test_an_await_is_answered_when_the_round_starts_or_when_its_wait_ends() -> None:
    async def scenario() -> None:
        p = Pacer(1, 5.0)
        waiting = asyncio.ensure_future(p.serve_await(2, 5.0, finished=lambda: False))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        p.advanced(1)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        p.advanced(2)
        await asyncio.wait_for(waiting, 1.0)
        began = time.monotonic()
        await p.serve_await(9, 0.2, finished=lambda: False)
        assert 0.15 < time.monotonic() - began < 1.0
        await asyncio.wait_for(p.serve_await(9, 5.0, finished=lambda: True), 0.5)  # no more rounds to run

    asyncio.run(scenario())


def test_await_payloads_are_checked() -> None:
    assert decode_await(encode_await(7, 1.5)) == (7, 1.5)
    assert decode_await(encode_await(7, 999.0)) == (7, MAX_AWAIT_MS / 1000)  # capped when encoding
    for bad in (b"", b"\x00" * 7, b"\x00" * 9, b"\x00\x00\x00\x01\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            decode_await(bad)


def test_peer_rounds_only_rise() -> None:
    p = Pacer(1, 1.0)
    p.saw("x", 5)
    p.saw("x", 2)  # a replayed old envelope
    assert p.peer_rounds["x"] == 5


def test_config_checks() -> None:
    GossipConfig(max_lead=1)
    for kwargs in ({"max_lead": -1}, {"max_lead": 1, "mode": "spsa"}, {"max_lead_wait_s": 0},
                   {"max_lead_wait_s": 31}):
        with pytest.raises(ConfigError):
            GossipConfig(**kwargs)
