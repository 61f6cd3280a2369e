"""``p2pnode bench e2e``: options, the time-to-target analysis, medians, ratios, the table, the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2pnode.bench.e2e import (
    E2EOptions,
    ProcessTreeCpu,
    acceptance,
    accuracy_curve,
    aggregate,
    first_reaching,
    format_table,
    parse_system,
    split_modifiers,
    summarize_run,
)
from p2pnode.bench.e2e_hivemind import parse_args as parse_worker_args
from p2pnode.cli import build_parser


def _round(node: int, rnd: int, t: float, acc: float | None, sent: int, **extra: Any) -> dict[str, Any]:
    return {"event": "round", "node": node, "round": rnd, "t": t, "test_accuracy": acc, "bytes_sent": sent,
            **extra}


def _final(node: int, acc: float, sent: int) -> dict[str, Any]:
    return {"event": "final", "node": node, "round": 3, "t": 0.0, "test_accuracy": acc, "bytes_sent": sent}


def test_parse_system_names() -> None:
    assert parse_system("hivemind") == ("hivemind", "")
    assert parse_system("dense") == ("gossip", "dense")
    assert parse_system("topk:0.01") == ("gossip", "topk:0.01")
    assert parse_system("increments/topk:0.01") == ("increments", "topk:0.01")
    assert parse_system("gossip/fp16") == ("gossip", "fp16")
    assert parse_system("dense@7") == ("gossip", "dense")
    assert split_modifiers("dense@7") == ("dense", 7, False)
    assert split_modifiers("dense@4@sync") == ("dense", 4, True)
    assert split_modifiers("gossip/fp16@sync") == ("gossip/fp16", None, True)
    assert split_modifiers("increments/topk:0.01") == ("increments/topk:0.01", None, False)
    assert parse_system("dense@4@sync") == ("gossip", "dense")
    for bad in ("spsa/dense", "increments/", "a/b/c", "gossip/hivemind", "", "hivemind@2", "dense@0",
                "dense@x", "@3", "hivemind@sync", "increments/dense@sync", "dense@sync@sync", "dense@2@3"):
        with pytest.raises(ValueError, match="unknown system"):
            parse_system(bad)


def test_options_are_validated() -> None:
    E2EOptions()
    for kwargs in ({"nodes": 1}, {"rounds": 0}, {"target": 0.0}, {"target": 1.5}, {"systems": ()},
                   {"systems": ("hivemind", "bogus/x")}, {"repeats": 0}, {"matchmaking_s": 0.0}):
        with pytest.raises(ValueError, match="must|unknown system"):
            E2EOptions(**kwargs)


def test_curve_uses_the_last_node_of_each_round_and_skips_incomplete_rounds() -> None:
    t0 = 100.0
    events = [
        _round(0, 1, 101.0, 0.50, 10), _round(1, 1, 102.5, 0.60, 30),
        _round(0, 2, 104.0, 0.79, 20), _round(1, 2, 103.0, 0.83, 50),  # mean 0.81, last row at 104
        _round(0, 3, 106.0, 0.90, 40),                                   # node 1 never evaluated round 3
        _round(1, 4, 108.0, None, 60),                                   # no evaluation: not a point
    ]
    curve = accuracy_curve(events, nodes=2, t0=t0)
    assert [p["round"] for p in curve] == [1, 2]
    assert curve[0] == {"round": 1, "t": 2.5, "accuracy": pytest.approx(0.55), "accuracy_min": 0.5,
                        "bytes_sent": 20.0}
    assert curve[1]["t"] == 4.0
    assert curve[1]["accuracy"] == pytest.approx(0.81)
    assert first_reaching(curve, 0.80) is curve[1]
    assert first_reaching(curve, 0.55) is curve[0]
    assert first_reaching(curve, 0.82) is None


def test_summarize_run_reports_target_bytes_finals_and_timing() -> None:
    events = [
        _round(0, 1, 11.0, 0.6, 100, exchange_s=0.5), _round(1, 1, 11.5, 0.7, 300, exchange_s=1.5),
        _round(0, 2, 13.0, 0.85, 200, exchange_s=0.5), _round(1, 2, 14.5, 0.80, 500, exchange_s=0.5),
        _final(0, 0.86, 250), _final(1, 0.84, 550),
    ]
    run = summarize_run(events, nodes=2, target=0.8, t0=10.0)
    assert run["time_to_target_s"] == 4.5
    assert run["round_to_target"] == 2
    assert run["bytes_to_target_per_node"] == 350.0
    assert run["final_accuracy"] == pytest.approx(0.85)
    assert run["final_accuracy_min"] == 0.84
    assert run["nodes_finished"] == 2
    assert run["bytes_sent_per_node"] == 400.0  # the largest counter each node reported
    assert run["round_s_median"] == pytest.approx(2.5)  # gaps 2.0 and 3.0
    assert run["exchange_s_median"] == 0.5
    # at t=13 node 0 has 0.85 and node 1 still 0.7 (mean 0.775); at 14.5 node 1's 0.80 makes it 0.825
    assert run["time_to_target_latest_s"] == 4.5

    missed = summarize_run(events, nodes=2, target=0.9, t0=10.0)
    assert missed["time_to_target_s"] is None
    assert missed["round_to_target"] is None
    assert missed["bytes_to_target_per_node"] is None


def test_latest_eval_time_reads_the_swarm_as_it_stands() -> None:
    events = [_round(0, 1, 1.0, 0.9, 0), _round(0, 2, 2.0, 0.9, 0),  # node 0 races ahead
              _round(1, 1, 3.0, 0.6, 0), _round(1, 2, 5.0, 0.75, 0)]
    assert summarize_run(events, nodes=2, target=0.8, t0=0.0)["time_to_target_latest_s"] == 5.0
    assert summarize_run(events, nodes=2, target=0.75, t0=0.0)["time_to_target_latest_s"] == 3.0
    assert summarize_run(events, nodes=3, target=0.5, t0=0.0)["time_to_target_latest_s"] is None


def _run(system: str, repeat: int, t: float | None, b: float | None, *, total: float = 1000.0,
         acc: float = 0.85) -> dict[str, Any]:
    return {"system": system, "repeat": repeat, "time_to_target_s": t, "time_to_target_latest_s": t,
            "round_to_target": None if t is None else 5,
            "bytes_to_target_per_node": b, "final_accuracy": acc, "final_accuracy_min": acc,
            "bytes_sent_per_node": total, "cpu_s": 10.0, "startup_s": 5.0, "wall_s": 60.0,
            "round_s_median": 3.0, "exchange_s_median": 0.2}


def test_medians_ratios_and_acceptance() -> None:
    data = {"options": {"target": 0.8}, "runs": [
        _run("hivemind", 0, 20.0, 1000.0), _run("hivemind", 1, 30.0, 1200.0),
        _run("hivemind", 2, 25.0, 900.0),
        _run("dense", 0, 18.0, 2000.0), _run("dense", 1, 33.0, 2100.0), _run("dense", 2, 20.0, 1900.0),
        _run("topk:0.01", 0, None, None, total=40.0), _run("topk:0.01", 1, 40.0, 45.0, total=40.0),
        _run("topk:0.01", 2, 50.0, 55.0, total=40.0),
        _run("dense@4@sync", 0, 30.0, 4000.0), _run("dense@4@sync", 1, 29.0, 4000.0),
        _run("dense@4@sync", 2, 26.0, 4000.0),
    ]}
    summary = aggregate(data, ("hivemind", "dense", "topk:0.01", "dense@4@sync"))
    by = {r["system"]: r for r in summary}
    assert by["hivemind"]["time_to_target_s"] == 25.0
    assert by["dense"]["time_to_target_s"] == 20.0
    assert by["dense"]["time_ratio_vs_hivemind"] == pytest.approx(0.8)
    assert by["dense"]["per_repeat_time_ratio"] == [0.9, 1.1, 0.8]
    # a run that missed the target counts as infinitely slow: median of (inf, 40, 50) is 50
    assert by["topk:0.01"]["time_to_target_s"] == 50.0
    assert by["topk:0.01"]["reached"] == 2
    assert by["topk:0.01"]["bytes_to_target_per_node"] == 55.0
    assert by["topk:0.01"]["bytes_to_target_fewer_x"] == pytest.approx(1000.0 / 55.0)
    assert by["topk:0.01"]["bytes_run_fewer_x"] == pytest.approx(25.0)
    assert by["topk:0.01"]["per_repeat_time_ratio"] == [None, pytest.approx(40 / 30, abs=1e-3), 2.0]
    verdict = acceptance(summary)
    assert verdict["dense_no_slower"] is True
    assert verdict["topk_20x_fewer_bytes"] is False  # 18.2x
    assert verdict["dense_variants"] == {"dense@4@sync": {"time_ratio": pytest.approx(29 / 25),
                                                          "no_slower": False}}

    data["summary"], data["acceptance"] = summary, verdict
    table = format_table(data)
    assert "| `dense` | 20.0 | 5 | 0.80 | 20.0 | 0.002 |" in table
    assert "dense time / hivemind time: 0.80 (met" in table
    assert "× fewer than hivemind: 18.2 (NOT met" in table
    assert "dense@4@sync time / hivemind time: 1.16 (NOT met" in table


def test_a_system_never_reaching_the_target_is_reported_as_such() -> None:
    data: dict[str, Any] = {"options": {"target": 0.8},
                            "runs": [_run("hivemind", 0, 20.0, 1000.0), _run("dense", 0, None, None)]}
    data["summary"] = aggregate(data, ("hivemind", "dense"))
    data["acceptance"] = acceptance(data["summary"])
    assert data["acceptance"]["dense_no_slower"] is False
    assert "| `dense` | not reached | not reached |" in format_table(data)


def test_process_tree_cpu_counts_a_child_that_burns_cpu() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nend = time.process_time() + 0.3\n"
                              "while time.process_time() < end: pass\ntime.sleep(5)"])
    try:
        cpu = ProcessTreeCpu()
        deadline = time.monotonic() + 20
        while cpu.seconds < 0.25 and time.monotonic() < deadline:
            cpu.sample([child.pid])
            time.sleep(0.1)
        assert cpu.seconds >= 0.25
        assert cpu.processes == 1
        assert cpu.seconds_by_kind() == {"node": pytest.approx(cpu.seconds, abs=0.011)}
        cpu.sample([2**22 + 12345])  # a pid that does not exist: nothing added
        assert cpu.processes == 1
    finally:
        child.kill()
        child.wait()


def test_cli_parser_and_worker_flags() -> None:
    ns = build_parser().parse_args(["bench", "e2e", "--nodes", "4", "--systems", "hivemind,dense,topk:0.01",
                                    "--target", "0.9", "--json", "x.json"])
    assert ns.bench == "e2e"
    assert ns.nodes == 4
    assert ns.target == 0.9
    assert ns.json == Path("x.json")
    assert ns.systems == ("hivemind", "dense", "topk:0.01")
    assert build_parser().parse_args(["bench", "e2e"]).repeats == 3

    # the worker takes a p2pnode node's command line and ignores the flags it does not use
    worker = parse_worker_args(["--task", "digits", "--rounds", "3", "--shard", "1/2", "--identity", "k",
                                "--swarm", "s", "--metrics-file", "m", "--ready-file", "r", "--result-file",
                                "x", "--defense", "mean", "--codec", "dense", "--wait-peers", "1",
                                "--fanout", "2", "--linger-s", "30"])
    assert worker.rounds == 3
    assert worker.shard == "1/2"
    assert worker.wait_peers == 1
    assert worker.lr == 0.05
    assert worker.batch_size == 32
    assert worker.local_steps == 20
