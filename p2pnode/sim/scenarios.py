"""Named paper-scale scenarios: ``monna``, ``sybilwall``, ``bristle``, ``vanishing-variance``, ``disaster``.

Each scenario runs the daemon's own ``Node`` code in process (:mod:`p2pnode.sim.scenarios_common`:
signed envelopes, the in-memory transport, membership views limited to a topology's neighbours, the
defenses and attacks by name) in the setting of one paper, and returns table rows that put our figure
beside the paper's (:mod:`p2pnode.sim.scenarios_papers`):

- ``monna`` (Farhadkhani et al.): n = 26, f = 5, fashion-mnist with Dirichlet(1) shards; NNA under ALIE,
  FOE/IPM, sign flip and label flip, beside D-SGD without attack.
- ``sybilwall`` (Werthenbach & Pouwelse): 99 honest nodes on a random geometric graph of degree <= 7, one
  attacker with 1, 5 or 15 Sybil identities doing a 0 -> 1 label flip, Dirichlet(0.1); mean vs SybilWall.
- ``bristle`` (Verbraeken et al.): 15 nodes, 5 label flippers, frozen features, non-IID classes.
- ``vanishing-variance`` (Tian et al.): gossip with and without variance correction vs federated
  averaging: rounds to a target accuracy.
- ``disaster`` (Palmieri et al.): Barabási–Albert graph; remove the most central nodes, random nodes, or
  central data-less relay nodes.

``run(out, seed=, quick=, progress=)`` returns a JSON-able dict (``rows``: our figure, the paper's figure
and its source, the configuration) and writes ``out/scenario.json`` when ``out`` is given. ``quick=True``
is a scaled-down run (digits, a few nodes and rounds) for tests.

Command line (until ``p2pnode simulate --scenario`` exists)::

    python -m p2pnode.sim.scenarios --all --out docs/sim/scenarios [--quick] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pnode.sim import scenarios_robust as robust
from p2pnode.sim import scenarios_topo as topo
from p2pnode.sim.scenarios_common import run_cells
from p2pnode.sim.scenarios_papers import PAPERS
from p2pnode.sim.scenarios_plots import PLOTS

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _acc(c: dict[str, Any]) -> str:
    return f"acc {c['honest_accuracy_mean']:.3f} / min {c['honest_accuracy_min']:.3f}"


def _ours_monna(c: dict[str, Any]) -> str:
    return _acc(c)


def _ours_sybil(c: dict[str, Any]) -> str:
    mean, worst = 100 * c["targeted_success_mean"], 100 * c["targeted_success_max"]
    return f"0->1 success {mean:.1f}% (worst node {worst:.1f}%); {_acc(c)}"


def _ours_bristle(c: dict[str, Any]) -> str:
    ratio = f" ({c['attack_over_no_attack']:.3f} of no-attack)" if "attack_over_no_attack" in c else ""
    return _acc(c) + ratio


def _ours_variance(c: dict[str, Any]) -> str:
    ratio = f", {c['ratio_to_gossip_mean']:.2f}x plain gossip" if "ratio_to_gossip_mean" in c else ""
    runs = ", ".join("never" if h is None else str(h) for h in c["rounds_to_target"])
    return f"median {c['rounds_to_target_median']:g} rounds (runs: {runs}){ratio}"


def _ours_disaster(c: dict[str, Any]) -> str:
    return (f"{_acc(c)} over {c['evaluated_nodes']} nodes; after removal {c['components_after']} "
            f"component(s), largest {c['largest_component_after']}")


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named scenario: ``run(out, seed=, quick=, progress=)`` returns its result dict (see module doc)."""

    name: str
    summary: str
    config: Callable[[bool], dict[str, Any]]
    cells: Callable[[dict[str, Any], int], list[dict[str, Any]]]
    cell: Callable[[dict[str, Any]], dict[str, Any]]
    ours: Callable[[dict[str, Any]], str]
    setting: str  # how our setting differs from the paper's (goes into every row's explanation)

    def run(self, out: Path | None, *, seed: int = 0, quick: bool = False, progress: Progress | None = None,
            workers: int | None = None) -> dict[str, Any]:
        """Run every cell (in ``workers`` processes; default 1 when quick, else 2) and build the rows."""
        cfg = self.config(quick)
        workers = workers if workers is not None else (1 if quick else 2)
        cells = run_cells(self.cells(cfg, seed), self.cell, workers=workers, progress=progress)
        cells = [{k: v for k, v in c.items() if k != "cfg"} for c in cells]
        result = self.result(cells, _plain(cfg), quick=quick, seed=seed)
        if out is not None:
            self.write(result, Path(out))
        return result

    def result(self, cells: list[dict[str, Any]], cfg: dict[str, Any], *, quick: bool,
               seed: int) -> dict[str, Any]:
        """The result dict (table rows with the paper's figures) from finished cells."""
        rows = [self._row(c, quick, cfg) for c in self._post(cells, cfg)]
        return {"scenario": self.name, "summary": self.summary, "quick": quick, "seed": seed, "config": cfg,
                "setting": self._setting(quick, cfg), "rows": rows, "cells": cells}

    def write(self, result: dict[str, Any], out: Path) -> None:
        """``out/scenario.json`` and, for some scenarios, ``out/scenario.png``."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "scenario.json").write_text(json.dumps(result, indent=2) + "\n")
        if self.name in PLOTS:
            PLOTS[self.name](result, out / "scenario.png")

    def rebuild(self, out: Path) -> dict[str, Any]:
        """Recompute the rows (and plot) of a saved ``out/scenario.json`` from its cells, e.g. after the
        paper figures were updated; the measured figures are not touched."""
        saved = json.loads((out / "scenario.json").read_text())
        result = self.result(saved["cells"], saved["config"], quick=saved["quick"], seed=saved["seed"])
        self.write(result, out)
        return result

    def _setting(self, quick: bool, cfg: dict[str, Any]) -> str:
        """The setting text, its ``{key}`` fields filled from the run's config (so it cannot go stale)."""
        return "quick (scaled-down) run for tests: see config" if quick else self.setting.format_map(cfg)

    def _post(self, cells: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
        if self.name == "vanishing-variance":
            return topo.variance_summary(cells, cfg)
        if self.name == "bristle":
            robust.add_ratios(cells)
        return cells

    def _row(self, c: dict[str, Any], quick: bool, cfg: dict[str, Any]) -> dict[str, Any]:
        paper = PAPERS[self.name](c["row"])
        ours = f"error: {c['error']}" if "error" in c else self.ours(c)
        figures = {k: v for k, v in c.items() if k not in ("cfg", "row")}
        return {"scenario": self.name, "row": c["row"], "ours": ours, "paper": paper.value,
                "paper_source": paper.source, "paper_note": paper.note, "setting": self._setting(quick, cfg),
                "figures": figures}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("monna", "MoNNA/NNA: n=26, f=5, Dirichlet(1); ALIE, FOE/IPM, sign flip, label flip",
             robust.monna_config, robust.monna_cells, robust.monna_cell, _ours_monna,
             "fashion-mnist instead of MNIST; every node sees all others and exchanges with {fanout} random "
             "peers per round (pull + push, so most of the others reach it); H = {local_steps} local SGD "
             "steps (heavy-ball momentum 0.9, lr 0.05) per round instead of one Polyak-momentum step; "
             "{rounds} rounds; NNA with F = {f}"),
    Scenario("sybilwall", "SybilWall: 99 honest on a geometric graph (degree <= 7), 1-15 Sybils, 0->1 flip",
             robust.sybilwall_config, robust.sybilwall_cells, robust.sybilwall_cell, _ours_sybil,
             "{task}, {partition} over 100 shards (the attacker's identities share one); random "
             "geometric graph on 100 positions, radius {radius}, at most {max_degree} neighbours; every "
             "Sybil takes the attacker position's edges; fanout {fanout} of the neighbours, "
             "H = {local_steps}, {rounds} rounds, gradient clip {max_grad_norm}"),
    Scenario("bristle", "Bristle: 15 nodes, 5 label flippers, frozen features, non-IID classes",
             robust.bristle_config, robust.bristle_cells, robust.bristle_cell, _ours_bristle,
             "fashion-mnist-transfer (CNN features pretrained on 10k disjoint public images, frozen; only "
             "the 64x10 head is trained); {partition} classes; K = fanout {fanout}; {rounds} rounds, "
             "H = {local_steps}; "
             "attackers flip every label (l -> 9 - l)"),
    Scenario("vanishing-variance", "gossip with/without variance correction vs federated averaging",
             topo.variance_config, topo.variance_cells, topo.variance_cell, _ours_variance,
             "{task} iid, {nodes} nodes, fanout {fanout} (full view), H = {local_steps}, independent "
             "initialisations for gossip; FedAvg = increments mode, dense (one shared model and init); "
             "target {target} honest mean accuracy on {eval_samples} test images, 3 seeds"),
    Scenario("disaster", "Barabasi-Albert graph: drop central vs random vs data-less relay nodes",
             topo.disaster_config, topo.disaster_cells, topo.disaster_cell, _ours_disaster,
             "{task} iid over all {nodes} nodes (relays' shards unused); BA m = {m}; {remove} nodes removed "
             "after round {remove_after} of {rounds}; fanout {fanout} of the neighbours, H = {local_steps}; "
             "accuracy of the data nodes left"),
)}


# -- the table -----------------------------------------------------------------------------------------
def markdown_table(results: list[dict[str, Any]]) -> str:
    """One Markdown table over every scenario's rows: scenario, row, ours, paper (source)."""
    lines = ["| scenario | row | our figure | paper's figure | paper's source / claim |",
             "|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            claim = f"{r['paper_source']}" + (f"; {r['paper_note']}" if r["paper_note"] else "")
            lines.append(f"| {res['scenario']} | {r['row']} | {r['ours']} | {r['paper']} | {claim} |")
    return "\n".join(lines) + "\n"


def run_all(names: list[str], out: Path | None, *, seed: int = 0, quick: bool = False,
            workers: int | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run the named scenarios in order; with ``out``, each writes ``out/NAME/scenario.json`` and the
    table of all finished so far is rewritten to ``out/table.md``."""
    results = []
    for name in names:
        sub = None if out is None else Path(out) / name
        results.append(SCENARIOS[name].run(sub, seed=seed, quick=quick, progress=progress, workers=workers))
        if out is not None:
            (Path(out) / "table.md").write_text(markdown_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pnode.sim.scenarios",
                                     description="Run the named paper-scale scenarios and print their table.")
    parser.add_argument("names", nargs="*", help=f"scenarios to run: {', '.join(SCENARIOS)}")
    parser.add_argument("--all", action="store_true", help="run every scenario")
    parser.add_argument("--out", type=Path, default=None, help="write NAME/scenario.json and table.md here")
    parser.add_argument("--quick", action="store_true", help="the scaled-down runs the tests use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true",
                        help="do not run: recompute rows, plots and table.md from OUT/NAME/scenario.json")
    parser.add_argument("--workers", type=int, default=None,
                        help="cells run in this many processes (default: 1 with --quick, else 2)")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if args.all else args.names
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"give --all or scenario names from: {', '.join(SCENARIOS)} (unknown: {unknown})")
    logging.basicConfig(level=logging.WARNING)
    if args.rebuild:
        if args.out is None:
            parser.error("--rebuild needs --out")
        results = [SCENARIOS[n].rebuild(args.out / n) for n in names]
        (args.out / "table.md").write_text(markdown_table(results))
        print(markdown_table(results))
        return 0
    results = run_all(names, args.out, seed=args.seed, quick=args.quick, workers=args.workers,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

