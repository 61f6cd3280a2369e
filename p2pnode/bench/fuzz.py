"""``p2pnode bench fuzz``: fuzzed messages against a live node; it must reject them all and keep training.

Two real ``p2pnode run`` processes on loopback (digits, gossip, dense): the *target* and one honest
*peer*, so the target keeps gossiping and training. This process then opens ``--lanes`` libp2p hosts
of its own (hivemind P2P, each with its own key, as :class:`~p2pnode.transport.p2p.P2PTransport` runs
them) and sends ``--messages`` messages to the target's exchange handler, each lane one at a time
with a deadline, the lanes concurrently (see :mod:`p2pnode.bench.fuzz_messages` for what they send).
The target runs with its per-peer rate limits and bans off (:func:`_unguarded`): with them, a lane is
banned after ten rejections and the rest of its messages never reach a decoder.

Checked afterwards (:func:`summarize`): the target never died or restarted; its metrics show rounds
during the whole fuzzing, with no gap longer than ``3 × heartbeat_s``; every message built to be
rejected was refused with a typed rejection and every valid one answered with the target's model;
``messages_rejected`` in its metrics grew by exactly the number of refusals; no send ran into its
deadline (a hang); its log holds no traceback, unhandled exception or "internal error", and none of
its own exchanges with the honest peer was cut off ("unreachable: stream closed").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnode.bench.fuzz_messages import ACCEPT, Target
from p2pnode.outputs import write_json_atomic

if TYPE_CHECKING:  # fuzz_send needs hivemind: imported where the lanes run, so `--help` works without it
    from p2pnode.bench.fuzz_send import LaneResult

NODE_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LOG_ERRORS = re.compile(r"traceback|exception|unhandled|internal error|handler failed", re.IGNORECASE)


@dataclass(kw_only=True, slots=True)
class FuzzOptions:
    """What ``p2pnode bench fuzz`` runs."""

    messages: int = 100_000  # messages sent to the target in all
    lanes: int = 4  # concurrent senders, each its own libp2p host and key
    seed: int = 0  # seeds every lane's choices
    timeout_s: float = 10.0  # deadline of one send; a send that runs into it is a hang
    rate: float = 0.0  # most messages per second over all lanes (0: as fast as the lanes go)
    heartbeat_s: float = 2.0  # the nodes' --heartbeat-s; the largest round gap allowed is 3 times this
    max_message_mb: float = 1.0  # the nodes' --max-message-mb (the over-limit frames announce more)
    start_timeout_s: float = 120.0  # longest wait for the nodes to be ready and training
    out_dir: Path = Path("runs/fuzz")  # node keys, logs, metrics
    json_path: Path | None = Path("runs/bench-fuzz.json")

    def __post_init__(self) -> None:
        if self.messages < 1 or self.lanes < 1:
            raise ValueError(f"messages and lanes must be >= 1, got {self.messages}, {self.lanes}")
        if min(self.timeout_s, self.heartbeat_s, self.max_message_mb, self.start_timeout_s) <= 0:
            raise ValueError("timeout_s, heartbeat_s, max_message_mb and start_timeout_s must be > 0")
        if self.rate < 0:
            raise ValueError(f"rate must be >= 0, got {self.rate}")


@dataclass(slots=True)
class NodeProcess:
    """One ``p2pnode run`` child; stopped by its pid only."""

    name: str
    proc: subprocess.Popen[bytes]
    dir: Path

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.dir / "node.log"

    def rows(self) -> list[dict[str, Any]]:
        """The metrics lines written so far (a line being written is skipped)."""
        rows = []
        with contextlib.suppress(OSError):
            for line in self.metrics.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
        return rows

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def _start_node(name: str, out: Path, swarm: str, opts: FuzzOptions, *, shard: int,
                initial_peer: str | None) -> NodeProcess:
    return start_pair_node(name, out, swarm, "digits", shard=shard, initial_peer=initial_peer, extra=[
        "--seed", str(opts.seed), "--heartbeat-s", str(opts.heartbeat_s), "--max-message-mb",
        str(opts.max_message_mb), "--log-level", "info" if name == "target" else "warning", *_unguarded()])


def start_pair_node(name: str, out: Path, swarm: str, task: str, *, shard: int, initial_peer: str | None,
                    extra: list[str]) -> NodeProcess:
    """One of two loopback ``p2pnode run`` nodes (shard ``shard``/2) that trains until stopped, with its
    key, metrics, ready file and log in ``out/name``; ``extra`` flags go last (a repeated flag wins)."""
    node_dir = out / name
    node_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "p2pnode", "run", "--task", task, "--identity", str(node_dir / "key"),
           "--swarm", swarm, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--shard", f"{shard}/2",
           "--rounds", "0", "--metrics-file", str(node_dir / "metrics.jsonl"),
           "--ready-file", str(node_dir / "ready.json"), "--threads", "1", "--linger-s", "0",
           "--wait-peers", "1", "--log-level", "warning"]
    if initial_peer is not None:
        cmd += ["--initial-peers", initial_peer]
    cmd += extra
    with open(node_dir / "node.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **NODE_ENV}, start_new_session=True)
    return NodeProcess(name, proc, node_dir)


def _unguarded() -> list[str]:
    """Flags that switch off the per-peer rate limits and bans where the node has them: a lane would be
    banned after a few rejections, and every later message refused before any decoder saw it."""
    from p2pnode.config import NetworkConfig

    if not hasattr(NetworkConfig(), "ban_after"):
        return []
    return ["--ban-after", "1e12", "--peer-rate", "0", "--peer-mb-s", "0"]


def _wait(what: str, node: NodeProcess, deadline: float, ready: Callable[[], Any]) -> Any:
    while (value := ready()) is None:
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} node exited ({node.proc.returncode}) before {what}; "
                               f"see {node.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.name} node not {what} after the start timeout; see {node.log}")
        time.sleep(0.2)
    return value


def _ready_file(node: NodeProcess) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((node.dir / "ready.json").read_text())  # type: ignore[no-any-return]
    return None


def _training_with_peer(node: NodeProcess) -> bool | None:
    rounds = [r for r in node.rows() if r.get("event") == "round"]
    return True if len(rounds) >= 2 and rounds[-1].get("peers_in_view", 0) >= 1 else None


def _target(info: dict[str, Any], swarm: str, opts: FuzzOptions) -> Target:
    from p2pnode.tasks import make_task
    from p2pnode.trainer import flatten_state, spec_fingerprint

    model = make_task("digits").build_model(opts.seed)  # what every node of the swarm starts from
    return Target(swarm=swarm, peer_id=info["peer_id"], fingerprint=spec_fingerprint(model),
                  init=flatten_state(model), max_message_bytes=int(opts.max_message_mb * 2**20))


def run_fuzz_bench(opts: FuzzOptions, *, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Start the two nodes, fuzz the target, stop them; return (and write) the figures and checks."""
    out = opts.out_dir / time.strftime("fuzz-%Y%m%d-%H%M%S")
    swarm = f"fuzz-{os.getpid()}-{time.time_ns() % 10**9}"
    nodes: list[NodeProcess] = []
    try:
        deadline = time.monotonic() + opts.start_timeout_s
        nodes.append(_start_node("target", out, swarm, opts, shard=0, initial_peer=None))
        info = _wait("ready", nodes[0], deadline, lambda: _ready_file(nodes[0]))
        nodes.append(_start_node("peer", out, swarm, opts, shard=1, initial_peer=info["maddrs"][0]))
        _wait("training with its peer", nodes[0], deadline, lambda: _training_with_peer(nodes[0]))
        progress(f"target {info['peer_id']} ready and training; sending {opts.messages:,} messages")
        target, before = nodes[0], nodes[0].rows()
        started = time.time()
        from p2pnode.bench.fuzz_send import run_lanes

        lanes = asyncio.run(run_lanes(_target(info, swarm, opts), info["maddrs"], opts.messages,
                                      lanes=opts.lanes, seed=opts.seed, timeout_s=opts.timeout_s,
                                      rate=opts.rate, keys=out / "lanes", progress=progress))
        ended = time.time()
        alive = target.proc.poll() is None
        if alive:  # the counters of the last messages are in the next round's line
            _wait("done with a round after the fuzzing", target, time.monotonic() + 60,
                  lambda: True if sum(r.get("t", 0) > ended for r in target.rows()) >= 2 else None)
    finally:
        codes = {node.name: node.stop() for node in nodes}
    result = summarize(opts, lanes, before, target.rows(), started=started, ended=ended, alive=alive,
                       exit_code=codes["target"], log=target.log.read_text(errors="replace"))
    result["out"] = str(out)
    result["guard_flags"] = _unguarded()
    if opts.json_path is not None:
        write_json_atomic(opts.json_path, result)
    return result


def _round_gaps(rows: list[dict[str, Any]], started: float, ended: float) -> tuple[float, int]:
    """The largest time between two round lines (or the fuzzing's start/end) and rounds in between."""
    times = [r["t"] for r in rows if r.get("event") == "round" and started < r["t"] < ended]
    points = [started, *times, ended]
    return max(b - a for a, b in zip(points, points[1:])), len(times)


def summarize(opts: FuzzOptions, lanes: list[LaneResult], before: list[dict[str, Any]],
              after: list[dict[str, Any]], *, started: float, ended: float, alive: bool, exit_code: int,
              log: str) -> dict[str, Any]:
    """The figures of one run and its checks (see the module docstring)."""
    outcomes: Counter[str] = Counter()
    by_category: dict[str, Counter[str]] = {}
    for lane in lanes:
        outcomes.update(lane.outcomes)
        for category, counts in lane.by_category.items():
            by_category.setdefault(category, Counter()).update(counts)
    expected = Counter(e for lane in lanes for e in lane.expected.elements())
    mismatches = [m for lane in lanes for m in lane.mismatches]
    rounds = [r for r in after if r.get("event") == "round"]
    rejected_before = max((r.get("messages_rejected", 0) for r in before if r.get("event") == "round"),
                          default=0)
    counted = rounds[-1].get("messages_rejected", 0) - rejected_before if rounds else 0
    gap, rounds_during = _round_gaps(after, started, ended)
    numbers = [r["round"] for r in rounds]
    consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else False
    restarted = log.count(" joined swarm ") != 1 or not consecutive
    log_errors = [line for line in log.splitlines() if LOG_ERRORS.search(line)]
    cut = log.count("unreachable: stream closed")  # the target's own exchanges with its honest peer
    wall = ended - started
    figures = {
        "messages": sum(outcomes.values()), "expected_reject": expected["reject"],
        "valid": expected[ACCEPT], "rejected": outcomes["rejected"], "answered": outcomes["ok"],
        "crashes": int(not alive or restarted) + outcomes["internal"], "hangs": outcomes["timeout"],
        "dropped": outcomes["dropped"], "bad_replies": outcomes["bad-reply"], "peer_exchanges_cut": cut,
        "messages_rejected_counted": counted, "largest_round_gap_s": round(gap, 3),
        "rounds_during_fuzzing": rounds_during, "msgs_per_s": round(sum(outcomes.values()) / wall, 1),
        "wall_time_s": round(wall, 1), "max_latency_s": round(max(lane.max_latency_s for lane in lanes), 3),
        "test_accuracy_last": next((r["test_accuracy"] for r in reversed(rounds)
                                    if r.get("test_accuracy") is not None), None),
    }
    checks = {
        "node_alive_and_never_restarted": alive and not restarted,
        "no_untyped_errors": outcomes["internal"] == 0 and not log_errors,
        "no_hangs": outcomes["timeout"] == 0,
        "every_message_as_expected": not mismatches and figures["messages"] == opts.messages,
        "every_rejection_counted": counted == outcomes["rejected"],
        "kept_training": rounds_during > 0 and gap <= 3 * opts.heartbeat_s,
        "peer_exchanges_intact": cut == 0,
        "clean_exit": exit_code == 0,
    }
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
            "figures": figures, "checks": checks, "passed": all(checks.values()),
            "by_category": {c: dict(v) for c, v in sorted(by_category.items())},
            "mismatches": mismatches[:20], "log_errors": log_errors[:20],
            "reasons": _reasons(lanes)}


def _reasons(lanes: list[LaneResult]) -> dict[str, list[str]]:
    """A few rejection reasons per category (for the report)."""
    out: dict[str, list[str]] = {}
    for lane in lanes:
        for category, reasons in lane.reasons.items():
            kept = out.setdefault(category, [])
            kept += [r for r in reasons if r not in kept][: 3 - len(kept)]
    return dict(sorted(out.items()))


def format_report(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    f = result["figures"]
    failed = [name for name, ok in result["checks"].items() if not ok]
    return "\n".join([
        f"{f['messages']:,} messages in {f['wall_time_s']} s ({f['msgs_per_s']} msgs/s): "
        f"{f['rejected']:,} rejected (expected {f['expected_reject']:,}; counted by the node "
        f"{f['messages_rejected_counted']:,}), {f['answered']:,} answered ({f['valid']:,} valid)",
        f"crashes {f['crashes']}, hangs {f['hangs']}, dropped {f['dropped']}, largest round gap "
        f"{f['largest_round_gap_s']} s over {f['rounds_during_fuzzing']} rounds, "
        f"max latency {f['max_latency_s']} s",
        "all checks passed" if not failed else f"FAILED: {', '.join(failed)}",
    ])


__all__ = ["FuzzOptions", "format_report", "run_fuzz_bench", "summarize"]
