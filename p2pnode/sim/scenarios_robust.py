"""The three robustness scenarios: ``monna``, ``sybilwall`` and ``bristle``.

Each builds its cells (one swarm each, :class:`~p2pnode.sim.scenarios_common.SwarmPlan`), and turns the
finished cells into table rows. The paper figures they are compared with are in
:mod:`p2pnode.sim.scenarios_papers`.
"""

from __future__ import annotations

from typing import Any

from p2pnode.sim.scenarios_common import SwarmPlan, run_swarm

MONNA_ATTACKS = ("none", "alie", "ipm", "sign-flip", "label-flip")
SYBIL_COUNTS = (1, 5, 15)
QUICK_TRANSFER_TASK = "p2pnode.sim.scenarios_robust:quick_transfer_task"


# -- monna ---------------------------------------------------------------------------------------------
def monna_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"nodes": 6, "f": 1, "task": "digits", "rounds": 8, "local_steps": 10, "fanout": 5,
                "partition": "dirichlet:1", "final_eval_samples": 500, "attacks": ("sign-flip",)}
    return {"nodes": 26, "f": 5, "task": "fashion-mnist", "rounds": 12, "local_steps": 10, "fanout": 12,
            "partition": "dirichlet:1", "final_eval_samples": 5000, "attacks": MONNA_ATTACKS}


def monna_cells(cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """D-SGD (plain mean, no attacker) as the reference, then NNA with F = f under each attack."""
    cells = [{"row": "D-SGD (mean), no attack", "attack": "none", "defense": "mean"}]
    nna = f"nna:{cfg['f']}"
    cells += [{"row": f"{nna}, {a}", "attack": a, "defense": nna} for a in cfg["attacks"]]
    return [{**c, "cfg": cfg, "seed": seed} for c in cells]


def monna_cell(cell: dict[str, Any]) -> dict[str, Any]:
    cfg = cell["cfg"]
    byz = 0 if cell["attack"] == "none" else cfg["f"]
    opts = {"nodes": cfg["nodes"], "byzantine": byz, "attack": "" if byz == 0 else cell["attack"],
            "rounds": cfg["rounds"], "task": cfg["task"], "partition": cfg["partition"],
            "fanout": cfg["fanout"], "local_steps": cfg["local_steps"], "defense": cell["defense"],
            "seed": cell["seed"], "final_eval_samples": cfg["final_eval_samples"]}
    return run_swarm(SwarmPlan(options=opts))


# -- sybilwall -----------------------------------------------------------------------------------------
def sybilwall_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"honest": 8, "task": "digits", "rounds": 3, "local_steps": 10, "fanout": 3, "radius": 0.6,
                "max_degree": 4, "partition": "dirichlet:1", "final_eval_samples": 500,
                "sybils": (2,), "defenses": ("mean", "sybilwall")}
    # 30 rounds x 10 steps: at 12 x 5 the honest models were still at 0.29-0.47 and the attack's success was
    # mostly confusion of an untrained model. The clip: at lr 0.05, momentum 0.9, local SGD on the one- or
    # two-class shards of dirichlet:0.1 blows up (NaN or |w| > 1e3 on 4 of 33 shards tried alone, 200
    # steps); with a gradient clip at 5 none does.
    return {"honest": 99, "task": "fashion-mnist", "rounds": 30, "local_steps": 10, "fanout": 4,
            "radius": 0.2, "max_degree": 7, "partition": "dirichlet:0.1", "final_eval_samples": 1000,
            "max_grad_norm": 5.0, "sybils": SYBIL_COUNTS,
            # the plain-median reference (sybilwall:relative) was captured by 5 and 15 Sybils here at seed 0
            # (not at seed 1); the weighted one, the default, at neither (docs/sim/scenarios.md). Stored
            # runs: cad9d68 (seed 0, all three, rows relabelled to today's names), 55ef9ad (seed 1),
            # b1c2b82 (the default's column, both seeds, with the weights' new scale), 73055b1 (plain),
            # c7adca2 (weighted)
            "defenses": ("mean", "sybilwall:relative", "sybilwall")}


def sybil_topology(honest: int, sybils: int, radius: float, max_degree: int, seed: int) -> list[list[int]]:
    """A random geometric graph on ``honest + 1`` positions (the last one the attacker's), max degree
    ``max_degree``; each of the attacker's ``sybils`` identities (indices ``honest .. honest+sybils-1``)
    takes the attacker position's edges to honest nodes (they are one machine in one place)."""
    from p2pnode.sim.topology import random_geometric

    base = random_geometric(honest + 1, radius, seed, max_degree=max_degree)
    victims = [j for j in base[honest] if j < honest]
    adj = [[j for j in base[i] if j < honest] for i in range(honest)]
    for v in victims:
        adj[v].extend(range(honest, honest + sybils))
    adj += [list(victims) for _ in range(sybils)]
    return adj


def sybilwall_cells(cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """A control without attacker (plain mean: how often an honest model reads a 0 as a 1 anyway), then
    every (Sybil count, defense)."""
    cells = [{"row": "no attacker, mean", "sybils": 0, "defense": "mean"}]
    cells += [{"row": f"{m} Sybil(s), {d}", "sybils": m, "defense": d} for m in cfg["sybils"]
              for d in cfg["defenses"]]
    return [{**c, "cfg": cfg, "seed": seed} for c in cells]


def sybilwall_cell(cell: dict[str, Any]) -> dict[str, Any]:
    from p2pnode.sim.topology import components

    cfg, m = cell["cfg"], cell["sybils"]
    adj = sybil_topology(cfg["honest"], m, cfg["radius"], cfg["max_degree"], cell["seed"])
    honest_adj = [[j for j in a if j < cfg["honest"]] for a in adj[:cfg["honest"]]]
    opts = {"nodes": cfg["honest"] + m, "byzantine": m, "attack": "sybil" if m else "",
            "rounds": cfg["rounds"], "task": cfg["task"], "partition": cfg["partition"],
            "fanout": cfg["fanout"], "local_steps": cfg["local_steps"], "defense": cell["defense"],
            "seed": cell["seed"], "final_eval_samples": cfg["final_eval_samples"],
            "max_grad_norm": cfg.get("max_grad_norm", 0.0)}
    extra = {"attack_edges": len(adj[cfg["honest"]]) if m else 0,
             "honest_max_degree": max(len(a) for a in honest_adj),
             "honest_components": len(components(honest_adj))}
    return run_swarm(SwarmPlan(options=opts, adjacency=adj, measure_targeted=(0, 1), extra=extra))


# -- bristle -------------------------------------------------------------------------------------------
def bristle_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"nodes": 6, "byzantine": 2, "task": QUICK_TRANSFER_TASK, "rounds": 4, "local_steps": 10,
                "fanout": 4, "partition": "dirichlet:0.3", "final_eval_samples": 1000, "baselines": []}
    # the paper compares with Byzantine-resilient rules: these, under attack, at n = 11 inputs per merge
    # (fanout 10 + own; krum needs n > 2F + 2, so F = 4; trimmed-mean:5 would be the median)
    return {"nodes": 15, "byzantine": 5, "task": "fashion-mnist-transfer", "rounds": 40, "local_steps": 20,
            "fanout": 10, "partition": "dirichlet:0.3", "final_eval_samples": 10_000,
            "baselines": ["median", "trimmed-mean:4", "krum:4", "nna:5"]}


def bristle_cells(cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    attack = cfg.get("attack", "label-flip")
    who = f"{cfg['byzantine']} " + ("label flippers" if attack == "label-flip" else f"{attack} attackers")
    cells = [{"row": f"{d}, {'no attack' if byz == 0 else who}", "defense": d, "byzantine": byz}
             for d in ("bristle", "mean") for byz in (0, cfg["byzantine"])]
    cells += [{"row": f"{d}, {who}", "defense": d, "byzantine": cfg["byzantine"]} for d in cfg["baselines"]]
    return [{**c, "cfg": cfg, "seed": seed} for c in cells]


def bristle_cell(cell: dict[str, Any]) -> dict[str, Any]:
    cfg, byz = cell["cfg"], cell["byzantine"]
    attack = cfg.get("attack", "label-flip")
    opts = {"nodes": cfg["nodes"], "byzantine": byz, "attack": attack if byz else "",
            "rounds": cfg["rounds"], "task": cfg["task"], "partition": cfg["partition"],
            "fanout": cfg["fanout"], "local_steps": cfg["local_steps"], "defense": cell["defense"],
            "seed": cell["seed"], "final_eval_samples": cfg["final_eval_samples"]}
    targeted = (0, 1) if attack.startswith("targeted-label-flip") else None
    return run_swarm(SwarmPlan(options=opts, measure_targeted=targeted))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Bristle: each attacked row's accuracy as a share of the same defense's no-attack accuracy."""
    clean = {r["defense"]: r.get("honest_accuracy_mean") for r in rows if r["byzantine"] == 0}
    for r in rows:
        base = clean.get(r["defense"])
        if r["byzantine"] and base and "honest_accuracy_mean" in r:
            r["attack_over_no_attack"] = round(r["honest_accuracy_mean"] / base, 4)


def quick_transfer_task(data_dir: str | None = None) -> Any:
    """The ``fashion-mnist-transfer`` task with a small, fast pretraining recipe (one epoch, 16 features),
    for the quick bristle run (Bristle merges only the output layer of a frozen-feature model). Used as
    the plug-in task ``p2pnode.sim.scenarios_robust:quick_transfer_task``; cached like the full task."""
    from p2pnode.tasks.transfer import FashionMnistTransferTask, PretrainRecipe

    return FashionMnistTransferTask(data_dir, recipe=PretrainRecipe(epochs=1, batch_size=256, feature_dim=16))
