"""Probe: the robustness bench's Sybil cells (16 honest, fashion-mnist, Dirichlet(1), fanout 6, H = 20,
20 rounds, seed 0) with a per-step gradient clip, to see whether the collapses of that table (local
training diverging; BENCHMARKS.md, Sybil table) go away with it.

    OMP_NUM_THREADS=1 python scripts/sybil_table_clip_probe.py [--clip 5] [--defense D[,D2]] [--sybils 1,5,15]
        [--attack sybil:0,1,BOOST]

Prints one JSON line per cell (two cells at a time in worker processes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def cell(args: tuple[int, str, float, str]) -> dict[str, Any]:
    import torch

    from p2pnode.bench.robustness import _targeted_success
    from p2pnode.inproc import InprocOptions, run_inproc

    torch.set_num_threads(1)
    sybils, defense, clip, attack = args
    run = InprocOptions(nodes=16 + sybils, byzantine=sybils, attack=attack, rounds=20, task="fashion-mnist",
                        partition="dirichlet:1", fanout=6, local_steps=20, defense=defense, seed=0,
                        final_eval_samples=5000, max_grad_norm=clip)
    s = run_inproc(run, measure=_targeted_success)
    keys = ("honest_accuracy_mean", "honest_accuracy_min")
    return {"sybils": sybils, "defense": defense, "clip": clip, "attack": attack,
            **{k: round(s[k], 4) for k in keys},
            **{k: round(v, 4) for k, v in s.get("measures", {}).items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", type=float, default=5.0)
    p.add_argument("--defense", default="sybilwall")
    p.add_argument("--sybils", default="1,5,15")
    p.add_argument("--attack", default="sybil")
    ns = p.parse_args()
    jobs = [(int(m), d, ns.clip, ns.attack) for m in ns.sybils.split(",") for d in ns.defense.split(",")]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(cell, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
