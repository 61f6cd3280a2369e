"""The in-process swarm runner and the robustness benchmark's cells, on the small digits task."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.bench.robustness import RobustnessOptions, run_cell
from p2pnode.bench.variance import rounds_to_target
from p2pnode.inproc import InprocOptions, InprocSwarm, run_inproc

SUMMARY_NODE_KEYS = {"peer_id", "role", "rounds", "test_accuracy", "test_loss", "bytes_sent",
                     "bytes_received", "messages_rejected"}


def test_inproc_swarm_learns_and_writes_the_summary_contract(tmp_path: Path) -> None:
    summary = run_inproc(InprocOptions(nodes=4, task="digits", rounds=6, out=tmp_path))

    assert summary["honest_accuracy_min"] >= 0.8
    assert len(summary["nodes"]) == 4
    for node in summary["nodes"]:
        assert set(node) >= SUMMARY_NODE_KEYS
        assert node["rounds"] == 6
        assert node["bytes_sent"] > 6 * 4810 * 4, "every round pushes at least one full model"
    assert (tmp_path / "summary.json").exists()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_the_gradient_clip_reaches_every_node_trainer() -> None:
    # InprocOptions → TaskConfig → LocalTrainer: a sybilwall scenario run once lost the clip on the way
    swarm = InprocSwarm(InprocOptions(nodes=3, task="digits", max_grad_norm=5.0))

    assert [node.trainer.max_grad_norm for node in swarm.nodes] == [5.0] * 3


def test_byzantine_nodes_are_the_last_ones_and_are_reported_as_such() -> None:
    summary = run_inproc(InprocOptions(nodes=4, byzantine=1, attack="sign-flip", task="digits", rounds=2))

    assert [n["role"] for n in summary["nodes"]] == ["honest"] * 3 + ["byzantine"]


def test_a_sybil_cell_reports_targeted_attack_success() -> None:
    opts = RobustnessOptions(honest=4, rounds=2, fanout=2, f=1, task="digits", partition="iid")
    cell = {"table": "sybil", "attack": "sybil", "sybils": 2, "defense": "mean"}

    row = run_cell(cell, {k: getattr(opts, k) for k in opts.__dataclass_fields__})

    assert "error" not in row, row
    assert 0.0 <= row["targeted_success_mean"] <= row["targeted_success_max"] <= 1.0
    assert row["honest_accuracy_mean"] > 0.3


def test_a_failing_cell_is_recorded_with_its_error_not_raised() -> None:
    opts = RobustnessOptions(honest=4, rounds=1, task="digits")
    row = run_cell({"table": "matrix", "attack": "no-such-attack", "defense": "mean"},
                   {k: getattr(opts, k) for k in opts.__dataclass_fields__})
    assert "no-such-attack" in row["error"]


@pytest.mark.parametrize(("curve", "expected"), [([0.1, 0.5, 0.8, 0.9], 3), ([0.1, 0.2], None), ([0.95], 1)])
def test_rounds_to_target(curve: list[float], expected: int | None) -> None:
    assert rounds_to_target(curve, 0.8) == expected


def test_a_fixed_run_is_fixed_by_its_seed_and_a_threaded_one_still_learns() -> None:
    def accuracies(seed: int, fixed: bool = True) -> list[float]:
        opts = InprocOptions(nodes=4, task="digits", defense="median", rounds=3, local_steps=10, seed=seed,
                             fixed=fixed)
        return [n["test_accuracy"] for n in run_inproc(opts)["nodes"]]

    first = accuracies(0)

    assert min(first) > 0.6
    assert accuracies(0) == first
    assert accuracies(1) != first
    assert min(accuracies(0, fixed=False)) > 0.6  # worker threads: timing-dependent, still learning


def test_a_robustness_file_is_resumed_only_under_the_settings_its_cells_ran_with(tmp_path: Path) -> None:
    from p2pnode.bench.robustness import _check_resumable
    from p2pnode.errors import ConfigError

    path = tmp_path / "cells.json"
    stored = {k: getattr(RobustnessOptions(), k) for k in RobustnessOptions.__dataclass_fields__}
    stored.pop("max_grad_norm")  # a file written before the clip existed ran without one
    unclipped = {**stored, "max_grad_norm": 0.0}
    _check_resumable(stored, {**unclipped, "workers": 1}, path)  # how many run at once changes nothing

    with pytest.raises(ConfigError, match=r"max_grad_norm 0\.0 there, 5\.0 now"):
        _check_resumable(stored, {**unclipped, "max_grad_norm": 5.0}, path)
    with pytest.raises(ConfigError, match="seed 0 there, 1 now"):
        _check_resumable(stored, {**unclipped, "seed": 1}, path)


def test_a_node_removed_after_a_round_makes_no_more_rounds_and_is_not_evaluated() -> None:
    swarm = InprocSwarm(InprocOptions(nodes=4, task="digits", rounds=3, local_steps=2))

    def remove_last(r: int) -> None:
        if r == 1:
            swarm.removed.add(3)

    finals = swarm.execute(after_round=remove_last)

    assert [row["node"] for row in finals] == [0, 1, 2]
    assert swarm.nodes[3].round == 1
    assert [swarm.nodes[i].round for i in range(3)] == [3, 3, 3]
    assert sum(1 for row in swarm.rows if row["event"] == "round" and row["node"] == 3) == 1
