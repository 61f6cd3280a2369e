"""Telemetry out of a node: MQTT (with aiomqtt) and a Prometheus endpoint (with prometheus-client).

MQTT topics of a node (``<swarm>`` and ``<peer_id>`` as they are)::

    p2pnode/<swarm>/<peer_id>/metrics   retained JSON: the latest values (see TELEMETRY_KEYS), every
                                        --telemetry-interval seconds
    p2pnode/<swarm>/<peer_id>/status    retained JSON {"status": "online" | "offline", "peer_id", "t"}:
                                        "offline" is the connection's last will (a killed node turns
                                        offline when the broker misses its keepalive) and is also sent on
                                        a clean stop
    p2pnode/<swarm>/control             operator commands for every node (see p2pnode.control)
    p2pnode/<swarm>/<peer_id>/control   operator commands for this node

Training never waits on the broker: :class:`MqttLink` runs as its own task and only ever reads the
latest snapshot; while the broker is away it retries every few seconds and publishes again once it is
back. Nothing is queued during an outage: telemetry is "latest values", and the per-round history goes
to the JSON-lines metrics file, broker or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

TOPIC_ROOT = "p2pnode"
TELEMETRY_KEYS = ("t", "peer_id", "role", "mode", "round", "train_loss", "test_accuracy", "test_loss",
                  "peers_in_view", "bytes_sent", "bytes_received", "messages_rejected", "peers_banned",
                  "control_rejected", "checkpoint_errors", "paused")
KEEPALIVE_S = 10  # the broker declares a silent node offline after 1.5x this
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # reconnect back-off; the last value repeats


def metrics_topic(swarm: str, peer_id: str) -> str:
    return f"{TOPIC_ROOT}/{swarm}/{peer_id}/metrics"


def status_topic(swarm: str, peer_id: str) -> str:
    return f"{TOPIC_ROOT}/{swarm}/{peer_id}/status"


def control_topics(swarm: str, peer_id: str) -> tuple[str, str]:
    """The broadcast and the per-node control topic."""
    return f"{TOPIC_ROOT}/{swarm}/control", f"{TOPIC_ROOT}/{swarm}/{peer_id}/control"


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: send them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_snapshot(snapshot: dict[str, Any]) -> bytes:
    return json.dumps({k: _json_safe(snapshot.get(k)) for k in TELEMETRY_KEYS},
                      separators=(",", ":")).encode()


def status_payload(status: str, peer_id: str) -> bytes:
    return json.dumps({"status": status, "peer_id": peer_id, "t": time.time()}).encode()


class MqttLink:
    """One node's connection to the broker: publishes telemetry, hands control messages to a callback.

    Parameters
    ----------
    host, port
        The broker.
    swarm, peer_id
        Name the topics.
    interval
        Seconds between two metrics messages.
    snapshot
        Returns the node's latest values (a dict with :data:`TELEMETRY_KEYS`); called on the event loop.
    on_control
        Called with the raw payload of each message on a control topic (checks happen there).
    """

    def __init__(self, host: str, port: int, *, swarm: str, peer_id: str, interval: float,
                 snapshot: Callable[[], dict[str, Any]], on_control: Callable[[bytes], None] | None = None,
                 ) -> None:
        self.host, self.port = host, port
        self.swarm, self.peer_id = swarm, peer_id
        self.interval = interval
        self._snapshot = snapshot
        self._on_control = on_control
        self.published = 0
        self.connects = 0
        self.failures = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Connect, publish, reconnect after any broker failure; runs until cancelled."""
        import aiomqtt  # here: only nodes started with --mqtt need it

        attempt = 0
        while True:
            will = aiomqtt.Will(status_topic(self.swarm, self.peer_id),
                                json.dumps({"status": "offline", "peer_id": self.peer_id}).encode(),
                                qos=1, retain=True)
            try:
                async with aiomqtt.Client(self.host, self.port, identifier=f"p2pnode-{self.peer_id}",
                                          will=will, keepalive=KEEPALIVE_S, timeout=5.0) as client:
                    self.connects += 1
                    attempt = 0
                    if self.connects > 1:
                        logger.info("telemetry: reconnected to mqtt://%s:%d", self.host, self.port)
                    await client.publish(status_topic(self.swarm, self.peer_id),
                                         status_payload("online", self.peer_id), qos=1, retain=True)
                    if self._on_control is not None:
                        for topic in control_topics(self.swarm, self.peer_id):
                            await client.subscribe(topic, qos=1)
                    self.connected.set()
                    try:
                        async with asyncio.TaskGroup() as tg:
                            tg.create_task(self._publish_loop(client))
                            if self._on_control is not None:
                                tg.create_task(self._receive_loop(client))
                    except asyncio.CancelledError:  # a clean stop: say goodbye while still connected
                        await self._goodbye(client)
                        raise
            except* aiomqtt.MqttError as group:
                self.failures += 1
                if attempt == 0:
                    logger.warning("telemetry: mqtt://%s:%d unavailable (%s); retrying in the background",
                                   self.host, self.port, group.exceptions[0])
            finally:
                self.connected.clear()
            await asyncio.sleep(RETRY_S[min(attempt, len(RETRY_S) - 1)])
            attempt += 1

    async def _publish_loop(self, client: Any) -> None:
        topic = metrics_topic(self.swarm, self.peer_id)
        while True:
            await client.publish(topic, encode_snapshot(self._snapshot()), qos=0, retain=True)
            self.published += 1
            await asyncio.sleep(self.interval)

    async def _receive_loop(self, client: Any) -> None:
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray) and self._on_control is not None:
                self._on_control(bytes(payload))

    async def _goodbye(self, client: Any, timeout: float = 2.0) -> None:
        """Publish the last metrics and "offline" (a clean stop); never raises."""
        try:
            async with asyncio.timeout(timeout):
                await client.publish(metrics_topic(self.swarm, self.peer_id),
                                     encode_snapshot(self._snapshot()), qos=1, retain=True)
                await client.publish(status_topic(self.swarm, self.peer_id),
                                     status_payload("offline", self.peer_id), qos=1, retain=True)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            logger.debug("telemetry: could not publish offline status: %s", exc)


# -- Prometheus ------------------------------------------------------------------------------------
_GAUGES = {
    "round": "rounds completed",
    "train_loss": "mean local training loss of the last round",
    "test_accuracy": "accuracy on the held-out test split at the last evaluation",
    "test_loss": "loss on the held-out test split at the last evaluation",
    "peers_in_view": "live peers in the membership view",
    "paused": "1 while an operator has paused the node",
}
_COUNTERS = {
    "bytes_sent": "bytes sent on the transport",
    "bytes_received": "bytes received on the transport",
    "messages_rejected": "peer messages rejected (bad signature, size, replay, malformed, ...)",
    "peers_banned": "bans this node gave peers for misbehaving (rejected messages past --ban-after)",
    "control_rejected": "operator commands rejected (unsigned, untrusted, forged, stale, replayed, ...)",
    "checkpoint_errors": "checkpoint writes that failed (disk full, directory gone, ...); training went on",
}


class SnapshotCollector:
    """A prometheus-client collector that reads the node's latest snapshot at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        labels = {"peer_id": str(snap.get("peer_id")), "role": str(snap.get("role")),
                  "mode": str(snap.get("mode"))}
        info = GaugeMetricFamily("p2pnode_info", "node identity (value is always 1)", labels=list(labels))
        info.add_metric(list(labels.values()), 1.0)
        yield info
        for key, text in _GAUGES.items():
            value = snap.get(key)
            if isinstance(value, int | float):  # bools too (paused); None before the first evaluation
                yield GaugeMetricFamily(f"p2pnode_{key}", text, value=float(value))
        for key, text in _COUNTERS.items():
            value = snap.get(key)
            if isinstance(value, int | float):
                yield CounterMetricFamily(f"p2pnode_{key}", text, value=float(value))


def start_prometheus(host: str, port: int, snapshot: Callable[[], dict[str, Any]]
                     ) -> tuple[int, Callable[[], None]]:
    """Serve the snapshot on http://host:port/metrics in a daemon thread (port 0: any free one).

    Returns the port it listens on and a function that stops it.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))  # type: ignore[arg-type]
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2.0)

    return int(server.server_port), stop
