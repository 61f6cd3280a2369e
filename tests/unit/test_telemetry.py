"""Telemetry payloads, the Prometheus endpoint, the monitor's table and checkpoints (no broker here;
tests/integration/test_mqtt.py runs the real mosquitto)."""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest
import torch
from rich.console import Console

from p2pnode.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from p2pnode.config import ConfigError, OpsConfig
from p2pnode.monitor import MAX_PAYLOAD, SwarmState
from p2pnode.telemetry import TELEMETRY_KEYS, encode_snapshot, metrics_topic, start_prometheus, status_topic

SNAP = {"t": 100.0, "peer_id": "12D3KooWAAA", "role": "honest", "mode": "gossip", "round": 7,
        "train_loss": float("nan"), "test_accuracy": 0.9, "test_loss": 0.3, "peers_in_view": 3,
        "bytes_sent": 1234, "bytes_received": 4321, "messages_rejected": 2, "control_rejected": 1,
        "paused": False, "extra": "not sent"}


def test_snapshot_payload_has_exactly_the_telemetry_keys_and_nan_as_null() -> None:
    obj = json.loads(encode_snapshot(SNAP))
    assert list(obj) == list(TELEMETRY_KEYS)
    assert obj["train_loss"] is None
    assert obj["round"] == 7
    assert obj["paused"] is False


def test_mqtt_url_is_validated() -> None:
    assert OpsConfig(mqtt="mqtt://broker").mqtt_address == ("broker", 1883)
    assert OpsConfig(mqtt="mqtt://127.0.0.1:18830/").mqtt_address == ("127.0.0.1", 18830)
    for bad in ("http://x:1", "mqtt://", "mqtt://a b:1", "mqtt://x:0", "mqtt://x:70000", "mqtt://x:1/topic"):
        with pytest.raises(ConfigError, match="ops.mqtt"):
            OpsConfig(mqtt=bad)
    with pytest.raises(ConfigError, match="ops.operator_keys"):
        OpsConfig(operator_keys=["not-a-peer-id"])


def test_prometheus_endpoint_serves_the_latest_snapshot() -> None:
    snap = dict(SNAP)
    port, stop = start_prometheus("127.0.0.1", 0, lambda: snap)
    try:
        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            values = {}
            for line in text.splitlines():
                if line.startswith("p2pnode_") and "{" not in line:
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
            assert 'p2pnode_info{mode="gossip",peer_id="12D3KooWAAA",role="honest"} 1.0' in text
            return values

        first = scrape()
        assert first["p2pnode_round"] == 7
        assert first["p2pnode_bytes_sent_total"] == 1234
        assert first["p2pnode_test_accuracy"] == pytest.approx(0.9)
        assert math.isnan(first["p2pnode_train_loss"])
        assert first["p2pnode_control_rejected_total"] == 1
        assert first["p2pnode_paused"] == 0
        snap.update(round=8, paused=True, bytes_sent=5000)
        second = scrape()
        assert second["p2pnode_round"] == 8
        assert second["p2pnode_paused"] == 1
        assert second["p2pnode_bytes_sent_total"] == 5000
    finally:
        stop()


def _render(state: SwarmState, now: float) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(state.table(now=now, stale_after=15.0))
    return console.export_text()


def test_monitor_folds_metrics_and_status_into_one_row_per_node() -> None:
    state = SwarmState()
    a, b, c = "12D3KooWAlphaAlphaAlpha", "12D3KooWBravoBravoBravo", "12D3KooWCharlieCharlie"
    assert state.apply(metrics_topic("s", a), encode_snapshot({**SNAP, "t": 995.0, "round": 12}), now=1000)
    assert state.apply(status_topic("s", a), b'{"status": "online"}')
    assert state.apply(metrics_topic("s", b), encode_snapshot({**SNAP, "t": 900.0, "round": 3}), now=1000)
    assert state.apply(metrics_topic("s", c), encode_snapshot({**SNAP, "t": 999.0, "paused": True}), now=1000)
    assert state.apply(status_topic("s", c), b'{"status": "offline"}')
    text = _render(state, 1000.0)
    rows = [line for line in text.splitlines() if "12D3KooW" in line]
    assert len(rows) == 3
    row_a, row_b, row_c = (next(r for r in rows if f"…{p[-6:]} " in r) for p in (a, b, c))
    assert " 12 " in row_a
    assert row_a.split("│")[-2].strip() == "online"
    assert row_b.split("│")[-2].strip() == "stale"  # 100 s old telemetry
    assert row_c.split("│")[-2].strip() == "offline"  # the last will beats a recent "paused"


def test_monitor_drops_malformed_and_oversized_payloads_and_ignores_other_topics() -> None:
    state = SwarmState()
    topic = metrics_topic("s", "12D3KooWX")
    assert not state.apply(topic, b"\xff not json")
    assert not state.apply(topic, b"[1]")
    assert not state.apply(topic, b" " * (MAX_PAYLOAD + 1))
    assert not state.apply(status_topic("s", "12D3KooWX"), b'{"status": "hacked"}')
    assert state.dropped == 4
    assert not state.apply("p2pnode/s/control", b"whatever")
    assert not state.apply("elsewhere/x/y/metrics", b"{}")
    assert state.dropped == 4
    # wrongly typed fields are dropped, the rest is kept
    payload = json.dumps({"t": 1.0, "round": "DROP TABLE", "test_accuracy": 0.5}).encode()
    assert state.apply(topic, payload, now=2)
    view = next(iter(state.nodes.values()))
    assert "round" not in view.metrics
    assert view.metrics["test_accuracy"] == 0.5
    assert "12D3KooWX" in _render(state, 2.0)


def test_checkpoint_round_trip_is_atomic_and_rejects_foreign_files(tmp_path: Path) -> None:
    state = {"round": 5, "mode": "gossip", "trainer": {"model": {"w": torch.arange(4.0)}}}
    path = save_checkpoint(tmp_path / "ck", state)
    assert path.name == "checkpoint.pt"
    assert not list(path.parent.glob(".*tmp"))
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded is not None
    assert loaded["round"] == 5
    assert torch.equal(loaded["trainer"]["model"]["w"], torch.arange(4.0))
    assert load_checkpoint(tmp_path / "none") is None
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "ck")
    torch.save({"something": "else"}, path)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "ck")
