"""Compare ways of choosing SybilWall's relative-history reference on a cut of the sybilwall scenario.

The figures in ``defenses/sybilwall.py`` ("The reference") came from this script: 40 honest nodes on a
random geometric graph (radius scaled from the scenario's 0.2 at 99 nodes), degree <= 7, one attacker
with M Sybils, fashion-mnist Dirichlet(0.1), fanout 4, 12 rounds x 10 steps, gradient clip 5, seed 0.

    OMP_NUM_THREADS=1 python scripts/sybilwall_reference_study.py VARIANT SYBILS [--honest 40] [--rounds 12]

VARIANT:
  current      sybilwall:weighted as it is (uniqueness; newcomers by first-sight uniqueness)
  uniq-new0    uniqueness, newcomers count 0
  uniq-norm    uniqueness over the largest one known (own model still 1; newcomers over their largest)
  own-max      own model counts the largest trust among the merge's received inputs (not 1)
  centered     cosines of histories minus their mean (3 or more histories): a component every history
               shares (our own update, through the reference) no longer makes honest peers look alike
  logit-new0   the logit SybilWall weight of the last merge, newcomers count 0
  obs-norm     current with --record-share 0: only observed peers set the scale of the weights
  all-norm     current with --record-share 1: every known history sets it (the rule before 2026-11-27)
  plain        every input counts 1 (the plain median of the inputs: the reference before)
  mean         no SybilWall at all (plain mean merge)

Prints one JSON line: honest accuracy mean/min, 0->1 success mean/worst, and per round the mean share
of received models that got merge weight 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from typing import Any

import torch

import defenses.sybilwall as sw
from p2pnode.sim.scenarios_common import SwarmPlan, run_swarm
from p2pnode.sim.scenarios_robust import sybil_topology, sybilwall_config

VARIANTS = ("current", "uniq-norm", "own-max", "centered", "obs-norm", "all-norm", "uniq-new0", "logit-new0",
            "plain", "mean")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("sybils", type=int)
    p.add_argument("--honest", type=int, default=40)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-share", type=float, default=None,
                   help=f"defenses.sybilwall.RECORD_SCALE_SHARE (default {sw.RECORD_SCALE_SHARE})")
    ns = p.parse_args()
    if ns.record_share is not None:
        sw.RECORD_SCALE_SHARE = ns.record_share
    if ns.variant in ("obs-norm", "all-norm"):
        sw.RECORD_SCALE_SHARE = 0.0 if ns.variant == "obs-norm" else 1.0

    last_weights: dict[int, dict[str, float]] = {}  # id(state) -> merge weights of its last merge
    last_unique: dict[int, dict[str, float]] = {}  # id(state) -> uniqueness of every known history
    # id(state) -> (round, received peers' weights, their uniqueness, max uniqueness known, max observed)
    last_merge: dict[int, tuple[int, list[float], list[float], float, float]] = {}
    zero_share: dict[int, list[float]] = collections.defaultdict(list)  # round -> share per merge
    merge_sums: dict[int, list[float]] = collections.defaultdict(list)  # id(state) -> Σ weights per merge
    scores, aggregate = sw.SybilWall.peer_scores, sw.SybilWall.aggregate

    def peer_scores(state: Any, records: Any, own: torch.Tensor) -> Any:
        out = scores(state, records, own)
        last_weights[id(state)] = out[0]
        last_unique[id(state)] = out[1]
        return out

    def recording_aggregate(self: Any, own: torch.Tensor, received: Any, context: Any = None) -> torch.Tensor:
        merged = aggregate(self, own, received, context)
        w = [last_weights[id(context.state)].get(peer, 0.0) for peer in received]
        merge_sums[id(context.state)].append(sum(w))
        if w:
            zero_share[context.round].append(sum(x == 0.0 for x in w) / len(w))
            unique = last_unique[id(context.state)]
            observed = [unique[p] for p in context.state.histories]
            last_merge[id(context.state)] = (context.round, [round(x, 3) for x in w],
                                             [round(unique.get(p, 0.0), 3) for p in received],
                                             round(max(unique.values()), 3), round(max(observed), 3))
        return merged

    sw.SybilWall.peer_scores = staticmethod(peer_scores)  # type: ignore[method-assign]
    sw.SybilWall.aggregate = recording_aggregate  # type: ignore[method-assign]
    if ns.variant in ("uniq-new0", "logit-new0", "plain"):
        sw.first_sight_uniqueness = lambda models, own: torch.zeros(models.shape[0], dtype=torch.float64)
    if ns.variant == "logit-new0":
        sw.SybilWallState.trust = lambda self, peer: last_weights.get(id(self), {}).get(peer, 0.0)
    if ns.variant == "uniq-norm":
        raw_first = sw.first_sight_uniqueness

        def normed_first(models: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            u = raw_first(models, own)
            return u / u.max() if u.max() > 0 else u

        def normed_trust(self: Any, peer: str) -> float:
            top = max(self.uniqueness.values(), default=0.0)
            return self.uniqueness.get(peer, 0.0) / top if top > 0 else 0.0

        sw.first_sight_uniqueness = normed_first
        sw.SybilWallState.trust = normed_trust
    if ns.variant == "own-max":
        median = sw.weighted_median  # the reference's only caller: row 0 is our own model

        def own_max_median(stacked: torch.Tensor, trust: torch.Tensor) -> torch.Tensor:
            top = float(trust[1:].max()) if trust.numel() > 1 else 0.0
            return median(stacked, torch.cat([trust.new_tensor([top if top > 0 else 1.0]), trust[1:]]))

        sw.weighted_median = own_max_median
    if ns.variant == "centered":
        cosine = sw.cosine_matrix

        def centered_cosine(histories: torch.Tensor) -> torch.Tensor:
            if histories.shape[0] < 3:
                return cosine(histories)
            centered = histories - histories.mean(dim=0, keepdim=True)
            live = centered.norm(dim=1) > 0
            if not bool(live.all()):
                return cosine(histories)
            return cosine(centered)

        sw.cosine_matrix = centered_cosine
    if ns.variant == "plain":
        sw.SybilWallState.trust = lambda self, peer: 1.0
        sw.first_sight_uniqueness = lambda models, own: torch.ones(models.shape[0], dtype=torch.float64)

    cfg = sybilwall_config(False)
    radius = cfg["radius"] * (99 / ns.honest) ** 0.5
    adj = sybil_topology(ns.honest, ns.sybils, radius, cfg["max_degree"], ns.seed)
    opts = {"nodes": ns.honest + ns.sybils, "byzantine": ns.sybils, "attack": "sybil" if ns.sybils else "",
            "rounds": ns.rounds, "task": cfg["task"], "partition": cfg["partition"], "fanout": cfg["fanout"],
            "local_steps": cfg["local_steps"],
            "defense": "mean" if ns.variant == "mean" else "sybilwall:weighted",
            "seed": ns.seed, "final_eval_samples": cfg["final_eval_samples"],
            "max_grad_norm": cfg["max_grad_norm"]}
    import p2pnode.inproc as inproc

    swarms: list[Any] = []
    execute = inproc.InprocSwarm.execute

    def keep_swarm(self: Any, *args: Any, **kwargs: Any) -> Any:
        swarms.append(self)
        return execute(self, *args, **kwargs)

    inproc.InprocSwarm.execute = keep_swarm  # type: ignore[method-assign]
    res = run_swarm(SwarmPlan(options=opts, adjacency=adj, measure_targeted=(0, 1)))
    worst = []  # the five worst honest nodes: what their merges weighed
    if swarms:
        # the run's own final evaluation of each honest node (InprocSwarm.run writes it as a "final" row)
        acc = {row["node"]: row["test_accuracy"] for row in swarms[0].rows
               if row["event"] == "final" and swarms[0].nodes[row["node"]].role == "honest"}
        honest = list(acc)
        for i in sorted(honest, key=acc.get)[:5]:
            sums = merge_sums.get(id(swarms[0].nodes[i].merge_state), [])
            worst.append({"node": i, "acc": round(acc[i], 3), "degree": sum(j < ns.honest for j in adj[i]),
                          "sybil_neighbour": ns.honest in adj[i] if ns.sybils else False,
                          "merges": len(sums), "merges_all_zero": sum(s == 0 for s in sums),
                          "mean_weight_sum": round(statistics.fmean(sums), 3) if sums else None,
                          "last_merge": last_merge.get(id(swarms[0].nodes[i].merge_state))})
    keys = ("honest_accuracy_mean", "honest_accuracy_min", "targeted_success_mean", "targeted_success_max")
    print(json.dumps({"variant": ns.variant, "record_share": sw.RECORD_SCALE_SHARE,
                      "sybils": ns.sybils, "attack_edges": len(adj[ns.honest]) if
                      ns.sybils else 0, **{k: round(res[k], 4) for k in keys},
                      "zero_weight_share_by_round": {r: round(statistics.fmean(v), 3)
                                                     for r, v in sorted(zero_share.items())},
                      # nodes whose last merge gave every received model weight 0: (round, weights,
                      # uniqueness of those peers, largest uniqueness known, largest among observed)
                      "starved_last_merges": [m for m in last_merge.values() if not any(m[1])],
                      "worst_nodes": worst}))


if __name__ == "__main__":
    main()
