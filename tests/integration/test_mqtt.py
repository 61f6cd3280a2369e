"""MQTT telemetry and operator control against a real mosquitto broker and real node processes.

The broker is the Debian package (installed by scripts/setup.sh), started here on a free loopback port
with its own config and stopped by its pid. Nodes are real `p2pnode run` processes (hivemind DHT,
libp2p) started by :class:`p2pnode.swarm.Swarm`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pnode.bench.mqtt import Mosquitto, find_mosquitto
from p2pnode.checkpoint import load_checkpoint
from p2pnode.control import sign_command
from p2pnode.identity import Identity, save_identity
from p2pnode.monitor import SwarmState, collect
from p2pnode.swarm import Swarm, SwarmOptions
from p2pnode.telemetry import control_topics

pytestmark = [pytest.mark.integration]

P2PNODE = [sys.executable, "-m", "p2pnode"]



@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs the Debian package)")
    b = Mosquitto(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


def _snapshot(broker: Mosquitto, swarm: str) -> SwarmState:
    state = SwarmState()
    asyncio.run(collect("127.0.0.1", broker.port, swarm, state, settle_s=0.5, max_wait_s=3.0))
    return state


def _metrics(state: SwarmState) -> dict[str, dict[str, Any]]:
    return {peer: view.metrics for (_, peer), view in state.nodes.items() if view.metrics}


def _wait_for(broker: Mosquitto, swarm: str, what: str, check: Callable[[dict[str, dict[str, Any]]], bool],
              timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        seen = _metrics(_snapshot(broker, swarm))
        if check(seen):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last telemetry: {json.dumps(seen)[:2000]}")


def _publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    import aiomqtt

    async def send() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port, timeout=5.0) as client:
            await client.publish(topic, payload, qos=1)

    asyncio.run(send())


def _swarm(tmp: Path, name: str, nodes: int, extra: list[str]) -> Swarm:
    opts = SwarmOptions(nodes=nodes, rounds=1_000_000, task="digits", out=tmp / name, swarm=name, linger_s=0,
                        log_level="info", extra_args=extra)
    return Swarm(opts)


@pytest.mark.timeout(240)
def test_telemetry_feeds_monitor_once_and_resumes_after_a_broker_restart(broker: Mosquitto,
                                                                         tmp_path: Path) -> None:
    swarm = _swarm(tmp_path, "telemetry", 3, ["--mqtt", broker.url, "--telemetry-interval", "0.5"])
    with swarm:
        swarm.start()
        peers = {json.loads(swarm.node_paths(i).ready.read_text())["peer_id"] for i in range(3)}
        seen = _wait_for(broker, "telemetry", "3 nodes with an evaluated round",
                         lambda m: set(m) == peers
                         and all(v.get("test_accuracy") is not None for v in m.values()))
        assert all(v["role"] == "honest" and v["mode"] == "gossip" for v in seen.values())

        proc = subprocess.run([*P2PNODE, "monitor", "--mqtt", broker.url, "--swarm", "telemetry", "--once"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        rows = [line for line in proc.stdout.splitlines() if "12D3KooW" in line]
        assert len(rows) == 3, proc.stdout
        for peer in peers:
            row = next(r for r in rows if f"…{peer[-6:]}" in r)
            assert row.split("│")[-2].strip() == "online", row

        # the broker goes away and comes back on the same port (retained messages gone: persistence off)
        rounds_before = {p: v["round"] for p, v in seen.items()}
        broker.stop()
        time.sleep(3.0)
        broker.start()
        after = _wait_for(broker, "telemetry", "telemetry again after the broker restart",
                          lambda m: set(m) == peers and all(m[p]["round"] > rounds_before[p] for p in peers),
                          timeout=45)
        assert all(after[p]["round"] > rounds_before[p] for p in peers)
        status = {peer: view.status for (_, peer), view in _snapshot(broker, "telemetry").nodes.items()}
        assert status == dict.fromkeys(peers, "online")  # re-announced after reconnecting
        assert all(p.poll() is None for p in swarm.processes)  # training never stopped


@pytest.mark.timeout(240)
def test_signed_commands_pause_resume_checkpoint_and_shut_down_and_bad_ones_are_counted(
        broker: Mosquitto, tmp_path: Path) -> None:
    operator = Identity.generate()
    save_identity(operator, tmp_path / "operator.key")
    stranger = Identity.generate()
    ckpt = tmp_path / "ckpt"
    swarm = _swarm(tmp_path, "control", 2, ["--mqtt", broker.url, "--telemetry-interval", "0.3",
                                             "--operator-keys", operator.peer_id,
                                             "--checkpoint-dir", str(ckpt)])
    broadcast, _ = control_topics("control", "")

    def control(cmd: str) -> None:
        proc = subprocess.run([*P2PNODE, "control", cmd, "--mqtt", broker.url,
                               "--key", str(tmp_path / "operator.key"), "--swarm", "control"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr

    with swarm:
        swarm.start()
        peers = {json.loads(swarm.node_paths(i).ready.read_text())["peer_id"] for i in range(2)}
        _wait_for(broker, "control", "both nodes past round 2",
                  lambda m: set(m) == peers and all(v["round"] > 2 for v in m.values()))

        pause = sign_command(operator, "pause", swarm="control")
        _publish(broker, broadcast, pause)
        _wait_for(broker, "control", "both nodes paused", lambda m: all(v["paused"] for v in m.values()))
        time.sleep(2.0)  # a round in flight when the command came may still finish
        frozen = {p: v["round"] for p, v in _metrics(_snapshot(broker, "control")).items()}
        time.sleep(3.0)
        still = _metrics(_snapshot(broker, "control"))
        assert {p: v["round"] for p, v in still.items()} == frozen
        assert all(v["paused"] for v in still.values())

        control("resume")
        _wait_for(broker, "control", "rounds moving again after resume",
                  lambda m: all(not v["paused"] and v["round"] > frozen[p] for p, v in m.items()))

        # four bad commands, each to every node: a replay of the pause, one signed by a stranger, one
        # whose body was changed after signing, and an unsigned one
        _publish(broker, broadcast, pause)
        _publish(broker, broadcast, sign_command(stranger, "pause", swarm="control"))
        good = sign_command(operator, "shutdown", swarm="control")
        _publish(broker, broadcast, good.replace(b'"cmd":"shutdown"', b'"cmd":"pause"'))
        _publish(broker, broadcast, json.dumps({"cmd": "pause", "swarm": "control"}).encode())
        seen = _wait_for(broker, "control", "4 rejected commands on each node",
                         lambda m: all(v["control_rejected"] == 4 for v in m.values()), timeout=20)
        rounds = {p: v["round"] for p, v in seen.items()}
        _wait_for(broker, "control", "nodes still training (none of the bad commands acted)",
                  lambda m: all(not v["paused"] and v["round"] > rounds[p] for p, v in m.items()))

        control("checkpoint")
        deadline = time.monotonic() + 20
        while not (ckpt / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        state = load_checkpoint(ckpt)
        assert state is not None
        assert state["round"] > 2
        assert state["peer_id"] in peers

        control("shutdown")
        for i, proc in enumerate(swarm.processes):
            log = swarm.node_paths(i).log
            assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")[-4000:]
        status = {peer: view.status for (_, peer), view in _snapshot(broker, "control").nodes.items()}
        assert status == dict.fromkeys(peers, "offline")
