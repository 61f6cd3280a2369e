"""A node joins a running swarm (real processes) whose three live members include one liar that answers
join requests and exchanges with a poisoned model: the joiner starts from the median of the three donors'
models and ends within 2 points of the honest nodes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from p2pnode.report import round_rows
from p2pnode.swarm import Swarm, SwarmOptions

pytestmark = [pytest.mark.integration]


def _wait(what: str, cond: Any, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.timeout(300)
def test_a_joiner_with_one_lying_donor_of_three_ends_within_two_points_of_the_honest_swarm(
        tmp_path: Path) -> None:
    join_at, joiner_rounds = 10, 20
    # the old nodes run until stopped; the joiner runs joiner_rounds and is compared with them then
    opts = SwarmOptions(nodes=4, rounds=1_000_000, task="digits", out=tmp_path / "run", linger_s=5.0,
                        defense="nna:1", fanout=2, extra_args=["--wait-peers", "2"])
    with Swarm(opts) as swarm:
        swarm.start(count=2)
        swarm.launch_late(2, ["--attack", "gaussian:100"])  # the liar: every model it sends is noise
        first = swarm.node_paths(0).metrics
        _wait("the swarm to run", lambda: (r := round_rows(first)) and r[-1]["round"] >= join_at)
        swarm.launch_late(3, ["--rounds", str(joiner_rounds), "--join-donors", "3", "--log-level", "info",
                              "--wait-peers", "3"])
        result = swarm.node_paths(3).result
        _wait("the joiner to finish", result.exists)
        honest_now = [[r["test_accuracy"] for r in round_rows(swarm.node_paths(i).metrics)[-5:]]
                      for i in (0, 1)]
        log = swarm.node_paths(3).log.read_text()
        joiner_rows = round_rows(swarm.node_paths(3).metrics)
        joiner_final = json.loads(result.read_text())["test_accuracy"]
    assert "join: started from the median of 3 donors' models" in log, log[-3000:]
    honest = sum(sum(a) / len(a) for a in honest_now) / 2  # last 5 evaluations of each honest node
    assert honest > 0.85, honest_now  # the honest swarm itself learns despite the liar
    assert abs(joiner_final - honest) <= 0.02, (joiner_final, honest_now)
    # already after its first round the joiner is close: it did not start from the liar's noise
    assert joiner_rows[0]["test_accuracy"] >= honest - 0.10, (joiner_rows[0], honest_now)
