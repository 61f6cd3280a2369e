"""A swarm of real :class:`~p2pnode.node.Node` objects in one process, over the in-memory transport.

Every node runs the daemon's own round loop, signs and verifies every envelope, and merges through
the configured defense; only the libp2p transport and the DHT are replaced, by
:class:`~p2pnode.transport.MemoryTransport` and :class:`FullView` (every other live node is in view).
Rounds are synchronous: in round r every node runs ``run_round`` concurrently, and round r+1 starts
when all have finished. This is what the robustness benchmark runs (20 nodes × many cells would not
fit on a 2-core machine as separate processes); the multi-process ``p2pnode swarm`` runs the same
configurations for real.

By default (``InprocOptions.fixed``) a run is fixed by its seed, as ``p2pnode simulate``'s are: peer ids
come from the seed, :meth:`InprocSwarm.execute` runs every node on one thread (training included, see
:func:`~p2pnode.sim.core.inline_loop_factory`), and the peer guards read a clock of :data:`ROUND_S` per
round (:class:`RoundClock`) rather than wall time. With training in worker threads instead
(``fixed=False``, what the throughput benches need), whether a node reads a peer's model before or
after that peer's merge depends on timing, and two runs of one seed differ by several points.

It writes the same ``summary.json`` contract as ``p2pnode swarm``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from defenses import make_aggregator
from p2pnode.config import AttackConfig, GossipConfig, NodeConfig, SpsaConfig, TaskConfig
from p2pnode.identity import Identity
from p2pnode.node import Node, PeerView, build_extension, model_layers, validation_fraction
from p2pnode.report import plot_accuracy
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer, resolve_device
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.records import MembershipRecord

logger = logging.getLogger(__name__)

NodeFactory = Callable[..., Node]

ROUND_S = 1.0  # what one round counts as on a fixed run's peer-guard clock (rate limits, ban recovery)
EXCHANGE_TIMEOUT_S = 3600.0  # a fixed run trains inline: a peer's answer waits for its training


class RoundClock:
    """A clock that reads :data:`ROUND_S` per round of a fixed run (its driver sets ``now``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(kw_only=True, slots=True)
class InprocOptions:
    """One in-process swarm run. Byzantine nodes are the last ``byzantine`` indices."""

    nodes: int = 8
    byzantine: int = 0
    attack: str = ""
    rounds: int = 20
    task: str = "fashion-mnist"
    partition: str = "iid"
    fanout: int = 2
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    max_grad_norm: float = 0.0  # TaskConfig.max_grad_norm: clip each local step's gradient (0 = off)
    defense: str = "mean"
    codec: str = "dense"
    mode: str = "gossip"  # | "increments" | "spsa" (``extra`` may then hold SpsaConfig fields: {"lr": 1e-4})
    variance_correction: bool = False
    seed: int = 0
    independent_init: bool = False  # each node starts from its own random weights (vanishing variance)
    eval_every: int = 0  # 0: only the final evaluation
    eval_samples: int = 2000
    final_eval_samples: int = 10_000
    overlap: bool = False  # GossipConfig.overlap: the next round's local steps run during the exchange
    device: str = "cpu"  # where every node trains: cpu | cuda | cuda:N | auto (they share it)
    fixed: bool = True  # the seed fixes the run: one thread, round-clock guards (module docstring)
    data_dir: str | None = None  # the task's data files (default: the task's own location)
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.byzantine < self.nodes:
            raise ValueError(f"byzantine must be in [0, nodes), got {self.byzantine} of {self.nodes}")
        if self.byzantine and not self.attack:
            raise ValueError("byzantine > 0 needs an attack")


class FullView:
    """Membership view of an in-process swarm: every other registered, live node."""

    def __init__(self, own: str, registry: dict[str, MembershipRecord], rng: random.Random) -> None:
        self.own, self.registry, self.rng = own, registry, rng
        self.rejected = 0
        self._down: set[str] = set()

    def live(self) -> list[MembershipRecord]:
        return [r for p, r in self.registry.items() if p != self.own and p not in self._down]

    def sample(self, k: int) -> list[MembershipRecord]:
        live = self.live()
        return self.rng.sample(live, min(k, len(live)))

    def mark_unreachable(self, peer_id: str) -> None:
        self._down.add(peer_id)

    def mark_alive(self, peer_id: str) -> None:
        self._down.discard(peer_id)

    async def refresh(self) -> list[MembershipRecord]:
        return self.live()

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()


def node_config(opts: InprocOptions, i: int) -> NodeConfig:
    """Node i's configuration in a run of ``opts`` (the simulator builds its nodes from it too)."""
    byz = i >= opts.nodes - opts.byzantine
    shard = shard_spec(opts, i)
    task = TaskConfig(name=opts.task, data_dir=opts.data_dir, partition=opts.partition, shard=shard.index,
                      num_shards=shard.count, batch_size=opts.batch_size, lr=opts.lr,
                      local_steps=opts.local_steps, eval_every=opts.eval_every or 10**9,
                      eval_samples=opts.eval_samples, max_grad_norm=opts.max_grad_norm)
    gossip = GossipConfig(rounds=opts.rounds, fanout=opts.fanout, defense=opts.defense, codec=opts.codec,
                          mode=opts.mode, overlap=opts.overlap,
                          variance_correction=opts.variance_correction,
                          # in-process and simulated rounds run in lock-step on one CPU, where a slow
                          # exchange is a busy loop, not a slow peer; the simulator's clock models links
                          straggler_factor=0.0)
    spsa = SpsaConfig(**opts.extra.get("spsa", {}))
    cfg = NodeConfig(device=opts.device, seed=opts.seed, task=task, gossip=gossip, spsa=spsa,
                     attack=AttackConfig(name=opts.attack if byz else ""))
    cfg.network.swarm = "inproc"
    return cfg


def default_factory(config: NodeConfig, identity: Identity, trainer: LocalTrainer,
                    transport: MemoryTransport, view: PeerView) -> Node:
    """The daemon's node for ``config``: honest or Byzantine gossip, SPSA or increments mode."""
    from p2pnode.byzantine import make_node

    if config.gossip.mode == "spsa":
        from p2pnode.spsa_node import make_spsa_node

        task = make_task(config.task.name, config.task.data_dir)
        return make_spsa_node(config, identity, trainer, transport, view, task)
    if config.gossip.mode == "increments":
        from p2pnode.increments_node import make_increments_node

        return make_increments_node(config, identity, trainer, transport, view)
    aggregator = make_aggregator(config.gossip.defense, variance_correction=config.gossip.variance_correction)
    return make_node(config, identity, trainer, transport, view, aggregator,
                     extension=build_extension(config, identity, trainer))


def shard_spec(opts: InprocOptions, i: int) -> ShardSpec:
    """Node i's shard. Sybil identities are one attacker: they all train on the attacker's single shard."""
    honest = opts.nodes - opts.byzantine
    if opts.attack.startswith("sybil") and opts.byzantine:
        return ShardSpec(index=min(i, honest), count=honest + 1, partition=opts.partition, seed=opts.seed)
    return ShardSpec(index=i, count=opts.nodes, partition=opts.partition, seed=opts.seed)


def _build_trainer(opts: InprocOptions, cfg: NodeConfig, i: int) -> LocalTrainer:
    task = make_task(opts.task, opts.data_dir)
    data = task.load(shard_spec(opts, i))
    init_seed = opts.seed * 1000 + i if opts.independent_init else opts.seed
    t = cfg.task
    shard = shard_spec(opts, i).index  # Sybil identities share the attacker's shard and batch order
    return LocalTrainer(task.build_model(init_seed), data, batch_size=t.batch_size,
                        device=resolve_device(opts.device), seed=opts.seed * 100_003 + shard,
                        val_fraction=validation_fraction(cfg), **t.sgd_settings())


_node_config, _shard, _default_factory = node_config, shard_spec, default_factory  # the former names


class InprocSwarm:
    """Builds the nodes of an :class:`InprocOptions` run and drives them round by round."""

    def __init__(self, opts: InprocOptions, *, factory: NodeFactory = default_factory) -> None:
        self.opts = opts
        self.network = MemoryNetwork()
        self.registry: dict[str, MembershipRecord] = {}
        self.nodes: list[Node] = []
        self.rows: list[dict[str, Any]] = []
        self.clock = RoundClock()
        # indices of nodes taken out of the run: they make no more rounds and are not evaluated at the
        # end (their transport still answers; whoever removes them also takes them out of the views)
        self.removed: set[int] = set()
        identities = [Identity.simulated(f"{opts.seed}/{i}") for i in range(opts.nodes)]
        # Sybil identities are one attacker: each knows the others' peer ids (its allies)
        allies = ([ident.peer_id for ident in identities[opts.nodes - opts.byzantine:]]
                  if opts.attack.startswith("sybil") else [])
        for i, identity in enumerate(identities):
            cfg = node_config(opts, i)
            if cfg.attack.name:
                cfg.attack.allies = list(allies)
            trainer = _build_trainer(opts, cfg, i)
            transport = MemoryTransport(self.network, identity.peer_id)
            view = FullView(identity.peer_id, self.registry, random.Random(f"{opts.seed}/{i}"))
            node = factory(cfg, identity, trainer, transport, view)
            if opts.fixed:
                node.guard.clock = self.clock
                node.config.timeouts.exchange = EXCHANGE_TIMEOUT_S
            self.nodes.append(node)
            self.registry[identity.peer_id] = MembershipRecord(
                peer_id=identity.peer_id, swarm="inproc", maddrs=(), round=0, mode=opts.mode,
                codec=opts.codec, model_fingerprint=b"", timestamp=time.time())

    def up(self) -> list[int]:
        """Indices of the nodes still in the run (not :attr:`removed`)."""
        return [i for i in range(len(self.nodes)) if i not in self.removed]

    async def run(self, progress: Callable[[int], None] | None = None, *,
                  after_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Run every round on every node still up; return the final per-node results of those.

        ``after_round(r)`` runs after round ``r``'s rows are written, before ``progress(r)``: a scenario
        takes nodes out there (:attr:`removed`).
        """
        for node in self.nodes:
            await node.transport.start(node.serve)
        for r in range(1, self.opts.rounds + 1):
            self.clock.now = r * ROUND_S
            up = self.up()
            reports = await asyncio.gather(*(self.nodes[i].run_round() for i in up))
            for i, rep in zip(up, reports, strict=True):
                node = self.nodes[i]
                self.rows.append({"event": "round", "node": i, "role": node.role, **node.counters(),
                                  **asdict(rep)})
            if after_round is not None:
                after_round(r)
            if progress is not None:
                progress(r)
        up = self.up()
        if self.opts.mode == "spsa":  # exchange only, until every scalar has reached every node
            await asyncio.gather(*(self.nodes[i].drain() for i in up))  # type: ignore[attr-defined]
        n_eval = self.opts.final_eval_samples
        finals = await asyncio.gather(*(asyncio.to_thread(self.nodes[i].trainer.evaluate, n_eval)
                                        for i in up))
        results = []
        for i, (acc, loss) in zip(up, finals, strict=True):
            node = self.nodes[i]
            row = {"event": "final", "node": i, **node.counters(), "rounds": node.round, "round": node.round,
                   "test_accuracy": acc, "test_loss": loss}
            self.rows.append(row)
            results.append(row)
        return results

    def execute(self, progress: Callable[[int], None] | None = None, *,
                after_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """:meth:`run` to the end on a new event loop: one thread if ``opts.fixed``, else worker threads."""
        if not self.opts.fixed:
            return asyncio.run(self.run(progress, after_round=after_round))
        from p2pnode.sim.core import inline_loop_factory

        with asyncio.Runner(loop_factory=inline_loop_factory()) as runner:
            return runner.run(self.run(progress, after_round=after_round))

    def models(self, honest_only: bool = True) -> torch.Tensor:
        """The current flat models stacked, shape ``(n, d)``."""
        chosen = [n for n in self.nodes if not honest_only or n.role == "honest"]
        return torch.stack([n.trainer.get_flat() for n in chosen])

    def layers(self) -> list[Any]:
        return model_layers(self.nodes[0].trainer.model)


def summarize(opts: InprocOptions, results: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
    """The ``summary.json`` contract shared with ``p2pnode swarm``."""
    keys = ("node", "peer_id", "role", "rounds", "test_accuracy", "test_loss", "bytes_sent", "bytes_received",
            "messages_rejected")
    nodes = [{k: r[k] for k in keys} for r in results]
    honest = [n["test_accuracy"] for n in nodes if n["role"] != "byzantine"]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    return {"config": config, "wall_time_s": round(wall_time_s, 3), "nodes": nodes,
            "honest_accuracy_mean": sum(honest) / len(honest), "honest_accuracy_min": min(honest),
            "runner": "inproc"}


def run_inproc(opts: InprocOptions, *, factory: NodeFactory = default_factory,
               progress: Callable[[int], None] | None = None,
               measure: Callable[[InprocSwarm], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one in-process swarm and return its summary (also written under ``opts.out`` if set).

    ``measure`` is called with the finished swarm; what it returns is stored as ``summary["measures"]``.
    """
    t0 = time.time()
    swarm = InprocSwarm(opts, factory=factory)
    results = swarm.execute(progress)
    summary = summarize(opts, results, time.time() - t0)
    if measure is not None:
        summary["measures"] = measure(swarm)
    if opts.out is not None:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in swarm.rows)
        plot_accuracy(swarm.rows, out / "accuracy.png", title=f"{opts.task}: {opts.nodes} nodes (in-process)")
    return summary
