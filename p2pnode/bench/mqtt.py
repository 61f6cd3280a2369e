"""``p2pnode bench mqtt``: does telemetry slow training down, with the broker up or down?

The same real swarm (``p2pnode swarm``: node processes, libp2p, DHT) runs in three settings, interleaved
over ``--repeats`` so that machine noise hits all of them alike:

- ``off``: no ``--mqtt`` at all;
- ``up``: ``--mqtt`` to a running mosquitto (started here on a free loopback port);
- ``down``: ``--mqtt`` to the same port with the broker stopped, so every node keeps retrying.

A node's round time is the median gap between the timestamps of its consecutive metrics lines (the
first ``--skip`` rounds, start-up, left out); a run's figure is the median over its nodes; a setting's
figure is the median over its repeats. Reported: those medians and the ratios down/up and up/off.
"""

from __future__ import annotations

import shutil
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pnode.outputs import write_json_atomic
from p2pnode.report import round_rows

SETTINGS = ("off", "up", "down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto", path="/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin")


class Mosquitto:
    """A mosquitto child process on 127.0.0.1:``port`` (restartable on the same port), stopped by its pid."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/setup.sh installs it with apt)")
        self.binary = binary
        self.port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Mosquitto:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(kw_only=True, slots=True)
class MqttBenchOptions:
    nodes: int = 4
    rounds: int = 60
    task: str = "fashion-mnist"
    local_steps: int = 20
    repeats: int = 3
    skip: int = 5
    telemetry_interval: float = 2.0
    out_dir: Path = field(default_factory=lambda: Path("runs/bench-mqtt"))
    json_path: Path = field(default_factory=lambda: Path("runs/bench-mqtt.json"))


def round_times(metrics_file: Path, skip: int) -> list[float]:
    """Gaps between consecutive round lines' timestamps, after the first ``skip`` rounds."""
    ts = [float(row["t"]) for row in round_rows(metrics_file) if row.get("round", 0) > skip]
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


def _one_run(opts: MqttBenchOptions, setting: str, repeat: int, broker: Mosquitto) -> dict[str, Any]:
    from p2pnode.swarm import Swarm, SwarmOptions

    extra = [] if setting == "off" else ["--mqtt", broker.url, "--telemetry-interval",
                                         str(opts.telemetry_interval)]
    if setting == "up":
        broker.start()
    out = opts.out_dir / f"{setting}-{repeat}"
    swarm_opts = SwarmOptions(nodes=opts.nodes, rounds=opts.rounds, task=opts.task,
                              local_steps=opts.local_steps, out=out, linger_s=1.0, extra_args=extra)
    try:
        with Swarm(swarm_opts) as swarm:
            swarm.start()
            swarm.wait_finished(timeout=opts.rounds * 10.0 + 120)
            summary = swarm.summarize()
    finally:
        broker.stop()
    per_node = []
    for i in range(opts.nodes):
        gaps = round_times(swarm.node_paths(i).metrics, opts.skip)
        if gaps:
            per_node.append(statistics.median(gaps))
    return {"setting": setting, "repeat": repeat,
            "round_time_s": statistics.median(per_node) if per_node else None,
            "per_node_s": per_node, "honest_accuracy_mean": summary["honest_accuracy_mean"],
            "all_finished": summary["all_finished"], "wall_time_s": summary["wall_time_s"]}


def run_mqtt_bench(opts: MqttBenchOptions, *, on_run: Any = None) -> dict[str, Any]:
    """Run every setting ``repeats`` times, interleaved; write and return the results."""
    from p2pnode.swarm import sigterm_as_interrupt

    runs: list[dict[str, Any]] = []
    broker = Mosquitto(opts.out_dir / "broker")
    with sigterm_as_interrupt():
        for repeat in range(opts.repeats):
            for setting in SETTINGS:
                run = _one_run(opts, setting, repeat, broker)
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    medians = {}
    for setting in SETTINGS:
        values = [r["round_time_s"] for r in runs
                  if r["setting"] == setting and r["round_time_s"] is not None]
        medians[setting] = statistics.median(values) if values else None
    result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in
                          ((f, getattr(opts, f)) for f in opts.__dataclass_fields__)},
              "runs": runs, "median_round_time_s": medians,
              "down_over_up": medians["down"] / medians["up"] if medians["down"] and medians["up"] else None,
              "up_over_off": medians["up"] / medians["off"] if medians["up"] and medians["off"] else None}
    write_json_atomic(opts.json_path, result)
    return result
