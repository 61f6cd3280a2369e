"""Metrics loading and accuracy plotting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pnode.report import MetricsTail, load_metrics, plot_accuracy

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
