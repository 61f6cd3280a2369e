"""Simulator topologies: degrees, connectivity, symmetry, determinism by seed; the neighbour view."""

from __future__ import annotations

import random
import time

import pytest

from p2pnode.sim.topology import (
    NeighbourView,
    PeerDirectory,
    Topology,
    barabasi_albert,
    components,
    degrees,
    edge_count,
    is_connected,
    parse_topology,
    random_geometric,
    random_k,
    shortest_hops,
)
from protocols.records import MembershipRecord


def _check_simple(adj: list[list[int]]) -> None:
    """Undirected, sorted, no self-loops, no duplicates."""
    sets = [set(a) for a in adj]
    for i, a in enumerate(adj):
        assert a == sorted(sets[i])
        assert i not in sets[i]
        assert all(i in sets[j] for j in a)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("full", Topology("full")),
        ("complete", Topology("full")),
        ("random-k:4", Topology("random-k", 4)),
        ("ba:3", Topology("ba", 3)),
        ("geometric:0.1", Topology("geometric", 0.1)),
        ("geometric:0.08:7", Topology("geometric", 0.08, 7)),
    ],
)
def test_parse_topology(spec: str, expected: Topology) -> None:
    topo = parse_topology(spec)
    assert topo == expected
    assert parse_topology(str(topo)) == topo


@pytest.mark.parametrize("spec", ["ring", "random-k", "random-k:0", "ba:x", "geometric:-1", "geometric:0.1:0",
                                  "random-k:3:2", "ba:2.5"])
def test_parse_topology_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="topology|needs|degree"):
        parse_topology(spec)


@pytest.mark.parametrize("n", [16, 101, 1000])
@pytest.mark.parametrize("k", [3, 4, 7])
def test_random_k_is_regular_and_connected(n: int, k: int) -> None:
    adj = random_k(n, k, seed=1)
    _check_simple(adj)
    deg = degrees(adj)
    if n * k % 2 == 0:
        assert set(deg) == {k}
    else:  # node 0 takes the odd stub
        assert deg[0] == k + 1
        assert set(deg[1:]) == {k}
    assert is_connected(adj)


def test_random_k_small_n_is_complete() -> None:
    assert random_k(4, 5, seed=0) == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_barabasi_albert(m: int) -> None:
    n = 2000
    adj = barabasi_albert(n, m, seed=3)
    _check_simple(adj)
    deg = degrees(adj)
    assert min(deg) >= m
    assert edge_count(adj) == m * (m + 1) // 2 + (n - m - 1) * m
    assert is_connected(adj)
    assert max(deg) > 8 * m  # preferential attachment: hubs


def test_geometric_radius_and_cap() -> None:
    n, radius = 1000, 0.1
    adj = random_geometric(n, radius, seed=5)
    _check_simple(adj)
    mean_degree = sum(degrees(adj)) / n
    assert 0.7 * n * 3.14159 * radius**2 < mean_degree < n * 3.14159 * radius**2  # border effects lower it
    capped = random_geometric(n, radius, seed=5, max_degree=7)
    _check_simple(capped)
    assert max(degrees(capped)) <= 7
    full_sets = [set(a) for a in adj]
    assert all(set(a) <= full_sets[i] for i, a in enumerate(capped))  # only edges within the radius


def test_geometric_large_is_fast() -> None:
    t0 = time.perf_counter()
    adj = random_geometric(10_000, 0.03, seed=0, max_degree=7)
    assert time.perf_counter() - t0 < 10
    assert max(degrees(adj)) <= 7


@pytest.mark.parametrize("spec", ["random-k:4", "ba:2", "geometric:0.2:6"])
def test_deterministic_by_seed(spec: str) -> None:
    topo = parse_topology(spec)
    assert topo.build(300, 7) == topo.build(300, 7)
    assert topo.build(300, 7) != topo.build(300, 8)


def test_full_builds_nothing() -> None:
    assert parse_topology("full").build(10_000, 0) is None


def test_components_and_hops() -> None:
    adj = [[1], [0, 2], [1], [4], [3], []]
    assert components(adj) == [[0, 1, 2], [3, 4], [5]]
    assert not is_connected(adj)
    assert shortest_hops(adj, 0) == [0, 1, 2, -1, -1, -1]


def _directory(n: int) -> PeerDirectory:
    return PeerDirectory([MembershipRecord(peer_id=f"p{i}", swarm="sim", maddrs=(), round=0, mode="gossip",
                                           codec="dense", model_fingerprint=b"", timestamp=0.0)
                          for i in range(n)])


def test_neighbour_view_offers_live_neighbours_only() -> None:
    d = _directory(6)
    view = NeighbourView(0, [1, 2, 3], d, random.Random(0))
    assert [r.peer_id for r in view.live()] == ["p1", "p2", "p3"]
    d.set_alive(2, False)
    assert [r.peer_id for r in view.live()] == ["p1", "p3"]
    assert {r.peer_id for r in view.sample(5)} == {"p1", "p3"}
    view.mark_unreachable("p3")
    assert [r.peer_id for r in view.live()] == ["p1"]
    d.set_alive(2, True)
    assert [r.peer_id for r in view.live()] == ["p1", "p2"]
    d.set_alive(3, False)
    d.set_alive(3, True)  # it came back: the unreachable mark is void
    assert [r.peer_id for r in view.live()] == ["p1", "p2", "p3"]
    assert view.live_count() == 3


def test_full_view_counts_and_samples() -> None:
    n = 5000
    d = _directory(n)
    view = NeighbourView(0, None, d, random.Random(1))
    assert len(view.live()) == n - 1
    for j in range(1, 2001):
        d.set_alive(j, False)
    view.mark_unreachable("p2001")
    assert len(view.live()) == n - 2002
    assert view.live_count() == sum(1 for _ in view.live())
    for _ in range(50):
        picked = [int(r.peer_id[1:]) for r in view.sample(3)]
        assert len(set(picked)) == 3
        assert all(j > 2001 for j in picked)
    view.mark_alive("p2001")
    assert len(view.live()) == n - 2001


def test_full_view_sample_when_few_are_live() -> None:
    d = _directory(50)
    view = NeighbourView(3, None, d, random.Random(2))
    for j in range(50):
        if j not in (3, 10, 20):
            d.set_alive(j, False)
    assert sorted(r.peer_id for r in view.sample(5)) == ["p10", "p20"]
