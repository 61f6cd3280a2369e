"""Rounds to a mean held-out accuracy of 0.80, in-process lock-step swarm (the Node round loop over the
memory transport), 8 nodes fashion-mnist iid H=20, dense, fanout 1..7, seeds 0-2."""
import json, sys, torch
torch.set_num_threads(1)
from p2pnode.inproc import InprocOptions, InprocSwarm
import asyncio
from collections import defaultdict
out = {}
for fanout in (2, 4, 7):
    for seed in (0, 1):
        sw = InprocSwarm(InprocOptions(nodes=8, rounds=9, fanout=fanout, codec="dense", eval_every=1, seed=seed))
        asyncio.run(sw.run(None))
        acc = defaultdict(list)
        for r in sw.rows:
            if r.get("event") == "round" and r.get("test_accuracy") is not None:
                acc[r["round"]].append(r["test_accuracy"])
        curve = [round(sum(v) / len(v), 4) for k, v in sorted(acc.items())]
        hit = next((i + 1 for i, a in enumerate(curve) if a >= 0.8), None)
        print(json.dumps({"fanout": fanout, "seed": seed, "round_to_0.80": hit, "curve": curve}), flush=True)
