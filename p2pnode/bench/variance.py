"""``p2pnode bench variance``: rounds to a target accuracy with and without variance correction.

Tian et al. ("Vanishing Variance Problem in Fully Decentralized Neural-Network Systems") observe that
averaging *uncorrelated* models shrinks every layer's weight variance below what the initialisation
established, which slows learning. The setting that exposes it: every node starts from its own random
initialisation and gossips with a small fanout. For each seed we run the same in-process swarm twice,
``mean`` and ``mean`` + ``--variance-correction``, evaluate every round, and report the first round at
which the honest mean test accuracy reaches the target (median over seeds, and the ratio).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class VarianceOptions:
    nodes: int = 8
    rounds: int = 25
    fanout: int = 2
    local_steps: int = 20
    task: str = "fashion-mnist"
    partition: str = "iid"
    target: float = 0.80
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_samples: int = 1000
    json_path: Path = field(default_factory=lambda: Path("runs/bench-variance.json"))
    plot_path: Path | None = field(default_factory=lambda: Path("runs/bench-variance.png"))


def _curve(rows: list[dict[str, Any]]) -> list[float]:
    """Honest mean accuracy per round from in-process metrics rows."""
    per_round: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["event"] == "round" and r["role"] == "honest" and r.get("test_accuracy") is not None:
            per_round[r["round"]].append(r["test_accuracy"])
    return [statistics.fmean(per_round[k]) for k in sorted(per_round)]


def rounds_to_target(curve: list[float], target: float) -> int | None:
    """1-based round at which ``curve`` first reaches ``target`` (None if never)."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def _run(opts: VarianceOptions, seed: int, corrected: bool) -> list[float]:
    import torch

    from p2pnode.inproc import InprocOptions, InprocSwarm

    torch.set_num_threads(1)
    run = InprocOptions(nodes=opts.nodes, rounds=opts.rounds, fanout=opts.fanout,
                        local_steps=opts.local_steps, task=opts.task, partition=opts.partition, seed=seed,
                        independent_init=True,
                        variance_correction=corrected, eval_every=1, eval_samples=opts.eval_samples,
                        final_eval_samples=opts.eval_samples)
    swarm = InprocSwarm(run)
    swarm.execute()  # one thread: the seed fixes the curve
    return _curve(swarm.rows)


def run_variance_bench(opts: VarianceOptions) -> dict[str, Any]:
    """Run every (seed, corrected) pair and summarise rounds-to-target; writes JSON (and a plot)."""
    runs: list[dict[str, Any]] = []
    for seed in opts.seeds:
        for corrected in (False, True):
            curve = _run(opts, seed, corrected)
            runs.append({"seed": seed, "variance_correction": corrected, "curve": curve,
                         "rounds_to_target": rounds_to_target(curve, opts.target)})
            logger.info("seed %d corrected=%s: rounds to %.2f = %s", seed, corrected, opts.target,
                        runs[-1]["rounds_to_target"])
    never = opts.rounds + 1  # a run that never reaches the target counts as rounds + 1 (and is flagged)

    def med(corrected: bool) -> float:
        chosen = [int(r["rounds_to_target"] or never) for r in runs if r["variance_correction"] is corrected]
        return float(statistics.median(chosen))

    result = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                          ((f, getattr(opts, f)) for f in opts.__dataclass_fields__)},
              "runs": runs, "median_rounds_mean": med(False), "median_rounds_corrected": med(True),
              "ratio": med(True) / med(False),
              "all_reached_target": all(r["rounds_to_target"] is not None for r in runs)}
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(result, indent=2) + "\n")
    if opts.plot_path is not None:
        _plot(result, opts.plot_path, opts.target)
    return result


def _plot(result: dict[str, Any], out_png: Path, target: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in result["runs"]:
        color = "tab:orange" if r["variance_correction"] else "tab:blue"
        name = "mean + variance correction" if r["variance_correction"] else "mean"
        label = f"{name} (seed {r['seed']})"
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=color, alpha=0.8, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("honest mean test accuracy")
    ax.set_title(f"independent inits: median rounds to {target:.2f}: {result['median_rounds_mean']:g} (mean) "
                 f"vs {result['median_rounds_corrected']:g} (corrected)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
