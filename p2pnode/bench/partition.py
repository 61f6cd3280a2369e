"""``p2pnode bench partition``: a real swarm cut in two halves, then healed.

N node processes (``p2pnode run``, libp2p transport, DHT membership), each in its own network namespace
on a private bridge (:mod:`p2pnode.bench.netns`), every node started with ``--probe-coords``. When the
median node finishes round ``cut_at``, every packet between the first and the second half is dropped
(iptables, both directions); when the median node finishes round ``heal_at`` (or, with ``max_cut_s``,
once the partition has lasted that long; with ``min_cut_s``, not before it has lasted that long), the rules
are removed.
The nodes are never told: they find out through timeouts and expiring membership records.

Reported per round (:mod:`p2pnode.bench.probes`): the mean pairwise probe distance within each half,
across the halves and over all pairs, and each half's mean test accuracy; the pre-partition level (mean
all-pairs distance over the ``window`` rounds before the earliest node's cut round, and the highest value
there); the number of rounds from ``heal_at`` until the all-pairs distance is back within that window's
range (at or below its highest value; at or below its mean is also given); and how many rounds each
node made while cut off. Saved as JSON and as a PNG of distance and accuracy against round with
the cut and the heal marked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.bench import probes as pr
from p2pnode.bench.netns import NetnsError, NetnsLab, NetnsSwarm, unavailable_reason
from p2pnode.outputs import write_json_atomic
from p2pnode.swarm import Swarm, SwarmOptions

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class PartitionOptions:
    """What ``p2pnode bench partition`` runs; validated on construction (ValueError)."""

    nodes: int = 8  # even; nodes 0 … n/2−1 are half A, the rest half B
    rounds: int = 60
    cut_at: int = 15  # partition once the median node has finished this round
    heal_at: int = 35  # heal once the median node has finished this round
    max_cut_s: float | None = None  # heal after this many seconds of partition even before heal_at
    # and not before this many: the views shrink only once the other half's records expire (--record-ttl-s,
    # 8 s, plus a heartbeat or two); on a starved machine a short cut of fast rounds ends before that
    min_cut_s: float = 0.0
    task: str = "fashion-mnist"
    local_steps: int = 20
    fanout: int = 2
    seed: int = 0
    probe_coords: int = 512
    window: int = 5  # pre-partition rounds averaged into the level
    node_args: tuple[str, ...] = ()  # extra `p2pnode run` flags for every node
    subnet: str = "10.213.7.0/24"
    out_dir: Path = field(default_factory=lambda: Path("runs/bench-partition"))
    json_path: Path = field(default_factory=lambda: Path("runs/bench-partition.json"))
    plot_path: Path | None = field(default_factory=lambda: Path("runs/bench-partition.png"))

    def __post_init__(self) -> None:
        if self.nodes < 4 or self.nodes % 2:
            raise ValueError(f"nodes must be even and >= 4, got {self.nodes}")
        if not 1 <= self.window < self.cut_at < self.heal_at < self.rounds:
            raise ValueError(f"need 1 <= window ({self.window}) < cut_at ({self.cut_at}) < heal_at "
                             f"({self.heal_at}) < rounds ({self.rounds})")
        if self.max_cut_s is not None and not self.max_cut_s > 0:
            raise ValueError(f"max_cut_s must be > 0 seconds, got {self.max_cut_s}")
        if not self.min_cut_s >= 0 or (self.max_cut_s is not None and self.min_cut_s > self.max_cut_s):
            raise ValueError(f"min_cut_s must be >= 0 and <= max_cut_s, got {self.min_cut_s}")
        if not 1 <= self.probe_coords <= 4096:
            raise ValueError(f"probe_coords must be 1 … 4096, got {self.probe_coords}")

    @property
    def halves(self) -> tuple[list[int], list[int]]:
        half = self.nodes // 2
        return list(range(half)), list(range(half, self.nodes))


def _mark(swarm: Swarm) -> dict[str, Any]:
    rounds = [p.round for p in swarm.poll_progress()]
    return {"t": time.time(), "rounds": rounds, "median": statistics.median_low(rounds)}


def _heal_now(marks: dict[str, Any], median: int, opts: PartitionOptions) -> bool:
    """The median node is at ``heal_at`` and the cut has lasted ``min_cut_s``, or it has lasted
    ``max_cut_s`` (when set)."""
    lasted = time.time() - marks["cut"]["t"]
    if opts.max_cut_s is not None and lasted >= opts.max_cut_s:
        return True
    return median >= opts.heal_at and lasted >= opts.min_cut_s


def drive(swarm: Swarm, lab: NetnsLab, opts: PartitionOptions, *, timeout_s: float,
          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Cut at ``cut_at`` and heal at ``heal_at`` (median round, once the cut has lasted ``min_cut_s``; or
    after ``max_cut_s`` seconds of partition when that comes first) while the swarm runs; return the marks.

    Returns ``{"cut": mark, "heal": mark}``, each ``{"t": unix time, "rounds": [round per node],
    "median": …}`` taken just before the fault change; a mark is missing if the swarm ended first.
    """
    group_a, group_b = opts.halves
    marks: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        prog = swarm.poll_progress()
        if all(p.finished or p.exited for p in prog):
            break
        median = statistics.median_low([p.round for p in prog])
        if "cut" not in marks and median >= opts.cut_at:
            marks["cut"] = _mark(swarm)
            lab.partition(group_a, group_b)
            if progress:
                progress(f"cut at rounds {marks['cut']['rounds']}")
        elif "cut" in marks and "heal" not in marks and _heal_now(marks, median, opts):
            marks["heal"] = _mark(swarm)
            lab.heal()
            if progress:
                progress(f"healed at rounds {marks['heal']['rounds']}")
        time.sleep(0.2)
    return marks


def analyze(events: Sequence[dict[str, Any]], opts: PartitionOptions,
            marks: dict[str, Any]) -> dict[str, Any]:
    """Distance and accuracy curves, the pre-partition level and the rounds to recover (see module doc)."""
    group_a, group_b = opts.halves
    probes = pr.probe_table(events)
    curve = pr.distance_curve(probes, group_a, group_b)
    accuracy = pr.accuracy_curve(events, {"a": group_a, "b": group_b})
    cut, heal = marks["cut"], marks["heal"]
    # relative to each node's own round at the cut and at the heal: the counters drift apart while cut
    before_cut = pr.relative_curve(probes, group_a, group_b, cut["rounds"], range(1 - opts.window, 1))
    after_heal = pr.relative_curve(probes, group_a, group_b, heal["rounds"], range(1, opts.rounds + 1))
    before = pr.window_before(before_cut, 1, opts.window)
    level, highest = statistics.fmean(before), max(before)
    views = _views(events, opts.nodes, cut["rounds"], heal["rounds"])
    during = [row for row in curve if max(cut["rounds"]) < row["round"] <= min(heal["rounds"])]
    acc_during = [row for row in accuracy if max(cut["rounds"]) < row["round"] <= min(heal["rounds"])]
    return {
        "halves": {"a": group_a, "b": group_b}, "cut": cut, "heal": heal,
        "cut_s": round(heal["t"] - cut["t"], 1),
        "pre_partition_level": level, "pre_partition_highest": highest,
        # back at the level: no higher than the highest value of the pre-partition window (the window's
        # own noise); strictly at or below its mean is also reported
        "rounds_to_recover": pr.rounds_to_recover(after_heal, after=0, level=highest),
        "rounds_to_mean": pr.rounds_to_recover(after_heal, after=0, level=level),
        # the halves compared with themselves: no reference to a level from earlier in training
        "rounds_to_mix": pr.rounds_to_mix(after_heal, after=0),
        "rounds_made_while_cut": [h - c for h, c in zip(heal["rounds"], cut["rounds"])],
        **views,
        "peak_across_while_cut": max((r["across"] for r in during if r["across"] is not None), default=None),
        "min_accuracy_while_cut": {k: min((r[k] for r in acc_during if r[k] is not None), default=None)
                                   for k in ("a", "b")},
        "curve": curve, "accuracy": accuracy,
        "after_heal": [row for row in after_heal if row["all"] is not None],
    }


def _views(events: Sequence[dict[str, Any]], nodes: int, cut: Sequence[int],
           heal: Sequence[int]) -> dict[str, list[int | None]]:
    """Per node, its view (peers_in_view): the smallest from the cut to the heal, the one at its last round
    before the heal, and the largest after the heal."""
    while_cut: list[list[int]] = [[] for _ in range(nodes)]
    after: list[list[int]] = [[] for _ in range(nodes)]
    for ev in sorted(events, key=lambda e: (e.get("node", 0), e.get("round", 0))):
        if ev.get("event") != "round" or not isinstance(ev.get("peers_in_view"), int):
            continue
        i, rnd = int(ev["node"]), int(ev["round"])
        if cut[i] < rnd <= heal[i]:
            while_cut[i].append(ev["peers_in_view"])
        elif rnd > heal[i]:
            after[i].append(ev["peers_in_view"])
    return {"smallest_view_while_cut": [min(v, default=None) for v in while_cut],
            "view_before_heal": [v[-1] if v else None for v in while_cut],
            "largest_view_after_heal": [max(v, default=None) for v in after]}


def _remove_stale_node_files(out_dir: Path) -> None:
    """A rerun into the same directory: the supervisor would take the last run's ready and result files
    for this run's (all nodes "ready" at once, then "finished")."""
    for pattern in ("node-*.ready.json", "node-*.result.json", "node-*.metrics.jsonl"):
        for path in (out_dir / "nodes").glob(pattern):
            path.unlink()


def run_partition_bench(opts: PartitionOptions, *,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the swarm in a fresh namespace lab, cut and heal it, analyse, save JSON and the plot.

    Raises
    ------
    NetnsError
        Namespaces are not available here (not root, tools missing) or could not be set up.
    RuntimeError
        The swarm ended before the cut or the heal happened.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsError(reason)
    swarm_opts = SwarmOptions(
        nodes=opts.nodes, rounds=opts.rounds, task=opts.task, fanout=opts.fanout,
        local_steps=opts.local_steps, seed=opts.seed, out=opts.out_dir, start_timeout_s=300.0,
        round_timeout_s=120.0 + 30.0 * opts.rounds,
        # every node waits for all the others before round 1: none starts alone on a busy machine
        extra_args=["--probe-coords", str(opts.probe_coords), "--wait-peers-s", "300", *opts.node_args])
    _remove_stale_node_files(opts.out_dir)
    t0 = time.time()
    with NetnsLab(opts.nodes, subnet=opts.subnet) as lab, NetnsSwarm(swarm_opts, lab) as swarm:
        swarm.start()
        if progress:
            progress(f"{opts.nodes} nodes ready in {time.time() - t0:.0f} s (namespaces {lab.prefix}-*)")
        marks = drive(swarm, lab, opts, timeout_s=float(swarm_opts.round_timeout_s or 0), progress=progress)
        swarm.wait_finished(timeout=60)
        swarm.stop()
        summary = swarm.summarize()
        events = swarm.events()
    if "cut" not in marks or "heal" not in marks:
        raise RuntimeError(f"the swarm ended before the {'heal' if 'cut' in marks else 'cut'} "
                           f"(median round never reached it); see {opts.out_dir}")
    result = {"options": {**asdict(opts), "out_dir": str(opts.out_dir), "json_path": str(opts.json_path),
                          "plot_path": str(opts.plot_path)},
              "wall_time_s": round(time.time() - t0, 1), "all_finished": summary["all_finished"],
              "final_accuracy": [n["test_accuracy"] for n in summary["nodes"]],
              **analyze(events, opts, marks)}
    write_json_atomic(opts.json_path, result)
    if opts.plot_path is not None:
        plot(result, opts.plot_path)
    return result


def load_events(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics lines of a run directory's nodes (``nodes/node-I.metrics.jsonl``), each with ``"node"``."""
    events = []
    for path in sorted((out_dir / "nodes").glob("node-*.metrics.jsonl")):
        node = int(path.name.split(".")[0].split("-")[1])
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                events.append({**json.loads(line), "node": node})
    return events


def reanalyze(json_path: Path, plot_path: Path | None) -> dict[str, Any]:
    """Recompute a saved result from its run directory's metrics (same cut and heal marks); save it."""
    result = json.loads(json_path.read_text(encoding="utf-8"))
    saved = result["options"]
    names = ("nodes", "rounds", "cut_at", "heal_at", "window")
    opts = PartitionOptions(**{n: saved[n] for n in names}, out_dir=Path(saved["out_dir"]))
    marks = {"cut": result["cut"], "heal": result["heal"]}
    result.update(analyze(load_events(opts.out_dir), opts, marks))
    write_json_atomic(json_path, result)
    if plot_path is not None:
        plot(result, plot_path)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Distance (top) and accuracy (bottom) against round, with the cut and the heal marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6.4))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    curve = result["curve"]
    rounds = [r["round"] for r in curve]
    styles = {"across": ("across halves", "tab:red"), "within_a": ("within half A", "tab:blue"),
              "within_b": ("within half B", "tab:green"), "all": ("all pairs", "black")}
    for key, (label, color) in styles.items():
        top.plot(rounds, [r[key] for r in curve], label=label, color=color, lw=1.6 if key == "all" else 1.1)
    top.axhline(result["pre_partition_level"], color="gray", ls=":", label="pre-partition level (mean)")
    top.axhline(result["pre_partition_highest"], color="gray", ls="--", lw=0.8,
                label="pre-partition level (highest)")
    top.set_ylabel("mean pairwise L2 distance\n(probe coordinates)")
    last = curve[-1]["round"] - result["heal"]["median"] if curve else 0

    def after(n: int | None) -> str:
        return f"{n} rounds after the heal" if n is not None else f"not in the {last} rounds after the heal"

    top.set_title(f"partition {len(result['halves']['a'])}+{len(result['halves']['b'])}: halves mixed "
                  f"again {after(result.get('rounds_to_mix'))};\nall-pairs distance back at the "
                  f"pre-partition level {after(result['rounds_to_recover'])}", pad=16, fontsize=10)
    acc = result["accuracy"]
    for key, color in (("a", "tab:blue"), ("b", "tab:green")):
        bottom.plot([r["round"] for r in acc], [r[key] for r in acc], color=color,
                    label=f"half {key.upper()}")
    bottom.set_ylabel("mean test accuracy")
    bottom.set_xlabel("round (each node's own)")
    for ax in (top, bottom):
        ax.axvline(result["cut"]["median"], color="tab:red", ls="--", lw=1)
        ax.axvline(result["heal"]["median"], color="tab:purple", ls="--", lw=1)
        ax.grid(alpha=0.3)
    for key, color in (("cut", "tab:red"), ("heal", "tab:purple")):
        top.text(result[key]["median"], 1.01, key, ha="center", va="bottom", color=color,
                 transform=top.get_xaxis_transform())
    top.legend(fontsize=8, loc="upper left")
    bottom.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(result: dict[str, Any]) -> str:
    """A few lines: the level, the recovery, rounds made while cut off, accuracies."""
    mwc = result["min_accuracy_while_cut"]
    return "\n".join([
        f"cut at rounds {result['cut']['rounds']}, healed at rounds {result['heal']['rounds']} "
        f"({result['cut_s']} s later)",
        f"rounds made while cut off, per node: {result['rounds_made_while_cut']}",
        f"peers in view: smallest while cut {result['smallest_view_while_cut']}, just before the heal "
        f"{result['view_before_heal']}, largest after the heal {result['largest_view_after_heal']}",
        f"pre-partition level (all-pairs distance, window mean / highest): "
        f"{result['pre_partition_level']:.4f} / {result['pre_partition_highest']:.4f}; "
        f"peak across-halves distance while cut: {_fmt(result['peak_across_while_cut'])}",
        f"rounds after the heal until back at the level (highest / mean): {result['rounds_to_recover']} / "
        f"{result['rounds_to_mean']}; until across <= within halves: {result['rounds_to_mix']}",
        f"lowest half accuracy while cut: A {mwc['a']}, B {mwc['b']}; final accuracy per node: "
        + ", ".join(f"{a:.4f}" for a in result["final_accuracy"]),
    ])
