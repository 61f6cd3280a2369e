"""The process around one daemon node: DHT, libp2p transport, supervision, signals, checkpoints.

:func:`run_node` is the blocking entry point used by ``p2pnode run``: it builds the trainer (in this
process or, with ``--train-process``, in a child), the DHT and its libp2p transport, the
:class:`~p2pnode.node.Node` for the configured mode, and runs heartbeat, rounds and the operations
endpoints until the rounds and the linger are over or SIGINT/SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defenses import Aggregator, make_aggregator
from p2pnode.config import NodeConfig
from p2pnode.errors import ConfigError, TrainProcessError, TransportClosed
from p2pnode.identity import Identity, load_or_create_identity, require_identity_pow
from p2pnode.node import Node, build_extension, validation_fraction
from p2pnode.outputs import MetricsWriter, write_json_atomic
from p2pnode.proc import die_with_parent as _die_with_parent
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer, limit_threads, resolve_device

if TYPE_CHECKING:
    from p2pnode.operate import Operations

logger = logging.getLogger(__name__)


def build_trainer(config: NodeConfig, task: Any = None) -> LocalTrainer:
    """The node's trainer: its shard of ``config``'s task, the swarm's common initial model."""
    t = config.task
    task = task if task is not None else make_task(t.name, t.data_dir)
    data = task.load(ShardSpec(index=t.shard, count=t.num_shards, partition=t.partition, seed=config.seed))
    model = task.build_model(config.seed)  # one seed for the swarm: every node starts from the same weights
    return LocalTrainer(model, data, batch_size=t.batch_size, device=resolve_device(config.device),
                        seed=config.seed * 100_003 + t.shard, val_fraction=validation_fraction(config),
                        **t.sgd_settings())


def _build_aggregator(spec: str, variance_correction: bool) -> Aggregator:
    try:
        return make_aggregator(spec, variance_correction=variance_correction)
    except ValueError as exc:
        raise ConfigError("gossip.defense", spec, str(exc)) from exc


class NodeRuntime:
    """Owns the DHT, transport and tasks of one node process; ``await run()`` until done or stopped."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self.signalled = False
        self.operations: Operations | None = None  # set once the node runs

    def request_stop(self) -> None:
        """Signal handler: finish the current await points and shut down."""
        self.signalled = True
        self.stop.set()

    async def run(self) -> int:
        cfg = self.config
        aggregator = _build_aggregator(cfg.gossip.defense, cfg.gossip.variance_correction)
        key_path = str(Path(cfg.network.identity).expanduser())  # noqa: ASYNC240 - no I/O, string expansion only
        identity = load_or_create_identity(Path(key_path))
        require_identity_pow(identity, cfg.network.identity_pow_bits)
        task = make_task(cfg.task.name, cfg.task.data_dir)
        trainer: Any
        if cfg.train_process:  # started on the main thread: the child dies with the thread that started it
            from p2pnode.train_process import TrainerProcess

            trainer = TrainerProcess(cfg, task.build_model(cfg.seed))
        else:
            trainer = await asyncio.to_thread(build_trainer, cfg, task)
        try:  # whatever fails from here on, a training process is closed once, after everything else
            if cfg.train_process:
                await asyncio.to_thread(trainer.wait_ready)
            return await self._run_node(identity, key_path, trainer, task, aggregator)
        finally:
            if cfg.train_process:
                await asyncio.to_thread(trainer.close)

    async def _run_node(self, identity: Identity, key_path: str, trainer: Any, task: Any,
                        aggregator: Aggregator) -> int:
        """Start the DHT and the transport, build the node on ``trainer``, serve and run it; stop both."""
        # here, not at the top: hivemind (DHT, libp2p) is only needed where a real node runs
        # (in-process swarms and benches run where it is absent)
        from p2pnode.byzantine import make_node
        from p2pnode.dht import create_dht, visible_maddrs
        from p2pnode.membership import Membership
        from p2pnode.transport.p2p import P2PTransport

        cfg, net = self.config, self.config.network
        # On this (the main) thread, not a worker: the DHT's forked child is told to die with the thread
        # that forked it (see p2pnode.proc.die_with_parent), so a SIGKILLed node leaves no orphan DHT
        # process behind.
        dht = create_dht(  # blocks the loop ~1 s at start-up, before anything is served
            key_path, swarm=net.swarm, initial_peers=net.initial_peers,
            host_maddrs=net.host_maddrs, announce_maddrs=net.announce_maddrs,
            wait_timeout=cfg.timeouts.dht * 3, pow_bits=net.identity_pow_bits)
        transport: P2PTransport | None = None
        p2p = None
        try:
            p2p = await dht.replicate_p2p()
            transport = P2PTransport(p2p, max_message_bytes=net.max_message_bytes,
                                     chunk_bytes=net.chunk_kb * 1024, connect_timeout=cfg.timeouts.connect,
                                     serve_timeout=cfg.timeouts.serve_read)
            rng = random.Random(f"{cfg.seed}/{identity.peer_id}")
            membership = Membership(dht, identity, swarm=net.swarm, heartbeat_s=net.heartbeat_s,
                                    ttl_s=net.record_ttl_s, unreachable_s=net.unreachable_s,
                                    dht_timeout=cfg.timeouts.dht, rng=rng, mode=cfg.gossip.mode,
                                    codec=cfg.gossip.codec, max_peers=net.max_peers,
                                    pow_bits=net.identity_pow_bits)
            if cfg.gossip.mode == "spsa":
                from p2pnode.spsa_node import make_spsa_node

                node: Node = make_spsa_node(cfg, identity, trainer, transport, membership, task)
            elif cfg.gossip.mode == "increments":
                from p2pnode.increments_node import make_increments_node

                node = make_increments_node(cfg, identity, trainer, transport, membership)
            else:
                node = make_node(cfg, identity, trainer, transport, membership, aggregator,
                                 extension=build_extension(cfg, identity, trainer))
            membership.exclude = node.guard.is_banned  # banned peers leave the view
            await asyncio.to_thread(resume_from_checkpoint, cfg, node)
            await transport.start(node.serve)
            return await self._supervise(node, visible_maddrs(dht))
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(transport.close(), cfg.timeouts.shutdown)
            if p2p is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p2p.shutdown(), cfg.timeouts.shutdown)
            await asyncio.to_thread(dht.shutdown)

    async def _supervise(self, node: Node, maddrs: list[str]) -> int:
        """Run heartbeat and rounds in one TaskGroup; stop both on a signal or after the linger."""
        from p2pnode.operate import Operations, run_operations

        cfg, ready = self.config, asyncio.Event()
        ops = Operations(cfg, node, request_stop=self.request_stop)
        self.operations = ops
        metrics = MetricsWriter(cfg.output.metrics_file, listeners=[ops.on_row])
        node.round_hooks.append(ops.after_round)
        outcome: dict[str, Any] = {}
        try:
            async with asyncio.TaskGroup() as tg:
                heartbeat = tg.create_task(node.membership.run(lambda: (node.round, node.fingerprint), ready))
                work = tg.create_task(self._work(node, maddrs, ready, metrics, outcome))
                operate = tg.create_task(run_operations(ops))
                await self.stop.wait()
                for task in (heartbeat, work, operate):
                    task.cancel()
            if self.signalled and cfg.ops.checkpoint_dir is not None and cfg.ops.checkpoint_every > 0:
                await ops.checkpoint()  # SIGTERM: keep the progress since the last periodic checkpoint
        finally:
            metrics.close()
        if outcome.get("error"):
            return 1
        return 0 if outcome.get("finished") or self.signalled or cfg.gossip.rounds == 0 else 1

    async def _work(self, node: Node, maddrs: list[str], ready: asyncio.Event, metrics: MetricsWriter,
                    outcome: dict[str, Any]) -> None:
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.timeouts.dht * 3):
                await ready.wait()
            self._announce(node, maddrs)
            await node.wait_for_peers()
            await node.join_swarm()
            final = await node.run_rounds(metrics)
            if cfg.output.result_file:
                write_json_atomic(cfg.output.result_file, final)
            outcome["finished"] = True
            logger.info("finished %d rounds: test accuracy %.4f; serving peers for %.0f s more",
                        node.round, final["test_accuracy"], cfg.gossip.linger_s)
            await asyncio.sleep(cfg.gossip.linger_s)
        except TimeoutError:
            logger.error("could not publish a membership record within %.0f s", cfg.timeouts.dht * 3)
        except TransportClosed:
            logger.info("transport closed; stopping")
        except TrainProcessError as exc:
            logger.error("%s; stopping", exc)
            outcome["error"] = True
        finally:
            self.stop.set()

    def _announce(self, node: Node, maddrs: list[str]) -> None:
        cfg = self.config
        print(f"p2pnode {node.identity.peer_id} joined swarm {cfg.network.swarm!r}; "
              "other nodes can join with:", flush=True)
        for maddr in maddrs:
            print(f"  --initial-peers {maddr}", flush=True)
        if cfg.output.ready_file:
            write_json_atomic(cfg.output.ready_file, {"peer_id": node.identity.peer_id, "maddrs": maddrs})


def resume_from_checkpoint(config: NodeConfig, node: Node) -> bool:
    """Load ``--checkpoint-dir``'s checkpoint into ``node`` (gossip mode); True when one was loaded.

    SPSA and increments nodes keep more state than the trainer's (the scalar log, the global model):
    their checkpoints are written but not resumed from yet, and that is said in the log.
    """
    from p2pnode.checkpoint import CheckpointError, load_checkpoint, remove_partial_writes

    directory = config.ops.checkpoint_dir
    if directory is None:
        return False
    removed = remove_partial_writes(directory)
    if removed:
        logger.warning("removed %d partial checkpoint write(s) left by an earlier crash in %s", removed,
                       directory)
    state = load_checkpoint(directory)
    if state is None:
        return False
    if state.get("peer_id") != node.identity.peer_id:
        raise CheckpointError(f"{directory}: the checkpoint belongs to peer {state.get('peer_id')}, not to "
                              f"this node ({node.identity.peer_id}); give each node its own --checkpoint-dir")
    if config.gossip.mode != "gossip" or state.get("mode") != "gossip":
        logger.warning("not resuming from %s: resuming is implemented for --mode gossip only", directory)
        return False
    try:
        node.trainer.load_state_dict(state["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: checkpoint does not fit this model and task ({exc})") from exc
    same_defense = state.get("defense") == config.gossip.defense
    for key, part in (("merge_state", node.merge_state), ("extension", node.extension)):
        if key in state and same_defense and part is not None and hasattr(part, "load_state_dict"):
            try:
                part.load_state_dict(state[key])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{directory}: its {key} does not fit this node ({exc})") from exc
    node.round = int(state["round"])
    node._last_good = node.trainer.get_flat()
    logger.info("resumed from %s at round %d", directory, node.round)
    return True


def lower_thread_priority(increment: int) -> None:
    """Add ``increment`` to the calling thread's niceness (Linux: per thread; elsewhere nothing).

    The default executor's threads run local training, evaluation and merges; the event loop thread,
    which answers peers' requests and pings, keeps the process's priority. Under a full CPU the loop
    then gets a core when a request arrives instead of waiting for the training thread's time slice
    (the kernel's scheduler shares CPU by weight: nice 10 weighs about a tenth of nice 0).
    """
    if sys.platform != "linux":
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as exc:  # e.g. a seccomp profile that refuses it: run at the same priority
        logger.debug("could not lower the worker thread's priority: %s", exc)


def run_node(config: NodeConfig) -> int:
    """Run one node until its rounds and linger are over, or SIGINT/SIGTERM; return the exit code."""
    limit_threads(config.threads)
    os.register_at_fork(after_in_child=_die_with_parent)
    runtime = NodeRuntime(config)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        if config.worker_nice:
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix="p2pnode-work", initializer=lower_thread_priority,
                initargs=(config.worker_nice,)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runtime.request_stop)
        return await runtime.run()

    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(main())
    sys.stdout.flush()
    return code
