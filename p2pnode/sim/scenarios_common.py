"""Shared machinery of the named scenarios (:mod:`p2pnode.sim.scenarios`).

- :func:`run_swarm`: one in-process swarm (:class:`~p2pnode.inproc.InprocSwarm`: the daemon's own
  ``Node`` objects, signed envelopes, the in-memory transport) whose membership views are limited to a
  topology's neighbours (:class:`~p2pnode.sim.topology.NeighbourView`), with optional data-less relay
  nodes (they never train, they only merge and forward) and nodes removed for good after a given round.
  Rounds are synchronous, as in ``run_inproc``, and a seed fixes the result as in any fixed
  in-process run (:mod:`p2pnode.inproc`): one thread, peer ids from the seed, round-clock guards.
- :func:`run_cells`: runs independent cells in a small pool of worker processes (one torch thread each).
- :class:`PaperFigure`: what a paper reports for one row of a scenario's table, with its source.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.bench.robustness import targeted_success

logger = logging.getLogger(__name__)

Adjacency = list[list[int]]


@dataclass(frozen=True, slots=True)
class PaperFigure:
    """The paper's figure for one row: ``value`` (text, as the paper states it, or ``"not found"``),
    ``source`` (paper and table/figure/section), and ``note`` (what the paper claims qualitatively)."""

    value: str
    source: str
    note: str = ""


@dataclass(kw_only=True, slots=True)
class SwarmPlan:
    """One swarm run of a scenario: the in-process options plus topology, relays and removals.

    ``adjacency[i]`` lists node i's neighbours (None: everyone sees everyone). ``relays`` never train
    (data-less: their shard is left unused). After round ``remove_after`` the nodes in ``removed`` leave
    for good (no view offers them again); they are not evaluated.
    """

    options: dict[str, Any]
    adjacency: Adjacency | None = None
    relays: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    remove_after: int = 0
    measure_targeted: tuple[int, int] | None = None  # (src, dst): share of src test images read as dst
    curve: bool = False  # honest mean accuracy after every round (options.eval_every must be 1)
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the result as is


def _no_training(steps: int) -> float:
    """A relay's local training: it has no data, so it takes no step (loss reported as 0)."""
    return 0.0


def _install_views(swarm: Any, adjacency: Adjacency | None, seed: int) -> Any:
    """Replace every node's full view by a :class:`NeighbourView` over ``adjacency``."""
    from p2pnode.sim.topology import NeighbourView, PeerDirectory

    records = list(swarm.registry.values())  # insertion order = node index
    directory = PeerDirectory(records)
    for i, node in enumerate(swarm.nodes):
        neighbours = None if adjacency is None else adjacency[i]
        node.membership = NeighbourView(i, neighbours, directory, random.Random(f"{seed}/view/{i}"))
    return directory


def honest_curve(rows: list[dict[str, Any]], keep: set[int]) -> list[float]:
    """Mean test accuracy per round over the nodes in ``keep`` (rows from the swarm's metrics)."""
    per_round: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r["event"] == "round" and r["node"] in keep and r.get("test_accuracy") is not None:
            per_round[r["round"]].append(r["test_accuracy"])
    return [statistics.fmean(per_round[k]) for k in sorted(per_round)]


def rounds_to_target(curve: Sequence[float], target: float) -> int | None:
    """1-based round at which ``curve`` first reaches ``target`` (None if never)."""
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def run_swarm(plan: SwarmPlan) -> dict[str, Any]:
    """Run one planned swarm; return honest accuracy figures of the evaluated nodes (and the extras).

    Evaluated: honest nodes still up at the end, relays excluded (they hold no data of their own).
    """
    import torch

    from p2pnode.inproc import InprocOptions, InprocSwarm

    torch.set_num_threads(1)
    t0 = time.time()
    opts = InprocOptions(**plan.options)
    swarm = InprocSwarm(opts)  # fixed by default: seeded ids, round-clock guards
    directory = _install_views(swarm, plan.adjacency, opts.seed)
    for i in plan.relays:
        setattr(swarm.nodes[i], "local_training", _no_training)  # noqa: B010 (instance override)

    def remove_planned(r: int) -> None:  # remove plan.removed after round plan.remove_after
        if plan.removed and r == plan.remove_after:
            for i in plan.removed:
                directory.set_alive(i, False)
            swarm.removed.update(plan.removed)

    finals = swarm.execute(after_round=remove_planned)  # one thread: opts.fixed is the default
    relays = set(plan.relays)
    kept = [row for row in finals if swarm.nodes[row["node"]].role == "honest" and row["node"] not in relays]
    keep = [row["node"] for row in kept]
    accs = [row["test_accuracy"] for row in kept]
    result: dict[str, Any] = {
        "honest_accuracy_mean": statistics.fmean(accs), "honest_accuracy_min": min(accs),
        "evaluated_nodes": len(keep), "wall_time_s": round(time.time() - t0, 1),
        "messages_rejected": sum(n.counters()["messages_rejected"] for n in swarm.nodes),
        "local_divergences": sum(n.counters()["local_divergences"] for n in swarm.nodes), **plan.extra}
    if plan.measure_targeted is not None:
        src, dst = plan.measure_targeted
        result.update(targeted_success([swarm.nodes[i] for i in keep], src, dst))
    if plan.curve:
        result["curve"] = [round(a, 4) for a in honest_curve(swarm.rows, set(keep))]
    return result


def _run_cell(fn: Callable[[dict[str, Any]], dict[str, Any]], cell: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**cell, **fn(cell)}
    except Exception as exc:  # one broken cell must not lose the others; it is reported, not hidden
        logger.exception("cell %s failed", cell)
        return {**cell, "error": f"{type(exc).__name__}: {exc}"}


def _worker_init(parent: int) -> None:
    """A cell worker: SIGTERM when the runner dies; exit at once if it already has (the request only
    covers a parent that dies after it is made, and spawning a worker takes seconds)."""
    from p2pnode.proc import die_with_parent

    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)


def run_cells(cells: list[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]], *,
              workers: int = 1, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run ``fn(cell)`` for every cell (in worker processes when ``workers > 1``), in the cells' order.

    ``fn`` must be a module-level function (it is pickled to the workers).
    """
    done: dict[int, dict[str, Any]] = {}

    def note(k: int, row: dict[str, Any]) -> None:
        done[k] = row
        if progress is not None:
            status = row.get("error") or f"{row.get('wall_time_s', '?')} s"
            progress(f"{len(done)}/{len(cells)} {row.get('row', k)}: {status}")

    if workers <= 1 or len(cells) <= 1:
        for k, cell in enumerate(cells):
            note(k, _run_cell(fn, cell))
    else:
        ctx = multiprocessing.get_context("spawn")
        # the workers die with this process: a stopped run must not leave two 5 GiB workers training on
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            futures: dict[Future[dict[str, Any]], int] = {pool.submit(_run_cell, fn, c): k
                                                         for k, c in enumerate(cells)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    note(futures[fut], fut.result())
    return [done[k] for k in range(len(cells))]


def relative_path(path: Path | None) -> str | None:
    return None if path is None else str(path)
