"""The bristle scenario's cells at another partition, for some defenses: is Bristle's edge over the robust
baselines a matter of how non-IID the classes are?

    OMP_NUM_THREADS=1 python scripts/bristle_partition_probe.py dirichlet:0.1 bristle,mean,median,nna:5,krum:4

Runs, for each defense, the no-attack cell (bristle and mean only, as in the scenario) and the cell with
the scenario's 5 label flippers, in 2 worker processes; prints one line per cell: partition, row, honest
accuracy mean and min, the attacked / no-attack ratio where both ran.
"""

from __future__ import annotations

import sys

from p2pnode.sim import scenarios_robust as robust
from p2pnode.sim.scenarios_common import run_cells


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    partition, defenses = argv[0], argv[1].split(",")
    cfg = {**robust.bristle_config(False), "partition": partition,
           "baselines": [d for d in defenses if d not in ("bristle", "mean")]}
    cells = [c for c in robust.bristle_cells(cfg, 0) if c["defense"] in defenses]
    done = run_cells(cells, robust.bristle_cell, workers=2, progress=lambda m: print(m, file=sys.stderr))
    robust.add_ratios(done)
    for c in done:
        print(partition, c["row"], c.get("honest_accuracy_mean"), c.get("honest_accuracy_min"),
              c.get("attack_over_no_attack"), c.get("error", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
