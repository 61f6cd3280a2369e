"""Metrics loading, the plots, and the run report (``p2pnode report`` and the end of ``p2pnode swarm``)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from p2pnode import cli
from p2pnode.report import MetricsTail, load_metrics, per_round_deltas, plot_accuracy
from p2pnode.run_report import load_run, summary_from_rows, write_report
from p2pnode.swarm import Swarm, SwarmOptions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _round(node: int, r: int, acc: float | None, role: str = "honest") -> dict[str, object]:
    return {"event": "round", "node": node, "peer_id": f"P{node}", "role": role, "round": r,
            "test_accuracy": acc, "train_loss": 1.0}


def test_load_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    rows = [_round(0, 1, 0.5), _round(0, 2, None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "round", "rou')
    assert load_metrics(path) == rows


def test_load_metrics_skips_blank_and_garbage_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('\n{"a": 1}\n[1, 2]\nnot json\n{"b": 2}\n')
    assert load_metrics(path) == [{"a": 1}, {"b": 2}]


def test_load_metrics_missing(tmp_path: Path) -> None:
    assert load_metrics(tmp_path / "nope.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        load_metrics(tmp_path / "nope.jsonl")


def test_plot_accuracy_writes_png(tmp_path: Path) -> None:
    rows = [_round(n, r, 0.1 * r if r % 2 else None, "byzantine" if n == 2 else "honest")
            for n in range(3) for r in range(1, 6)]
    rows.append({"event": "final", "node": 0, "role": "honest", "rounds": 5, "test_accuracy": 0.7})
    out = plot_accuracy(rows, tmp_path / "sub" / "acc.png", title="test")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_accuracy_without_data_and_many_nodes(tmp_path: Path) -> None:
    assert plot_accuracy([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
    rows = [_round(n, r, 0.5) for n in range(20) for r in range(1, 3)]
    assert plot_accuracy(rows, tmp_path / "many.png").read_bytes()[:8] == PNG_MAGIC


def test_metrics_tail_reads_incrementally(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    tail = MetricsTail(path)
    assert tail.read_new() == []  # file does not exist yet
    first, second = _round(0, 1, 0.5), _round(0, 2, None)
    line2 = json.dumps(second) + "\n"
    with open(path, "w") as f:
        f.write(json.dumps(first) + "\n" + line2[:10])
    assert tail.read_new() == [first]
    with open(path, "a") as f:
        f.write(line2[10:] + '{"event": "info"}\n{"event": "final", "rounds": 2')
    assert tail.read_new() == [second]  # "info" filtered out, partial final waits
    assert tail.read_new(writer_exited=True) == []  # truncated for good: dropped
    assert tail.events == [first, second]


# -- the run report (p2pnode report, and the end of p2pnode swarm) ----------------------------------
EVIL_PEER = '12D3KooW<script>alert("x")</script>&'
PLOTS = ("accuracy.png", "bytes_sent.png", "peers_in_view.png")


def _node_events(node: int, role: str, rounds: int, *, finished: bool, peer: str | None = None,
                 bytes_per_round: int = 1000) -> list[dict[str, object]]:
    """Round events (accuracy only on even rounds, as with --eval-every 2) and a final event if finished."""
    rows: list[dict[str, object]] = []
    for r in range(1, rounds + 1):
        rows.append({"event": "round", "t": 100.0 + r + 0.1 * node, "node": node,
                     "peer_id": peer or f"P{node}", "role": role, "round": r, "train_loss": 1.0 / r,
                     "test_accuracy": 0.5 + 0.01 * r if r % 2 == 0 else None,
                     "test_loss": 1.0 / r if r % 2 == 0 else None, "peers_in_view": min(r, 3),
                     "bytes_sent": bytes_per_round * r, "bytes_received": 2 * bytes_per_round * r,
                     "messages_rejected": 0})
    if finished:
        rows.append({"event": "final", "t": 200.0 + node, "node": node, "peer_id": peer or f"P{node}",
                     "role": role, "round": rounds, "rounds": rounds, "test_accuracy": 0.6, "test_loss": 0.4,
                     "bytes_sent": bytes_per_round * rounds, "bytes_received": 2 * bytes_per_round * rounds,
                     "messages_rejected": 5 if role == "byzantine" else 0})
    return rows


def _synthetic_rows() -> list[dict[str, object]]:
    """Nodes 0, 1 honest; 2 byzantine (sends 100x more); 3 honest, died after round 3."""
    return [*_node_events(0, "honest", 8, finished=True), *_node_events(1, "honest", 8, finished=True),
            *_node_events(2, "byzantine", 8, finished=True, peer=EVIL_PEER, bytes_per_round=100_000),
            *_node_events(3, "honest", 3, finished=False)]


def _summary(rows: list[dict[str, object]]) -> dict[str, object]:
    summary = summary_from_rows(rows)
    summary["config"] = {"task": "digits", "nodes": 4, "partition": "iid", "fanout": 2, "byzantine": 1,
                         "attack": "<b>noise</b>", "extra_args": ["--lr", "0.1"]}
    summary["nodes"][3]["exit_code"] = 1  # type: ignore[index]
    return summary


def _write_run(run: Path, rows: list[dict[str, object]], *, per_node: bool = False,
               summary: dict[str, object] | None = None) -> Path:
    run.mkdir(parents=True)
    if per_node:
        (run / "nodes").mkdir()
        for node in sorted({int(r["node"]) for r in rows}):  # type: ignore[call-overload]
            lines = [json.dumps({k: v for k, v in r.items() if k != "node"}) + "\n" for r in rows
                     if r["node"] == node]
            (run / "nodes" / f"node-{node}.metrics.jsonl").write_text("".join(lines) + '{"event": "rou')
    else:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _assert_valid_pngs(folder: Path) -> None:
    from PIL import Image

    for name in PLOTS:
        path = folder / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as img:
            img.verify()
            assert img.format == "PNG"
            assert min(img.size) > 100


def _table_rows(page: str) -> list[str]:
    """The node table's body rows."""
    table = page.split('<table class="nodes">', 1)[1].split("</table>", 1)[0]
    return [line for line in table.splitlines() if line.startswith("<tr") and "<td" in line]


def test_per_round_deltas_differences_a_cumulative_counter() -> None:
    assert per_round_deltas({1: 100, 2: 250, 3: 250}) == {1: 100.0, 2: 150.0, 3: 0.0}
    assert per_round_deltas({2: 200, 5: 500}) == {2: 100.0, 5: 100.0}  # gaps: spread evenly
    assert per_round_deltas({1: 100, 2: 50, 3: 80}) == {1: 100.0, 3: 30.0}  # a reset gives no value
    assert per_round_deltas({}) == {}


def test_report_of_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    rows = _synthetic_rows()
    run = _write_run(tmp_path / "run", rows, summary=_summary(rows))
    # Execute
    code = cli.main(["report", str(run)])
    # Assert
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(run / "index.html")
    _assert_valid_pngs(run)
    page = (run / "index.html").read_text(encoding="utf-8")
    table = _table_rows(page)
    assert len(table) == 4
    for i, row in enumerate(table):
        assert row.count("<td") == 9
        assert f'<td class="num">{i}</td>' in row
    assert 'class="byzantine"' in table[2]
    assert "0.6000" in table[0]
    assert "0.5200" in table[3]  # died: its last evaluation (round 2)
    assert "no (exit 1)" in table[3]
    assert "yes" in table[0]
    assert "0.76" in table[2]  # 800,000 bytes in MiB
    for name in PLOTS:
        assert f'<img src="{name}"' in page


def test_report_escapes_values_and_is_self_contained(tmp_path: Path) -> None:
    # Prepare
    rows = _synthetic_rows()
    summary = _summary(rows)
    summary["nodes"][0]["test_accuracy"] = "<i>bad</i>"  # type: ignore[index]
    summary["wall_time_s"] = None
    # Execute
    page = write_report(rows, summary, tmp_path / "out").read_text(encoding="utf-8")
    # Assert
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "<b>noise</b>" not in page
    assert "&lt;b&gt;noise&lt;/b&gt;" in page
    assert "&lt;i&gt;bad&lt;/i&gt;" in page
    assert html.escape(EVIL_PEER, quote=True) in page  # the whole id, in the title attribute
    for external in ("http://", "https://", "src=\"/", "//cdn", "@import", "url("):
        assert external not in page
    _assert_valid_pngs(tmp_path / "out")


def test_report_from_per_node_files_without_summary(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    run = _write_run(tmp_path / "run", _synthetic_rows(), per_node=True)
    out_dir = tmp_path / "elsewhere" / "report"
    # Execute
    code = cli.main(["report", str(run), "--out", str(out_dir)])
    # Assert
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == str(out_dir / "index.html")
    assert not (run / "index.html").exists()
    _assert_valid_pngs(out_dir)
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "No summary.json" in page
    table = _table_rows(page)
    assert len(table) == 4
    assert "yes" in table[1]
    assert "no" in table[3]
    assert "3 of 4" in page  # finished


def test_summary_from_rows() -> None:
    summary = summary_from_rows(_synthetic_rows())
    nodes = summary["nodes"]
    assert [n["node"] for n in nodes] == [0, 1, 2, 3]
    assert [n["finished"] for n in nodes] == [True, True, True, False]
    assert nodes[3]["rounds"] == 3
    assert nodes[3]["test_accuracy"] == pytest.approx(0.52)
    assert nodes[2]["messages_rejected"] == 5
    assert summary["honest_accuracy_min"] == pytest.approx(0.52)
    assert summary["honest_accuracy_mean"] == pytest.approx((0.6 + 0.6 + 0.52) / 3)
    assert summary["all_finished"] is False


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-round-events"])
def test_report_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           case: str) -> None:
    # Prepare
    run = tmp_path / "run"
    if case == "file":
        run.write_text("not a directory")
    elif case == "empty":
        (run / "nodes").mkdir(parents=True)
    elif case == "no-round-events":
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"event": "info"}\nnot json\n')
        (run / "summary.json").write_text("{}")
    # Execute
    code = cli.main(["report", str(run)])
    # Assert
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("p2pnode report: error: ")
    assert str(run) in err
    assert not (tmp_path / "run" / "index.html").exists()


def test_bad_summary_json_is_ignored(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", _synthetic_rows())
    (run / "summary.json").write_text("[1, 2")
    rows, summary = load_run(run)
    assert summary is None
    assert len(rows) == len(_synthetic_rows())


def test_swarm_summarize_writes_the_report(tmp_path: Path) -> None:
    # Prepare: a swarm whose nodes already wrote their metrics (none is started)
    opts = SwarmOptions(nodes=2, rounds=3, out=tmp_path / "swarm")
    swarm = Swarm(opts)
    for i in range(2):
        path = swarm.node_paths(i).metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        events = _node_events(i, "honest", 3, finished=True)
        path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "node"}) + "\n"
                                for e in events))
    # Execute
    summary = swarm.summarize()
    # Assert
    assert summary["honest_accuracy_min"] == pytest.approx(0.6)
    _assert_valid_pngs(opts.out)
    page = (opts.out / "index.html").read_text(encoding="utf-8")
    assert len(_table_rows(page)) == 2
    assert f"{opts.task}: 2 nodes, iid, fanout 2" in page
