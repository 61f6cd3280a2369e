"""``p2pnode bench defenses`` on a tiny size: every rule timed, rows well-formed, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from p2pnode.bench.defenses import BYZFL_EQUIVALENTS, load_byzfl_aggregators, run_defense_bench


def test_bench_times_every_rule_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()

    result = run_defense_bench(n=9, dims=(300,), repeats=1, device="cpu", json_path=out, threads=1)

    rows = [r for r in result["rows"] if r["device"] == "cpu"]
    ours = {r["rule"] for r in rows if r["impl"] == "p2pnode"}
    expected = {"mean", "median", "trimmed-mean:3", "krum:3", "multi-krum:3,n-4", "centered-clip:1.0",
                "nna:3"}
    assert ours == set(BYZFL_EQUIVALENTS) == expected
    assert {r["rule"] for r in rows if r["impl"] == "reference"} == {"cdist+mean", "nna-floor"}
    assert all(r["median_s"] > 0 and r["n"] == 9 and r["d"] == 300 for r in rows)
    if load_byzfl_aggregators() is not None:
        assert all(r["ratio_vs_byzfl"] is not None for r in rows if r["impl"] != "reference")
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert result["threads"] == 1
    assert torch.get_num_threads() == threads, "the thread setting is restored"
