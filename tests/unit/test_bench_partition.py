"""The partition benchmark's arithmetic on synthetic metrics (no processes, no namespaces)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from p2pnode.bench import probes as pr
from p2pnode.bench.netns import NetnsLab
from p2pnode.bench.partition import PartitionOptions, _heal_now, analyze, format_report, plot


def _events(rounds: int, spread: dict[int, float], cut: tuple[int, int]) -> list[dict]:
    """Four nodes (halves {0, 1} and {2, 3}); at rounds inside ``cut`` the halves sit 1.0 apart on
    coordinate 0, otherwise 0.1; node i is offset by spread[i] on coordinate 1."""
    events = []
    for rnd in range(1, rounds + 1):
        inside = cut[0] < rnd <= cut[1]
        for node in range(4):
            x = (1.0 if inside else 0.1) if node >= 2 else 0.0
            events.append({"event": "round", "node": node, "round": rnd, "t": float(rnd),
                           "probe": [x, spread[node]], "test_accuracy": 0.5 + 0.01 * rnd,
                           "peers_in_view": 1 if inside else 3})
    return events


def test_distances_within_across_and_all_pairs() -> None:
    # Prepare
    probes = pr.probe_table(_events(3, {0: 0.0, 1: 0.3, 2: 0.0, 3: 0.4}, cut=(0, 0)))
    # Execute
    row = pr.distance_curve(probes, [0, 1], [2, 3])[0]
    # Assert
    assert row["round"] == 1
    assert row["within_a"] == pytest.approx(0.3)
    assert row["within_b"] == pytest.approx(0.4)
    across = [math.hypot(0.1, 0.0), math.hypot(0.1, 0.4), math.hypot(0.1, 0.3), math.hypot(0.1, 0.1)]
    assert row["across"] == pytest.approx(sum(across) / 4)
    assert row["all"] == pytest.approx((0.3 + 0.4 + sum(across)) / 6)


def _ev(node: int, rnd: int, t: float, x: float) -> dict:
    return {"event": "round", "node": node, "round": rnd, "t": t, "probe": [x]}


def test_round_r_is_compared_with_what_the_other_node_held_then() -> None:
    # node 1 runs twice as fast: its round 2 ends at t=2, node 0's at t=4
    probes = pr.probe_table([_ev(0, 1, 2.0, 0.0), _ev(0, 2, 4.0, 1.0),
                             _ev(1, 1, 1.0, 0.5), _ev(1, 2, 2.0, 0.5), _ev(1, 3, 3.0, 0.5),
                             _ev(1, 4, 4.0, 1.0)])
    # round 1: node 0 (t=2) vs node 1's round 2 (0.5); node 1 (t=1) vs nothing of node 0 yet
    assert pr.mean_distance(probes, [(0, 1)], 1) == pytest.approx(0.5)
    # round 2: node 0 (t=4, 1.0) vs node 1's round 4 (1.0): 0; node 1 (t=2, 0.5) vs node 0's round 1: 0.5
    assert pr.mean_distance(probes, [(0, 1)], 2) == pytest.approx(0.25)
    # round 3: only node 1 reported it; node 0 then held its round 1 (0.0)
    assert pr.mean_distance(probes, [(0, 1)], 3) == pytest.approx(0.5)
    assert pr.mean_distance(probes, [(0, 1)], 9) is None
    with pytest.raises(ValueError, match="different lengths"):
        pr.distance([0.0], [0.0, 1.0])


def test_relative_curve_takes_each_nodes_own_rounds_after_the_anchor() -> None:
    # node 1 ran 5 rounds ahead: at the heal (t=10) node 0 had finished round 10, node 1 round 15
    events = [_ev(0, r, float(r), 1.0 if r <= 10 else 0.0) for r in range(1, 14)]
    events += [_ev(1, r, r - 5.0, 0.0) for r in range(6, 19)]
    probes = pr.probe_table(events)
    rows = pr.relative_curve(probes, [0], [1], anchor=[10, 15], offsets=range(0, 3))
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[0]["across"] == pytest.approx(1.0)  # node 0 still apart at its heal round
    assert rows[1]["across"] == pytest.approx(0.0)  # both nodes' first round after the heal
    assert rows[1]["within_a"] is None
    # same-round pairing would have compared node 1's round 11 (before the heal) with node 0's round 11
    assert pr.mean_distance(probes, [(0, 1)], 11) == pytest.approx(0.5)


def test_level_and_rounds_to_recover() -> None:
    curve = [{"round": r, "all": d} for r, d in enumerate([0.5, 0.2, 0.2, 0.4, 0.9, 0.8, 0.3, 0.15, 0.1], 1)]
    assert pr.level_before(curve, 4, 2) == pytest.approx(0.2)  # rounds 2 and 3
    assert pr.rounds_to_recover(curve, after=5, level=0.2) == 3  # round 8
    assert pr.rounds_to_recover(curve, after=5, level=0.2, hold=2) == 3  # rounds 8 and 9
    assert pr.rounds_to_recover(curve, after=5, level=0.05) is None
    with pytest.raises(ValueError, match="no 'all' distance"):
        pr.level_before(curve, 1, 3)


def test_rounds_to_mix_compares_across_with_within() -> None:
    curve = [{"round": 1, "within_a": 0.1, "within_b": 0.2, "across": 0.5},
             {"round": 2, "within_a": 0.1, "within_b": 0.2, "across": 0.25},
             {"round": 3, "within_a": 0.1, "within_b": 0.2, "across": 0.2}]
    assert pr.rounds_to_mix(curve, after=1) == 2
    assert pr.rounds_to_mix(curve[:2], after=0) is None


def test_analyze_finds_the_partition_and_the_recovery(tmp_path: Path) -> None:
    # Prepare: cut after round 10, healed after round 20, back together from round 23
    events = _events(30, {0: 0.0, 1: 0.2, 2: 0.0, 3: 0.2}, cut=(10, 22))
    opts = PartitionOptions(nodes=4, rounds=30, cut_at=10, heal_at=20, window=5)
    marks = {"cut": {"t": 0.0, "rounds": [10, 10, 9, 10], "median": 10},
             "heal": {"t": 1.0, "rounds": [20, 21, 20, 20], "median": 20}}
    # Execute
    res = analyze(events, opts, marks)
    plot(res, tmp_path / "p.png")
    # Assert
    across = (0.1 + math.hypot(0.1, 0.2)) / 2  # within each half: 0.2
    assert res["pre_partition_level"] == pytest.approx((2 * 0.2 + 4 * across) / 6)
    assert res["pre_partition_highest"] == pytest.approx(res["pre_partition_level"])
    assert "rounds after the heal" in format_report({**res, "final_accuracy": [0.9] * 4})
    assert res["rounds_to_recover"] == 3
    assert res["rounds_to_mean"] == 3
    assert res["rounds_to_mix"] == 3
    assert res["cut_s"] == 1.0
    assert res["rounds_made_while_cut"] == [10, 11, 11, 10]
    assert res["peak_across_while_cut"] == pytest.approx((1.0 + math.hypot(1.0, 0.2)) / 2)
    assert res["smallest_view_while_cut"] == [1, 1, 1, 1]
    assert res["view_before_heal"] == [1, 1, 1, 1]
    assert res["largest_view_after_heal"] == [3, 3, 3, 3]
    assert res["min_accuracy_while_cut"]["a"] == pytest.approx(0.5 + 0.11)
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize("kw", [{"nodes": 5}, {"nodes": 2}, {"cut_at": 40}, {"heal_at": 70},
                                {"window": 15}, {"probe_coords": 0}, {"max_cut_s": 0.0},
                                {"min_cut_s": -1.0}, {"max_cut_s": 5.0, "min_cut_s": 6.0}])
def test_partition_options_are_checked(kw: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        PartitionOptions(**kw)


def test_lab_names_and_addresses_need_no_root() -> None:
    lab = NetnsLab(8, prefix="p2pntest")
    assert lab.ns(3) == "p2pntest-3"
    assert lab.bridge_ns == "p2pntest-br"
    assert [lab.addr(i) for i in (0, 7)] == ["10.213.7.1", "10.213.7.8"]
    assert lab.exec_prefix(2)[-3:] == ["netns", "exec", "p2pntest-2"]
    with pytest.raises(ValueError, match="private"):
        NetnsLab(2, subnet="8.8.8.0/24")
    with pytest.raises(ValueError, match="at most 11"):
        NetnsLab(2, prefix="a-very-long-prefix")


def test_the_heal_waits_for_heal_at_and_min_cut_s_or_comes_at_max_cut_s() -> None:
    opts = PartitionOptions(heal_at=20, min_cut_s=16.0, max_cut_s=30.0)
    now = time.time()

    def heal(median: int, lasted: float) -> bool:
        return _heal_now({"cut": {"t": now - lasted}}, median, opts)

    assert not heal(20, 10.0)  # heal_at reached, but the other half's records have not expired yet
    assert not heal(19, 20.0)
    assert heal(20, 16.5)
    assert heal(5, 30.5)  # max_cut_s comes first
    assert _heal_now({"cut": {"t": now}}, 20, PartitionOptions(heal_at=20))  # no minimum by default
