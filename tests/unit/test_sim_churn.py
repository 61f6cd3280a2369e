"""Churn specs and traces for the simulator, and their effect on a small simulation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2pnode.errors import ConfigError
from p2pnode.sim.churn import ChurnError, parse_churn, read_trace
from p2pnode.sim.core import SimOptions, Simulation


def test_no_churn() -> None:
    assert not parse_churn("").active
    assert not parse_churn(None).active


def test_rate() -> None:
    churn = parse_churn("0.25")
    assert churn.rate == 0.25
    rng = random.Random(0)
    alive = [True] * 1000
    assert churn.events(1, alive, rng) == []  # never before the first round
    events = churn.events(2, alive, rng)
    assert all(up is False for _, up in events)
    assert 180 < len(events) < 320
    back = churn.events(3, [False] * 1000, rng)
    assert all(up for _, up in back)
    assert 180 < len(back) < 320


@pytest.mark.parametrize("spec", ["-0.1", "1.5", "nan"])
def test_bad_rate(spec: str) -> None:
    with pytest.raises(ChurnError, match="churn rate"):
        parse_churn(spec)


def test_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("round,node,state\n# comment\n2,3,down\n2, 4 ,DOWN\n\n5,3,up\n5,3,up\n")
    churn = parse_churn(str(path))
    assert churn.trace == {2: [(3, False), (4, False)], 5: [(3, True), (3, True)]}
    alive = [True] * 6
    assert churn.events(1, alive, random.Random(0)) == []
    assert churn.events(2, alive, random.Random(0)) == [(3, False), (4, False)]
    alive[3] = False
    assert churn.events(5, alive, random.Random(0)) == [(3, True)]  # the repeat is no change
    churn.check_nodes(6)
    with pytest.raises(ChurnError, match="outside"):
        churn.check_nodes(4)


@pytest.mark.parametrize(("text", "match"), [("1,2\n", "expected round,node"), ("1,x,down\n", "integers"),
                                             ("1,2,gone\n", "down or up"), ("0,1,down\n", "round >= 1")])
def test_bad_trace_names_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text("round,node,state\n" + text)
    with pytest.raises(ChurnError, match=match) as info:
        read_trace(path)
    assert ":2:" in str(info.value)


def test_missing_trace() -> None:
    with pytest.raises(ChurnError, match="cannot read"):
        parse_churn("/nonexistent/churn.csv")


def test_options_check_trace_nodes(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("1,9,down\n")
    with pytest.raises(ConfigError, match="outside"):
        SimOptions(nodes=4, churn=str(path))


def test_trace_takes_a_node_out_and_back(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("2,1,down\n4,1,up\n3,2,down\n")
    sim = Simulation(SimOptions(nodes=6, rounds=5, local_steps=2, fanout=2, churn=str(path),
                                final_eval_samples=50))
    results = sim.run()
    rounds = {r["node"]: r["rounds"] for r in results}
    assert rounds[1] == 3  # rounds 1, 4, 5
    assert rounds[2] == 2  # rounds 1, 2; still down at the end
    assert rounds[0] == 5
    ran = {(r["node"], r["sim_round"]) for r in sim.rows if r["event"] == "round"}
    assert (1, 2) not in ran
    assert (1, 3) not in ran
    assert (1, 4) in ran
    log = {e["round"]: e for e in sim.rounds_log}
    assert [log[r]["live"] for r in range(1, 6)] == [6, 5, 4, 5, 5]
    assert log[4]["returned"] == 1
    # while down, nobody offered it: every live node's view had the others minus the departed
    rows = [r for r in sim.rows if r["event"] == "round"]
    assert all(r["peers_in_view"] == log[r["sim_round"]]["live"] - 1 for r in rows)
    assert [r["finished"] for r in results] == [True, True, False, True, True, True]
    summary = sim.summarize(results, 1.0)
    assert summary["all_finished"] is False
    assert summary["churn"] == {"spec": str(path), "left": 2, "returned": 1, "live_at_end": 5}
