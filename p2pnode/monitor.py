"""``p2pnode monitor``: a live table of a swarm, built from the nodes' MQTT telemetry.

It subscribes to ``p2pnode/<swarm>/+/metrics`` and ``p2pnode/<swarm>/+/status`` (both retained, so a
monitor started late sees every node at once) and shows one row per node: round, accuracy, loss, peers
in view, bytes, rejections and a state — ``online``, ``paused``, ``offline`` (the node said so, or the
broker published its last will), or ``stale`` (no telemetry newer than ``--stale-after`` seconds: the
node is frozen, partitioned or its clock is off).

Payloads are untrusted: each is size-checked before it is parsed, and anything that is not a JSON object
with the expected field types is dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from p2pnode.telemetry import TOPIC_ROOT

MAX_PAYLOAD = 16 * 1024
_NUMERIC = ("t", "round", "train_loss", "test_accuracy", "test_loss", "peers_in_view", "bytes_sent",
            "bytes_received", "messages_rejected", "control_rejected")


@dataclass(slots=True)
class NodeView:
    """What the monitor knows about one node."""

    swarm: str
    peer_id: str
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    received_at: float = 0.0  # local time of the last metrics message


class SwarmState:
    """Folds telemetry messages into one :class:`NodeView` per (swarm, peer id)."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], NodeView] = {}
        self.dropped = 0

    def apply(self, topic: str, payload: bytes, *, now: float | None = None) -> bool:
        """Take one message; False (and counted) when it is not a well-formed telemetry message."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[3] not in ("metrics", "status"):
            return False  # a control topic or a stranger's: not telemetry, not an error
        if len(payload) > MAX_PAYLOAD:
            self.dropped += 1
            return False
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict):
            self.dropped += 1
            return False
        swarm, peer_id, kind = parts[1], parts[2], parts[3]
        view = self.nodes.setdefault((swarm, peer_id), NodeView(swarm, peer_id))
        if kind == "status":
            status = obj.get("status")
            if status not in ("online", "offline"):
                self.dropped += 1
                return False
            view.status = status
            return True
        clean = {k: v for k, v in obj.items() if k not in _NUMERIC or _is_number(v)}
        view.metrics = clean
        view.received_at = time.time() if now is None else now
        return True

    def state_of(self, view: NodeView, *, now: float, stale_after: float) -> str:
        if view.status == "offline":
            return "offline"
        t = view.metrics.get("t")
        if not isinstance(t, int | float) or now - t > stale_after:
            return "stale"
        return "paused" if view.metrics.get("paused") else "online"

    def table(self, *, now: float | None = None, stale_after: float = 15.0, title: str = "") -> Table:
        """A rich table with one row per node, sorted by swarm then peer id."""
        now = time.time() if now is None else now
        table = Table(title=title or None, title_justify="left")
        for name, justify in (("swarm", "left"), ("node", "left"), ("role", "left"), ("round", "right"),
                              ("accuracy", "right"), ("loss", "right"), ("peers", "right"),
                              ("sent MB", "right"), ("recv MB", "right"), ("rejected", "right"),
                              ("age s", "right"), ("state", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        styles = {"online": "green", "paused": "yellow", "stale": "bold red", "offline": "red"}
        for key in sorted(self.nodes):
            view = self.nodes[key]
            m = view.metrics
            state = self.state_of(view, now=now, stale_after=stale_after)
            t = m.get("t")
            table.add_row(
                view.swarm, _short(view.peer_id), str(m.get("role", "?")), _fmt(m.get("round"), "d"),
                _fmt(m.get("test_accuracy"), ".4f"), _fmt(m.get("train_loss"), ".4f"),
                _fmt(m.get("peers_in_view"), "d"), _mb(m.get("bytes_sent")), _mb(m.get("bytes_received")),
                _fmt(_sum(m.get("messages_rejected"), m.get("control_rejected")), "d"),
                _fmt(now - t if isinstance(t, int | float) else None, ".0f"),
                f"[{styles[state]}]{state}[/]")
        return table


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    return format(int(v) if spec == "d" else float(v), spec)


def _mb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def _sum(*values: Any) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


async def collect(host: str, port: int, swarm: str, state: SwarmState, *, settle_s: float, max_wait_s: float
                  ) -> None:
    """Subscribe and fold messages into ``state`` until ``settle_s`` of quiet after the first one, or
    ``max_wait_s`` in all (the retained messages of every node arrive right after subscribing)."""
    import aiomqtt

    async with aiomqtt.Client(host, port, timeout=5.0) as client:
        for kind in ("metrics", "status"):
            await client.subscribe(f"{TOPIC_ROOT}/{swarm}/+/{kind}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        messages = aiter(client.messages)
        seen_any = False
        while (left := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(anext(messages), min(left, settle_s) if seen_any else left)
            except TimeoutError:
                if seen_any:
                    return
                continue
            if isinstance(message.payload, bytes | bytearray):
                seen_any |= state.apply(message.topic.value, bytes(message.payload))


async def watch(host: str, port: int, swarm: str, state: SwarmState, console: Console, *,
                stale_after: float, refresh_s: float = 1.0) -> None:
    """Follow the swarm live until cancelled (Ctrl-C)."""
    import aiomqtt
    from rich.live import Live

    title = f"p2pnode swarm {swarm!r} via mqtt://{host}:{port}"
    with Live(state.table(stale_after=stale_after, title=title), console=console, auto_refresh=False) as live:
        while True:
            try:
                async with aiomqtt.Client(host, port, timeout=5.0) as client:
                    for kind in ("metrics", "status"):
                        await client.subscribe(f"{TOPIC_ROOT}/{swarm}/+/{kind}")
                    messages = aiter(client.messages)
                    while True:
                        try:
                            message = await asyncio.wait_for(anext(messages), refresh_s)
                            if isinstance(message.payload, bytes | bytearray):
                                state.apply(message.topic.value, bytes(message.payload))
                        except TimeoutError:
                            pass
                        live.update(state.table(stale_after=stale_after, title=title), refresh=True)
            except aiomqtt.MqttError as exc:
                live.update(state.table(stale_after=stale_after, title=f"{title}  [red]broker: {exc}[/]"),
                            refresh=True)
                await asyncio.sleep(2.0)
