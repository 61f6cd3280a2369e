"""--mode spsa and compressed codecs on real multi-process swarms (hivemind DHT + libp2p on loopback)."""

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
DIGITS_MODEL_BYTES = (64 * 64 + 64 + 64 * 10 + 10) * 4


@pytest.mark.timeout(300)
def test_spsa_swarm_applies_every_scalar_everywhere_and_the_models_agree(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rounds, steps, nodes = 4, 150, 3

    proc = subprocess.run([*P2PNODE, "swarm", "--nodes", str(nodes), "--task", "digits", "--rounds",
                           str(rounds), "--local-steps", str(steps), "--fanout", "1", "--out", str(out),
                           "--linger-s", "5", "--no-live", "--", "--mode", "spsa", "--spsa-lr", "2e-3"],
                          env=ENV, capture_output=True, text=True, timeout=280)

    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted((out / "nodes").glob("node-*.result.json"))]
    assert len(results) == nodes
    produced = nodes * rounds * steps
    assert all(r["scalars_produced"] == rounds * steps for r in results)
    assert all(r["scalars_applied"] == produced for r in results), [r["scalars_applied"] for r in results]
    assert all(r["summary"] == results[0]["summary"] for r in results)
    probes = [r["probe"] for r in results]
    assert max(abs(a - b) for p in probes for a, b in zip(p, probes[0], strict=True)) < 1e-5
    assert min(r["test_accuracy"] for r in results) > 0.3  # digits from a random init: SPSA learns
    sent = sum(r["bytes_sent"] for r in results)
    assert sent < 20 * produced * (nodes - 1), "one byte per scalar plus bounded overhead"
    assert all(r["messages_rejected"] == 0 for r in results)


@pytest.mark.timeout(300)
def test_topk_swarm_learns_with_a_fraction_of_dense_bytes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rounds = 10

    proc = subprocess.run([*P2PNODE, "swarm", "--nodes", "4", "--task", "digits", "--rounds", str(rounds),
                           "--codec", "topk:0.05", "--out", str(out), "--linger-s", "5", "--no-live"],
                          env=ENV, capture_output=True, text=True, timeout=280)

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["honest_accuracy_min"] >= 0.8, summary
    for node in summary["nodes"]:
        assert node["messages_rejected"] == 0, node
        # dense would send >= one model per round; top-5% sends well under a fifth of that
        assert node["bytes_sent"] < rounds * DIGITS_MODEL_BYTES, node
