"""SIGKILL during checkpoint writes, 20 times each: every restart loads a valid checkpoint and loses at most
one checkpoint interval of progress.

Two levels: (1) a process that writes large checkpoints back to back through the node's own
:func:`p2pnode.checkpoint.save_checkpoint`, so most kills land inside a write (a temp file is left), and
(2) a real `p2pnode run` node checkpointing every round, killed at random moments and restarted from its
directory, whose resumed round is compared with the last round its metrics file recorded.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pnode.checkpoint import load_checkpoint, remove_partial_writes
from p2pnode.report import round_rows

KILLS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

WRITER = r"""
import sys, torch
from p2pnode.checkpoint import save_checkpoint
directory, start = sys.argv[1], int(sys.argv[2])
big = torch.randn(8 * 1024 * 1024)  # 32 MiB: a write takes long enough to be hit
n = start
while True:
    n += 1
    big[0] = n
    save_checkpoint(directory, {"round": n, "trainer": {"big": big}})
    print(n, flush=True)
"""


@pytest.mark.timeout(300)
def test_sigkill_inside_checkpoint_writes_always_leaves_a_valid_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(5)
    directory = tmp_path / "ckpt"
    last_acked, mid_write = 0, 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(last_acked)], env=ENV,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one complete write, so the next kill lands in a later one
        assert first.strip(), "writer produced no checkpoint"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        acked = [int(x) for x in (first + out).split()]
        last_acked = acked[-1]
        mid_write += remove_partial_writes(directory)
        state = load_checkpoint(directory)
        assert state is not None
        # the last acknowledged write, or the one whose rename landed just before the kill
        assert state["round"] in (last_acked, last_acked + 1)
        assert int(state["trainer"]["big"][0]) == state["round"]
        last_acked = state["round"]
    print(f"{KILLS} kills, {mid_write} inside a write (temp file left); every checkpoint loaded")
    assert mid_write >= KILLS // 4  # the test really hits writes in progress (typically most of them)


def _start_node(tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "p2pnode", "run", "--task", "digits", "--rounds", "0", "--local-steps", "20",
           "--identity", str(tmp / "node.key"), "--swarm", "ckpt-kill",
           "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
           "--metrics-file", str(tmp / "metrics.jsonl"), "--checkpoint-dir", str(tmp / "ckpt"),
           "--checkpoint-every", "1", "--threads", "1", "--log-level", "info"]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV)


def _last_round(metrics: Path) -> int:
    return max((int(row["round"]) for row in round_rows(metrics)), default=0)  # cut lines are skipped


def _resume_round(log: Path, offset: int) -> int | None:
    """The round in the first "resumed from ... at round R" line written after ``offset``."""
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(offset)
        found = re.search(r"resumed from \S+ at round (\d+)", fh.read())
    return int(found.group(1)) if found else None


def _wait(what: str, proc: subprocess.Popen[bytes], log: Path, cond: object, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert proc.poll() is None, f"node exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.timeout(600)
def test_a_real_node_killed_20_times_resumes_each_time_within_one_checkpoint_interval(tmp_path: Path) -> None:
    rng = random.Random(7)
    log, metrics = tmp_path / "node.log", tmp_path / "metrics.jsonl"
    lost: list[int] = []
    reached = 0  # last round the metrics file recorded before the latest kill
    for kill in range(KILLS + 1):
        offset = log.stat().st_size if log.exists() else 0
        proc = _start_node(tmp_path, log)
        try:
            resumed = 0
            if kill > 0:
                _wait("the resume line", proc, log, lambda at=offset: _resume_round(log, at) is not None)
                resumed = _resume_round(log, offset) or 0
                # the checkpoint of round r is written right after round r's metrics line
                assert reached - 1 <= resumed <= reached, (kill, reached, resumed)
                lost.append(reached - resumed)
            _wait("3 new rounds", proc, log, lambda r=resumed: _last_round(metrics) >= r + 3)
            if kill < KILLS:
                time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        reached = _last_round(metrics)
    assert len(lost) == KILLS
    print(f"{KILLS} kills of a real node: rounds lost per restart {lost} (checkpoint interval 1 round)")
