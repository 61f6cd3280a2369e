"""Process faults on real multi-process swarms on loopback: a frozen node (SIGSTOP/SIGCONT of its whole
process group: node, DHT process and libp2p daemon, as a frozen host) and half the swarm SIGKILLed at a
random round. ``tests/integration/test_swarm.py`` already kills one node of four; these are the harder
cells of the fault matrix. Network faults (partition, loss, bandwidth) are in ``test_netns_faults.py``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from p2pnode.swarm import Swarm, SwarmOptions

pytestmark = [pytest.mark.integration]

HEARTBEAT_S = 2.0  # the node default (--heartbeat-s)
# Without the straggler cutoff a round waits for every sampled peer up to --timeout-exchange (30 s by
# default): a frozen peer would stall the rounds of whoever sampled it that long. 4 s is ~100x what a digits
# exchange takes here. --wait-peers-s: on a busy machine node 0 may otherwise start alone, rounds ahead.
NET_FLAGS = ["--timeout-exchange", "4", "--timeout-connect", "2", "--wait-peers-s", "120"]
# The daemon's own timeouts (exchange 30 s, connect 5 s): only the straggler cutoff (p2pnode/stragglers.py)
# keeps a frozen peer from holding the rounds of whoever samples it.
DEFAULT_TIMEOUTS = ["--wait-peers-s", "120"]


def _round_times(swarm: Swarm, node: int) -> list[tuple[int, float]]:
    return [(ev["round"], ev["t"]) for ev in swarm.events() if ev["node"] == node and ev["event"] == "round"]


def _wait_rounds(swarm: Swarm, nodes: list[int], at_least: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        progress = swarm.poll_progress()
        if all(progress[i].round >= at_least for i in nodes):
            return
        dead = [p.node for p in progress if p.exited]
        assert not dead, f"nodes {dead} exited"
        assert time.monotonic() < deadline, f"not all of {nodes} reached round {at_least}: {progress}"
        time.sleep(0.1)


def _max_gap(times: list[float], start: float, end: float) -> float:
    """Longest time without a finished round between ``start`` and ``end``."""
    inside = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in zip(inside, inside[1:]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("flags", [NET_FLAGS, DEFAULT_TIMEOUTS], ids=["timeout-4s", "default-timeouts"])
def test_a_frozen_node_does_not_stall_the_others_and_resumes_after_sigcont(tmp_path: Path,
                                                                           flags: list[str]) -> None:
    opts = SwarmOptions(nodes=4, rounds=100_000, task="digits", out=tmp_path / "run", linger_s=0.0,
                        extra_args=[*flags, "--eval-every", "10"])
    frozen_s, victim, others = 10.0, 2, [0, 1, 3]
    with Swarm(opts) as swarm:
        swarm.start()
        _wait_rounds(swarm, [0, 1, 2, 3], 5, timeout_s=90)
        os.killpg(swarm.processes[victim].pid, signal.SIGSTOP)
        t_stop = time.time()
        try:
            time.sleep(frozen_s)
        finally:
            # the clock is read before the SIGCONT: read after it, a loaded machine can run the victim
            # (and let it write a round row) before this thread reads the clock
            t_cont = time.time()
            os.killpg(swarm.processes[victim].pid, signal.SIGCONT)
        at_cont = swarm.poll_progress()[victim].round
        _wait_rounds(swarm, [victim], at_cont + 3, timeout_s=60)
        time.sleep(2.0)
        swarm.poll_progress()
        victim_times = [t for _, t in _round_times(swarm, victim)]
        other_times = {i: [t for _, t in _round_times(swarm, i)] for i in others}

    # the freeze took: the victim finished no round while stopped (1 s for a round ending as it froze)
    assert not [t for t in victim_times if t_stop + 1.0 < t < t_cont], "the victim kept running"
    assert [t for t in victim_times if t > t_cont], "the victim made no round after SIGCONT"
    for i, times in other_times.items():
        made = len([t for t in times if t_stop < t < t_cont])
        gap = _max_gap(times, t_stop, t_cont + 2.0)
        assert made >= 5, f"node {i} made only {made} rounds while node {victim} was frozen"
        assert gap <= 3 * HEARTBEAT_S, f"node {i}: no round for {gap:.1f} s while node {victim} was frozen"


@pytest.mark.timeout(240)
def test_survivors_finish_when_half_the_nodes_are_killed_at_a_random_round(tmp_path: Path) -> None:
    seed = int(os.environ.get("P2PNODE_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    nodes, rounds = 6, 200
    victims = sorted(rng.sample(range(nodes), nodes // 2))  # may include node 0, the bootstrap peer
    kill_at = rng.randint(3, 40)
    why = f"seed {seed} (P2PNODE_FAULT_SEED), victims {victims}, kill at round {kill_at}"
    survivors = [i for i in range(nodes) if i not in victims]
    opts = SwarmOptions(nodes=nodes, rounds=rounds, task="digits", out=tmp_path / "run", linger_s=5.0,
                        extra_args=NET_FLAGS)
    with Swarm(opts) as swarm:
        swarm.start()
        _wait_rounds(swarm, victims, kill_at, timeout_s=120)
        for i in victims:
            os.kill(swarm.processes[i].pid, signal.SIGKILL)
        killed_at = [p.round for p in swarm.poll_progress()]
        swarm.wait_finished(timeout=150)
        progress = swarm.poll_progress()

    for i in victims:
        assert progress[i].failed, (why, progress[i])
        assert progress[i].exit_code == -signal.SIGKILL, (why, progress[i])
    for i in survivors:
        p = progress[i]
        assert p.finished, (why, p)
        assert p.round == rounds, (why, p)
        assert killed_at[i] < rounds, (why, "the survivor had finished before the kill", killed_at)
        assert p.test_accuracy is not None, (why, p)
        assert p.test_accuracy >= 0.8, (why, p)
