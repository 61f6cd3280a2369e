"""The two topology scenarios: ``vanishing-variance`` and ``disaster``.

``vanishing-variance`` (Tian et al.): every node starts from its own random initialisation and gossips
with a small fanout; plain averaging vs variance-corrected averaging vs federated averaging (one shared
model, :mod:`p2pnode.increments_node` with the dense codec: every node adds the mean increment of all
nodes each round, exactly FedAvg), compared by rounds to a target accuracy.

``disaster`` (Palmieri et al.): a Barabási–Albert overlay; after round ``remove_after`` a set of nodes
leaves for good: the most central ones, random ones, or the most central ones when those are data-less
relays (they never trained: losing them costs connectivity only). Accuracy of the nodes left.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from typing import Any

from p2pnode.sim.scenarios_common import Adjacency, SwarmPlan, rounds_to_target, run_swarm

REMOVAL_STRATEGIES = ("degree", "betweenness", "random")


# -- vanishing variance --------------------------------------------------------------------------------
VARIANTS = {  # row name -> (mode, variance_correction, independent_init)
    "gossip, mean": ("gossip", False, True),
    "gossip, mean + variance correction": ("gossip", True, True),
    "federated averaging": ("increments", False, False),
}


def variance_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"nodes": 4, "task": "digits", "rounds": 4, "local_steps": 10, "fanout": 1, "target": 0.7,
                "seeds": (0,), "eval_samples": 300}
    return {"nodes": 16, "task": "fashion-mnist", "rounds": 25, "local_steps": 20, "fanout": 2,
            "target": 0.80, "seeds": (0, 1, 2), "eval_samples": 1000}


def variance_cells(cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    return [{"row": f"{name} (seed {seed + s})", "variant": name, "cfg": cfg, "seed": seed + s}
            for s in cfg["seeds"] for name in VARIANTS]


def variance_cell(cell: dict[str, Any]) -> dict[str, Any]:
    cfg = cell["cfg"]
    mode, corrected, independent = VARIANTS[cell["variant"]]
    opts = {"nodes": cfg["nodes"], "rounds": cfg["rounds"], "fanout": cfg["fanout"],
            "local_steps": cfg["local_steps"], "task": cfg["task"], "partition": "iid", "seed": cell["seed"],
            "mode": mode, "variance_correction": corrected, "independent_init": independent, "eval_every": 1,
            "eval_samples": cfg["eval_samples"], "final_eval_samples": cfg["eval_samples"]}
    out = run_swarm(SwarmPlan(options=opts, curve=True))
    out["rounds_to_target"] = rounds_to_target(out["curve"], cfg["target"])
    return out


def variance_summary(cells: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: median rounds to target over seeds (a run that never reaches it counts as
    rounds + 1 and is flagged), its runs, and the ratio to plain gossip."""
    never = cfg["rounds"] + 1
    rows = []
    for name in VARIANTS:
        runs = [c for c in cells if c["variant"] == name and "error" not in c]
        hits = [c["rounds_to_target"] for c in runs]
        med = statistics.median([h or never for h in hits]) if hits else None
        rows.append({"row": name, "rounds_to_target_median": med, "rounds_to_target": hits,
                     "all_reached": all(h is not None for h in hits) and bool(hits),
                     "final_accuracy": [round(c["curve"][-1], 4) for c in runs],
                     "wall_time_s": sum(c["wall_time_s"] for c in runs)})
    base = rows[0]["rounds_to_target_median"]
    for r in rows:
        if base and r["rounds_to_target_median"] is not None:
            r["ratio_to_gossip_mean"] = round(r["rounds_to_target_median"] / base, 3)
    return rows


# -- disaster ------------------------------------------------------------------------------------------
def betweenness(adj: Adjacency) -> list[float]:
    """Betweenness centrality of every node of an unweighted undirected graph (Brandes 2001), unnormalised:
    the number of shortest paths between other pairs that pass through the node (each pair counted once)."""
    n = len(adj)
    score = [0.0] * n
    for s in range(n):
        order, preds = [], [[] for _ in range(n)]  # type: ignore[var-annotated]
        sigma, dist = [0.0] * n, [-1] * n
        sigma[s], dist[s] = 1.0, 0
        queue = deque([s])
        while queue:
            v = queue.popleft()
            order.append(v)
            for w in adj[v]:
                if dist[w] < 0:
                    dist[w] = dist[v] + 1
                    queue.append(w)
                if dist[w] == dist[v] + 1:
                    sigma[w] += sigma[v]
                    preds[w].append(v)
        delta = [0.0] * n
        for w in reversed(order):
            for v in preds[w]:
                delta[v] += sigma[v] / sigma[w] * (1.0 + delta[w])
            if w != s:
                score[w] += delta[w]
    return [x / 2.0 for x in score]  # each pair was counted from both ends


def select_removed(adj: Adjacency, k: int, strategy: str, seed: int = 0) -> list[int]:
    """The ``k`` nodes a disaster removes: highest degree (ties: betweenness, then lower index), highest
    betweenness (ties: degree, then index), or ``k`` drawn uniformly at random with ``seed``. Sorted."""
    if strategy not in REMOVAL_STRATEGIES:
        raise ValueError(f"unknown removal strategy {strategy!r}; valid: {', '.join(REMOVAL_STRATEGIES)}")
    if not 0 <= k <= len(adj):
        raise ValueError(f"cannot remove {k} of {len(adj)} nodes")
    if strategy == "random":
        return sorted(random.Random(seed).sample(range(len(adj)), k))
    deg, btw = [len(a) for a in adj], betweenness(adj)
    if strategy == "degree":
        order = sorted(range(len(adj)), key=lambda i: (-deg[i], -btw[i], i))
    else:
        order = sorted(range(len(adj)), key=lambda i: (-btw[i], -deg[i], i))
    return sorted(order[:k])


def without(adj: Adjacency, removed: set[int]) -> Adjacency:
    """The graph left after ``removed`` leave: their edges dropped (they keep empty lists)."""
    return [[] if i in removed else [j for j in a if j not in removed] for i, a in enumerate(adj)]


def disaster_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"nodes": 10, "m": 2, "remove": 2, "remove_after": 2, "task": "digits", "rounds": 4,
                "local_steps": 10, "fanout": 2, "final_eval_samples": 500}
    return {"nodes": 50, "m": 2, "remove": 5, "remove_after": 4, "task": "fashion-mnist", "rounds": 12,
            "local_steps": 5, "fanout": 3, "final_eval_samples": 2000}


DISASTER_ROWS = {  # row -> (who is removed, central nodes are data-less relays)
    "no removal": ("", False),
    "remove most central (degree)": ("degree", False),
    "remove random": ("random", False),
    "data-less central relays, kept": ("", True),
    "data-less central relays, removed": ("degree", True),
}


def disaster_cells(cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    return [{"row": name, "cfg": cfg, "seed": seed} for name in DISASTER_ROWS]


def disaster_cell(cell: dict[str, Any]) -> dict[str, Any]:
    from p2pnode.sim.topology import barabasi_albert, components

    cfg, seed = cell["cfg"], cell["seed"]
    strategy, relays_central = DISASTER_ROWS[cell["row"]]
    adj = barabasi_albert(cfg["nodes"], cfg["m"], seed)
    central = select_removed(adj, cfg["remove"], "degree")
    relays = central if relays_central else []
    removed = select_removed(adj, cfg["remove"], strategy, seed) if strategy else []
    left = without(adj, set(removed))
    comps = [c for c in components(left) if not (len(c) == 1 and c[0] in set(removed))]
    opts = {"nodes": cfg["nodes"], "rounds": cfg["rounds"], "fanout": cfg["fanout"],
            "local_steps": cfg["local_steps"], "task": cfg["task"], "partition": "iid", "seed": seed,
            "final_eval_samples": cfg["final_eval_samples"]}
    extra = {"removed": removed, "relays": relays, "removed_degrees": [len(adj[i]) for i in removed],
             "components_after": len(comps), "largest_component_after": len(comps[0]) if comps else 0,
             "isolated_after": sum(1 for c in comps if len(c) == 1)}
    return run_swarm(SwarmPlan(options=opts, adjacency=adj, relays=tuple(relays), removed=tuple(removed),
                               remove_after=cfg["remove_after"], extra=extra))
