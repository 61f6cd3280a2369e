"""Reading node metrics files, plotting them, and showing swarm progress and summaries.

Nodes append one JSON object per line to their metrics file (see ``p2pnode run --metrics-file``).
A node killed mid-write leaves a truncated last line; :func:`load_metrics` skips it.
:func:`plot_accuracy`, :func:`plot_bytes_per_round` and :func:`plot_peers_in_view` draw one line per
node against the round number (honest nodes in blues, byzantine ones in reds) with the headless Agg
renderer, so they work on machines without a display and never touch pyplot's global state.
:mod:`p2pnode.run_report` puts them together with an ``index.html``.
"""

from __future__ import annotations

import json
import logging
import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

logger = logging.getLogger(__name__)

_HONEST_CMAP = "Blues"
_BYZANTINE_CMAP = "Reds"
_MAX_LEGEND_ENTRIES = 12
_TITLE_WIDTH = 64  # characters per title line
_LOG_SPAN = 30.0  # bytes plot: log y axis when the positive values span more than this factor


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


def round_rows(path: str | Path) -> list[dict[str, Any]]:
    """The ``"round"`` events of a node's metrics file (none if it does not exist yet)."""
    return [row for row in load_metrics(path, missing_ok=True) if row.get("event") == "round"]


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


def series_key(row: dict[str, Any]) -> str:
    """The series a metrics row belongs to: ``"node I"`` if it has a ``node`` key, else its peer id (cut)."""
    if "node" in row:
        return f"node {row['node']}"
    return str(row.get("peer_id", "?"))[:12]


def natural_key(key: str) -> list[Any]:
    """Sort key that puts ``node 2`` before ``node 10`` (digit runs compare as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _role_of(row: dict[str, Any]) -> str:
    return "byzantine" if row.get("role") == "byzantine" else "honest"


def _legend_text(text: str) -> str:
    # "$" would start mathtext and a leading "_" hides the entry: keys may come from peer ids in files
    return text.replace("$", r"\$").lstrip("_")


def _styles(roles: dict[str, str]) -> dict[str, tuple[Any, str | None]]:
    """Colour and legend label of each series (key -> role), honest ones first.

    Honest series get shades of blue and byzantine ones shades of red. Up to ``_MAX_LEGEND_ENTRIES``
    series each get a label ``"node 3 (honest)"``; beyond that only the first series of a role is
    labelled, with the role.
    """
    from matplotlib import colormaps

    styles: dict[str, tuple[Any, str | None]] = {}
    for role, cmap_name in (("honest", _HONEST_CMAP), ("byzantine", _BYZANTINE_CMAP)):
        keys = sorted((k for k, r in roles.items() if r == role), key=natural_key)
        cmap = colormaps[cmap_name]
        for j, key in enumerate(keys):
            color = cmap(0.45 + 0.5 * (j / max(1, len(keys) - 1)))
            if len(roles) <= _MAX_LEGEND_ENTRIES:
                label: str | None = _legend_text(f"{key} ({role})")
            else:
                label = role if j == 0 else None
            styles[key] = (color, label)
    return styles


def _axes(title: str) -> tuple[Any, Any]:
    """A new headless figure (never pyplot's global state) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.grid(True, alpha=0.3)
    if title:  # wrapped to the axes' width: the legend sits to their right, up to the figure's top
        ax.set_title(_wrap_title(title.replace("$", r"\$")), fontsize="medium")
    return fig, ax


def _wrap_title(title: str) -> str:
    """Wrap at ``_TITLE_WIDTH`` characters, breaking between comma-separated parts where possible."""
    keep = ", ".join(part.replace(" ", "\u00a0") for part in title.split(", "))  # no break inside a part
    return textwrap.fill(keep, _TITLE_WIDTH, break_long_words=True).replace("\u00a0", " ")


def _save(fig: Any, ax: Any, out_png: str | Path) -> Path:
    if ax.get_legend_handles_labels()[0]:  # beside the axes, so it never hides a line
        fig.legend(loc="outside right upper", fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=110)
    return out_png


def _marker(n_points: int) -> str | None:
    return "." if n_points < 30 else None


def plot_accuracy(rows: list[dict[str, Any]], out_png: str | Path, *, title: str = "") -> Path:
    """Plot test accuracy per node against the round number and save it as a PNG.

    Parameters
    ----------
    rows
        Metrics events as written by nodes (``"event": "round"`` rows with a non-null
        ``test_accuracy`` become line points; ``"event": "final"`` rows become a marker at their
        ``rounds``; a node without one gets a cross at its last point). Rows are grouped by their
        ``"node"`` key if present, else by ``peer_id``. Honest nodes are drawn in shades of blue,
        byzantine ones in shades of red.
    out_png
        Destination file; its parent directory is created if needed.
    title
        Figure title.

    Returns
    -------
    Path
        ``out_png``.
    """
    series: dict[str, dict[str, Any]] = {}
    for row in rows:
        event = row.get("event")
        if event not in ("round", "final"):
            continue
        s = series.setdefault(series_key(row), {"role": "honest", "pts": [], "final": None})
        if _role_of(row) == "byzantine":
            s["role"] = "byzantine"
        acc = row.get("test_accuracy")
        if not isinstance(acc, int | float):
            continue
        if event == "round" and isinstance(row.get("round"), int):
            s["pts"].append((row["round"], float(acc)))
        elif event == "final" and isinstance(row.get("rounds"), int):
            s["final"] = (row["rounds"], float(acc))

    fig, ax = _axes(title)
    drawn = {k: s["role"] for k, s in series.items() if s["pts"] or s["final"] is not None}
    for key, (color, label) in _styles(drawn).items():
        s = series[key]
        pts = sorted(s["pts"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1.4, label=label,
                    marker=_marker(len(pts)))
            label = None
        if s["final"] is not None:
            ax.plot([s["final"][0]], [s["final"][1]], color=color, marker="*", markersize=10,
                    linestyle="none", label=label)
        else:  # died or was stopped before its final evaluation
            ax.plot([pts[-1][0]], [pts[-1][1]], color=color, marker="X", markersize=9, linestyle="none")
    finals = [s["final"] is not None for k, s in series.items() if k in drawn]
    if any(finals):
        ax.plot([], [], color="grey", marker="*", markersize=10, linestyle="none",
                label="final evaluation\n(whole test split)")
    if not all(finals):
        ax.plot([], [], color="grey", marker="X", markersize=9, linestyle="none",
                label="no final evaluation\n(died or stopped)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    return _save(fig, ax, out_png)


def _round_values(rows: list[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    """Per series key: its role and ``{round: value}`` of ``field`` on ``"round"`` events (last one wins)."""
    series: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("event") != "round":
            continue
        s = series.setdefault(series_key(row), {"role": "honest", "values": {}})
        if _role_of(row) == "byzantine":
            s["role"] = "byzantine"
        value, rnd = row.get(field), row.get("round")
        if isinstance(value, int | float) and not isinstance(value, bool) and isinstance(rnd, int):
            s["values"][rnd] = value
    return series


def per_round_deltas(counters: dict[int, float]) -> dict[int, float]:
    """Turn a cumulative counter ``{round: total}`` into the amount per round.

    The counter is taken to start at 0 before round 1. Where rounds are missing the difference is
    spread evenly over them; a counter that went down (a restarted process) gives no value.
    """
    deltas: dict[int, float] = {}
    prev_round, prev_total = 0, 0.0
    for rnd in sorted(counters):
        total = float(counters[rnd])
        if rnd > prev_round and total >= prev_total:
            deltas[rnd] = (total - prev_total) / (rnd - prev_round)
        prev_round, prev_total = rnd, total
    return deltas


def plot_bytes_per_round(rows: list[dict[str, Any]], out_png: str | Path, *, title: str = "") -> Path:
    """Plot the bytes each node sent per round, and their mean over the nodes, as a PNG.

    Parameters
    ----------
    rows
        Metrics events; the cumulative ``bytes_sent`` of ``"round"`` events is differenced between
        consecutive rounds (see :func:`per_round_deltas`). Grouping and colours as :func:`plot_accuracy`.
    out_png
        Destination file; its parent directory is created if needed.
    title
        Figure title.

    Returns
    -------
    Path
        ``out_png``. The y axis is logarithmic when the positive values span more than a factor
        ``_LOG_SPAN``; zeros then leave gaps.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series = {k: {"role": s["role"], "deltas": per_round_deltas(s["values"])}
              for k, s in _round_values(rows, "bytes_sent").items()}
    series = {k: s for k, s in series.items() if s["deltas"]}
    by_round: dict[int, list[float]] = {}
    for s in series.values():
        for rnd, value in s["deltas"].items():
            by_round.setdefault(rnd, []).append(value)
    positive = [v for vals in by_round.values() for v in vals if v > 0]
    unit, scale = _byte_unit(max(positive, default=0.0))
    fig, ax = _axes(title)
    for key, (color, label) in _styles({k: s["role"] for k, s in series.items()}).items():
        pts = sorted(series[key]["deltas"].items())
        ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], color=color, linewidth=1.0, label=label,
                marker=_marker(len(pts)), alpha=0.75)
    if len(series) > 1:
        mean = sorted((r, sum(v) / len(v)) for r, v in by_round.items())
        ax.plot([p[0] for p in mean], [p[1] / scale for p in mean], color="black", linestyle="--",
                linewidth=2.0, label="mean over the nodes\nthat ran the round")
    if positive and max(positive) > _LOG_SPAN * min(positive):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel(f"{unit} sent per round (transport layer)")
    return _save(fig, ax, out_png)


def _byte_unit(largest: float) -> tuple[str, float]:
    """The binary unit (bytes, KiB, MiB, GiB) in which ``largest`` bytes is at least 1."""
    unit, scale = "bytes", 1.0
    for name, size in (("KiB", 2.0**10), ("MiB", 2.0**20), ("GiB", 2.0**30)):
        if largest >= size:
            unit, scale = name, size
    return unit, scale


def plot_peers_in_view(rows: list[dict[str, Any]], out_png: str | Path, *, title: str = "",
                       expected: int | None = None) -> Path:
    """Plot how many live peers each node had in its view at the end of each round, as a PNG.

    Parameters
    ----------
    rows
        Metrics events (``peers_in_view`` of ``"round"`` events). Grouping and colours as
        :func:`plot_accuracy`.
    out_png
        Destination file; its parent directory is created if needed.
    title
        Figure title.
    expected
        If given, a dotted reference line at this count (all other nodes of the swarm).

    Returns
    -------
    Path
        ``out_png``.
    """
    from matplotlib.ticker import MaxNLocator

    series = {k: s for k, s in _round_values(rows, "peers_in_view").items() if s["values"]}
    fig, ax = _axes(title)
    styles = _styles({k: s["role"] for k, s in series.items()})
    # identical counts would hide each other: earlier series are drawn wider, so each stays visible
    widths = {key: 1.2 + 2.4 * (1 - j / max(1, len(styles) - 1)) for j, key in enumerate(styles)}
    top = 0
    for key, (color, label) in styles.items():
        pts = sorted(series[key]["values"].items())
        top = max(top, *(p[1] for p in pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=widths[key], label=label,
                drawstyle="steps-mid", solid_capstyle="butt")
    if expected is not None:
        ax.axhline(expected, color="grey", linestyle=":", linewidth=1.5,
                   label=f"all other nodes ({expected})")
        top = max(top, expected)
    ax.set_ylim(0, top + 1)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("peers in view (live membership records)")
    return _save(fig, ax, out_png)


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
