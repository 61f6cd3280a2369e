"""Plots of the named scenarios' results (written next to ``scenario.json`` when a run has an ``out``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_variance(result: dict[str, Any], out_png: Path) -> Path:
    """Honest mean accuracy per round of every vanishing-variance run, one colour per variant."""
    colors = {"gossip, mean": "tab:blue", "gossip, mean + variance correction": "tab:orange",
              "federated averaging": "tab:green"}
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    seen: set[str] = set()
    for cell in result["cells"]:
        if "curve" not in cell:
            continue
        name = cell["variant"]
        ax.plot(range(1, len(cell["curve"]) + 1), cell["curve"], color=colors.get(name, "grey"), alpha=0.8,
                label=None if name in seen else name)
        seen.add(name)
    ax.axhline(result["config"]["target"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("honest mean test accuracy")
    ax.set_title(f"vanishing variance: {result['config']['nodes']} nodes, one line per seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_sybil(result: dict[str, Any], out_png: Path) -> Path:
    """Targeted 0 -> 1 success by number of Sybils, one bar group per defense."""
    cells = [c for c in result["cells"] if "targeted_success_mean" in c and c["sybils"] > 0]
    control = [c for c in result["cells"] if "targeted_success_mean" in c and c["sybils"] == 0]
    counts = sorted({c["sybils"] for c in cells})
    defenses = list(dict.fromkeys(c["defense"] for c in cells))
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(defenses))
    for k, d in enumerate(defenses):
        by = {c["sybils"]: 100 * c["targeted_success_mean"] for c in cells if c["defense"] == d}
        xs = [i + k * width for i in range(len(counts))]
        ax.bar(xs, [by.get(m, 0.0) for m in counts], width=width, label=d)
    for c in control:
        ax.axhline(100 * c["targeted_success_mean"], color="grey", linestyle="--", linewidth=1,
                   label="no attacker (mean)")
    ax.set_xticks([i + width * (len(defenses) - 1) / 2 for i in range(len(counts))], [str(m) for m in counts])
    ax.set_xlabel("Sybil identities of the one attacker")
    ax.set_ylabel("class-0 test images read as 1 (%)")
    ax.set_title(f"sybilwall: {result['config']['honest']} honest nodes, geometric graph", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return out_png


PLOTS = {"vanishing-variance": plot_variance, "sybilwall": plot_sybil}
