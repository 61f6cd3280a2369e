"""The simulator behind ``p2pnode simulate``: N virtual nodes in one process, on a virtual clock.

Every virtual node is the daemon's own :class:`~p2pnode.node.Node` (or
:class:`~p2pnode.byzantine.ByzantineNode`), built by the same factory as the in-process swarm
(:func:`p2pnode.inproc.default_factory`): it signs and verifies every envelope, encodes and decodes
through the configured codec and merges through the configured defense. What the simulator replaces:

- the transport, by :class:`SimTransport` (the in-memory transport, which counts bytes as libp2p does,
  plus the virtual clock's accounting and churn: a node that has left answers nothing);
- membership, by :class:`~p2pnode.sim.topology.NeighbourView` (only a node's live neighbours in the
  chosen topology);
- the wall clock, by :class:`~p2pnode.sim.clock.VirtualClock` (per-link latency and bandwidth, a
  compute time per SGD step; nothing sleeps). Each node's peer guard (rate limits, bans) runs on it;
- the local training of small models: when the model has no buffers, all nodes' models are the rows
  of one :class:`~p2pnode.sim.batched.ModelStack`, trained in one vmapped batch per round before the
  nodes' ``run_round`` calls, which then see exactly what a ``LocalTrainer`` would have given them;
- worker threads: ``asyncio.to_thread`` runs the job at once on the event loop's thread and returns a
  finished future (:func:`inline_loop_factory`): the jobs are short, one thread keeps a run
  deterministic for a seed, and a thread hand-off per call would cost more than most jobs.

Rounds are synchronous: in round r, after the churn events, the live nodes train, then all run
``Node.run_round`` concurrently; round r+1 starts when all have finished. The run writes the
``summary.json`` contract of ``p2pnode swarm`` (plus simulator fields: virtual time, peak memory,
topology, churn) and ``metrics.jsonl`` (the same ``round``/``final`` events, and one ``sim_round``
event per round).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from p2pnode.errors import ConfigError, PeerUnreachable
from p2pnode.identity import Identity
from p2pnode.inproc import InprocOptions, default_factory, node_config, shard_spec
from p2pnode.node import Node, validation_fraction
from p2pnode.sim.batched import ModelStack, RowTrainer, initial_rows, stackable
from p2pnode.sim.churn import Churn, ChurnError, parse_churn
from p2pnode.sim.clock import LinkModel, VirtualClock
from p2pnode.sim.data import load_shards
from p2pnode.sim.topology import NeighbourView, PeerDirectory, Topology, components, degrees, parse_topology
from p2pnode.tasks import make_task
from p2pnode.trainer import LocalTrainer, resolve_device
from p2pnode.transport import MemoryNetwork, MemoryTransport
from p2pnode.transport.framing import framed_size
from protocols.records import MembershipRecord

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, Any]], None]
BATCHED_ALLOWED = "auto | on | off"


@dataclass(kw_only=True, slots=True)
class SimOptions(InprocOptions):
    """One simulation: :class:`~p2pnode.inproc.InprocOptions` plus topology, churn and the clock model.

    ``byzantine_frac``, when given, sets ``byzantine = round(frac * nodes)`` (at least 1 if frac > 0).
    """

    task: str = "digits"
    topology: str = "full"
    byzantine_frac: float | None = None
    churn: str = ""
    latency_ms: float = 20.0
    bandwidth_mbps: float = 100.0
    link_jitter: float = 0.5
    step_ms: float = 5.0
    batched: str = "auto"
    plot_nodes: int = 200  # nodes whose rows go to the report's plots (metrics.jsonl has them all)

    def __post_init__(self) -> None:
        if self.byzantine_frac is not None:
            if not 0.0 <= self.byzantine_frac < 1.0:
                raise ConfigError("byzantine_frac", self.byzantine_frac, "a fraction in [0, 1)")
            count = round(self.byzantine_frac * self.nodes)
            self.byzantine = max(count, 1) if self.byzantine_frac > 0 else 0
        if self.nodes < 2:
            raise ConfigError("nodes", self.nodes, "integer >= 2")
        if self.rounds < 1:
            raise ConfigError("rounds", self.rounds, "integer >= 1")
        if self.batched not in ("auto", "on", "off"):
            raise ConfigError("batched", self.batched, BATCHED_ALLOWED)
        if self.mode != "gossip" and self.batched == "on":
            raise ConfigError("batched", self.batched, "auto | off (batched training is for --mode gossip)")
        for name in ("latency_ms", "step_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "a number >= 0")
        if self.bandwidth_mbps <= 0:
            raise ConfigError("bandwidth_mbps", self.bandwidth_mbps, "a number > 0")
        if not 0 <= self.link_jitter < 1:
            raise ConfigError("link_jitter", self.link_jitter, "a number in [0, 1)")
        try:
            parse_topology(self.topology)
        except ValueError as exc:
            raise ConfigError("topology", self.topology, str(exc)) from None
        try:
            parse_churn(self.churn).check_nodes(self.nodes)
        except ChurnError as exc:
            raise ConfigError("churn", self.churn, str(exc)) from None
        self.overlap = False  # the next round's training never overlaps the exchange here
        if self.byzantine >= self.nodes:
            raise ConfigError("byzantine", self.byzantine, f"fewer than nodes ({self.nodes})")
        InprocOptions.__post_init__(self)


def inline_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of event loops (uvloop's when installed) whose ``run_in_executor``, and so
    ``asyncio.to_thread``, runs the job at once on the loop's thread and returns a finished future.

    Awaiting a finished future does not yield, so a node's ``run_round`` runs from its training to its
    first exchange without a pause; the exchanges themselves still interleave (they await each other).
    """
    try:
        import uvloop

        base: type = uvloop.Loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        base = asyncio.SelectorEventLoop

    class InlineLoop(base):  # type: ignore[misc, valid-type]
        def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            future = self.create_future()
            try:
                future.set_result(func(*args))
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # handed to the awaiting coroutine, as a worker thread would
                future.set_exception(exc)
            return future

    return InlineLoop


class SimTransport(MemoryTransport):
    """The in-memory transport of virtual node ``index``: charges each exchange it makes to the
    virtual clock, and answers nothing while the node is down (churn)."""

    def __init__(self, network: MemoryNetwork, peer_id: str, *, index: int, clock: VirtualClock,
                 index_of: dict[str, int]) -> None:
        super().__init__(network, peer_id)
        self.index, self.clock, self.index_of = index, clock, index_of
        self.up = True

    async def _roundtrip(self, peer_id: str, request: bytes) -> bytes:
        reply = b""
        try:
            reply = await super()._roundtrip(peer_id, request)
            return reply
        finally:
            peer = self.index_of.get(peer_id)
            if peer is not None:
                self.clock.note_exchange(self.index, peer, framed_size(len(request)),
                                         framed_size(len(reply)) if reply else 0)

    async def _serve(self, sender: str, request: bytes) -> tuple[int, bytes]:
        if not self.up:
            raise PeerUnreachable("peer is down (churn)", peer=self.peer_id)
        return await super()._serve(sender, request)


def prefer_batched(model: torch.nn.Module, nodes: int) -> bool:
    """``--batched auto``: stack the models unless they are convolutional and few (vmapped convolutions
    are slower than one model's own on a CPU; with many nodes the batch wins anyway)."""
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
    return not has_conv or nodes >= 64


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plot_subset(n: int, byzantine: int, limit: int) -> set[int]:
    """Nodes whose rows feed the plots: all when few, else evenly spaced honest ones and some attackers."""
    if n <= limit:
        return set(range(n))
    honest = n - byzantine
    keep_byz = min(byzantine, max(1, limit // 5)) if byzantine else 0
    step = max(1, honest // max(1, limit - keep_byz))
    chosen = set(range(0, honest, step))
    chosen |= set(range(n - byzantine, n - byzantine + keep_byz))
    return chosen


class Simulation:
    """Builds the virtual nodes of a :class:`SimOptions` run and drives them (module docstring)."""

    def __init__(self, opts: SimOptions) -> None:
        t0 = time.perf_counter()
        self.opts = opts
        n = opts.nodes
        self.topology: Topology = parse_topology(opts.topology)
        self.adjacency = self.topology.build(n, opts.seed)
        self.churn: Churn = parse_churn(opts.churn)
        self.churn_rng = random.Random(f"{opts.seed}/churn")
        links = LinkModel(latency_s=opts.latency_ms / 1000, bandwidth_bps=opts.bandwidth_mbps * 1e6 / 8,
                          jitter=opts.link_jitter, seed=opts.seed)
        self.clock = VirtualClock(links=links, step_s=opts.step_ms / 1000)
        specs = [shard_spec(opts, i) for i in range(n)]
        datas, n_train = load_shards(opts.task, opts.data_dir, specs)
        self.shard_info = {"train_samples": n_train,
                           "shards": len({(s.index % n_train) if n_train > 0 else s.index for s in specs}),
                           "shard_sizes": _stats([len(d.train_y) for d in datas])}
        configs = [node_config(opts, i) for i in range(n)]
        task = make_task(opts.task, opts.data_dir)
        template = task.build_model(opts.seed)
        want = opts.batched
        can = opts.mode == "gossip" and stackable(template)
        if want == "on" and not can:
            raise ConfigError("batched", want, "off for this task (its model has buffers)")
        self.batched = can and (want == "on" or (want == "auto" and prefer_batched(template, n)))
        device = resolve_device(opts.device)
        init_seeds = [opts.seed * 1000 + i if opts.independent_init else opts.seed for i in range(n)]
        t = configs[0].task
        self.stack: ModelStack | None = None
        trainers: list[Any]
        if self.batched:
            self.stack = ModelStack(template, initial_rows(task.build_model, init_seeds),
                                    test_x=datas[0].test_x, test_y=datas[0].test_y,
                                    num_classes=datas[0].num_classes, device=device, **t.sgd_settings())
            for i, (data, cfg) in enumerate(zip(datas, configs)):
                self.stack.set_data(i, data.train_x, data.train_y, batch_size=cfg.task.batch_size,
                                    seed=opts.seed * 100_003 + specs[i].index,
                                    val_fraction=validation_fraction(cfg))
            trainers = [RowTrainer(self.stack, i) for i in range(n)]
        else:
            trainers = [LocalTrainer(task.build_model(init_seeds[i]), data, batch_size=cfg.task.batch_size,
                                     device=device, seed=opts.seed * 100_003 + specs[i].index,
                                     val_fraction=validation_fraction(cfg), **cfg.task.sgd_settings())
                        for i, (data, cfg) in enumerate(zip(datas, configs))]
        del datas
        identities = [Identity.simulated(f"{opts.seed}/{i}") for i in range(n)]
        allies = ([ident.peer_id for ident in identities[n - opts.byzantine:]]
                  if opts.attack.startswith("sybil") else [])
        records = [MembershipRecord(peer_id=ident.peer_id, swarm=configs[0].network.swarm, maddrs=(),
                                    round=0, mode=opts.mode, codec=opts.codec, model_fingerprint=b"",
                                    timestamp=time.time())
                   for ident in identities]
        self.directory = PeerDirectory(records)
        self.network = MemoryNetwork()
        self.nodes: list[Node] = []
        self.transports: list[SimTransport] = []
        for i, (identity, cfg) in enumerate(zip(identities, configs)):
            if cfg.attack.name:
                cfg.attack.allies = list(allies)
            transport = SimTransport(self.network, identity.peer_id, index=i, clock=self.clock,
                                     index_of=self.directory.index)
            neighbours = None if self.adjacency is None else self.adjacency[i]
            view = NeighbourView(i, neighbours, self.directory, random.Random(f"{opts.seed}/{i}"))
            node = default_factory(cfg, identity, cast(LocalTrainer, trainers[i]), transport, view)
            node.guard.clock = self.clock  # rate limits and bans run on virtual time
            self.nodes.append(node)
            self.transports.append(transport)
        self.trains = [getattr(getattr(node, "attack", None), "trains", True) for node in self.nodes]
        self.plotted = _plot_subset(n, opts.byzantine, opts.plot_nodes)
        self.rows: list[dict[str, Any]] = []  # rows of the plotted nodes
        self.rounds_log: list[dict[str, Any]] = []
        self.timing = {"build_s": time.perf_counter() - t0, "train_s": 0.0, "rounds_s": 0.0, "eval_s": 0.0}
        self._metrics: IO[str] | None = None
        logger.info("built %d virtual nodes in %.1f s (%s training)", n, self.timing["build_s"],
                    "batched" if self.batched else "per-node")

    # -- one round ------------------------------------------------------------------------------------
    def _apply_churn(self, r: int) -> list[tuple[int, bool]]:
        events = self.churn.events(r, self.directory.alive, self.churn_rng)
        for i, up in events:
            self.directory.set_alive(i, up)
            self.transports[i].up = up
        return events

    def _needs_before(self, i: int) -> bool:
        node = self.nodes[i]
        return node.extension is not None or node.role == "byzantine"

    def _emit(self, row: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(row) + "\n")
        if row.get("node") in self.plotted:
            self.rows.append(row)

    def _evaluate(self, idx: list[int], samples: int | None) -> list[tuple[float, float]]:
        t0 = time.perf_counter()
        try:
            if self.stack is not None:
                return self.stack.evaluate(idx, samples)
            return [self.nodes[i].trainer.evaluate(samples) for i in idx]
        finally:
            self.timing["eval_s"] += time.perf_counter() - t0

    async def _round(self, r: int) -> dict[str, Any]:
        opts = self.opts
        events = self._apply_churn(r)
        live = [i for i in range(opts.nodes) if self.directory.alive[i]]
        self.clock.begin_round()
        steps = {i: opts.local_steps if self.trains[i] else 0 for i in live}
        if self.stack is not None:
            t0 = time.perf_counter()
            self.stack.clear_pending()
            self.stack.train([i for i in live if self.trains[i]], opts.local_steps,
                             keep_before=self._needs_before)
            self.timing["train_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        reports = await asyncio.gather(*(self.nodes[i].run_round() for i in live))
        self.timing["rounds_s"] += time.perf_counter() - t0
        duration = self.clock.end_round(steps)
        accs: dict[int, tuple[float, float]] = {}
        if opts.eval_every and r % opts.eval_every == 0 and live:
            accs = dict(zip(live, self._evaluate(live, opts.eval_samples)))
        for i, rep in zip(live, reports):
            node = self.nodes[i]
            row = {"event": "round", "node": i, "t": round(self.clock.now, 6), **node.counters(),
                   **asdict(rep), "sim_round": r,
                   "virtual_round_s": round(self.clock.node_round_s(i, steps[i]), 6)}
            if i in accs:
                row["test_accuracy"], row["test_loss"] = accs[i]
            self._emit(row)
        honest = [accs[i][0] for i in live if i in accs and self.nodes[i].role != "byzantine"]
        entry = {"event": "sim_round", "round": r, "live": len(live),
                 "left": sum(1 for _, up in events if not up), "returned": sum(1 for _, up in events if up),
                 "virtual_round_s": round(duration, 6), "virtual_time_s": round(self.clock.now, 6),
                 "train_loss_mean": statistics.fmean(rep.train_loss for rep in reports) if reports else None}
        if honest:
            entry["honest_accuracy_mean"] = statistics.fmean(honest)
        self.rounds_log.append(entry)
        if self._metrics is not None:
            self._metrics.write(json.dumps(entry) + "\n")
        return entry

    async def _run(self, progress: Progress | None) -> list[dict[str, Any]]:
        for node in self.nodes:
            await node.transport.start(node.serve)
        wall0 = time.perf_counter()
        for r in range(1, self.opts.rounds + 1):
            entry = await self._round(r)
            if progress is not None:
                progress(r, self.opts.rounds, {**entry, "wall_s": time.perf_counter() - wall0})
        everyone = list(range(self.opts.nodes))
        finals = self._evaluate(everyone, self.opts.final_eval_samples)
        results = []
        for i, (acc, loss) in zip(everyone, finals):
            node = self.nodes[i]
            row = {"event": "final", "node": i, "t": round(self.clock.now, 6), **node.counters(),
                   "rounds": node.round, "round": node.round, "test_accuracy": acc, "test_loss": loss,
                   "finished": bool(self.directory.alive[i])}
            self._emit(row)
            results.append(row)
        return results

    def run(self, progress: Progress | None = None, metrics_path: Path | None = None) -> list[dict[str, Any]]:
        """Run every round; return each node's final row. Metrics go to ``metrics_path`` as they come."""
        if metrics_path is not None:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            self._metrics = open(metrics_path, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        try:
            return _run_loop(self._run(progress))
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None

    # -- summary --------------------------------------------------------------------------------------
    def summarize(self, results: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
        """The ``summary.json`` contract of ``p2pnode swarm``, plus the simulator's own fields."""
        keys = ("node", "peer_id", "role", "rounds", "test_accuracy", "test_loss", "bytes_sent",
                "bytes_received", "messages_rejected", "finished")
        nodes = [{**{k: r[k] for k in keys}, "exit_code": None} for r in results]
        honest = [x for x in nodes if x["role"] != "byzantine"]
        accs = [x["test_accuracy"] for x in honest]
        live_accs = [x["test_accuracy"] for x in honest if x["finished"]]
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.opts).items()}
        topo: dict[str, Any] = {"spec": str(self.topology)}
        if self.adjacency is not None:
            deg = degrees(self.adjacency)
            topo.update(edges=sum(deg) // 2, degree=_stats(deg), components=len(components(self.adjacency)))
        virtual = self.clock.rounds
        return {
            "config": config, "wall_time_s": round(wall_time_s, 3), "nodes": nodes,
            "honest_accuracy_mean": statistics.fmean(accs) if accs else 0.0,
            "honest_accuracy_min": min(accs) if accs else 0.0,
            "honest_accuracy_mean_live": statistics.fmean(live_accs) if live_accs else 0.0,
            "all_finished": all(x["finished"] for x in nodes), "runner": "simulator",
            "out": str(self.opts.out) if self.opts.out is not None else None,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "virtual_time_s": round(self.clock.now, 4),
            "virtual_round_s": {"mean": round(statistics.fmean(virtual), 6) if virtual else 0.0,
                                "max": round(max(virtual), 6) if virtual else 0.0},
            "clock": {"latency_ms": self.opts.latency_ms, "bandwidth_mbps": self.opts.bandwidth_mbps,
                      "link_jitter": self.opts.link_jitter, "step_ms": self.opts.step_ms,
                      "exchanges": self.clock.exchanges},
            "topology": topo,
            "churn": {"spec": self.opts.churn, "left": sum(e["left"] for e in self.rounds_log),
                      "returned": sum(e["returned"] for e in self.rounds_log),
                      "live_at_end": sum(self.directory.alive)},
            "data": self.shard_info,
            "training": "batched" if self.batched else "per-node",
            "timing_s": {k: round(v, 3) for k, v in self.timing.items()},
            "rounds_log": self.rounds_log,
        }


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 3)}


def _run_loop(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=inline_loop_factory()) as runner:
        return runner.run(coro)


def run_simulation(opts: SimOptions, *, progress: Progress | None = None, report: bool = True
                   ) -> dict[str, Any]:
    """Run one simulation and return its summary.

    With ``opts.out`` set, writes ``summary.json``, ``metrics.jsonl`` (every node's rows) and, with
    ``report``, the report of ``p2pnode report`` (plots of up to ``opts.plot_nodes`` nodes, index.html).
    """
    t0 = time.perf_counter()
    sim = Simulation(opts)
    out = Path(opts.out) if opts.out is not None else None
    results = sim.run(progress, metrics_path=out / "metrics.jsonl" if out is not None else None)
    summary = sim.summarize(results, time.perf_counter() - t0)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if report:
            from p2pnode.run_report import write_report

            write_report(sim.rows, summary, out)
    return summary
