"""The report of a swarm run: its plots and a static ``index.html``, behind ``p2pnode report``.

:func:`write_report` takes metrics rows and a summary (the contract of ``summary.json``, see the
README's "Outputs of `p2pnode swarm`") so any producer of those can reuse it; ``Swarm.summarize``
calls it at the end of every ``p2pnode swarm``. :func:`load_run` reads a run directory back.

The page is one self-contained file: inline CSS, relative ``<img>`` links to the PNGs next to it, no
JavaScript and nothing fetched from elsewhere. Every value that comes from a file is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pnode import __version__
from p2pnode.errors import P2PNodeError
from p2pnode.report import (
    load_metrics,
    natural_key,
    plot_accuracy,
    plot_bytes_per_round,
    plot_peers_in_view,
    series_key,
)

logger = logging.getLogger(__name__)

INDEX = "index.html"
PLOTS: tuple[tuple[str, str], ...] = (
    ("accuracy.png", "Test accuracy of each node against the round (honest in blue, byzantine in red)."),
    ("bytes_sent.png", "Bytes each node sent per round (difference of its cumulative counter), "
                       "and the mean over the nodes."),
    ("peers_in_view.png", "Live peers in each node's view at the end of each round."),
)
_NODE_FILE = re.compile(r"^node-(\d+)\.metrics\.jsonl$")
_EVENTS = ("round", "final")


class ReportError(P2PNodeError):
    """A run directory cannot be reported on: it does not exist or holds no metrics."""


# -- reading a run directory -------------------------------------------------------------------------
def _node_files(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run_dir / "nodes").glob("node-*.metrics.jsonl"):
        m = _NODE_FILE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def _by_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(row: dict[str, Any]) -> tuple[float, str]:
        t = row.get("t")
        return (float(t) if isinstance(t, int | float) else 0.0, series_key(row))

    return sorted(rows, key=key)


def load_run(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Read the metrics events and the summary of a run directory written by ``p2pnode swarm``.

    Parameters
    ----------
    run_dir
        The directory. Metrics come from ``metrics.jsonl``; if it is missing or has no round/final
        events, from the per-node files ``nodes/node-I.metrics.jsonl`` (each row gets ``"node": I``),
        in time order.

    Returns
    -------
    rows, summary
        The ``"round"``/``"final"`` events, and the parsed ``summary.json`` (None if it is missing or
        is not a JSON object; a warning is logged for the latter).

    Raises
    ------
    ReportError
        If ``run_dir`` is not a directory or holds no round/final events.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"no such directory: {run_dir}")
    if not run_dir.is_dir():
        raise ReportError(f"not a directory: {run_dir}")
    rows = [r for r in load_metrics(run_dir / "metrics.jsonl", missing_ok=True) if r.get("event") in _EVENTS]
    if not rows:
        rows = _by_time([{**r, "node": i} for i, path in _node_files(run_dir)
                         for r in load_metrics(path) if r.get("event") in _EVENTS])
    if not rows:
        raise ReportError(f"{run_dir} holds no metrics (no round events in metrics.jsonl "
                          "or nodes/node-*.metrics.jsonl)")
    return rows, _load_summary(run_dir / "summary.json")


def _load_summary(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    if not isinstance(obj, dict):
        logger.warning("ignoring %s: not a JSON object", path)
        return None
    return obj


def summary_from_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild what can be rebuilt of a summary from metrics alone (no ``summary.json``).

    A node counts as finished if it wrote a ``"final"`` event; its accuracy is that of its final
    event, else of its last evaluation (0.0 if none). ``wall_time_s`` spans the events' timestamps.
    """
    nodes: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = series_key(row)
        n = nodes.setdefault(key, {"node": row.get("node", key), "peer_id": "", "role": "honest", "rounds": 0,
                                   "test_accuracy": 0.0, "test_loss": math.nan, "bytes_sent": 0,
                                   "bytes_received": 0, "messages_rejected": 0, "finished": False,
                                   "exit_code": None})
        n["peer_id"] = str(row.get("peer_id") or n["peer_id"])
        n["role"] = str(row.get("role") or n["role"])
        for field in ("bytes_sent", "bytes_received", "messages_rejected"):
            if isinstance(row.get(field), int):
                n[field] = row[field]
        rnd = row.get("rounds") if row.get("event") == "final" else row.get("round")
        if isinstance(rnd, int):
            n["rounds"] = max(n["rounds"], rnd)
        if isinstance(row.get("test_accuracy"), int | float):
            n["test_accuracy"] = float(row["test_accuracy"])
            n["test_loss"] = row.get("test_loss")
        n["finished"] = n["finished"] or row.get("event") == "final"
    entries = [nodes[k] for k in sorted(nodes, key=natural_key)]
    honest = [n["test_accuracy"] for n in entries if n["role"] != "byzantine"]
    times = [float(r["t"]) for r in rows if isinstance(r.get("t"), int | float)]
    return {"config": {}, "wall_time_s": max(times) - min(times) if times else 0.0, "nodes": entries,
            "honest_accuracy_mean": sum(honest) / len(honest) if honest else 0.0,
            "honest_accuracy_min": min(honest) if honest else 0.0,
            "all_finished": all(n["finished"] for n in entries)}


# -- writing the report ------------------------------------------------------------------------------
def report_title(config: Any) -> str:
    """One line naming the run, from the summary's ``config`` (empty if it has none)."""
    if not isinstance(config, dict) or "task" not in config:
        return ""
    parts = [f"{config['task']}: {config.get('nodes', '?')} nodes"]
    parts += [str(config[k]) for k in ("partition",) if k in config]
    if "fanout" in config:
        parts.append(f"fanout {config['fanout']}")
    for key, usual in (("defense", "mean"), ("codec", "dense")):
        if config.get(key) not in (None, "", usual):
            parts.append(f"{key} {config[key]}")
    if config.get("byzantine"):
        parts.append(f"{config['byzantine']} byzantine ({config.get('attack', '?')})")
    return ", ".join(parts)


def write_report(rows: list[dict[str, Any]], summary: dict[str, Any] | None, out_dir: str | Path, *,
                 source: str | Path | None = None) -> Path:
    """Write the plots and ``index.html`` of a run into ``out_dir``.

    Parameters
    ----------
    rows
        Metrics events (``"round"``/``"final"``, grouped by ``"node"`` or else ``peer_id``).
    summary
        The run summary (``summary.json``'s contract); None rebuilds one with :func:`summary_from_rows`
        and says so on the page.
    out_dir
        Created if needed; gets ``accuracy.png``, ``bytes_sent.png``, ``peers_in_view.png`` and
        ``index.html`` (overwritten).
    source
        The run directory, named on the page (default: ``summary["out"]`` or ``out_dir``).

    Returns
    -------
    Path
        The ``index.html`` written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    derived = summary is None
    if summary is None:
        summary = summary_from_rows(rows)
    config = summary.get("config")
    title = report_title(config)
    nodes = config.get("nodes") if isinstance(config, dict) else None
    expected = nodes - 1 if isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 1 else None
    plot_accuracy(rows, out_dir / PLOTS[0][0], title=title)
    plot_bytes_per_round(rows, out_dir / PLOTS[1][0], title=title)
    plot_peers_in_view(rows, out_dir / PLOTS[2][0], title=title, expected=expected)
    source = source if source is not None else summary.get("out", out_dir)
    page = render_index(summary, title=title, source=str(source), derived=derived)
    index = out_dir / INDEX
    tmp = out_dir / f".{INDEX}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    logger.info("wrote the report of %s to %s", source, index)
    return index


# -- the page ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.byzantine td { background: #fdecea; }
.bad { color: #b00020; font-weight: bold; }
.note { color: #555; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
dl.headline { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.headline dt { font-weight: bold; }
dl.headline dd { margin: 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; anything else (or a number ``spec`` does not fit) as it is."""
    if _is_num(value):
        try:
            return _e(format(value, spec))
        except ValueError:  # a float where an integer was expected
            pass
    return _e("–" if value is None else value)


def _mib(value: Any) -> str:
    if not _is_num(value):
        return _fmt(value, "")
    return f'<span title="{_e(value)} bytes">{value / 2**20:.2f}</span>'


def _short_id(peer_id: Any) -> str:
    text = "" if peer_id is None else str(peer_id)
    short = text if len(text) <= 16 else f"{text[:4]}…{text[-8:]}"
    return f'<code title="{_e(text)}">{_e(short)}</code>'


def _finished(node: dict[str, Any]) -> str:
    if node.get("finished") is True:
        return "yes"
    code = node.get("exit_code")
    return f'<span class="bad">no{_e(f" (exit {code})") if code is not None else ""}</span>'


def _node_row(node: Any) -> str:
    if not isinstance(node, dict):
        return f'<tr><td colspan="9">{_e(node)}</td></tr>'
    role = str(node.get("role", ""))
    cells = [
        ("num", _e(node.get("node", ""))),
        ("", _short_id(node.get("peer_id"))),
        ("", _e(role)),
        ("num", _fmt(node.get("rounds"), "d")),
        ("num", _fmt(node.get("test_accuracy"), ".4f")),
        ("num", _mib(node.get("bytes_sent"))),
        ("num", _mib(node.get("bytes_received"))),
        ("num", _fmt(node.get("messages_rejected"), "d")),
        ("", _finished(node)),
    ]
    tds = "".join(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>" for css, text in cells)
    return f'<tr class="byzantine">{tds}</tr>' if role == "byzantine" else f"<tr>{tds}</tr>"


def _node_table(nodes: Any) -> str:
    head = ("node", "peer id", "role", "rounds", "final accuracy", "sent MiB", "received MiB", "rejected",
            "finished")
    body = "\n".join(_node_row(n) for n in nodes) if isinstance(nodes, list) else ""
    return f'<table class="nodes">\n<tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>\n{body}\n</table>'


def _headline(summary: dict[str, Any]) -> str:
    listed = summary.get("nodes")
    nodes: list[Any] = listed if isinstance(listed, list) else []
    done = sum(1 for n in nodes if isinstance(n, dict) and n.get("finished") is True)
    byz = sum(1 for n in nodes if isinstance(n, dict) and n.get("role") == "byzantine")
    wall = summary.get("wall_time_s")
    items = [("honest accuracy, mean", _fmt(summary.get("honest_accuracy_mean"), ".4f")),
             ("honest accuracy, min", _fmt(summary.get("honest_accuracy_min"), ".4f")),
             ("wall time", f"{_fmt(wall, '.1f')} s" if _is_num(wall) else _fmt(wall, "")),
             ("nodes", f"{len(nodes) - byz} honest, {byz} byzantine"),
             ("finished", f"{done} of {len(nodes)}" if done == len(nodes)
              else f'<span class="bad">{done} of {len(nodes)}</span>')]
    return "<dl class=\"headline\">\n" + "\n".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "\n</dl>"


def _config_table(config: Any) -> str:
    if not isinstance(config, dict) or not config:
        return '<p class="note">no configuration recorded</p>'
    rows = "\n".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v if isinstance(v, str) else json.dumps(v))}"
                     "</code></td></tr>" for k, v in config.items())
    return f"<table>\n{rows}\n</table>"


def render_index(summary: dict[str, Any], *, title: str = "", source: str = "", derived: bool = False) -> str:
    """The ``index.html`` of a run: headline figures, node table, plots, configuration.

    Parameters
    ----------
    summary
        The run summary (``summary.json``'s contract); any value may be malformed, all are escaped.
    title
        Shown under the heading (see :func:`report_title`).
    source
        The run directory, shown on the page.
    derived
        The summary was rebuilt from metrics (no ``summary.json``): the page says so.
    """
    note = ('<p class="note">No summary.json: these figures were rebuilt from the metrics files '
            "(exit codes unknown; a node counts as finished if it wrote its final evaluation).</p>"
            if derived else "")
    figures = "\n".join(f'<figure><img src="{_e(name)}" alt="{_e(caption)}">'
                        f"<figcaption>{_e(caption)}</figcaption></figure>" for name, caption in PLOTS)
    body = f"""\
<h1>p2pnode swarm report</h1>
{f"<p>{_e(title)}</p>" if title else ""}
<p class="note">run directory <code>{_e(source)}</code></p>
{note}
{_headline(summary)}
<h2>Nodes</h2>
{_node_table(summary.get("nodes"))}
<p class="note">Final accuracy: the final evaluation on the whole test split, or the last evaluation of a
node that did not finish. Bytes are counted at the transport layer. Hover a peer id for all of it.</p>
<h2>Plots</h2>
{figures}
<h2>Configuration</h2>
{_config_table(summary.get("config"))}
<p class="note">written by p2pnode {_e(__version__)}</p>"""
    page_title = _e(f"p2pnode report: {title}" if title else "p2pnode report")
    head = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{page_title}</title>\n<style>{_CSS}</style>\n</head>\n")
    return f"{head}<body>\n{body}\n</body>\n</html>\n"
