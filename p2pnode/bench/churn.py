"""``p2pnode bench churn``: an undisturbed swarm against the same swarm losing half its nodes and gaining
new ones, on real processes (``p2pnode run``, libp2p, DHT).

Setting (the issue's): 8 nodes, fashion-mnist, 30 rounds. In the churned run, when node 0 (a survivor)
has finished round ``--kill-at`` (10), nodes 4..7 are SIGKILLed; when it has finished round ``--join-at``
(15), two new nodes start (``--join-donors`` from the defaults: they fetch the median of 3 peers' models)
and run ``rounds - join_at`` rounds, so that everyone ends at about the same time.

Reported:

- ``max_exchange_wait_s``: the longest time any survivor's round waited on its exchange with peers after
  the kill (the ``exchange_s`` of its metrics lines: what a dead peer can cost), against
  ``2 x --heartbeat-s``; ``max_round_gap_s``: the longest time any survivor spent on one round after the
  kill (the time between two consecutive metrics lines, local training included), and
  ``max_wait_beyond_median_s``: that minus the survivors' median round time before the kill;
- the final honest accuracy (mean over the nodes alive at the end) of both runs and its difference;
- each joiner's test accuracy at its 5th round against the survivors' mean accuracy at that moment (their
  last evaluation before the joiner's).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.outputs import write_json_atomic
from p2pnode.report import round_rows

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class ChurnOptions:
    nodes: int = 8
    killed: int = 4
    joiners: int = 2
    rounds: int = 30
    kill_at: int = 10
    join_at: int = 15
    task: str = "fashion-mnist"
    seed: int = 0
    heartbeat_s: float = 2.0
    out_dir: Path = field(default_factory=lambda: Path("runs/bench-churn"))
    json_path: Path = field(default_factory=lambda: Path("runs/bench-churn.json"))


def _final_accuracy(result: Path) -> float | None:
    try:
        return float(json.loads(result.read_text(encoding="utf-8"))["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _wait_round(swarm: Any, node: int, target: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = round_rows(swarm.node_paths(node).metrics)
        if rows and rows[-1]["round"] >= target:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} did not reach round {target} within {timeout:.0f} s")
        time.sleep(0.1)


def _run(opts: ChurnOptions, *, churn: bool) -> dict[str, Any]:
    from p2pnode.swarm import Swarm, SwarmOptions

    total = opts.nodes + (opts.joiners if churn else 0)
    out = opts.out_dir / ("churn" if churn else "undisturbed")
    swarm_opts = SwarmOptions(nodes=total, rounds=opts.rounds, task=opts.task, seed=opts.seed, out=out,
                              linger_s=5.0, extra_args=["--heartbeat-s", str(opts.heartbeat_s),
                                                        "--wait-peers", str(opts.nodes - 1)])
    killed = list(range(opts.nodes - opts.killed, opts.nodes)) if churn else []
    joiners = list(range(opts.nodes, total))
    with Swarm(swarm_opts) as swarm:
        swarm.start(count=opts.nodes)
        t_kill = t_join = None
        if churn:
            _wait_round(swarm, 0, opts.kill_at, timeout=600)
            t_kill = time.time()
            for i in killed:
                swarm.processes[i].kill()
            logger.info("killed nodes %s at node 0's round %d", killed, opts.kill_at)
            _wait_round(swarm, 0, opts.join_at, timeout=600)
            t_join = time.time()
            for i in joiners:
                swarm.launch_late(i, ["--rounds", str(opts.rounds - opts.join_at), "--wait-peers", "1"])
            logger.info("started nodes %s at node 0's round %d", joiners, opts.join_at)
        swarm.wait_finished(timeout=opts.rounds * 30.0 + 300)
    alive = [i for i in range(total) if i not in killed]
    survivors = [i for i in range(opts.nodes) if i not in killed]
    finals = {i: _final_accuracy(swarm.node_paths(i).result) for i in alive}
    present = [a for a in finals.values() if a is not None]
    result: dict[str, Any] = {"final_accuracy": finals,
                              "honest_accuracy_mean": statistics.fmean(present) if present else None,
                              "all_alive_finished": all(a is not None for a in finals.values())}
    if not churn:
        return result
    before: list[float] = []
    after: list[float] = []
    waits: list[float] = []  # what a round waited on its exchange with peers, after the kill
    for i in survivors:
        rows = round_rows(swarm.node_paths(i).metrics)
        ts = [r["t"] for r in rows]
        for a, b in zip(ts, ts[1:], strict=False):
            (after if b >= (t_kill or 0) else before).append(b - a)
        waits += [r["exchange_s"] for r in rows
                  if r["t"] >= (t_kill or 0) and r.get("exchange_s") is not None]
    result["max_exchange_wait_s"] = max(waits) if waits else None
    median_before = statistics.median(before) if before else None
    result["round_time_median_before_kill_s"] = median_before
    result["max_round_gap_s"] = max(after) if after else None
    result["max_wait_beyond_median_s"] = (max(after) - median_before) if after and median_before else None
    result["round_gap_limit_s"] = 2 * opts.heartbeat_s
    joined: dict[int, dict[str, Any] | None] = {}
    for j in joiners:
        rows = round_rows(swarm.node_paths(j).metrics)
        fifth = next((r for r in rows if r["round"] == 5), None)
        if fifth is None or fifth.get("test_accuracy") is None:
            joined[j] = None
            continue
        others = []
        for i in survivors:
            evaluated = [r for r in round_rows(swarm.node_paths(i).metrics)
                         if r["t"] <= fifth["t"] and r.get("test_accuracy") is not None]
            if evaluated:
                others.append(evaluated[-1]["test_accuracy"])
        swarm_acc = statistics.fmean(others) if others else None
        joined[j] = {"accuracy_round5": fifth["test_accuracy"], "swarm_accuracy": swarm_acc,
                     "gap_points": None if swarm_acc is None else 100 * (swarm_acc - fifth["test_accuracy"])}
    result["joiners"] = joined
    result["t_kill"], result["t_join"] = t_kill, t_join
    return result


def run_churn_bench(opts: ChurnOptions) -> dict[str, Any]:
    """The undisturbed run, then the churned run; write and return both with the comparison."""
    from p2pnode.swarm import sigterm_as_interrupt

    with sigterm_as_interrupt():
        base = _run(opts, churn=False)
        churn = _run(opts, churn=True)
    b, c = base["honest_accuracy_mean"], churn["honest_accuracy_mean"]
    data = {"options": {k: str(getattr(opts, k)) if isinstance(getattr(opts, k), Path) else getattr(opts, k)
                        for k in opts.__dataclass_fields__},
            "undisturbed": base, "churn": churn,
            "accuracy_drop_points": None if b is None or c is None else 100 * (b - c)}
    write_json_atomic(opts.json_path, data)
    return data
