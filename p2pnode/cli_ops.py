"""``p2pnode monitor`` and ``p2pnode control``: watching and steering a swarm through its MQTT broker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from p2pnode.config import NetworkConfig, OpsConfig
from p2pnode.errors import ConfigError

MONITOR_HELP = """\
Show one row per node of the swarm, from the nodes' MQTT telemetry (start them with --mqtt URL):
round, accuracy, loss, peers in view, bytes, rejected messages and a state: online, paused, stale (no
telemetry for --stale-after seconds) or offline. Runs until Ctrl-C; with --once it prints the table
once and exits (1 when no node was seen)."""

CONTROL_HELP = """\
Sign an operator command with an Ed25519 key (make one with `p2pnode keygen --identity operator.key`)
and publish it on the swarm's control topic. Nodes obey it only when started with
--operator-keys PEER_ID (the key's peer id: `p2pnode peer-id --identity operator.key`). Commands:
pause, resume (between rounds; a paused node keeps serving peers), checkpoint (needs --checkpoint-dir on
the node), shutdown; and, only for nodes started with --test-mode, crash and stall --seconds S.
Each command is bound to its swarm, target and time and carries a nonce, so it cannot be replayed."""


def _broker(url: str) -> tuple[str, int]:
    try:
        return OpsConfig(mqtt=url).mqtt_address
    except ConfigError as exc:
        raise ConfigError("--mqtt", url, "mqtt://HOST[:PORT]") from exc


def add_ops_commands(sub: Any) -> None:
    p = sub.add_parser("monitor", help="live table of a swarm from its MQTT telemetry",
                       description=MONITOR_HELP, allow_abbrev=False)
    p.add_argument("--mqtt", metavar="URL", required=True,
                   help="the broker the nodes publish to (mqtt://HOST:PORT)")
    p.add_argument("--swarm", metavar="NAME", default="+", help="show this swarm only (default: every swarm)")
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.add_argument("--stale-after", metavar="S", type=float, default=15.0,
                   help="flag a node stale when its last telemetry is older than this (default 15)")
    p.add_argument("--wait", metavar="S", type=float, default=5.0,
                   help="--once: wait at most this long for telemetry (default 5)")
    from p2pnode.control import COMMANDS, FAULT_COMMANDS

    p = sub.add_parser("control", help="send a signed operator command to a swarm over MQTT",
                       description=CONTROL_HELP, allow_abbrev=False)
    p.add_argument("cmd", metavar="COMMAND", choices=sorted(COMMANDS | FAULT_COMMANDS),
                   help=" | ".join(sorted(COMMANDS)) + " | (test mode) " + " | ".join(sorted(FAULT_COMMANDS)))
    p.add_argument("--mqtt", metavar="URL", required=True, help="the swarm's broker (mqtt://HOST:PORT)")
    p.add_argument("--key", metavar="PATH", required=True, help="the operator's Ed25519 key file")
    p.add_argument("--swarm", metavar="NAME", default=NetworkConfig().swarm,
                   help=f"the nodes' --swarm (default {NetworkConfig().swarm!r})")
    p.add_argument("--node", metavar="PEER_ID", default="*",
                   help="send to this node only (default: every node)")
    p.add_argument("--seconds", metavar="S", type=float, default=None, help="stall: how long to freeze")


def cmd_monitor(ns: argparse.Namespace) -> int:
    from rich.console import Console

    from p2pnode.monitor import SwarmState, collect, watch

    host, port = _broker(ns.mqtt)
    state = SwarmState()
    console = Console(width=None if sys.stdout.isatty() else 160)  # a pipe: don't squash the table to 80
    if ns.once:
        import aiomqtt

        try:
            asyncio.run(collect(host, port, ns.swarm, state, settle_s=1.0, max_wait_s=ns.wait))
        except aiomqtt.MqttError as exc:
            print(f"p2pnode monitor: error: cannot read mqtt://{host}:{port}: {exc}", file=sys.stderr)
            return 1
        if not state.nodes:
            print(f"p2pnode monitor: no telemetry from swarm {ns.swarm!r} on mqtt://{host}:{port} "
                  f"within {ns.wait:.0f} s", file=sys.stderr)
            return 1
        title = f"swarm {ns.swarm!r}: {len(state.nodes)} nodes"
        console.print(state.table(stale_after=ns.stale_after, title=title))
        return 0
    try:
        asyncio.run(watch(host, port, ns.swarm, state, console, stale_after=ns.stale_after))
    except KeyboardInterrupt:
        return 0
    return 0


async def _publish(host: str, port: int, topic: str, payload: bytes) -> None:
    import aiomqtt

    async with aiomqtt.Client(host, port, timeout=5.0) as client:
        await client.publish(topic, payload, qos=1)


def cmd_control(ns: argparse.Namespace) -> int:
    import aiomqtt

    from p2pnode.control import sign_command
    from p2pnode.identity import load_identity
    from p2pnode.telemetry import control_topics

    host, port = _broker(ns.mqtt)
    args: dict[str, Any] = {}
    if ns.cmd == "stall":
        if ns.seconds is None:
            raise ConfigError("--seconds", None, "a duration for stall")
        args["seconds"] = ns.seconds
    operator = load_identity(Path(ns.key))
    payload = sign_command(operator, ns.cmd, swarm=ns.swarm, target=ns.node, args=args)
    broadcast, _ = control_topics(ns.swarm, "")
    topic = broadcast if ns.node == "*" else control_topics(ns.swarm, ns.node)[1]
    try:
        asyncio.run(_publish(host, port, topic, payload))
    except aiomqtt.MqttError as exc:
        print(f"p2pnode control: error: cannot publish to mqtt://{host}:{port}: {exc}", file=sys.stderr)
        return 1
    who = "every node" if ns.node == "*" else ns.node
    print(f"sent {ns.cmd} to {who} of swarm {ns.swarm!r} (operator {operator.peer_id})", file=sys.stderr)
    return 0
