"""The bristle scenario's cells at another partition, for some defenses: is Bristle's edge over the robust
baselines a matter of how non-IID the classes are?

    OMP_NUM_THREADS=1 python scripts/bristle_partition_probe.py \
        dirichlet:0.1 bristle,mean,median,nna:5,krum:4 [ATTACK] [SEED]

Runs, for each defense, the no-attack cell (bristle and mean only, as in the scenario) and the cell with
the scenario's 5 attackers (ATTACK, default label-flip; e.g. targeted-label-flip, which also reports the
share of class-0 test images read as 1), in 2 worker processes; prints one line per cell: partition, row,
honest accuracy mean and min, the attacked / no-attack ratio where both ran, the targeted success.
"""

from __future__ import annotations

import re
import sys

from p2pnode.sim import scenarios_robust as robust
from p2pnode.sim.scenarios_common import run_cells


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 4:
        print(__doc__, file=sys.stderr)
        return 2
    partition, defenses = argv[0], re.split(r",(?=[a-z])", argv[1])  # "bristle:0.4,0,mean": 2 rules
    attack = argv[2] if len(argv) > 2 else "label-flip"
    seed = int(argv[3]) if len(argv) > 3 else 0
    cfg = {**robust.bristle_config(False), "partition": partition, "attack": attack,
           "baselines": [d for d in defenses if d not in ("bristle", "mean")]}
    cells = [c for c in robust.bristle_cells(cfg, seed) if c["defense"] in defenses]
    done = run_cells(cells, robust.bristle_cell, workers=2, progress=lambda m: print(m, file=sys.stderr))
    robust.add_ratios(done)
    for c in done:
        print(partition, c["row"], c.get("honest_accuracy_mean"), c.get("honest_accuracy_min"),
              c.get("attack_over_no_attack"), c.get("targeted_success_mean", ""), c.get("error", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
