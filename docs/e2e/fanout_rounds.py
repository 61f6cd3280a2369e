"""Rounds to a mean held-out accuracy of 0.80 in the in-process lock-step swarm (the node's own round loop
over the memory transport): 8 nodes, fashion-mnist iid, H = 20, dense, fanout 2 / 4 / 7, seeds 0 and 1.

Run: ``OMP_NUM_THREADS=1 flock /tmp/p2pnode-heavy.lock .venv/bin/python docs/e2e/fanout_rounds.py``
(about 6 minutes on one core); output: one JSON line per (fanout, seed), see fanout_rounds.log.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import torch

from p2pnode.inproc import InprocOptions, InprocSwarm


def main() -> None:
    torch.set_num_threads(1)
    for fanout in (2, 4, 7):
        for seed in (0, 1):
            swarm = InprocSwarm(InprocOptions(nodes=8, rounds=9, fanout=fanout, codec="dense", eval_every=1,
                                              seed=seed))
            asyncio.run(swarm.run(None))
            acc: dict[int, list[float]] = defaultdict(list)
            for row in swarm.rows:
                if row.get("event") == "round" and row.get("test_accuracy") is not None:
                    acc[row["round"]].append(row["test_accuracy"])
            curve = [round(sum(v) / len(v), 4) for _, v in sorted(acc.items())]
            hit = next((i + 1 for i, a in enumerate(curve) if a >= 0.8), None)
            row = {"fanout": fanout, "seed": seed, "round_to_0.80": hit, "curve": curve}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
