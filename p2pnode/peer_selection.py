"""Deterministic peer choice on an exponential graph (``--peer-selection exponential``).

Random peer sampling mixes models slowly: after a round a node holds the mean of a few random models,
never the swarm's. Ying et al. ("Exponential Graph is Provably Efficient for Decentralized Deep
Training", NeurIPS 2021) show that with n nodes a *one-peer* exponential graph — in round t node i talks
to node i + 2^(t mod τ), τ = ⌈log₂ n⌉ — reaches the exact average after τ rounds when n is a power of 2,
for the bytes of one peer per round. Here the nodes are ranked by peer id among the ones in view, and
for a power of 2 the partner is i XOR 2^(t mod τ) (the hypercube: the relation is symmetric, so a
push-pull with it is an exact pairwise average); otherwise i + 2^(t mod τ) mod n. With fanout k a round
uses the k dimensions t, t + 1, ... (mod τ).

Every node computes its partners from its own round counter and view. Nodes whose views or rounds
differ (churn, free-running rounds) simply pick other partners: the exchange stays a valid gossip
round, only the exact-average property is lost for that round.
"""

from __future__ import annotations

PEER_SELECTIONS = ("random", "exponential")


def exponential_partners(own: str, others: list[str], round: int, k: int) -> list[str]:
    """The up to ``k`` distinct partners of ``own`` among ``others`` in round ``round`` (see module doc)."""
    ids = sorted({own, *others})
    n = len(ids)
    if n < 2 or k <= 0:
        return []
    i = ids.index(own)
    tau = max(1, (n - 1).bit_length())  # ceil(log2 n)
    hypercube = n & (n - 1) == 0
    partners: list[str] = []
    for j in range(tau):
        if len(partners) == min(k, n - 1):
            break
        step = 1 << ((round + j) % tau)
        partner = ids[i ^ step] if hypercube else ids[(i + step) % n]
        if partner != own and partner not in partners:
            partners.append(partner)
    return partners
