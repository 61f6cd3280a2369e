"""``p2pnode simulate`` end to end: flags, progress on stderr, summary and report files, exit codes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from p2pnode.cli import build_parser, main


def test_simulate_writes_summary_metrics_and_report(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    trace = tmp_path / "churn.csv"
    trace.write_text("round,node,state\n2,5,down\n")
    code = main(["simulate", "--nodes", "12", "--rounds", "3", "--local-steps", "5", "--topology", "ba:2",
                 "--byzantine-frac", "0.1", "--attack", "sign-flip", "--defense", "median",
                 "--churn", str(trace), "--final-eval-samples", "100", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "round 3/3" in captured.err  # the progress bar (plain lines when not a terminal)
    assert "honest accuracy: mean" in captured.out
    assert "peak memory" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["topology"] == "ba:2"
    assert summary["config"]["byzantine"] == 1
    assert summary["churn"]["left"] == 1
    assert summary["nodes"][5]["finished"] is False
    assert summary["nodes"][11]["role"] == "byzantine"
    for name in ("metrics.jsonl", "index.html", "accuracy.png", "bytes_sent.png", "peers_in_view.png"):
        assert (out / name).exists(), name
    # `p2pnode report` reads the run back
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "index.html").exists()


def test_help_documents_every_flag_and_its_default() -> None:
    sim = build_parser()._subparsers._group_actions[0].choices["simulate"]  # type: ignore[union-attr, index]
    for action in sim._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert "default" in action.help, action.option_strings


@pytest.mark.parametrize(("argv", "message"), [
    (["--nodes", "1"], "--nodes must be >= 2"),
    (["--byzantine-frac", "0.2"], "needs --attack"),
    (["--topology", "ring"], "topology"),
    (["--churn", "7"], "churn"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_scenario_dispatches_to_the_scenarios_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    class Fake:
        def run(self, out: Path | None, *, seed: int = 0, quick: bool = False, progress: object = None
                ) -> dict[str, object]:
            calls.append((out, seed, quick))
            return {"rows": [{"row": "r1", "ours": "0.9", "paper": "0.8"}]}

    fake = types.ModuleType("p2pnode.sim.scenarios")
    fake.SCENARIOS = {"demo": Fake()}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pnode.sim.scenarios", fake)
    monkeypatch.setattr("p2pnode.sim.scenarios", fake, raising=False)
    assert main(["simulate", "--scenario", "demo", "--seed", "4", "--quick", "--workers", "3",
                 "--out", str(tmp_path)]) == 0
    assert calls == [(tmp_path, 4, True)]  # --workers is not passed to a run() that takes none
    assert "r1: ours 0.9; paper 0.8" in capsys.readouterr().out
    assert main(["simulate", "--scenario", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown scenario" in capsys.readouterr().err


def test_scenario_without_the_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "p2pnode.sim.scenarios", None)  # import fails as if it were missing
    monkeypatch.delattr("p2pnode.sim.scenarios", raising=False)
    code = main(["simulate", "--scenario", "monna", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "p2pnode.sim.scenarios" in err
