"""``p2pnode bench gpu`` on the CPU with tiny sizes: every section yields real figures, with none of the
packages the GPU machine lacks (hivemind and its libp2p stack) importable."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from p2pnode import cli
from p2pnode.bench.gpu import CODECS, GpuBenchOptions, bench_layout
from protocols.codecs.powersgd import low_rank_dims

RULES = {"mean", "median", "trimmed-mean:3", "krum:3", "multi-krum:3,n-4", "centered-clip:1.0", "nna:3"}


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# What the GPU machine lacks (it has torch, numpy, msgpack; scripts/gpu_bench.sh brings cryptography and
# base58): the bench runs in a subprocess that cannot import these.
MISSING_ON_GPU = ("hivemind", "pydantic", "pydantic_core", "grpc", "aiomqtt", "paho", "blake3", "mmh3",
                  "multihash", "varint", "prefetch_generator", "byzfl")
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition('.')[0] in {MISSING_ON_GPU!r}:
            raise ImportError('not on the GPU machine: ' + name)
sys.meta_path.insert(0, Block())
from p2pnode.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_bench_gpu_on_cpu_reports_every_figure_without_hivemind(tmp_path: Path) -> None:
    out = tmp_path / "bench-gpu.json"

    proc = subprocess.run([sys.executable, "-c", BLOCKER, "bench", "gpu", "--device", "cpu", "--nodes", "2",
                           "--rounds", "5", "--warmup-rounds", "1", "--local-steps", "2", "--fanout", "1",
                           "--trials", "1", "--repeats", "1", "--numel", "140000", "--json", str(out)],
                          capture_output=True, text=True, timeout=110, check=False)

    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["device"] == "cpu"
    tp = data["throughput"]
    for mode in ("off", "on"):
        figures = tp[mode]
        assert _positive(figures["steps_per_s_per_node"]), figures
        assert _positive(figures["train_steps_per_s_per_node"]), figures
        assert figures["rounds_timed"] == 2 * 3, "each node's rounds 2..4 (warm-up and last round left out)"
        assert figures["train_calls_timed"] >= 2
    assert tp["off"]["pulled_per_round"] == 0
    assert tp["off"]["bytes_sent_per_node_round"] == 0, "gossip off exchanges nothing"
    assert tp["on"]["pulled_per_round"] == 1, "gossip on pulls from its one peer every round"
    assert tp["on"]["bytes_sent_per_node_round"] > 4 * 100_000, "and pushes the whole model"
    assert [r["overlap"] for r in tp["runs"]] == [False, True]
    ratio = tp["on"]["steps_per_s_per_node"] / tp["off"]["steps_per_s_per_node"]
    assert math.isclose(tp["gossip_cost"], 1 - ratio)

    codecs = data["codecs"]
    assert [r["codec"] for r in codecs["rows"]] == list(CODECS)
    assert codecs["numel"] == 140_000
    assert _positive(codecs["clone_gbs"])
    for row in codecs["rows"]:
        assert _positive(row["encode_gbs"]), row
        assert _positive(row["decode_gbs"]), row
        assert row["bytes"] > 0

    rules = {r["rule"]: r for r in data["rules"]["rows"] if r["impl"] == "p2pnode"}
    assert set(rules) == RULES
    for row in rules.values():
        assert _positive(row["median_s"]), row
        assert _positive(row["input_gbs"]), row
        assert (row["n"], row["d"], row["device"]) == (16, 140_000, "cpu")

    report = proc.stdout
    assert "gossip cost = 1 - on/off" in report
    assert "| terngrad |" in report
    assert "| centered-clip:1.0 |" in report


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "gpu", "--device", "cpu", "--rounds", "4", "--warmup-rounds", "2"]) == 2
    assert "rounds >= warmup_rounds + 3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fanout"):
        GpuBenchOptions(nodes=2, fanout=2)


@pytest.mark.parametrize("numel", [25_557_032, 140_000, 140_003])
def test_bench_layout_has_numel_elements_and_a_low_rank_matrix(numel: int) -> None:
    name, layout = bench_layout(numel)

    assert layout.numel == numel
    assert any(low_rank_dims(shape, 2) for shape in layout.shapes)
    assert (name == "resnet50") == (numel == 25_557_032)
