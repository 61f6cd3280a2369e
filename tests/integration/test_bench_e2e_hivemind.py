"""The hivemind baseline of ``p2pnode bench e2e`` as a real 2-process swarm: it learns, bytes are counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2pnode.bench.e2e import E2EOptions, run_one
from p2pnode.tasks import ShardSpec, make_task

pytestmark = [pytest.mark.integration]


@torch.no_grad()
def _untrained_accuracy(seed: int, samples: int) -> float:
    task = make_task("digits")
    data = task.load(ShardSpec())
    model = task.build_model(seed).eval()
    x, y = data.test_x[:samples], data.test_y[:samples]
    return float((model(x).argmax(dim=1) == y).float().mean())


@pytest.mark.timeout(240)
def test_hivemind_baseline_learns_and_counts_bytes(tmp_path: Path) -> None:
    opts = E2EOptions(nodes=2, task="digits", rounds=3, target=0.5, repeats=1, eval_samples=300,
                      systems=("hivemind",), matchmaking_s=1.0, out_dir=tmp_path / "runs",
                      json_path=tmp_path / "e2e.json")

    row = run_one(opts, "hivemind", 0)

    assert row["all_finished"]
    assert row["nodes_finished"] == 2
    curve = row["curve"]
    assert [p["round"] for p in curve] == [1, 2, 3]
    # every round averaged the whole group: both nodes hold the same model, hence the same accuracy
    assert all(p["accuracy_min"] == p["accuracy"] for p in curve)
    untrained = _untrained_accuracy(0, 300)
    assert curve[0]["accuracy"] > untrained + 0.3, (untrained, curve)
    assert curve[-1]["accuracy"] > curve[0]["accuracy"], curve
    assert row["final_accuracy"] > 0.8  # the whole held-out split
    assert row["time_to_target_s"] is not None
    assert row["round_to_target"] == 1
    # each all-reduce round a node sends its half of the model vector and the averaged half back to its peer
    numel = sum(p.numel() for p in make_task("digits").build_model(0).state_dict().values()
                if p.is_floating_point())
    sent = row["bytes_sent_per_node"]
    assert 3 * 4 * numel <= sent <= 3 * 4 * numel * 1.2, (numel, sent)
    assert row["cpu_s"] > 1.0
    assert row["processes"] >= 4
