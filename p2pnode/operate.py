"""Operating one node process: telemetry, the Prometheus endpoint and operator commands.

:class:`Operations` sits beside the node in :class:`~p2pnode.runtime.NodeRuntime`. It keeps the latest
metrics row (it listens to the node's :class:`~p2pnode.outputs.MetricsWriter`), builds the telemetry
snapshot from it, runs the MQTT link and the Prometheus endpoint when configured, and carries out
operator commands that pass :class:`~p2pnode.control.CommandVerifier`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnode.checkpoint import save_checkpoint
from p2pnode.control import Command, CommandVerifier, ControlError
from p2pnode.telemetry import MqttLink, start_prometheus

if TYPE_CHECKING:
    from p2pnode.config import NodeConfig
    from p2pnode.node import Node

logger = logging.getLogger(__name__)

CRASH_EXIT_CODE = 70  # what a node crashed on purpose (test mode) exits with


def node_checkpoint_state(node: Node) -> dict[str, Any]:
    """What a checkpoint of ``node`` holds (see :mod:`p2pnode.checkpoint`): the trainer (model, optimizer,
    sampler), the round, and the defense's and gossip extension's own state where they have one (e.g.
    SybilWall's history). Per-peer codec references are not saved: after a restart the first exchange
    with each peer finds them missing and sends a full snapshot (protocols/replicas.py)."""
    state: dict[str, Any] = {"round": node.round, "mode": node.config.gossip.mode,
                             "peer_id": node.identity.peer_id, "defense": node.config.gossip.defense,
                             "trainer": node.trainer.state_dict()}
    for key, part in (("merge_state", node.merge_state), ("extension", node.extension)):
        if part is not None and hasattr(part, "state_dict"):
            state[key] = part.state_dict()
    return state


class Operations:
    """Telemetry out of, and operator commands into, one node.

    Parameters
    ----------
    config
        The node's configuration (its ``ops`` section says what runs).
    node
        The node being operated.
    request_stop
        Stops the node cleanly (what the ``shutdown`` command calls).
    """

    def __init__(self, config: NodeConfig, node: Node, *, request_stop: Callable[[], None]) -> None:
        self.config = config
        self.node = node
        self._request_stop = request_stop
        self.latest: dict[str, Any] = {}
        self.control_rejected = 0
        self.rejected_by_reason: Counter[str] = Counter()
        self.executed: Counter[str] = Counter()
        self.checkpoints = 0
        self.checkpoint_errors = 0
        self._checkpoint_lock = asyncio.Lock()  # the periodic write and the command's never overlap
        ops = config.ops
        self.verifier = CommandVerifier(ops.operator_keys, swarm=config.network.swarm,
                                        peer_id=node.identity.peer_id, test_mode=ops.test_mode)
        self.link: MqttLink | None = None
        if ops.mqtt is not None:
            host, port = ops.mqtt_address
            self.link = MqttLink(host, port, swarm=config.network.swarm, peer_id=node.identity.peer_id,
                                 interval=ops.telemetry_interval, snapshot=self.snapshot,
                                 on_control=self.on_control)
        self._stop_prometheus: Callable[[], None] | None = None
        self._scraped: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- telemetry -----------------------------------------------------------------------------------
    def on_row(self, row: dict[str, Any]) -> None:
        """MetricsWriter listener: remember the latest value of each field (a final row has no loss)."""
        self.latest.update({k: v for k, v in row.items() if v is not None})

    def snapshot(self) -> dict[str, Any]:
        """The node's latest values (the keys of :data:`p2pnode.telemetry.TELEMETRY_KEYS`)."""
        node, last = self.node, self.latest
        return {**node.counters(), "t": time.time(), "mode": self.config.gossip.mode, "round": node.round,
                "train_loss": last.get("train_loss"), "test_accuracy": last.get("test_accuracy"),
                "test_loss": last.get("test_loss"), "peers_in_view": len(node.membership.live()),
                "control_rejected": self.control_rejected, "checkpoint_errors": self.checkpoint_errors,
                "paused": node.paused}

    async def run(self) -> None:
        """Start the Prometheus endpoint and run the MQTT link (if configured) until cancelled."""
        ops = self.config.ops
        async with asyncio.TaskGroup() as tg:
            if ops.metrics_port:
                # the HTTP server scrapes from its own thread: it reads a copy the event loop refreshes, never
                # the node's live structures
                self._scraped = self.snapshot()
                tg.create_task(self._refresh_scraped(min(ops.telemetry_interval, 1.0)))
                _, self._stop_prometheus = await asyncio.to_thread(start_prometheus, ops.metrics_host,
                                                                   ops.metrics_port, lambda: self._scraped)
                logger.info("prometheus metrics on http://%s:%d/metrics", ops.metrics_host, ops.metrics_port)
            if self.link is not None:
                tg.create_task(self.link.run())

    async def _refresh_scraped(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self._scraped = self.snapshot()

    async def close(self) -> None:
        if self._stop_prometheus is not None:
            await asyncio.to_thread(self._stop_prometheus)
            self._stop_prometheus = None

    # -- control -------------------------------------------------------------------------------------
    def on_control(self, data: bytes) -> None:
        """Check one raw control message and carry it out, or count why it was rejected."""
        try:
            command = self.verifier.open(data)
        except ControlError as exc:
            self.control_rejected += 1
            self.rejected_by_reason[exc.reason] += 1
            logger.warning("%s", exc)
            return
        logger.info("operator %s: %s %s", command.operator, command.cmd, command.args or "")
        self.executed[command.cmd] += 1
        self.execute(command)

    def execute(self, command: Command) -> None:
        node = self.node
        match command.cmd:
            case "pause":
                node.pause()
            case "resume":
                node.resume()
            case "shutdown":
                self._request_stop()
            case "checkpoint":
                self._spawn(self.checkpoint())
            case "crash":  # test mode only: as abrupt as SIGKILL (no cleanup, no offline status)
                os._exit(CRASH_EXIT_CODE)
            case "stall":  # test mode only: freeze the event loop (no rounds, no serving, no heartbeat)
                time.sleep(float(command.args["seconds"]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def after_round(self) -> None:
        """Node round hook: checkpoint every ``--checkpoint-every`` rounds (with --checkpoint-dir)."""
        every = self.config.ops.checkpoint_every
        if self.config.ops.checkpoint_dir is not None and every > 0 and self.node.round % every == 0:
            await self.checkpoint()

    async def checkpoint(self) -> Path | None:
        """Write a checkpoint now (the ``checkpoint`` command); None when no --checkpoint-dir is set."""
        directory = self.config.ops.checkpoint_dir
        if directory is None:
            logger.warning("checkpoint command ignored: this node runs without --checkpoint-dir")
            return None
        async with self._checkpoint_lock:
            state = await asyncio.to_thread(node_checkpoint_state, self.node)
            try:
                path = await asyncio.to_thread(save_checkpoint, directory, state)
            except OSError as exc:  # disk full, directory gone: say so and keep training
                self.checkpoint_errors += 1
                logger.error("round %d: checkpoint to %s failed: %s", state["round"], directory, exc)
                return None
        self.checkpoints += 1
        logger.info("round %d: checkpoint written to %s", state["round"], path)
        return path


async def run_operations(ops: Operations) -> None:
    """Run ``ops`` until cancelled (the MQTT link publishes "offline" then), then close it."""
    try:
        await ops.run()
        await asyncio.Event().wait()  # nothing configured to run: idle until cancelled
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(ops.close())
