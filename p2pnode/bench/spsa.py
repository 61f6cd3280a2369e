"""``p2pnode bench spsa``: one-byte SPSA gossip against single-node MeZO with as many perturbations.

Three in-process runs (the daemon's SpsaNode, signed envelopes, in-memory transport whose byte
counters see every message): (1) ``nodes`` nodes in ``--mode spsa`` for ``rounds`` rounds of
``local_steps`` SPSA steps (``k`` scalars each), each node running its rounds without waiting for the
others as daemons do (``lockstep`` puts them in step), then the drain; (2) one node alone running the same
total number of perturbations, ``nodes × local_steps`` steps per round, on the whole fine-tuning split;
(3) a shorter swarm (``join_steps`` per round) that one more node joins at round ``join_round`` by
fetching the state from running peers. Reported: wire bytes per delivered scalar of run 1
(``bytes_sent`` over all nodes ÷ (scalars produced × (nodes − 1)), everything included), the
held-out loss after every round against the perturbations applied (runs 1 and 2, plot), the largest
difference between any two nodes' models after the drain, and, in run 3, from the joiner's 5th round
on, its mean L2 distance to the old nodes over their mean pairwise distance (1.0: it is as close to
them as they are to each other; mid-run every node lacks some of the scalars in flight).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2pnode.spsa_node import SpsaNode


@dataclass(kw_only=True, slots=True)
class SpsaBenchOptions:
    nodes: int = 4
    rounds: int = 10
    local_steps: int = 500
    k: int = 1
    task: str = "shakespeare-charlm"
    lr: float = 1e-4
    eps: float = 1e-3
    batch_size: int = 16
    fanout: int = 1
    drain_rounds: int = 3
    join_round: int = 2
    join_steps: int = 300  # local steps per round in the separate run with a joiner
    seed: int = 0
    lockstep: bool = False  # all nodes' rounds in step (else each node runs its rounds freely, as daemons do)
    runs: tuple[str, ...] = ("swarm", "single", "join")
    eval_samples: int = 1000
    json_path: Path = field(default_factory=lambda: Path("runs/bench-spsa.json"))
    plot_path: Path = field(default_factory=lambda: Path("docs/bench-spsa.png"))


def _options(o: SpsaBenchOptions, nodes: int, steps: int) -> Any:
    from p2pnode.inproc import InprocOptions

    spsa = {"lr": o.lr, "eps": o.eps, "k": o.k, "drain_rounds": o.drain_rounds, "probe_every": 2}
    return InprocOptions(nodes=nodes, rounds=o.rounds, task=o.task, fanout=o.fanout, mode="spsa",
                         local_steps=steps, batch_size=o.batch_size, seed=o.seed, eval_samples=o.eval_samples,
                         final_eval_samples=o.eval_samples, extra={"spsa": spsa},
                         fixed=False)  # this bench drives its own loop, free rounds included


def _spsa_nodes(swarm: Any) -> list[SpsaNode]:
    nodes = [n for n in swarm.nodes if isinstance(n, SpsaNode)]
    if len(nodes) != len(swarm.nodes):
        raise TypeError("expected an --mode spsa swarm")
    return nodes


def _spread(old: list[SpsaNode], joiner: SpsaNode) -> dict[str, float]:
    """The joiner's mean L2 distance to the old nodes beside the old nodes' mean pairwise distance."""
    models = torch.stack([n.trainer.get_flat() for n in old])
    mine = joiner.trainer.get_flat()
    pairs = [float((models[i] - models[j]).norm()) for i in range(len(old)) for j in range(i + 1, len(old))]
    to_old = float((models - mine).norm(dim=1).mean())
    among = sum(pairs) / len(pairs)
    ratio = to_old / among if among else float("inf")
    return {"joiner_to_old": to_old, "old_pairwise": among, "ratio": ratio}


def _max_diff(nodes: list[Any]) -> float:
    models = torch.stack([n.trainer.get_flat() for n in nodes])
    return float((models - models[0]).abs().max())


async def _free_rounds(o: SpsaBenchOptions, nodes: list[SpsaNode], curve: list[dict[str, Any]]) -> None:
    """Every node runs its ``o.rounds`` rounds without waiting for the others; node 0 records the curve."""

    async def loop(node: SpsaNode, record: bool) -> None:
        for r in range(1, o.rounds + 1):
            await node.run_round()
            if record:
                curve.append({"round": r, "scalars": node.scalars_applied, "loss": node.evaluate()[1]})

    await asyncio.gather(*(loop(n, i == 0) for i, n in enumerate(nodes)))


async def _swarm_run(o: SpsaBenchOptions, *, joiner_at: int | None, steps: int) -> dict[str, Any]:
    """``o.nodes`` nodes for ``o.rounds`` rounds (+ drain); with ``joiner_at``, one more node joins then
    (the run with a joiner is always in lockstep, so that "its 5th round" is one moment for everyone)."""
    from p2pnode.inproc import InprocSwarm

    extra = 1 if joiner_at is not None else 0
    swarm = InprocSwarm(_options(o, o.nodes + extra, steps))
    all_nodes = _spsa_nodes(swarm)
    nodes, joiner = all_nodes[: o.nodes], (all_nodes[-1] if extra else None)
    record = swarm.registry.pop(joiner.identity.peer_id) if joiner is not None else None
    for n in nodes:
        await n.transport.start(n.serve)
    curve: list[dict[str, Any]] = [{"round": 0, "scalars": 0, "loss": nodes[0].evaluate()[1]}]
    join: dict[str, Any] | None = None
    members = list(nodes)
    free = joiner is None and not o.lockstep
    if free:
        await _free_rounds(o, nodes, curve)
    lockstep = range(0) if free else range(1, o.rounds + 1)  # (free rounds have run above)
    for r in lockstep:
        if joiner is not None and record is not None and r == joiner_at:
            swarm.registry[record.peer_id] = record
            await joiner.transport.start(joiner.serve)
            joiner.config.spsa.join = True
            members.append(joiner)
        await asyncio.gather(*(n.run_round() for n in members))
        if joiner is not None and r >= (joiner_at or 0) + 4:  # from the joiner's 5th round on
            join = join or {"rounds": [], "joiner_vs_node0_at_5th": _max_diff([nodes[0], joiner]),
                            "node1_vs_node0_at_5th": _max_diff(nodes[:2])}
            join["rounds"].append(_spread(nodes, joiner))
        curve.append({"round": r, "scalars": nodes[0].scalars_applied, "loss": nodes[0].evaluate()[1]})
    if join is not None:
        ratios = sorted(x["ratio"] for x in join["rounds"])
        join["median_ratio"] = ratios[len(ratios) // 2]
        join["max_ratio"] = ratios[-1]
    await asyncio.gather(*(n.drain() for n in members))
    produced = sum(n.scalars_produced for n in members)
    sent = sum(n.transport.stats.bytes_sent for n in members)
    return {"curve": curve, "final_loss": nodes[0].evaluate()[1], "scalars_produced": produced,
            "bytes_sent": sent, "state_bytes_sent": sum(n.state_bytes_sent for n in members),
            "bytes_per_delivered_scalar": sent / (produced * (len(members) - 1)),
            "max_model_diff_end": _max_diff(members), "join": join,
            "wire": {key: sum(n.wire_counts[key] for n in members) for key in members[0].wire_counts},
            "applied": [n.scalars_applied for n in members], "resyncs": [n.resyncs for n in members],
            "equivocations": sum(n.equivocations for n in members),
            "rejected": sum(n.messages_rejected for n in members)}


async def _single_run(o: SpsaBenchOptions) -> dict[str, Any]:
    from p2pnode.inproc import InprocSwarm

    opts = _options(o, 1, o.nodes * o.local_steps)
    (node,) = _spsa_nodes(InprocSwarm(opts))
    curve: list[dict[str, Any]] = [{"round": 0, "scalars": 0, "loss": node.evaluate()[1]}]
    for r in range(1, o.rounds + 1):
        await node.run_round()
        curve.append({"round": r, "scalars": node.scalars_applied, "loss": node.evaluate()[1]})
    return {"curve": curve, "final_loss": curve[-1]["loss"], "scalars_produced": node.scalars_produced}


def run_spsa_bench(o: SpsaBenchOptions) -> dict[str, Any]:
    """Both runs, the JSON and the plot; returns the result."""
    torch.set_num_threads(1)
    unknown = set(o.runs) - {"swarm", "single", "join"}
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}: choose from swarm, single, join")
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()}
    result: dict[str, Any] = {"options": options}
    jobs = {"swarm": lambda: _swarm_run(o, joiner_at=None, steps=o.local_steps),
            "single": lambda: _single_run(o),
            "join_run": lambda: _swarm_run(o, joiner_at=o.join_round, steps=o.join_steps)}
    for key, job in jobs.items():
        if key.removesuffix("_run") in o.runs:
            t0 = time.time()
            result[key] = {**asyncio.run(job()), "wall_time_s": time.time() - t0}
    o.json_path.parent.mkdir(parents=True, exist_ok=True)
    o.json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(result, o.plot_path)
    return result


def plot_curves(results: dict[str, Any] | list[dict[str, Any]], out: Path) -> Path:
    """Held-out loss against perturbations applied, swarm and single node, for one result or several
    (repeats of the same setting: one colour per kind of run, one line per repeat)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = results if isinstance(results, list) else [results]
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = runs[0]["options"]["nodes"]
    for key, label, colour in (("swarm", f"swarm of {n} (one-byte gossip)", "tab:blue"),
                               ("single", "one node, MeZO", "tab:orange")):
        for i, result in enumerate(r for r in runs if key in r):
            curve = result[key]["curve"]
            ax.plot([c["scalars"] for c in curve], [c["loss"] for c in curve], marker="o", markersize=3,
                    color=colour, alpha=0.8, label=label if i == 0 else None)
    ax.set_xlabel("perturbations applied to the model")
    ax.set_ylabel("held-out loss (nats/char)")
    title = f"SPSA fine-tuning: {runs[0]['options']['task']}"
    ax.set_title(title + (f" ({len(runs)} repeats)" if len(runs) > 1 else ""))
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
