"""Run one defense's cells of the full sybilwall scenario (99 honest, geometric graph, 1/5/15 Sybils).

The whole scenario (``python -m p2pnode.sim.scenarios sybilwall``) runs three defenses and a control,
about 40 minutes on the 2-core dev machine; one column is about a quarter of that. For checking a change
to one rule against the stored rows (docs/sim/scenarios/sybilwall/).

    OMP_NUM_THREADS=1 python scripts/sybilwall_scenario_column.py [--defense sybilwall] [--seed 1]
        [--workers 2] [--json FILE]

Prints one JSON line per cell: every figure the scenario stores for it (honest accuracy mean/min, 0→1
success mean/worst, local divergences, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2pnode.sim.scenarios_common import run_cells
from p2pnode.sim.scenarios_robust import sybilwall_cell, sybilwall_cells, sybilwall_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--defense", default="sybilwall")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ns = p.parse_args()
    cfg = {**sybilwall_config(False), "defenses": (ns.defense,)}
    cells = [c for c in sybilwall_cells(cfg, ns.seed) if c["sybils"] > 0]  # no control: it is plain mean
    rows = []
    for row in run_cells(cells, sybilwall_cell, workers=ns.workers, progress=print):
        out = {"error": None, **{k: v for k, v in row.items() if k != "cfg"}}  # every figure of the cell
        rows.append(out)
        print(json.dumps(out), flush=True)
    if ns.json is not None:
        ns.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
