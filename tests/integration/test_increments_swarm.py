"""--mode increments on a real multi-process swarm (hivemind DHT + libp2p on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

P2PNODE = [sys.executable, "-m", "p2pnode"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.timeout(300)
def test_increments_swarm_ends_with_one_global_model_that_learned(tmp_path: Path) -> None:
    out = tmp_path / "run"

    proc = subprocess.run([*P2PNODE, "swarm", "--nodes", "3", "--task", "digits", "--rounds", "4",
                           "--out", str(out), "--linger-s", "5", "--no-live", "--", "--mode", "increments",
                           "--codec", "topk:0.05"],
                          env=ENV, capture_output=True, text=True, timeout=280)

    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((out / "nodes").glob("node-*.result.json"))]
    assert len(results) == 3
    assert len({r["global_digest"] for r in results}) == 1  # bit-identical G in three processes
    assert len({r["test_accuracy"] for r in results}) == 1
    assert min(r["test_accuracy"] for r in results) > 0.6  # digits from a random init
    for r in results:
        assert r["messages_rejected"] == 0, r
        assert r["increments_missing"] == 0, r
        assert r["increments_late"] == 0, r
