"""Reading node metrics files, plotting them, and showing swarm progress and summaries.

Nodes append one JSON object per line to their metrics file (see ``p2pnode run --metrics-file``).
A node killed mid-write leaves a truncated last line; :func:`load_metrics` skips it.
:func:`plot_accuracy` draws test accuracy per node against the round number with the headless Agg
renderer, so it works on machines without a display and never touches pyplot's global state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

_HONEST_CMAP = "Blues"
_BYZANTINE_CMAP = "Reds"
_MAX_LEGEND_ENTRIES = 12


def parse_metrics_lines(lines: Iterable[str], *, source: str = "<metrics>") -> list[dict[str, Any]]:
    """Parse JSON lines, skipping blank lines and lines that are not a JSON object.

    Parameters
    ----------
    lines
        Text lines, with or without their trailing newline.
    source
        Name used in log messages.

    Returns
    -------
    list of dict
        The parsed objects, in order.
    """
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            logger.debug("%s:%d: skipping line that is not valid JSON (truncated write?)", source, lineno)
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            logger.debug("%s:%d: skipping JSON value that is not an object", source, lineno)
    return rows


def load_metrics(path: str | Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Load a node's metrics file (JSON lines).

    Parameters
    ----------
    path
        The metrics file.
    missing_ok
        Return an empty list instead of raising when the file does not exist.

    Returns
    -------
    list of dict
        One dict per complete line. A truncated or otherwise malformed line (typically the last one,
        from a node killed mid-write) is skipped.

    Raises
    ------
    FileNotFoundError
        If the file does not exist and ``missing_ok`` is false.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        if missing_ok:
            return []
        raise
    return parse_metrics_lines(text.splitlines(), source=str(path))


class MetricsTail:
    """Incremental reader of one metrics file that a live process is appending to.

    Parameters
    ----------
    path
        The metrics file (it may not exist yet).
    events
        Which ``"event"`` values to keep (default: ``round`` and ``final``).
    """

    def __init__(self, path: str | Path, *, events: tuple[str, ...] = ("round", "final")) -> None:
        self.path = Path(path)
        self.kinds = events
        self.events: list[dict[str, Any]] = []  #: everything kept so far, in file order
        self._offset = 0
        self._partial = b""

    def read_new(self, *, writer_exited: bool = False) -> list[dict[str, Any]]:
        """Return the events completed since the last call (also appended to :attr:`events`).

        An incomplete last line waits for the next call, unless ``writer_exited``: then it is kept if it
        is complete JSON and otherwise dropped (truncated by a kill mid-write).
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = b"" if writer_exited else chunks.pop()
        lines = [c.decode("utf-8", errors="replace") for c in chunks]
        new = [e for e in parse_metrics_lines(lines, source=str(self.path)) if e.get("event") in self.kinds]
        self.events.extend(new)
        return new


def _series_key(row: dict[str, Any]) -> str:
    if "node" in row:
        return f"node {row['node']}"
    return str(row.get("peer_id", "?"))[:12]


def plot_accuracy(rows: list[dict[str, Any]], out_png: str | Path, *, title: str = "") -> Path:
    """Plot test accuracy per node against the round number and save it as a PNG.

    Parameters
    ----------
    rows
        Metrics events as written by nodes (``"event": "round"`` rows with a non-null
        ``test_accuracy`` become line points; ``"event": "final"`` rows become a marker at their
        ``rounds``). Rows are grouped by their ``"node"`` key if present, else by ``peer_id``.
        Honest nodes are drawn in shades of blue, byzantine ones in shades of red.
    out_png
        Destination file; its parent directory is created if needed.
    title
        Figure title.

    Returns
    -------
    Path
        ``out_png``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, dict[str, Any]] = {}
    for row in rows:
        event = row.get("event")
        if event not in ("round", "final"):
            continue
        s = series.setdefault(_series_key(row), {"role": "honest", "x": [], "y": [], "final": None})
        if row.get("role") == "byzantine":
            s["role"] = "byzantine"
        acc = row.get("test_accuracy")
        if not isinstance(acc, int | float):
            continue
        if event == "round" and isinstance(row.get("round"), int):
            s["x"].append(row["round"])
            s["y"].append(float(acc))
        elif event == "final" and isinstance(row.get("rounds"), int):
            s["final"] = (row["rounds"], float(acc))

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_role = {role: sorted(k for k, s in series.items() if s["role"] == role)
               for role in ("honest", "byzantine")}
    labelled_roles: set[str] = set()
    any_label = False
    for role, cmap_name in (("honest", _HONEST_CMAP), ("byzantine", _BYZANTINE_CMAP)):
        keys = by_role[role]
        cmap = colormaps[cmap_name]
        for j, key in enumerate(keys):
            s = series[key]
            color = cmap(0.45 + 0.5 * (j / max(1, len(keys) - 1)))
            pts = sorted(zip(s["x"], s["y"], strict=True))
            if len(series) <= _MAX_LEGEND_ENTRIES:
                label = f"{key} ({role})"
            elif role not in labelled_roles:
                label = role
            else:
                label = None
            if not pts and s["final"] is None:
                continue
            if label is not None:
                labelled_roles.add(role)
                any_label = True
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1.4, label=label,
                        marker="." if len(pts) < 30 else None)
                label = None
            if s["final"] is not None:
                ax.plot([s["final"][0]], [s["final"][1]], color=color, marker="*", markersize=10,
                        linestyle="none", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if any_label:
        ax.legend(loc="best", fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=110)
    return out_png


class SwarmProgressView:
    """Live rich progress for a swarm: one bar per node (round/R, last accuracy) and an overall bar.

    Use as a context manager and pass :meth:`update` as ``on_progress`` to ``Swarm.wait_finished``.
    """

    def __init__(self, console: Console, *, nodes: int, rounds: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.rounds = rounds
        self.progress = Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=console,
                                 refresh_per_second=2)
        self.overall = self.progress.add_task("overall", total=nodes * rounds, acc="")
        self.bars = [self.progress.add_task(f"node {i}", total=rounds, acc="acc -") for i in range(nodes)]

    def __enter__(self) -> SwarmProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, progress: Sequence[Any]) -> None:
        """Refresh the bars from a list of ``p2pnode.swarm.NodeProgress``."""
        for p in progress:
            acc = "acc -" if p.test_accuracy is None else f"acc {p.test_accuracy:.3f}"
            state = " [red]died[/red]" if p.failed else (" done" if p.finished else "")
            self.progress.update(self.bars[p.node], completed=min(p.round, self.rounds), acc=acc + state)
        self.progress.update(self.overall, completed=sum(min(p.round, self.rounds) for p in progress))


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """Print a swarm summary (as written to ``summary.json``) as a table."""
    from rich.table import Table

    table = Table(title=f"swarm {summary['config']['swarm']} ({summary['wall_time_s']:.1f} s)")
    for col in ("node", "role", "rounds", "test acc", "sent MiB", "recv MiB", "rejected", "status"):
        table.add_column(col, justify="left" if col in ("role", "status") else "right")
    for n in summary["nodes"]:
        status = "ok" if n["finished"] else f"[red]failed (exit {n['exit_code']})[/red]"
        table.add_row(str(n["node"]), n["role"], str(n["rounds"]), f"{n['test_accuracy']:.4f}",
                      f"{n['bytes_sent'] / 2**20:.1f}", f"{n['bytes_received'] / 2**20:.1f}",
                      str(n["messages_rejected"]), status)
    console.print(table)
    console.print(f"honest accuracy: mean {summary['honest_accuracy_mean']:.4f}, "
                  f"min {summary['honest_accuracy_min']:.4f}  ->  {summary.get('out', '')}")
