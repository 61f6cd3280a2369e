"""``p2pnode bench robustness``: the attack × defense matrix and the Sybil table.

Each cell is one in-process swarm (:mod:`p2pnode.inproc`: the daemon's own Node code, signed envelopes,
in-memory transport) on fashion-mnist with a Dirichlet(α) split: ``honest`` honest nodes plus
``byzantine`` attackers that speak the same protocol. Reported per cell: the honest nodes' mean and
minimum test accuracy. The Sybil table runs one attacker with 1, 5 and 15 identities (all training on
the attacker's one shard) doing a targeted 0→1 label flip, and reports the attack success: the share
of class-0 test images that honest models predict as class 1.

Cells run in a pool of worker processes (one torch thread each); results are appended to the JSON
file as each cell finishes, and a rerun skips cells already there, so an interrupted run loses at
most the cells in flight.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.bench import load_results
from p2pnode.errors import ConfigError
from p2pnode.outputs import write_json_atomic

logger = logging.getLogger(__name__)

MATRIX_ATTACKS = ("none", "sign-flip", "gaussian", "alie", "ipm", "label-flip")
MATRIX_DEFENSES = ("mean", "nna:{f}", "median", "trimmed-mean:{f}", "krum:{f}", "multi-krum:{f},{m}",
                   "centered-clip:10")
SYBIL_COUNTS = (1, 5, 15)
SYBIL_DEFENSES = ("mean", "multi-krum:{f},{m}", "sybilwall")


@dataclass(kw_only=True, slots=True)
class RobustnessOptions:
    """What the benchmark runs; defaults are the issue's setting (16 honest + 4 Byzantine)."""

    honest: int = 16
    byzantine: int = 4
    rounds: int = 20
    fanout: int = 6
    local_steps: int = 20
    # F for the rules that take it. A merge holds at most one input per peer id, so with 4 attackers at
    # most 4 inputs of a merge are Byzantine: F = 4 is the bound every round. (F = 3 let a Gaussian
    # attacker through whenever all four reached one node in the same round, and NNA collapsed.)
    f: int = 4
    multi_krum_m: int = 4
    partition: str = "dirichlet:1"
    task: str = "fashion-mnist"
    seed: int = 0
    # TaskConfig.max_grad_norm for every node (0 = off). Without a clip some Sybil cells' local training
    # diverges and the swarm collapses whatever the defense (BENCHMARKS.md, Sybil table).
    max_grad_norm: float = 0.0
    workers: int = 2
    attacks: tuple[str, ...] = MATRIX_ATTACKS
    defenses: tuple[str, ...] = MATRIX_DEFENSES
    sybil_counts: tuple[int, ...] = SYBIL_COUNTS
    sybil_defenses: tuple[str, ...] = SYBIL_DEFENSES
    json_path: Path = field(default_factory=lambda: Path("runs/bench-robustness.json"))
    plot_path: Path | None = None

    def defense(self, template: str) -> str:
        return template.format(f=self.f, m=self.multi_krum_m)


def _cells(opts: RobustnessOptions) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = [{"table": "matrix", "attack": a, "defense": opts.defense(d)}
             for a in opts.attacks for d in opts.defenses]
    cells += [{"table": "sybil", "attack": "sybil", "sybils": m, "defense": opts.defense(d)}
              for m in opts.sybil_counts for d in opts.sybil_defenses]
    return cells


def _key(cell: dict[str, Any]) -> str:
    return f"{cell['table']}|{cell['attack']}|{cell.get('sybils', 0)}|{cell['defense']}"


def _targeted_success(swarm: Any, src: int = 0, dst: int = 1) -> dict[str, Any]:
    """Share of class-``src`` test images that honest nodes' models predict as ``dst``."""
    return targeted_success([node for node in swarm.nodes if node.role == "honest"], src, dst)


def targeted_success(nodes: Sequence[Any], src: int, dst: int) -> dict[str, float]:
    """Share of class-``src`` test images that each given node's model predicts as ``dst`` (mean, max)."""
    import torch

    shares = []
    for node in nodes:
        trainer = node.trainer
        mask = trainer.test_y == src
        with torch.no_grad():
            trainer._eval_model.load_state_dict(trainer.model.state_dict())
            pred = trainer._eval_model(trainer.test_x[mask]).argmax(dim=1)
        shares.append(float((pred == dst).float().mean()))
    return {"targeted_success_mean": sum(shares) / len(shares), "targeted_success_max": max(shares)}


def run_cell(cell: dict[str, Any], opts_dict: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in this process; returns the cell with its figures, or with ``error`` if it failed."""
    try:
        return _run_cell(cell, opts_dict)
    except Exception as exc:  # one broken cell must not lose the others; it is reported, not hidden
        return {**cell, "error": f"{type(exc).__name__}: {exc}"}


def _run_cell(cell: dict[str, Any], opts_dict: dict[str, Any]) -> dict[str, Any]:
    import torch

    from p2pnode.inproc import InprocOptions, run_inproc

    torch.set_num_threads(1)
    opts = RobustnessOptions(**opts_dict)
    sybil = cell["table"] == "sybil"
    byzantine = cell["sybils"] if sybil else (0 if cell["attack"] == "none" else opts.byzantine)
    attack = "" if cell["attack"] == "none" else cell["attack"]
    run = InprocOptions(nodes=opts.honest + byzantine, byzantine=byzantine, attack=attack, rounds=opts.rounds,
                        task=opts.task, partition=opts.partition, fanout=opts.fanout,
                        local_steps=opts.local_steps, defense=cell["defense"], seed=opts.seed,
                        final_eval_samples=5000, max_grad_norm=opts.max_grad_norm)
    summary = run_inproc(run, measure=_targeted_success if sybil else None)
    return {**cell, "honest_accuracy_mean": summary["honest_accuracy_mean"],
            "honest_accuracy_min": summary["honest_accuracy_min"], "wall_time_s": summary["wall_time_s"],
            "bytes_sent_per_node": sum(n["bytes_sent"] for n in summary["nodes"]) / len(summary["nodes"]),
            **summary.get("measures", {})}


# options that change a cell's figures: a file's cells may only be resumed under the same values
CELL_SETTINGS = ("honest", "byzantine", "rounds", "fanout", "local_steps", "f", "multi_krum_m", "partition",
                 "task", "seed", "max_grad_norm")


def _check_resumable(stored: dict[str, Any] | None, opts_dict: dict[str, Any], path: Path) -> None:
    """ConfigError if ``path``'s cells were run under other :data:`CELL_SETTINGS` than ``opts_dict``'s."""
    if not stored:
        return
    defaults = asdict(RobustnessOptions())  # files written before a setting existed ran at its default
    differ = [f"{k} {stored.get(k, defaults[k])!r} there, {opts_dict[k]!r} now" for k in CELL_SETTINGS
              if stored.get(k, defaults[k]) != opts_dict[k]]
    if differ:
        raise ConfigError("--json", str(path), "a file of cells run with these settings, or a new one; this "
                          f"one's differ: {'; '.join(differ)}")


def run_robustness(opts: RobustnessOptions, *,
                   on_cell: Callable[[dict[str, Any], int, int], None] | None = None) -> dict[str, Any]:
    """Run every missing cell (resuming from ``opts.json_path``), write the JSON and the plot."""
    opts_dict = asdict(opts)
    data = load_results(opts.json_path, "cells")
    _check_resumable(data.get("options"), opts_dict, opts.json_path)
    data["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts_dict.items()}
    done = {_key(c) for c in data["cells"]}
    todo = [c for c in _cells(opts) if _key(c) not in done]
    total = len(done) + len(todo)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx) as pool:
        pending: set[Future[dict[str, Any]]] = {pool.submit(run_cell, c, opts_dict) for c in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                row = fut.result()
                if "error" in row:
                    logger.error("cell %s failed: %s", _key(row), row["error"])
                data["cells"].append(row)
                write_json_atomic(opts.json_path, data)
                if on_cell is not None:
                    on_cell(row, len(data["cells"]), total)
    if opts.plot_path is not None:
        plot_matrix(data, opts.plot_path)
    return data


def plot_matrix(data: dict[str, Any], out_png: Path) -> Path:
    """Heat map of honest mean accuracy, attacks × defenses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = [c for c in data["cells"] if c["table"] == "matrix"]
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    grid = [[float("nan")] * len(defenses) for _ in attacks]
    for c in cells:
        grid[attacks.index(c["attack"])][defenses.index(c["defense"])] = c["honest_accuracy_mean"]
    fig = Figure(figsize=(1.4 * len(defenses) + 2, 0.6 * len(attacks) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="honest accuracy (mean)")
    ax.set_title("fashion-mnist: honest accuracy under attack")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
