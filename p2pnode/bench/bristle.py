"""``p2pnode bench bristle``: Bristle under label flipping, on the transfer-learning task.

Setting (Verbraeken, de Vos, Pouwelse, "Bristle"): frozen pretrained features, only the output layer
is trained and exchanged (``fashion-mnist-transfer``); non-IID classes per node (Dirichlet split);
``byzantine`` of ``nodes`` nodes train on labels flipped for every class (l → C−1−l). Each defense is
run without and with the attackers; the figure of merit is the honest mean accuracy under attack as a
share of the same defense's no-attack accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(kw_only=True, slots=True)
class BristleOptions:
    nodes: int = 15
    byzantine: int = 5
    rounds: int = 40
    fanout: int = 10
    local_steps: int = 20
    partition: str = "dirichlet:0.3"
    defenses: tuple[str, ...] = ("bristle", "mean")
    seed: int = 0
    json_path: Path = field(default_factory=lambda: Path("runs/bench-bristle.json"))


def run_bristle_bench(opts: BristleOptions) -> dict[str, Any]:
    """Run (defense × {no attack, label flip}); return and write the rows and the ratios."""
    import torch

    from p2pnode.inproc import InprocOptions, run_inproc

    torch.set_num_threads(1)
    rows = []
    for defense in opts.defenses:
        for byz in (0, opts.byzantine):
            run = InprocOptions(nodes=opts.nodes, byzantine=byz, attack="label-flip" if byz else "",
                                rounds=opts.rounds, task="fashion-mnist-transfer", partition=opts.partition,
                                fanout=opts.fanout, local_steps=opts.local_steps, defense=defense,
                                seed=opts.seed)
            s = run_inproc(run)
            rows.append({"defense": defense, "byzantine": byz, "wall_time_s": s["wall_time_s"],
                         "honest_accuracy_mean": s["honest_accuracy_mean"],
                         "honest_accuracy_min": s["honest_accuracy_min"]})
    by = {(r["defense"], r["byzantine"]): r["honest_accuracy_mean"] for r in rows}
    ratios = {d: by[(d, opts.byzantine)] / by[(d, 0)] for d in opts.defenses}
    result = {"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                          ((f, getattr(opts, f)) for f in opts.__dataclass_fields__)},
              "rows": rows, "attack_over_no_attack": ratios}
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result
