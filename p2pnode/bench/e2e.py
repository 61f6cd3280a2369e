"""``p2pnode bench e2e``: p2pnode gossip against a hivemind all-reduce swarm, end to end, one machine.

Every run is a real multi-process swarm started by :class:`p2pnode.swarm.Swarm` (one OS process per
node on loopback, node 0 first as the bootstrap peer). The systems differ only in the node program:

* ``hivemind``: :mod:`p2pnode.bench.e2e_hivemind` — H local SGD steps, then hivemind's
  ``DecentralizedAverager.step()`` in a group of all nodes (an all-reduce of the model vector);
* a codec name (``dense``, ``fp16``, ``topk:0.01``, ...): ``p2pnode run`` with model gossip and that codec;
* ``increments/CODEC``: ``p2pnode run --mode increments --codec CODEC``;
* any p2pnode system with ``@K`` (``dense@7``): that system at fanout K instead of ``--fanout``; with
  ``@sync`` (``dense@4@sync``): that system with ``--sync`` (round-aligned models, :mod:`p2pnode.sync`).

Same task, shards, initial model, local steps, learning rate, batch size and seed; every node evaluates
after every round on the same held-out subset (the first ``eval_samples`` test samples) and once at the
end on the whole test split. Measured per run:

* time to target: the first round at which the mean over nodes of that round's held-out accuracy is
  >= ``target``; its time is when the last node wrote that round's row, counted from the moment every
  node was ready (start-up, i.e. imports, data loading and joining, is reported apart as ``startup_s``);
* bytes sent per node, counted at each system's transport (see :mod:`p2pnode.bench.e2e_hivemind`): at
  the target round and over the whole run;
* CPU seconds: user + system time of every process of the swarm (node processes and their children:
  DHT processes, the averager process, the libp2p daemons), read from ``/proc/PID/stat`` twice a second
  while the swarm runs (what a process spends after its last sample is not counted), split by kind
  (``cpu_s_by_kind``: ``node`` processes, ``p2pd`` daemons, other ``child`` processes) and also taken
  when every node was ready (``cpu_s_at_ready``), so start-up and training can be told apart;
* final accuracy: mean over nodes of the final evaluation on the whole test split.

Runs are interleaved (repeat 1 of every system, then repeat 2, ...) so load drifts hit all systems
alike; repeat ``i`` uses seed ``seed + i`` for every system. Each run is appended to the JSON file as it
finishes and a rerun skips runs already there. The report is the median over repeats per system.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.bench import load_results
from p2pnode.outputs import write_json_atomic

logger = logging.getLogger(__name__)

HIVEMIND = "hivemind"
SYSTEMS = (HIVEMIND, "dense", "fp16", "topk:0.01")
HIVEMIND_COMMAND = (sys.executable, "-m", "p2pnode.bench.e2e_hivemind")


@dataclass(kw_only=True, slots=True)
class E2EOptions:
    """What the benchmark runs (defaults: issue 8's setting)."""

    nodes: int = 8
    task: str = "fashion-mnist"
    target: float = 0.80
    rounds: int = 18
    local_steps: int = 20
    fanout: int = 2
    repeats: int = 3
    seed: int = 0
    eval_samples: int = 2000
    matchmaking_s: float = 2.0  # hivemind's min_matchmaking_time (a full group starts at once)
    systems: tuple[str, ...] = SYSTEMS
    out_dir: Path = field(default_factory=lambda: Path("runs/bench-e2e"))
    json_path: Path = field(default_factory=lambda: Path("runs/bench-e2e.json"))

    def __post_init__(self) -> None:
        for name, low in (("nodes", 2), ("rounds", 1), ("local_steps", 1), ("fanout", 1), ("repeats", 1),
                          ("eval_samples", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {self.target!r}")
        if self.seed < 0 or self.matchmaking_s <= 0:
            raise ValueError("seed must be >= 0 and matchmaking_s > 0")
        if not self.systems:
            raise ValueError("systems must not be empty")
        for system in self.systems:
            parse_system(system)

    def to_json(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "task": self.task, "target": self.target, "rounds": self.rounds,
                "local_steps": self.local_steps, "fanout": self.fanout, "repeats": self.repeats,
                "seed": self.seed, "eval_samples": self.eval_samples, "matchmaking_s": self.matchmaking_s,
                "systems": list(self.systems)}


def split_modifiers(system: str) -> tuple[str, int | None, bool]:
    """``"dense@7@sync"`` -> ``("dense", 7, True)``; ``"dense"`` -> ``("dense", None, False)`` (``None``: the
    run's ``--fanout``)."""
    base, *mods = system.split("@")
    fanout, sync = None, False
    for mod in mods:
        if mod == "sync" and not sync:
            sync = True
        elif mod.isdigit() and int(mod) >= 1 and fanout is None:
            fanout = int(mod)
        else:
            raise ValueError(f"unknown system {system!r}: a p2pnode system takes @K (fanout >= 1), @sync")
    if mods and (not base or base == HIVEMIND):
        raise ValueError(f"unknown system {system!r}: only p2pnode systems take @K and @sync")
    return base, fanout, sync


def parse_system(system: str) -> tuple[str, str]:
    """``"hivemind"`` -> ``("hivemind", "")``; ``"dense"`` (or ``"dense@7"``) -> ``("gossip", "dense")``;
    ``"increments/topk:0.01"`` -> ``("increments", "topk:0.01")``. Raises ValueError otherwise."""
    base, _, sync = split_modifiers(system)
    if base == HIVEMIND:
        return HIVEMIND, ""
    mode, sep, codec = base.partition("/")
    if not sep:
        mode, codec = "gossip", base
    if mode not in ("gossip", "increments") or not codec or "/" in codec or codec == HIVEMIND:
        raise ValueError(f"unknown system {base!r}: hivemind | CODEC | gossip/CODEC | increments/CODEC")
    if sync and mode != "gossip":
        raise ValueError(f"unknown system {system!r}: @sync is for model gossip")
    return mode, codec


# -- measurement -----------------------------------------------------------------------------------
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, utime + stime in ticks, start time in ticks)`` of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19])
    except (IndexError, ValueError):
        return None


class ProcessTreeCpu:
    """User + system CPU seconds of some processes and all their descendants, by sampling ``/proc``.

    Each :meth:`sample` walks the process tree under the given root pids and keeps, per process
    (pid and start time, so a reused pid is a new process), the largest CPU time seen, and its kind:
    ``node`` (a root), ``p2pd`` (a libp2p daemon) or ``child`` (another descendant: DHT, averager).
    """

    def __init__(self) -> None:
        self._ticks: dict[tuple[int, int], int] = {}
        self._kind: dict[tuple[int, int], str] = {}

    def sample(self, roots: Iterable[int]) -> None:
        stats: dict[int, tuple[int, int, int]] = {}
        children: dict[int, list[int]] = defaultdict(list)
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and (st := _read_stat(int(entry.name))) is not None:
                    stats[int(entry.name)] = st
                    children[st[0]].append(int(entry.name))
        root_set = set(roots)
        todo, seen = [r for r in root_set if r in stats], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            _, ticks, start = stats[pid]
            key = (pid, start)
            self._ticks[key] = max(self._ticks.get(key, 0), ticks)
            if key not in self._kind:
                self._kind[key] = "node" if pid in root_set else _kind_of(pid)
            todo.extend(children.get(pid, ()))

    @property
    def processes(self) -> int:
        return len(self._ticks)

    @property
    def seconds(self) -> float:
        return sum(self._ticks.values()) / _CLK_TCK

    def seconds_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, ticks in self._ticks.items():
            out[self._kind.get(key, "child")] += ticks / _CLK_TCK
        return {k: round(v, 2) for k, v in sorted(out.items())}


def _kind_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().strip()
    except OSError:
        return "child"
    return "p2pd" if comm == "p2pd" else "child"


def accuracy_curve(events: Iterable[dict[str, Any]], *, nodes: int, t0: float) -> list[dict[str, Any]]:
    """Per round that every node evaluated: mean held-out accuracy, time and mean bytes sent.

    ``t`` is when the last node wrote its row of that round, minus ``t0``; ``bytes_sent`` is the mean over
    nodes of their transport counter in that row. Rounds that not all ``nodes`` evaluated are left out.
    """
    rows: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for ev in events:
        if ev.get("event") == "round" and ev.get("test_accuracy") is not None:
            rows[int(ev["round"])][int(ev["node"])] = ev
    curve = []
    for rnd in sorted(rows):
        got = rows[rnd]
        if len(got) < nodes:
            continue
        curve.append({"round": rnd, "t": round(max(float(r["t"]) for r in got.values()) - t0, 3),
                      "accuracy": sum(float(r["test_accuracy"]) for r in got.values()) / len(got),
                      "accuracy_min": min(float(r["test_accuracy"]) for r in got.values()),
                      "bytes_sent": sum(int(r.get("bytes_sent") or 0) for r in got.values()) / len(got)})
    return curve


def first_reaching(curve: Sequence[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first point of ``curve`` whose mean accuracy is >= ``target`` (None if none is)."""
    return next((p for p in curve if p["accuracy"] >= target), None)


def time_to_target_latest(events: Iterable[dict[str, Any]], *, nodes: int, target: float,
                          t0: float) -> float | None:
    """The first time (minus ``t0``) at which the mean over nodes of each node's latest held-out accuracy
    is >= ``target`` (every node evaluated at least once); None if never.

    The round-based time of :func:`accuracy_curve` waits for the slowest node to finish the round;
    this one reads the swarm as it stands at each moment, which differs when nodes run rounds freely
    (p2pnode) rather than in lock-step (an all-reduce).
    """
    latest: dict[int, float] = {}
    rows = [ev for ev in events if ev.get("event") == "round" and ev.get("test_accuracy") is not None]
    for ev in sorted(rows, key=lambda e: float(e["t"])):
        latest[int(ev["node"])] = float(ev["test_accuracy"])
        if len(latest) >= nodes and sum(latest.values()) / len(latest) >= target:
            return round(float(ev["t"]) - t0, 3)
    return None


def round_timing(events: Iterable[dict[str, Any]]) -> dict[str, float | None]:
    """Median time between a node's consecutive round rows, and median time a round waited on its exchange
    (``exchange_s``: p2pnode's push-pull, hivemind's ``averager.step()``), over all nodes and rounds."""
    by_node: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        if ev.get("event") == "round":
            by_node[int(ev["node"])].append(ev)
    gaps, waits = [], []
    for rows in by_node.values():
        rows.sort(key=lambda r: int(r["round"]))
        gaps += [float(b["t"]) - float(a["t"]) for a, b in zip(rows, rows[1:], strict=False)]
        waits += [float(r["exchange_s"]) for r in rows if isinstance(r.get("exchange_s"), int | float)]
    return {"round_s_median": statistics.median(gaps) if gaps else None,
            "exchange_s_median": statistics.median(waits) if waits else None}


def summarize_run(events: list[dict[str, Any]], *, nodes: int, target: float, t0: float) -> dict[str, Any]:
    """The figures of one run from its metrics events (each with ``node``); see the module docstring."""
    curve = accuracy_curve(events, nodes=nodes, t0=t0)
    hit = first_reaching(curve, target)
    finals = [ev for ev in events if ev.get("event") == "final" and ev.get("test_accuracy") is not None]
    last_bytes: dict[int, int] = {}
    for ev in events:
        if isinstance(ev.get("bytes_sent"), int):
            last_bytes[int(ev["node"])] = max(last_bytes.get(int(ev["node"]), 0), ev["bytes_sent"])
    return {
        "time_to_target_s": hit["t"] if hit else None,
        "time_to_target_latest_s": time_to_target_latest(events, nodes=nodes, target=target, t0=t0),
        "round_to_target": hit["round"] if hit else None,
        "bytes_to_target_per_node": hit["bytes_sent"] if hit else None,
        "final_accuracy": (sum(float(e["test_accuracy"]) for e in finals) / len(finals)) if finals else None,
        "final_accuracy_min": min(float(e["test_accuracy"]) for e in finals) if finals else None,
        "nodes_finished": len(finals),
        "bytes_sent_per_node": sum(last_bytes.values()) / nodes,
        **round_timing(events),
        "curve": curve,
    }


# -- running ---------------------------------------------------------------------------------------
def _slug(system: str) -> str:
    return system.replace(":", "-").replace("/", "-").replace("@sync", "-sync").replace("@", "-fanout")


def run_one(opts: E2EOptions, system: str, repeat: int) -> dict[str, Any]:
    """Run one swarm of ``system`` (repeat ``repeat``) and return its row."""
    from p2pnode.swarm import Swarm, SwarmOptions

    mode, codec = parse_system(system)
    _, fanout_k, sync = split_modifiers(system)
    fanout = fanout_k or opts.fanout
    seed = opts.seed + repeat
    extra = ["--eval-every", "1", "--eval-samples", str(opts.eval_samples)]
    command: list[str] | None = None
    if mode == HIVEMIND:
        command = list(HIVEMIND_COMMAND)
        extra += ["--matchmaking-s", str(opts.matchmaking_s)]
    elif mode == "increments":
        extra += ["--mode", "increments"]
    if sync:
        extra += ["--sync"]
    swarm_opts = SwarmOptions(nodes=opts.nodes, rounds=opts.rounds, task=opts.task, fanout=fanout,
                              local_steps=opts.local_steps, seed=seed, codec=codec or "dense",
                              out=opts.out_dir / f"repeat-{repeat}" / _slug(system), extra_args=extra)
    cpu = ProcessTreeCpu()
    load = os.getloadavg()[0]
    launched = time.time()
    with Swarm(swarm_opts, node_command=command) as swarm:
        swarm.start()
        ready = time.time()

        def pids() -> list[int]:
            return [p.pid for p in swarm.processes]

        cpu.sample(pids())
        at_ready = cpu.seconds_by_kind()
        finished = swarm.wait_finished(on_progress=lambda _progress: cpu.sample(pids()))
        cpu.sample(pids())
        done = time.time()
        swarm.stop()
        swarm.summarize()
        events = swarm.events()
    row = {"system": system, "repeat": repeat, "seed": seed, "all_finished": finished, "t_ready": ready,
           "startup_s": round(ready - launched, 3), "wall_s": round(done - launched, 3),
           "cpu_s": round(cpu.seconds, 2), "cpu_s_by_kind": cpu.seconds_by_kind(), "cpu_s_at_ready": at_ready,
           "processes": cpu.processes,
           "load_1min_at_start": load,
           "out": str(swarm_opts.out)}
    row.update(summarize_run(events, nodes=opts.nodes, target=opts.target, t0=ready))
    return row


def reanalyze(opts: E2EOptions) -> dict[str, Any]:
    """Recompute every run's figures in ``opts.json_path`` from its swarm's ``metrics.jsonl`` (nothing runs).

    The ready time is the stored ``t_ready`` or, for rows written before it was stored, recovered from
    the first curve point (its ``t`` is the last row of that round minus the ready time).
    """
    import json

    data = load_results(opts.json_path, "runs")
    for row in data["runs"]:
        path = Path(row["out"]) / "metrics.jsonl"
        events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        t0 = row.get("t_ready")
        if t0 is None:
            first = row["curve"][0]
            t0 = max(float(e["t"]) for e in events
                     if e.get("event") == "round" and e.get("round") == first["round"]) - first["t"]
            row["t_ready"] = t0
        row.update(summarize_run(events, nodes=opts.nodes, target=opts.target, t0=t0))
    data["options"] = {**data.get("options", {}), "target": opts.target}
    data["summary"] = aggregate(data, opts.systems)
    data["acceptance"] = acceptance(data["summary"])
    write_json_atomic(opts.json_path, data)
    return data


def _median(values: Sequence[float | None]) -> float | None:
    """Median with None as +inf (a run that never reached the target); None if the median is +inf."""
    if not values:
        return None
    med = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(med) else med


def aggregate(data: dict[str, Any], systems: Sequence[str]) -> list[dict[str, Any]]:
    """Median over repeats per system, with ratios against the hivemind baseline (when present)."""
    out = []
    for system in systems:
        runs = [r for r in data["runs"] if r["system"] == system]
        if not runs:
            continue
        row: dict[str, Any] = {"system": system, "runs": len(runs),
                               "reached": sum(r["time_to_target_s"] is not None for r in runs)}
        for key in ("time_to_target_s", "time_to_target_latest_s", "round_to_target",
                    "bytes_to_target_per_node", "final_accuracy", "final_accuracy_min", "bytes_sent_per_node",
                    "cpu_s", "startup_s", "wall_s", "round_s_median", "exchange_s_median"):
            row[key] = _median([r.get(key) for r in runs])
        out.append(row)
    base = next((r for r in out if r["system"] == HIVEMIND), None)
    for row in out:
        if base is None:
            continue
        t, tb = row["time_to_target_s"], base["time_to_target_s"]
        row["time_ratio_vs_hivemind"] = t / tb if t is not None and tb else None
        b, bb = row["bytes_to_target_per_node"], base["bytes_to_target_per_node"]
        row["bytes_to_target_fewer_x"] = bb / b if b and bb else None
        row["bytes_run_fewer_x"] = (base["bytes_sent_per_node"] / row["bytes_sent_per_node"]
                                    if row["bytes_sent_per_node"] else None)
        row["per_repeat_time_ratio"] = per_repeat_ratio(data["runs"], row["system"])
    return out


def per_repeat_ratio(runs: Sequence[dict[str, Any]], system: str) -> list[float | None]:
    """Time-to-target of ``system`` over hivemind's in the same repeat, per repeat (None: one missed)."""
    by = {(r["system"], r["repeat"]): r for r in runs}
    ratios: list[float | None] = []
    for (name, rep), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        base = by.get((HIVEMIND, rep))
        if name != system or base is None:
            continue
        t, tb = r["time_to_target_s"], base["time_to_target_s"]
        ratios.append(round(t / tb, 3) if t is not None and tb else None)
    return ratios


def acceptance(summary: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 8's two checks on the medians: dense time ratio <= 1, topk:0.01 >= 20x fewer bytes to target.

    The dense check is made for ``dense`` (the defaults) and, under ``dense_variants``, for every dense
    model-gossip system with modifiers (``dense@4@sync``), each with its own ratio.
    """
    by = {r["system"]: r for r in summary}
    dense, topk = by.get("dense"), by.get("topk:0.01")
    res: dict[str, Any] = {}
    if dense is not None and "time_ratio_vs_hivemind" in dense:
        ratio = dense["time_ratio_vs_hivemind"]
        res["dense_time_ratio"] = ratio
        res["dense_no_slower"] = ratio is not None and ratio <= 1.0
    variants = {name: r["time_ratio_vs_hivemind"] for name, r in by.items()
                if name != "dense" and "time_ratio_vs_hivemind" in r
                and parse_system(name) == ("gossip", "dense")}
    if variants:
        res["dense_variants"] = {name: {"time_ratio": ratio, "no_slower": ratio is not None and ratio <= 1.0}
                                 for name, ratio in variants.items()}
    if topk is not None and "bytes_to_target_fewer_x" in topk:
        fewer = topk["bytes_to_target_fewer_x"]
        res["topk_bytes_fewer_x"] = fewer
        res["topk_20x_fewer_bytes"] = fewer is not None and fewer >= 20.0
    return res


def run_e2e_bench(opts: E2EOptions, *,
                  on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every (repeat, system) not yet in ``opts.json_path``; return the data with medians."""
    data = load_results(opts.json_path, "runs")
    data["options"] = opts.to_json()
    for repeat in range(opts.repeats):
        for system in opts.systems:
            if any(r["system"] == system and r["repeat"] == repeat for r in data["runs"]):
                continue
            row = run_one(opts, system, repeat)
            data["runs"].append(row)
            data["summary"] = aggregate(data, opts.systems)
            write_json_atomic(opts.json_path, data)
            if on_run is not None:
                on_run(row)
    data["summary"] = aggregate(data, opts.systems)
    data["acceptance"] = acceptance(data["summary"])
    write_json_atomic(opts.json_path, data)
    return data


def _num(value: float | None, fmt: str, scale: float = 1.0, missing: str = "not reached") -> str:
    return missing if value is None else format(value / scale, fmt)


def format_table(data: dict[str, Any]) -> str:
    """Markdown table of the medians (and the acceptance lines when there is a baseline)."""
    target = data.get("options", {}).get("target", 0.8)
    lines = [f"| system | time to {target:.2f} (s) | round | vs hivemind | latest-eval time (s) "
             "| MB sent / node to target "
             "| × fewer bytes to target | final acc. | MB sent / node (run) | CPU s | round s | exchange s "
             "| reached |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data.get("summary", []):
        ratio, fewer = r.get("time_ratio_vs_hivemind"), r.get("bytes_to_target_fewer_x")
        lines.append(
            f"| `{r['system']}` | {_num(r['time_to_target_s'], '.1f')} | "
            f"{_num(r['round_to_target'], '.0f')} | {'' if ratio is None else f'{ratio:.2f}'} | "
            f"{_num(r.get('time_to_target_latest_s'), '.1f')} | "
            f"{_num(r['bytes_to_target_per_node'], '.3f', 1e6)} | "
            f"{'' if fewer is None else f'{fewer:.1f}'} | {_num(r['final_accuracy'], '.4f')} | "
            f"{_num(r['bytes_sent_per_node'], '.3f', 1e6)} | {_num(r['cpu_s'], '.0f')} | "
            f"{_num(r['round_s_median'], '.2f', missing='–')} | "
            f"{_num(r['exchange_s_median'], '.3f', missing='–')} | "
            f"{r['reached']}/{r['runs']} |")
    acc = data.get("acceptance") or {}
    if "dense_time_ratio" in acc:
        lines.append(f"\ndense time / hivemind time: {_num(acc['dense_time_ratio'], '.2f')} "
                     f"({'met' if acc['dense_no_slower'] else 'NOT met'}: <= 1.0)")
    for name, v in (acc.get("dense_variants") or {}).items():
        lines.append(f"{name} time / hivemind time: {_num(v['time_ratio'], '.2f')} "
                     f"({'met' if v['no_slower'] else 'NOT met'}: <= 1.0)")
    if "topk_bytes_fewer_x" in acc:
        lines.append("topk:0.01 bytes to target, × fewer than hivemind: "
                     f"{_num(acc['topk_bytes_fewer_x'], '.1f')} "
                     f"({'met' if acc['topk_20x_fewer_bytes'] else 'NOT met'}: >= 20)")
    return "\n".join(lines)
