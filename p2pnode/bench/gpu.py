"""``p2pnode bench gpu``: what gossip costs on an accelerator, and how fast codecs and rules run there.

1. **Local step throughput, gossip off vs on.** In-process swarms (:mod:`p2pnode.inproc`: the daemon's
   own ``Node`` code, signed envelopes, in-memory transport) of ``nodes`` nodes that share the device,
   all with the same task, model, seed, batch size and ``H = local_steps``:

   - *off*: fanout 0, no exchange at all; a round is H local steps plus the node's own bookkeeping
     (copying its model to the host for the finiteness check);
   - *on*: fanout k with ``--overlap``: every round pushes to and pulls from k peers (dense, mean
     merge), and the next round's H steps run while that exchange is in flight.

   The modes alternate (off, on, off, on, ...) ``trials`` times, so drift in clocks or load hits both.
   Timed, with ``time.perf_counter``: every round's wall time (all nodes run their round concurrently;
   a round ends when the last node has merged), and every ``local_training`` call (H steps, ended by the
   loss's ``.item()``, so the device's work is finished). The first ``warmup_rounds`` rounds (device
   and allocator warm-up; with overlap nothing is in flight yet) and the last round (overlap starts no
   training there) are left out; the rest are pooled over trials and their medians taken. Reported
   per mode: steps/s per node = H / median round time (what a node gets, end to end) and train-only
   steps/s = H / median time of one ``local_training`` call; gossip cost = 1 − on / off.
   ``schedule`` free is how daemons run (each node its own round loop); lockstep puts a barrier after
   every round. All nodes are threads of one Python process, so they share one interpreter lock.
1b. **The same with one OS process per node** (section ``processes``): :class:`p2pnode.swarm.Swarm`
   starts ``nodes`` real daemons (``p2pnode run``: libp2p transport over loopback, ``--device``), the
   daemon's normal deployment, with gossip off (fanout 0) and on (fanout k, ``--overlap``), alternating
   ``trials`` times. Timed from each node's own ``round`` rows (``t``, written when a round ends): steps/s
   per node = H / median of the gaps between consecutive rows over rounds ``warmup_rounds + 1 ..
   rounds - 1``, pooled over nodes and trials; train-only from the rows' ``train_s`` (the wall time of
   the ``local_training`` call whose model the round sent). Per-round evaluation is off
   (``--eval-every`` past the last round).
1c. **The same with each daemon's training in a child process** (section ``processes-train``: the daemons
   run with ``--train-process``, see :mod:`p2pnode.train_process`), so the exchange's Python work and the
   training loop hold different interpreter locks. With both sections, each trial runs in-thread then
   child-process training (each gossip off, then on), so the two are compared side by side.
2. **Codecs on the device**: :func:`protocols.codecs.bench.bench_codecs` with ``device``: encode of
   a ``numel``-element fp32 tensor that lives there (to host bytes) and decode onto it, GB/s of fp32
   input (median of ``repeats`` after a warm-up, synchronised), with ``x.clone()`` there as reference.
3. **Merge rules on the device**: :func:`p2pnode.bench.defenses.time_rules` on an ``(n=16, numel)``
   stack that lives there.

A section that fails is recorded under ``errors`` and the others still run; the JSON is rewritten
after each section.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from defenses import make_aggregator
from p2pnode.config import NodeConfig
from p2pnode.identity import Identity
from p2pnode.node import Node, PeerView
from p2pnode.outputs import write_json_atomic
from p2pnode.trainer import LocalTrainer
from p2pnode.transport import Transport

logger = logging.getLogger(__name__)

RESNET50_NUMEL = 25_557_032
SECTIONS = ("throughput", "processes", "processes-train", "codecs", "rules")
CODECS = ("dense", "fp16", "bf16", "int8", "topk:0.01", "topk:0.001", "powersgd:2", "terngrad")
TIMED = ("throughput: steps/s per node = local_steps / median round wall time (schedule free: each "
         "node's rounds, end to end, every node running its own loop; lockstep: all nodes' run_round, "
         "gather to gather), train-only = local_steps / median wall time of one local_training call "
         "(ends with the loss's .item(), so device work is done); rounds 1..warmup_rounds and the last "
         "round excluded, medians over the remaining rounds of all trials; off = fanout 0 (no exchange), "
         "on = fanout k with --overlap; gossip_cost = 1 - on/off. codecs: median wall time of encode "
         "(device tensor -> host bytes) and decode (host bytes -> device tensor) between "
         "synchronisations, GB/s = 4*numel / time. rules: median wall time on an (n, numel) fp32 stack "
         "on the device between synchronisations.")


@dataclass(kw_only=True, slots=True)
class GpuBenchOptions:
    """What ``p2pnode bench gpu`` runs (defaults: one H100, about a minute)."""

    device: str = "auto"
    nodes: int = 4
    rounds: int = 30
    warmup_rounds: int = 5
    local_steps: int = 20
    fanout: int = 2
    batch_size: int = 32
    trials: int = 2
    task: str = "fashion-mnist"
    data_dir: str | None = None
    repeats: int = 5
    numel: int = RESNET50_NUMEL
    inputs: int = 16
    codecs: tuple[str, ...] = CODECS
    seed: int = 0
    # free: every node runs its own round loop, as daemons do; lockstep: round r+1 starts when every node
    # has finished round r (the in-process swarm's schedule), so each round waits for the slowest exchange
    schedule: str = "free"
    sections: tuple[str, ...] = ("throughput", "codecs", "rules")
    json_path: Path = field(default_factory=lambda: Path("runs/bench-gpu.json"))

    def __post_init__(self) -> None:
        if self.nodes < 2 or self.fanout < 1 or self.fanout >= self.nodes:
            raise ValueError(f"need nodes >= 2 and 1 <= fanout < nodes, got {self.nodes} and {self.fanout}")
        if self.warmup_rounds < 1 or self.rounds < self.warmup_rounds + 3:
            raise ValueError(f"need warmup_rounds >= 1 and rounds >= warmup_rounds + 3 (two timed rounds), "
                             f"got {self.rounds} and {self.warmup_rounds}")
        if self.schedule not in ("free", "lockstep"):
            raise ValueError(f"schedule must be free or lockstep, got {self.schedule!r}")
        if not set(self.sections) <= set(SECTIONS):
            raise ValueError(f"sections must be among {', '.join(SECTIONS)}; got {self.sections}")
        if min(self.local_steps, self.trials, self.repeats) < 1 or self.numel < 4096 or self.inputs < 9:
            raise ValueError("need local_steps, trials, repeats >= 1, numel >= 4096 and inputs >= 9")


# -- 1. local step throughput ------------------------------------------------------------------------
class TimedNode(Node):
    """An honest node that records the wall-clock span of every ``local_training`` call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_spans: list[tuple[float, float]] = []
        self.round_ends: list[float] = []  # round_ends[r - 1]: when this node finished round r

    def local_training(self, steps: int) -> float:
        start = time.perf_counter()
        loss = super().local_training(steps)
        self.train_spans.append((start, time.perf_counter()))  # list.append: safe from the worker thread
        return loss


def _timed_factory(config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                   view: PeerView) -> Node:
    return TimedNode(config, identity, trainer, transport, view, make_aggregator(config.gossip.defense))


def run_swarm_timed(opts: GpuBenchOptions, device: str, *, gossip: bool) -> dict[str, Any]:
    """One in-process swarm with gossip off (fanout 0) or on (fanout k, overlap); its steady-state times."""
    from p2pnode.inproc import InprocOptions, InprocSwarm

    run = InprocOptions(nodes=opts.nodes, rounds=opts.rounds, task=opts.task, data_dir=opts.data_dir,
                        fanout=opts.fanout if gossip else 0, overlap=gossip, local_steps=opts.local_steps,
                        batch_size=opts.batch_size, device=device, seed=opts.seed, final_eval_samples=256,
                        fixed=False)  # training in worker threads: what overlap and timing need
    swarm = InprocSwarm(run, factory=_timed_factory)
    w, last = opts.warmup_rounds, opts.rounds
    nodes = [node for node in swarm.nodes if isinstance(node, TimedNode)]
    if opts.schedule == "lockstep":
        ends: list[float] = []  # ends[r - 1]: when round r finished on every node
        results = asyncio.run(swarm.run(lambda r: ends.append(time.perf_counter())))
        for node in nodes:
            node.round_ends = list(ends)
        steady = [row for row in swarm.rows if row["event"] == "round" and w < row["round"] < last]
        pulled = statistics.fmean(row["pulled"] for row in steady)
    else:
        results, pulled = asyncio.run(_run_free(swarm, nodes, w, last))
    round_s, train_s = [], []
    for node in nodes:  # rounds w+1 .. last-1 of each node, and the training calls inside them
        ends = node.round_ends
        round_s += [ends[r - 1] - ends[r - 2] for r in range(w + 1, last)]
        window = (ends[w - 1], ends[last - 2])
        train_s += [b - a for a, b in node.train_spans if a >= window[0] and b <= window[1]]
    out = {"mode": "on" if gossip else "off", "schedule": opts.schedule, "fanout": run.fanout,
           "overlap": run.overlap, "round_s": round_s, "train_s": train_s, "pulled_per_round": pulled,
           "bytes_sent_per_node_round": statistics.fmean(r["bytes_sent"] for r in results) / opts.rounds,
           "test_accuracy_mean": statistics.fmean(r["test_accuracy"] for r in results)}
    del swarm
    _free(device)
    return out


async def _run_free(swarm: Any, nodes: list[TimedNode], warmup: int, last: int) -> tuple[list[dict[str, Any]],
                                                                                         float]:
    """Every node runs its own ``opts.rounds`` rounds concurrently (no barrier between rounds), as
    separate daemons would; a node that is done keeps answering until all are. Final results (256
    test samples) and the mean models pulled per steady round."""
    for node in swarm.nodes:
        await node.transport.start(node.serve)
    pulled: list[int] = []

    async def loop(node: TimedNode) -> None:
        while node.round < last:
            report = await node.run_round()
            node.round_ends.append(time.perf_counter())
            if warmup < report.round < last:
                pulled.append(report.pulled)

    await asyncio.gather(*(loop(node) for node in nodes))
    results = []
    for node in swarm.nodes:
        accuracy, _ = await asyncio.to_thread(node.trainer.evaluate, 256)
        results.append({**node.counters(), "test_accuracy": accuracy})
    return results, statistics.fmean(pulled) if pulled else 0.0


def _mode_summary(runs: list[dict[str, Any]], local_steps: int) -> dict[str, Any]:
    round_s = [t for run in runs for t in run["round_s"]]
    train_s = [t for run in runs for t in run["train_s"]]
    med_round, med_train = statistics.median(round_s), statistics.median(train_s)
    return {"steps_per_s_per_node": local_steps / med_round,
            "train_steps_per_s_per_node": local_steps / med_train,
            "round_s_median": med_round, "train_s_median": med_train, "rounds_timed": len(round_s),
            "train_calls_timed": len(train_s),
            "pulled_per_round": statistics.fmean(r["pulled_per_round"] for r in runs),
            "bytes_sent_per_node_round": statistics.fmean(r["bytes_sent_per_node_round"] for r in runs)}


def bench_throughput(opts: GpuBenchOptions, device: str,
                     progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Alternate gossip-off and gossip-on swarms ``trials`` times; medians per mode and the gossip cost."""
    runs: list[dict[str, Any]] = []
    for trial in range(opts.trials):
        for gossip in (False, True):
            progress(f"throughput: trial {trial + 1}/{opts.trials}, gossip {'on' if gossip else 'off'}")
            runs.append({"trial": trial, **run_swarm_timed(opts, device, gossip=gossip)})
    return _off_on_result(opts, runs)


def _off_on_result(opts: GpuBenchOptions, runs: list[dict[str, Any]],
                   extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-mode medians of alternating off/on runs and the gossip cost; ``extra`` per-run figures are
    summarised by their median over runs."""
    modes = {}
    for mode in ("off", "on"):
        mine = [r for r in runs if r["mode"] == mode]
        modes[mode] = {**_mode_summary(mine, opts.local_steps),
                       **{key: statistics.median(r[key] for r in mine) for key in extra}}
    off, on = modes["off"], modes["on"]
    return {"nodes": opts.nodes, "local_steps": opts.local_steps, "fanout": opts.fanout, "task": opts.task,
            "off": off, "on": on,
            "gossip_cost": 1.0 - on["steps_per_s_per_node"] / off["steps_per_s_per_node"],
            "gossip_cost_train_only": 1.0 - on["train_steps_per_s_per_node"]
            / off["train_steps_per_s_per_node"], "runs": runs}


# -- 1b. the same, one OS process per node -----------------------------------------------------------------
def run_processes_timed(opts: GpuBenchOptions, device: str, out: Path, *, gossip: bool,
                        train_process: bool = False) -> dict[str, Any]:
    """One swarm of daemon processes with gossip off or on; the gaps between each node's round rows."""
    from p2pnode.swarm import Swarm, SwarmOptions

    extra = ["--eval-every", str(opts.rounds + 1), "--eval-samples", "256",
             "--batch-size", str(opts.batch_size)]
    if gossip:
        extra.append("--overlap")
    if train_process:
        extra.append("--train-process")
    if opts.data_dir is not None:
        extra += ["--data-dir", str(Path(opts.data_dir).resolve())]
    run = SwarmOptions(nodes=opts.nodes, rounds=opts.rounds, task=opts.task, seed=opts.seed, device=device,
                       fanout=opts.fanout if gossip else 0, local_steps=opts.local_steps, out=out,
                       linger_s=5.0, extra_args=extra)
    with Swarm(run) as swarm:
        swarm.start()
        finished = swarm.wait_finished()
        swarm.stop()
        paths = [swarm.node_paths(i).metrics for i in range(opts.nodes)]
    if not finished:
        mode = "on" if gossip else "off"
        raise RuntimeError(f"a node of the gossip-{mode} swarm did not finish; logs in {out}/logs")
    w, last = opts.warmup_rounds, opts.rounds
    round_s: list[float] = []
    pulled: list[int] = []
    exchange_s: list[float] = []
    train_s: list[float] = []
    sent: list[float] = []
    for path in paths:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ends = {row["round"]: row for row in rows if row.get("event") == "round"}
        round_s += [ends[r]["t"] - ends[r - 1]["t"] for r in range(w + 1, last)]
        pulled += [ends[r]["pulled"] for r in range(w + 1, last)]
        exchange_s += [ends[r]["exchange_s"] for r in range(w + 1, last)]
        train_s += [ends[r]["train_s"] for r in range(w + 1, last)]
        sent.append((ends[last - 1]["bytes_sent"] - ends[w]["bytes_sent"]) / (last - 1 - w))
    return {"mode": "on" if gossip else "off", "fanout": run.fanout, "overlap": gossip,
            "train_process": train_process, "round_s": round_s,
            "train_s": train_s, "pulled_per_round": statistics.fmean(pulled),
            "exchange_s_median": statistics.median(exchange_s),
            "bytes_sent_per_node_round": statistics.fmean(sent), "out": str(out)}


def _process_trials(opts: GpuBenchOptions, device: str, progress: Callable[[str], None],
                    kinds: tuple[bool, ...]) -> list[dict[str, Any]]:
    """Per trial, per kind of training (``--train-process`` off / on), a gossip-off then a gossip-on swarm."""
    root = Path(tempfile.mkdtemp(prefix="p2pnode-bench-gpu-processes-"))
    runs: list[dict[str, Any]] = []
    for trial in range(opts.trials):
        for train_process in kinds:
            name = "processes-train" if train_process else "processes"
            for gossip in (False, True):
                mode = "on" if gossip else "off"
                progress(f"{name}: trial {trial + 1}/{opts.trials}, gossip {mode}")
                out = root / f"trial-{trial}-{name}-{mode}"
                runs.append({"trial": trial, **run_processes_timed(opts, device, out, gossip=gossip,
                                                                   train_process=train_process)})
    return runs


def _processes_result(opts: GpuBenchOptions, runs: list[dict[str, Any]],
                      train_process: bool) -> dict[str, Any]:
    mine = [r for r in runs if r["train_process"] == train_process]
    return {"train_process": train_process, **_off_on_result(opts, mine, extra=("exchange_s_median",))}


def bench_processes(opts: GpuBenchOptions, device: str, progress: Callable[[str], None] = lambda msg: None,
                    *, train_process: bool = False) -> dict[str, Any]:
    """Alternate gossip-off and gossip-on swarms of daemon processes; medians per mode and the cost."""
    return _processes_result(opts, _process_trials(opts, device, progress, (train_process,)), train_process)


def bench_processes_train(opts: GpuBenchOptions, device: str,
                          progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """:func:`bench_processes` with every daemon's training in a child process (``--train-process``)."""
    return bench_processes(opts, device, progress, train_process=True)


def bench_processes_pair(opts: GpuBenchOptions, device: str,
                         progress: Callable[[str], None] = lambda msg: None,
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both process sections side by side: each trial runs in-thread then child-process training, each
    gossip off then on, so drift over the run hits both kinds alike."""
    runs = _process_trials(opts, device, progress, (False, True))
    return _processes_result(opts, runs, False), _processes_result(opts, runs, True)


# -- 2. codecs, 3. rules --------------------------------------------------------------------------------
def bench_layout(numel: int) -> tuple[str, Any]:
    """ResNet-50's layout for its size; otherwise a (64, m) matrix plus a vector (PowerSGD has work)."""
    from protocols.codecs import Layout
    from protocols.codecs.layouts import resnet50_layout

    if numel == RESNET50_NUMEL:
        return "resnet50", resnet50_layout()
    m = numel // 64
    rest = numel - 64 * m
    return f"matrix-{numel}", Layout(((64, m),) + (((rest,),) if rest else ()))


def bench_codecs_on(opts: GpuBenchOptions, device: str,
                    progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Every codec's encode/decode GB/s on the device, and ``clone()`` there."""
    from protocols.codecs.bench import bench_codecs

    name, layout = bench_layout(opts.numel)
    result = bench_codecs(opts.codecs, layouts={name: layout}, repeats=opts.repeats, hivemind=False,
                          device=device, progress=lambda msg: progress(f"codecs: {msg}"))
    result.pop("machine", None)
    return {"layout": name, "numel": layout.numel, **result}


def bench_rules_on(opts: GpuBenchOptions, device: str,
                   progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Every merge rule (and the references) on an ``(inputs, numel)`` stack on the device."""
    from p2pnode.bench.defenses import TAU, F, time_rules

    progress(f"rules: n={opts.inputs}, d={opts.numel:,}")
    dev = torch.device(device)
    x = torch.randn(opts.inputs, opts.numel, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(opts.seed))  # (n, d)
    try:
        rows = time_rules(x, opts.repeats)
    finally:
        del x
        _free(device)
    for row in rows:
        row["input_gbs"] = 4 * opts.inputs * opts.numel / row["median_s"] / 1e9 if row["median_s"] else None
    return {"n": opts.inputs, "d": opts.numel, "f": F, "tau": TAU, "rows": rows}


# -- the whole bench ---------------------------------------------------------------------------------------
def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_gpu_bench(opts: GpuBenchOptions,
                  progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run the three sections on ``opts.device``; write and return the results (see the module doc)."""
    from p2pnode.trainer import resolve_device
    from protocols.codecs.bench import machine_info

    device = str(resolve_device(opts.device))
    t0 = time.perf_counter()
    data: dict[str, Any] = {
        "device": device, "machine": machine_info(), "timed": TIMED, "errors": {}, "wall_s": {},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}}
    sections: dict[str, Callable[..., dict[str, Any]]] = {
        "throughput": bench_throughput, "processes": bench_processes,
        "processes-train": bench_processes_train, "codecs": bench_codecs_on,
        "rules": bench_rules_on}
    for name, section in sections.items():
        if name not in opts.sections or name in data:  # processes-train may have run beside processes
            continue
        start = time.perf_counter()
        try:
            if name == "processes" and "processes-train" in opts.sections:
                data["processes"], data["processes-train"] = bench_processes_pair(opts, device, progress)
            else:
                data[name] = section(opts, device, progress)
        except Exception as exc:  # one broken section must not lose the others' figures: recorded, logged
            logger.error("section %s failed: %s", name, exc)
            data["errors"][name] = "".join(traceback.format_exception_only(exc)).strip()
            data["errors"][name + "_traceback"] = traceback.format_exc()
        data["wall_s"][name] = time.perf_counter() - start
        write_json_atomic(opts.json_path, data)
    data["wall_s"]["total"] = time.perf_counter() - t0
    write_json_atomic(opts.json_path, data)
    return data


def format_report(data: dict[str, Any]) -> str:
    """Readable tables of :func:`run_gpu_bench`'s result (markdown)."""
    m = data["machine"]
    lines = [f"device {data['device']} ({m.get('cuda_device') or m['processor']}), torch {m['torch']}, "
             f"{m['cpu_count']} CPUs", ""]
    tp = data.get("throughput")
    if tp:
        lines += [f"Local step throughput: {tp['nodes']} nodes on one device, {tp['task']}, "
                  f"H = {tp['local_steps']}, batch {data['options']['batch_size']}",
                  "| gossip | steps/s per node (round wall time) | train-only steps/s | median round s | "
                  "exchanges per round | MB sent per node per round |", "|---|---:|---:|---:|---:|---:|"]
        for key, label in (("off", "off (fanout 0)"), ("on", f"on (fanout {tp['fanout']}, overlap)")):
            s = tp[key]
            lines.append(f"| {label} | {s['steps_per_s_per_node']:.1f} | "
                         f"{s['train_steps_per_s_per_node']:.1f} | {s['round_s_median']:.4f} | "
                         f"{s['pulled_per_round']:.2f} | {s['bytes_sent_per_node_round'] / 1e6:.3f} |")
        verdict = "meets" if tp["gossip_cost"] <= 0.05 else "misses"
        lines += [f"gossip cost = 1 - on/off = {100 * tp['gossip_cost']:.1f}% of local step throughput "
                  f"({verdict} <= 5%); train-only: {100 * tp['gossip_cost_train_only']:.1f}%", ""]
    for section in ("processes", "processes-train"):
        pr = data.get(section)
        if not pr:
            continue
        where = "training in a child process of each" if pr.get("train_process") else "training in-thread"
        lines += [f"Local step throughput: {pr['nodes']} daemon processes on one device ({where}), "
                  f"{pr['task']}, H = {pr['local_steps']}, batch {data['options']['batch_size']}",
                  "| gossip | steps/s per node (round wall time) | train-only steps/s | median round s | "
                  "exchanges per round | median exchange s | MB sent per node per round |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, label in (("off", "off (fanout 0)"), ("on", f"on (fanout {pr['fanout']}, overlap)")):
            s = pr[key]
            lines.append(f"| {label} | {s['steps_per_s_per_node']:.1f} | "
                         f"{s['train_steps_per_s_per_node']:.1f} | {s['round_s_median']:.4f} | "
                         f"{s['pulled_per_round']:.2f} | {s['exchange_s_median']:.4f} | "
                         f"{s['bytes_sent_per_node_round'] / 1e6:.3f} |")
        verdict = "meets" if pr["gossip_cost"] <= 0.05 else "misses"
        lines += [f"gossip cost = 1 - on/off = {100 * pr['gossip_cost']:.1f}% of local step throughput "
                  f"({verdict} <= 5%); train-only: {100 * pr['gossip_cost_train_only']:.1f}%", ""]
    thread, child = data.get("processes"), data.get("processes-train")
    if thread and child:
        ratios = [child[k]["steps_per_s_per_node"] / thread[k]["steps_per_s_per_node"] for k in ("off", "on")]
        lines += [f"steps/s per node, training in a child process / in-thread: gossip off {ratios[0]:.2f}x, "
                  f"gossip on {ratios[1]:.2f}x", ""]
    cd = data.get("codecs")
    if cd:
        lines += [f"Codecs on {cd['device']}, {cd['layout']} ({cd['numel']:,} fp32), median of "
                  f"{cd['repeats']}",
                  "| codec | bytes | ratio | encode GB/s | decode GB/s | encode ms | decode ms "
                  "| rel. L2 error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cd["rows"]:
            lines.append(f"| {r['codec']} | {r['bytes']:,} | {r['ratio']:.1f} | {r['encode_gbs']:.2f} | "
                         f"{r['decode_gbs']:.2f} | {r['encode_ms']:.2f} | {r['decode_ms']:.2f} | "
                         f"{r['rel_error']:.2e} |")
        lines += [f"x.clone() on the device: {cd['clone_gbs']:.1f} GB/s (4*numel / time)", ""]
    rl = data.get("rules")
    if rl:
        lines += [f"Merge rules on an (n={rl['n']}, d={rl['d']:,}) fp32 stack, F = {rl['f']}",
                  "| rule | median ms | min ms | GB/s of input |", "|---|---:|---:|---:|"]
        for r in rl["rows"]:
            if r["median_s"] is None:
                lines.append(f"| {r['rule']} | failed: {r.get('error', '?')} | | |")
            else:
                lines.append(f"| {r['rule']} | {1e3 * r['median_s']:.2f} | {1e3 * r['min_s']:.2f} | "
                             f"{r['input_gbs']:.1f} |")
        lines.append("")
    for name, err in data["errors"].items():
        if not name.endswith("_traceback"):
            lines.append(f"section {name} FAILED: {err}")
    lines.append("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in data["wall_s"].items()))
    return "\n".join(lines)
