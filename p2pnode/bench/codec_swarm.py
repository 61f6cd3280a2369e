"""``p2pnode bench codec-swarm``: the same real multi-process swarm once per codec.

Each run is ``p2pnode swarm`` (one OS process per node, libp2p transport, DHT membership) with the
codec as the only difference: same task, shards, seed, rounds, fanout and H. Reported per codec: the
honest nodes' mean and minimum test accuracy, bytes sent per node (counted at the transport: every
envelope, signature, header and reference snapshot included), the ratio of dense's bytes to the
codec's, and the wall time. Results are appended to the JSON file as each run finishes; a rerun skips
codecs already there. ``--mode increments`` runs every swarm in that mode (``p2pnode run --mode``)
instead of the default model gossip; its rows are then compared with its own dense row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.bench import load_results
from p2pnode.outputs import write_json_atomic

logger = logging.getLogger(__name__)

CODECS = ("dense", "fp16", "int8", "topk:0.01", "topk:0.001", "powersgd:2", "terngrad")


@dataclass(kw_only=True, slots=True)
class CodecSwarmOptions:
    """What the benchmark runs (defaults: the compression issue's setting)."""

    nodes: int = 8
    rounds: int = 30
    task: str = "fashion-mnist"
    fanout: int = 2
    local_steps: int = 20
    seed: int = 0
    mode: str = "gossip"  # gossip.mode of every node: gossip | increments
    codecs: tuple[str, ...] = CODECS
    out_dir: Path = field(default_factory=lambda: Path("runs/bench-codec-swarm"))
    json_path: Path = field(default_factory=lambda: Path("runs/bench-codec-swarm.json"))


def run_codec_swarm_bench(opts: CodecSwarmOptions, *,
                          on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one swarm per codec not yet in ``opts.json_path``; return all rows with the dense ratios."""
    from p2pnode.swarm import SwarmOptions, run_swarm

    data = load_results(opts.json_path, "rows")
    data["options"] = {"nodes": opts.nodes, "rounds": opts.rounds, "task": opts.task, "fanout": opts.fanout,
                       "local_steps": opts.local_steps, "seed": opts.seed, "mode": opts.mode}
    done = {r["codec"] for r in data["rows"]}
    for codec in opts.codecs:
        if codec in done:
            continue
        out = opts.out_dir / (codec if opts.mode == "gossip" else f"{opts.mode}-{codec}").replace(":", "-")
        swarm = SwarmOptions(nodes=opts.nodes, rounds=opts.rounds, task=opts.task, fanout=opts.fanout,
                             local_steps=opts.local_steps, seed=opts.seed, codec=codec, out=out,
                             extra_args=[] if opts.mode == "gossip" else ["--mode", opts.mode])
        summary = run_swarm(swarm, live=False)
        nodes = summary["nodes"]
        row = {"codec": codec, "honest_accuracy_mean": summary["honest_accuracy_mean"],
               "honest_accuracy_min": summary["honest_accuracy_min"],
               "bytes_sent_per_node": sum(n["bytes_sent"] for n in nodes) / len(nodes),
               "wall_time_s": summary["wall_time_s"], "all_finished": summary["all_finished"]}
        data["rows"].append(row)
        write_json_atomic(opts.json_path, data)
        if on_row is not None:
            on_row(row)
    dense = next((r for r in data["rows"] if r["codec"] == "dense"), None)
    for row in data["rows"]:
        if dense is not None:
            row["bytes_ratio_vs_dense"] = dense["bytes_sent_per_node"] / row["bytes_sent_per_node"]
            row["accuracy_minus_dense"] = row["honest_accuracy_mean"] - dense["honest_accuracy_mean"]
    write_json_atomic(opts.json_path, data)
    return data


def format_table(data: dict[str, Any]) -> str:
    """Markdown table of the rows."""
    lines = ["| codec | honest acc. mean | min | Δ vs dense (points) | MB sent / node | × fewer bytes "
             "| wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        delta = r.get("accuracy_minus_dense")
        ratio = r.get("bytes_ratio_vs_dense")
        delta_s = "" if delta is None else f"{100 * delta:+.2f}"
        ratio_s = "" if ratio is None else f"{ratio:.1f}"
        lines.append(f"| `{r['codec']}` | {r['honest_accuracy_mean']:.4f} | {r['honest_accuracy_min']:.4f} | "
                     f"{delta_s} | {r['bytes_sent_per_node'] / 1e6:.3f} | {ratio_s} | "
                     f"{r['wall_time_s']:.0f} |")
    return "\n".join(lines)
