"""The simulator: real Node round logic over the in-memory transport, virtual time, summary contract."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from p2pnode.byzantine import ByzantineNode
from p2pnode.errors import ConfigError
from p2pnode.node import Node
from p2pnode.sim.core import SimOptions, Simulation, inline_loop_factory, run_simulation

SWARM_NODE_KEYS = {"node", "peer_id", "role", "rounds", "test_accuracy", "test_loss", "bytes_sent",
                   "bytes_received", "messages_rejected", "finished", "exit_code"}


def test_sixteen_nodes_learn_digits_with_the_daemon_nodes(tmp_path: Path) -> None:
    opts = SimOptions(nodes=16, rounds=4, task="digits", local_steps=20, eval_every=2, eval_samples=200,
                      out=tmp_path)
    summary = run_simulation(opts)
    # held-out accuracy (360 test digits no node trains on)
    assert summary["honest_accuracy_mean"] > 0.85
    assert summary["honest_accuracy_min"] > 0.75
    # the contract of `p2pnode swarm`'s summary.json, and the simulator's fields
    assert {"config", "wall_time_s", "nodes", "honest_accuracy_mean", "honest_accuracy_min",
            "all_finished"} <= set(summary)
    assert all(set(n) == SWARM_NODE_KEYS for n in summary["nodes"])
    assert summary["all_finished"] is True
    assert summary["runner"] == "simulator"
    assert summary["training"] == "batched"
    assert summary["peak_rss_mib"] > 50
    assert summary["config"]["nodes"] == 16
    assert summary["config"]["topology"] == "full"
    assert all(n["bytes_sent"] > 0 and n["bytes_received"] > 0 and n["rounds"] == 4 for n in summary["nodes"])
    # virtual time: 20 steps x 5 ms of compute plus the slowest exchange (two 20 ms +- 50% latencies, ~40 kB
    # at 100 Mbit/s +- 50%) per round
    per_round = summary["virtual_round_s"]["mean"]
    assert 0.1 + 0.02 < per_round < 0.1 + 0.06 + 0.01
    assert summary["virtual_time_s"] == pytest.approx(4 * per_round, rel=0.05)
    # files: summary, metrics (round, sim_round, final events), the report
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["honest_accuracy_mean"] == summary["honest_accuracy_mean"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "round" for r in rows) == 16 * 4
    assert sum(r["event"] == "sim_round" for r in rows) == 4
    assert sum(r["event"] == "final" for r in rows) == 16
    evaluated = [r for r in rows if r["event"] == "round" and r.get("test_accuracy") is not None]
    assert {r["round"] for r in evaluated} == {2, 4}
    for name in ("index.html", "accuracy.png", "bytes_sent.png", "peers_in_view.png"):
        assert (tmp_path / name).stat().st_size > 0
    log = summary["rounds_log"]
    assert [e["round"] for e in log] == [1, 2, 3, 4]
    assert log[3]["honest_accuracy_mean"] > log[1]["honest_accuracy_mean"] - 0.05


def test_nodes_are_the_daemons_and_exchange_only_with_neighbours() -> None:
    opts = SimOptions(nodes=10, rounds=2, local_steps=2, topology="random-k:2", byzantine_frac=0.2,
                      attack="sign-flip", defense="median", final_eval_samples=50)
    sim = Simulation(opts)
    assert sum(isinstance(n, ByzantineNode) for n in sim.nodes) == 2
    assert all(type(n) is Node for n in sim.nodes[:8])
    assert sim.adjacency is not None
    sim.run()
    for r in sim.rows:
        if r["event"] == "round":
            assert r["peers_in_view"] == 2  # a 2-regular graph: only neighbours are offered
    summary = sim.summarize([r for r in sim.rows if r["event"] == "final"], 0.0)
    assert summary["topology"]["degree"] == {"min": 2, "max": 2, "mean": 2.0}
    assert [n["role"] for n in summary["nodes"]].count("byzantine") == 2


def test_same_seed_same_run_and_batched_matches_per_node_training() -> None:
    base: dict[str, Any] = {"nodes": 6, "rounds": 3, "local_steps": 5, "final_eval_samples": 360, "seed": 3}
    a = run_simulation(SimOptions(**base))
    b = run_simulation(SimOptions(**base))
    assert [n["test_accuracy"] for n in a["nodes"]] == [n["test_accuracy"] for n in b["nodes"]]
    c = run_simulation(SimOptions(**base, batched="off"))
    assert c["training"] == "per-node"
    # the same SGD, batches and exchanges: equal up to float rounding
    for x, y in zip(a["nodes"], c["nodes"]):
        assert x["test_accuracy"] == pytest.approx(y["test_accuracy"], abs=0.01)
        assert x["bytes_sent"] == y["bytes_sent"]


def test_more_nodes_than_samples_and_free_riders() -> None:
    summary = run_simulation(SimOptions(nodes=40, rounds=1, local_steps=1, byzantine_frac=0.1,
                                        attack="free-rider", batch_size=200, final_eval_samples=20,
                                        step_ms=0))
    assert summary["data"]["shards"] == 40
    assert summary["nodes"][-1]["role"] == "byzantine"


def test_byzantine_frac_and_validation() -> None:
    assert SimOptions(nodes=100, byzantine_frac=0.1, attack="sign-flip").byzantine == 10
    assert SimOptions(nodes=10, byzantine_frac=0.01, attack="sign-flip").byzantine == 1
    for bad in ({"topology": "ring"}, {"batched": "maybe"}, {"churn": "2"}, {"nodes": 1},
                {"byzantine_frac": 1.0, "attack": "sign-flip"}, {"link_jitter": 1.0}):
        with pytest.raises(ConfigError):
            SimOptions(**bad)  # type: ignore[arg-type]


def test_to_thread_runs_inline_on_the_simulators_loop() -> None:
    import threading

    async def main() -> None:
        assert await asyncio.to_thread(threading.get_ident) == threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            await asyncio.to_thread(lambda: 1 / 0)

    with asyncio.Runner(loop_factory=inline_loop_factory()) as runner:
        runner.run(main())
