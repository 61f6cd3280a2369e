"""``p2pnode report DIR``: the plots and ``index.html`` of a swarm run directory, again or elsewhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PROG = "p2pnode report"

DESCRIPTION = """\
Read a run directory written by `p2pnode swarm` (DIR/metrics.jsonl, or the per-node files
DIR/nodes/node-*.metrics.jsonl if that is missing, and DIR/summary.json if present) and write
into OUTDIR (--out, default DIR):
  accuracy.png       test accuracy of each node against the round (honest blue, byzantine red)
  bytes_sent.png     bytes each node sent per round, and the mean over the nodes
  peers_in_view.png  live peers in each node's view at the end of each round
  index.html         a self-contained page (no JavaScript, nothing fetched) with the headline
                     figures, one row per node, the plots and the configuration
Without summary.json the table is rebuilt from the metrics. `p2pnode swarm` writes the same files
at the end of every run; this command redoes them, e.g. for a run that was killed.
Prints the path of index.html. Exit codes: 0 written; 1 could not write; 2 DIR missing or without
metrics.
"""


def add_report(sub: Any) -> None:
    """Register the ``report`` subcommand on the top-level subparsers."""
    p = sub.add_parser("report", help="plots and index.html of a swarm run directory",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    p.add_argument("dir", metavar="DIR", type=Path, help="run directory written by `p2pnode swarm`")
    p.add_argument("--out", metavar="OUTDIR", type=Path, default=None,
                   help="where the plots and index.html go (default: DIR itself; created if needed)")


def cmd_report(ns: argparse.Namespace) -> int:
    """Run ``p2pnode report``; returns the exit code."""
    from p2pnode.run_report import ReportError, load_run, write_report

    try:
        rows, summary = load_run(ns.dir)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        index = write_report(rows, summary, ns.out if ns.out is not None else ns.dir, source=ns.dir)
    except OSError as exc:
        print(f"{PROG}: error: cannot write the report: {exc}", file=sys.stderr)
        return 1
    print(index)
    return 0
