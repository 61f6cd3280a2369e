"""The simulator's virtual clock: per-link model, exchange cost arithmetic, synchronous rounds."""

from __future__ import annotations

import pytest

from p2pnode.sim.clock import LinkModel, VirtualClock


def test_link_without_jitter_is_the_mean() -> None:
    links = LinkModel(latency_s=0.01, bandwidth_bps=1e6, jitter=0.0)
    assert links.link(3, 7) == (0.01, 1e6)
    # 2 latencies + (request + reply) / bandwidth
    assert links.exchange_s(3, 7, 400_000, 100_000) == pytest.approx(0.02 + 0.5)


def test_link_factors_are_symmetric_seeded_and_bounded() -> None:
    links = LinkModel(latency_s=0.02, bandwidth_bps=1e7, jitter=0.5, seed=4)
    assert links.link(1, 2) == links.link(2, 1)
    assert links.link(1, 2) == LinkModel(latency_s=0.02, bandwidth_bps=1e7, jitter=0.5, seed=4).link(1, 2)
    assert links.link(1, 2) != LinkModel(latency_s=0.02, bandwidth_bps=1e7, jitter=0.5, seed=5).link(1, 2)
    values = [links.link(a, b) for a in range(30) for b in range(a + 1, 30)]
    assert all(0.01 <= lat <= 0.03 and 0.5e7 <= bw <= 1.5e7 for lat, bw in values)
    assert len(set(values)) == len(values)  # links differ


@pytest.mark.parametrize("kwargs", [{"latency_s": -1}, {"bandwidth_bps": 0}, {"jitter": 1.0}])
def test_link_model_rejects(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        LinkModel(**kwargs)  # type: ignore[arg-type]


def test_round_is_compute_plus_slowest_exchange_of_the_slowest_node() -> None:
    clock = VirtualClock(links=LinkModel(latency_s=0.01, bandwidth_bps=1000.0, jitter=0.0), step_s=0.002)
    clock.begin_round()
    assert clock.note_exchange(0, 1, 500, 500) == pytest.approx(0.02 + 1.0)
    clock.note_exchange(0, 2, 100, 100)  # concurrent with the first: only the slowest counts
    clock.note_exchange(1, 0, 1000, 1000)
    assert clock.slowest_exchange(0) == pytest.approx(1.02)
    assert clock.node_round_s(0, 10) == pytest.approx(0.02 + 1.02)
    assert clock.node_round_s(1, 10) == pytest.approx(0.02 + 2.02)
    duration = clock.end_round({0: 10, 1: 10, 2: 10})
    assert duration == pytest.approx(2.04)  # node 1 is the slowest; node 2 only trained
    assert clock.now == pytest.approx(2.04)
    clock.begin_round()
    assert clock.end_round({0: 5}) == pytest.approx(0.01)  # no exchange: compute only
    assert clock.now == pytest.approx(2.05)
    assert clock() == clock.now
    assert clock.rounds == [pytest.approx(2.04), pytest.approx(0.01)]
    assert clock.exchanges == 3


def test_empty_round_takes_no_time() -> None:
    clock = VirtualClock()
    clock.begin_round()
    assert clock.end_round({}) == 0.0
