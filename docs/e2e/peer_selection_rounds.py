"""Rounds to a mean held-out accuracy of 0.80 in the in-process lock-step swarm (the node's own round loop
over the memory transport), random peer sampling vs the exponential graph (p2pnode/peer_selection.py):
8 nodes, fashion-mnist iid, H = 20, dense; random fanout 2 and 7, exponential fanout 1 and 2; seeds 0-2.

Run: ``OMP_NUM_THREADS=1 flock /tmp/p2pnode-heavy.lock .venv/bin/python docs/e2e/peer_selection_rounds.py``
(about 12 minutes on one core); output: one JSON line per (selection, fanout, seed), see
peer_selection_rounds.log.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import torch

from p2pnode.inproc import InprocOptions, InprocSwarm

SETTINGS = (("random", 2), ("exponential", 1), ("exponential", 2), ("random", 7))


def main() -> None:
    torch.set_num_threads(1)
    for seed in (0, 1, 2):
        for selection, fanout in SETTINGS:
            swarm = InprocSwarm(InprocOptions(nodes=8, rounds=9, fanout=fanout, peer_selection=selection,
                                              codec="dense", eval_every=1, seed=seed))
            asyncio.run(swarm.run(None))
            acc: dict[int, list[float]] = defaultdict(list)
            for row in swarm.rows:
                if row.get("event") == "round" and row.get("test_accuracy") is not None:
                    acc[row["round"]].append(row["test_accuracy"])
            curve = [round(sum(v) / len(v), 4) for _, v in sorted(acc.items())]
            hit = next((i + 1 for i, a in enumerate(curve) if a >= 0.8), None)
            row = {"selection": selection, "fanout": fanout, "seed": seed, "round_to_0.80": hit,
                   "curve": curve}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
