"""SybilWall (Werthenbach & Pouwelse, "Towards Sybil Resilience in Decentralized Learning").

One attacker running many identities sends near-identical (poisoned) updates. SybilWall keeps, per
known peer ``p``, the accumulated sum of its updates ``h_p = Σ_t (m_p(t) − m_p(t−1))`` and weighs each
peer FoolsGold-style by how *unlike* every other known history its own is (DESIGN §4.2):

- ``cs`` = cosine similarity matrix of the histories, zero diagonal;
- ``v_a = max_b cs_ab``; pardoning: ``cs_ab *= v_a / v_b`` where ``v_a < v_b``;
- ``w = 1 − max_b cs_ab``, clip [0, 1], ``w /= max w``, ``w = ln(w / (1 − w)) + 0.5``, clip [0, 1]
  (``max w``: see "The scale of the weights");
- merge: ``θ_i ← (θ_i + Σ_{p ∈ R} w_p m_p) / (1 + Σ_{p ∈ R} w_p)`` — own weight exactly 1.

Histories (choices where the paper leaves room)
-----------------------------------------------
Two definitions of "p's update", chosen with ``sybilwall[:weighted|relative|absolute]``:

- ``weighted`` (default) and ``relative``: what p's model adds to the round's consensus, ``m_p − c(t)``,
  summed over the rounds p's model arrives: ``h_p = Σ_t (m_p(t) − c(t))``. ``c(t)`` is a weighted
  coordinate-wise median of this merge's inputs (own model and received ones) in which our own model
  counts 1 and each received model its sender's :func:`uniqueness` (``weighted``, see "The reference"),
  or their plain median (``relative``).
  This is FoolsGold's client update (client model − global model) with the round's robust consensus in
  the role of the global model. (Our own model alone is no good as the reference: every history would
  share ``−`` our own update and look alike, and a lone dissimilar attacker would then get the highest
  weight.) In gossip every model carries the merges it
  took part in, so a model-to-model update ``m_p(t) − m_p(t−1)`` is dominated by the swarm's common
  trajectory: once nodes mix, every history points the same way and an attacker that also merges (a
  Sybil that stays aligned with the honest swarm and adds a boosted poisoned update) looks *less* alike
  than the honest peers and gets the highest weight — measured: honest accuracy 0.19 with 15 such Sybils
  (boost 4; relative histories fared no better at that boost, 0.10, see :mod:`defenses.attacks.sybil`:
  neither bounds the *size* of an update). Relative to the observer, the common trajectory cancels and
  what is left is each peer's own contribution: diverse for honest peers (different data), near-
  identical for Sybils. Gossiped records then carry each origin's own sum of local-training updates
  (what it adds to the models it receives), the same kind of vector.
- ``absolute``: the literal update history of the paper, below.

The reference (relative mode)
-----------------------------
An unweighted median of the inputs belongs to whoever sends most of them. On the sybilwall scenario's
geometric graph a victim merges, each round, all 15 Sybil models against its own and at most 7 honest
ones: the median *is* the Sybil model, a Sybil's relative update is then only its private noise
(uncorrelated across identities), and every Sybil looked unique and got weight 1 — measured at commit
73055b1: 15 Sybils broke through (worst victim 38.5% of class 0 read as 1, control 5.4%) while 5 did
not (12.7%). ``weighted`` (the default since 2026-11-27) makes ``c(t)`` a weighted median in which an
identity counts by how unlike the others it is, never by how many identities there are:

- a peer weighed before counts with its :func:`uniqueness` at our last merge (``1 − max_b cs_ab``:
  ~0 for a Sybil whose history has near-identical twins, a share of 1 for an honest peer);
- a newcomer counts with the uniqueness of its update ``m_p − own`` among this merge's updates
  (:func:`first_sight_uniqueness`): a Sybil swarm arriving together counts ~0 from its first merge;
- our own model counts 1.

Near-identical Sybils then share ``S − c(t)``, their histories stay alike, and they stay out.

Measured on a cut of the sybilwall scenario (``scripts/sybilwall_reference_study.py``: 40 honest,
geometric graph, 12 rounds, seed 0, seed-fixed runs at 955c58b; honest accuracy, then 0→1 success mean /
worst node): ``weighted`` 1 Sybil 0.611, 4.0% / 56.0%, 15 Sybils 0.581, 0.7% / 5.2%; the plain median
(``relative``) 1 Sybil 0.619, 3.9% / 49.6%, 15 Sybils 0.545, 17.8% / 94.6%. Our own model counting 1, more
than any received input, is what keeps the Sybils out, and what costs low-degree nodes: at a node with one
or two honest neighbours the reference is close to its own model, its neighbours' histories share ``−``
its update, and FoolsGold's logit can zero them (worst honest node 0.369 against the plain median's 0.441
at 1 Sybil; 0.173 against 0.44–0.51 on the full scenario's seed 1; these figures are from before "The scale
of the weights" below, which removed that starvation). Two ways of counting our own model for
less were measured and rejected: as the largest trust among the merge's received inputs (``own-max``: 1
Sybil 0.619, worst honest node 0.449; but 15 Sybils 3.8% / **90.5%**), and every count over the largest
known uniqueness, which is the same up to scale (1 Sybil 0.617; 15 Sybils 0.605, 3.2% / 90.6%). Nor does
centering the histories before the cosines (removing the component every history shares): 1 Sybil 0.621,
worst honest node 0.448; 15 Sybils 15.2% / 93.4%. A bound on the size of merged models (each at most F ×
the trust-weighted median distance from the reference, against boosted Sybils, commit 016df95, reverted)
did nothing where the weights already hold: with Sybils boosted 4× (``sybil:0,1,4``, 15 Sybils) the rule
without it gives 0.584, 0.8% / 5.8% (plain mean 0.498, 26% / 98%); F = 1 0.582, 0.8% / 3.2%; F = 2 0.558,
0.5% / 3.1%; and F = 2 costs 2 points with 1 Sybil (0.590). Also rejected: the *logit* SybilWall weight as
the count with newcomers at 0 starved the reference (our own model alone at a first merge makes every
history share ``−`` our update, so 35% of honest peers got weight 0, and it stuck: 1 Sybil 0.517, 5.5% /
88%); uniqueness with newcomers at 0 left 33% of honest peers at 0 after the first merge (1 Sybil 0.596;
these two from thread-timed runs before 955c58b).

Why it is the default: on the full sybilwall scenario (99 honest, seed 0) the plain median let 5 and 15
Sybils through (worst victim 69.5% and 47.8%, worse than a plain mean's 24.5% and 42.4%) where
``weighted`` held them (6.7%, 5.2%), at 3 points of honest accuracy below the plain median's; at seed 1
(a weaker attack: ``mean``'s worst victim 15.4% and 8.0%) both held (plain median 1.8% / 4.9%,
``weighted`` 3.7% / 5.1%), ``weighted`` 2–3 points below, with one honest node stuck at 0.173; on the
robustness bench's full-view Sybil table with a gradient clip of 5 (``scripts/sybil_table_clip_probe.py``)
the two are alike: 1 / 5 / 15 Sybils 0.16% / 0.18% / 0.21% of class 0 read as 1 (honest accuracy 0.859 /
0.858 / 0.846) with ``weighted``, 0.19% / 0.11% / 0.29% (0.858 / 0.859 / 0.843) with the plain median.
Without the clip that table collapses in some runs under either reference (local training diverging;
BENCHMARKS.md, Sybil table). With the scale of the weights below (b1c2b82) the default's column of the full
scenario gives honest accuracy 0.648–0.660 (worst node 0.30–0.34) at seed 0 and 0.681–0.690 (0.46–0.47) at
seed 1, worst victim 15.0% / 6.1% / 5.9% and 6.0% / 2.1% / 3.0% for 1 / 5 / 15 Sybils.

The scale of the weights
------------------------
FoolsGold's ``w /= max w`` takes the largest uniqueness of the clients being aggregated, and the logit
then zeroes every peer below 0.377 of it. Here the known histories are of two kinds: the peers this node
observed (relative histories, against this node's reference) and gossiped records (each origin's own sum
of local updates, observer-free and more unique by nature). The scale is the largest uniqueness among the
observed peers, raised to :data:`RECORD_SCALE_SHARE` (0.25) × the largest of all known histories when that
is more; records still take part in every cosine, so a Sybil whose twin is known only by its record is
still caught. Until 2026-11-27 every known history set the scale. That starved nodes: a node whose
merges gave its neighbours weight 0 trained alone, its own model drifted, the reference (where our own
model counts 1) followed it, every neighbour's history then shared ``−`` that drift and looked alike, and
a far origin's record (uniqueness 0.94) kept them all below the cut (0.05–0.17) for good: on the cut
below at seed 1, one node merged nothing in 12 rounds and three ended at chance (0.107). Measured on that
cut (honest accuracy mean / worst node, then 0→1 success mean / worst; every record setting the scale →
this rule): seed 1, 1 Sybil 0.490 / 0.107, 4.8% / 89% → 0.559 / 0.372, 2.3% / 37% (plain mean 0.569 /
0.318); 5 Sybils 0.508 / 0.097, 0.7% / 8.4% → 0.561 / 0.313, 0.6% / 3.2%; 15 Sybils 0.515 / 0.191, 0.6% /
5.6% → 0.550 / 0.294, 0.6% / 6.7%; seed 0, 1 Sybil 0.611 / 0.369, 4.0% / 56% → 0.616 / 0.448, 4.8% / 64%;
5 Sybils 0.588 / 0.275, 0.6% / 5.5% → 0.589 / 0.260, 0.7% / 5.0%; 15 Sybils 0.581 / 0.185, 0.7% / 5.2% →
0.593 / 0.188, 0.6% / 5.1% (``scripts/sybilwall_reference_study.py current|all-norm M --seed S``; with
the share at 0, ``obs-norm``, the same figures in the two cells tried). The share bounds what a forged
record can do to the scale (before, one record claiming uniqueness 1 set it for everyone). What it does
not fix: a node that has observed only near-identical Sybils, and knows no other history, gives them
full weight, as before.

- ``h_p`` starts from 0 and only ever adds updates (the reference code starts from the full model,
  which turns ``h_p`` into a model whose shared initialisation dominates every cosine). When the swarm's
  common initial model ``θ_0`` is known (``base``: every node builds it from the swarm seed), ``θ_0`` is
  ``p``'s first "previous" model, so the telescoped sum is ``h_p = m_p(latest) − θ_0``: it is the same
  at every observer, survives eviction, and equals what ``p`` itself signs in its gossiped record.
  Without a base, the first model seen from ``p`` becomes its previous model and ``h_p = 0``.
- The weights are computed over every known history: this node's own observations of the peers that
  sent it models (kept in :class:`SybilWallState`, bounded, least recently seen evicted) plus the
  histories gossiped in origin-signed records (``context.extras["records"]``) for origins it has not
  observed itself. An observation always wins over a self-signed record of the same peer. The node's
  own history takes no part (its weight is 1 by definition).
- A history of zero norm (a peer seen once, without a base) has no direction: it gets weight 0 and
  takes no part in the similarities, so without a base a new identity's first model never counts
  (honest newcomers wait one round too); with a base it is weighed like any other history.
- ``1 − max_b cs_ab`` below ``NOISE_W`` (1e-9, in float64) is rounding noise of identical histories and
  counts as 0; if that leaves ``max w = 0`` (every history has an identical twin), every weight is 0
  rather than letting ``w /= max w`` blow the noise up to a full weight.

Cost per merge: an (n, d) float64 copy of the histories and O(n²·d) time for n known histories of d
elements (n ≤ ``max_peers`` observed + the gossiped records table; 35 histories of the 114,314-parameter
fashion-mnist CNN merge in about 0.07 s on a CPU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch

from defenses.base import Aggregator, MergeContext, stack_inputs

LOGIT_EPS = 1e-6
# The scale of the weights (FoolsGold's ``max w``) is the largest uniqueness among the peers a node has
# observed, or this share of the largest among all known histories (gossiped records included) when
# that is larger ("The scale of the weights" in the module docstring).
RECORD_SCALE_SHARE = 0.25
NOISE_W = 1e-9  # 1 − max cs below this is rounding noise of identical histories: weight 0


# -- pure math on (n, d) / (n, n) tensors ----------------------------------------------------------
def cosine_matrix(histories: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(n, n)``, zero diagonal, of the rows of ``histories`` ``(n, d)`` (none zero)."""
    unit = histories / histories.norm(dim=1, keepdim=True)  # (n, d)
    cs = (unit @ unit.T).clamp_(-1.0, 1.0)  # (n, n)
    cs.fill_diagonal_(0.0)
    return cs


def pardon(cs: torch.Tensor) -> torch.Tensor:
    """FoolsGold pardoning of an ``(n, n)`` zero-diagonal similarity matrix; returns a new ``(n, n)``.

    ``v_a = max_b cs_ab`` (the zero diagonal takes part, so ``v ≥ 0``); where ``v_a < v_b``,
    ``cs_ab *= v_a / v_b`` — an honest peer that merely resembles a tight cluster is forgiven in
    proportion to how much less similar it is to anyone than the cluster members are to each other.
    """
    v = cs.max(dim=1).values  # (n,)
    lower = v[:, None] < v[None, :]  # (n, n): v_a < v_b, hence v_b > 0
    ratio = v[:, None] / torch.where(lower, v[None, :], torch.ones_like(cs))  # (n, n)
    return torch.where(lower, cs * ratio, cs)


def uniqueness(cs: torch.Tensor, *, pardoning: bool = True) -> torch.Tensor:
    """``1 − max_b cs_ab`` (after pardoning) per row, clipped to [0, 1], rounding noise as 0; ``(n,)``.

    FoolsGold's raw weight, before ``w /= max w`` and the logit: how unlike its closest other history a
    peer's history is. Near-identical Sybils have ~0, honest peers keep a share of 1 however many
    others are known (it is not relative to the most unique peer).
    """
    if cs.numel() == 0:
        return cs.new_zeros(cs.shape[0])
    if pardoning:
        cs = pardon(cs)
    w = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)  # (n,)
    return torch.where(w < NOISE_W, torch.zeros_like(w), w)


def weights_from_similarity(cs: torch.Tensor, *, pardoning: bool = True) -> torch.Tensor:
    """Per-row FoolsGold weights in [0, 1] from an ``(n, n)`` zero-diagonal similarity matrix; ``(n,)``."""
    return weights_from_uniqueness(uniqueness(cs, pardoning=pardoning))


def weights_from_uniqueness(w: torch.Tensor, top: float | None = None) -> torch.Tensor:
    """FoolsGold's ``w /= max w``, ``ln(w / (1 − w)) + 0.5``, clip [0, 1] on :func:`uniqueness` ``(n,)``.

    ``top`` replaces ``max w`` as the scale (a row above it counts as ``top``, weight 1); with ``top``
    0 (or ``max w`` 0 when it is not given) every weight is 0.
    """
    if w.numel() == 0:
        return w.clone()
    scale = float(w.max()) if top is None else top
    if scale <= 0:
        return torch.zeros_like(w)
    w = (w / scale).clamp(LOGIT_EPS, 1.0 - LOGIT_EPS)  # guard ln(0) and division by 1 − 1
    return (torch.log(w / (1.0 - w)) + 0.5).clamp(0.0, 1.0)


def sybilwall_weights(histories: torch.Tensor) -> torch.Tensor:
    """Weights ``(n,)`` of ``n`` peers from their update histories ``(n, d)`` (:func:`sybilwall_scores`)."""
    return sybilwall_scores(histories)[0]


def sybilwall_scores(histories: torch.Tensor, scale_rows: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """FoolsGold weights and :func:`uniqueness` ``(n,)`` each, of ``n`` peers' histories ``(n, d)``.

    A zero history gets 0 in both and takes no part in the others' similarities. Every row takes part
    in the similarities. The scale of the weights (``w /= max w``, :func:`weights_from_uniqueness`) is
    the largest uniqueness of all rows, or with ``scale_rows`` (the observed peers, listed first) the
    largest of the first ``scale_rows`` rows, raised to :data:`RECORD_SCALE_SHARE` × the largest of
    all rows if that is more.

    Similarities are computed in float64: converged honest histories can differ from each other only in
    the fifth decimal of their cosines, near-identical Sybil histories in the seventh, and the
    normalisation ``w /= max w`` is what tells them apart.

    Raises
    ------
    ValueError
        ``histories`` is not 2-D or holds NaN/Inf.
    """
    if histories.dim() != 2:
        raise ValueError(f"histories must be an (n, d) tensor, got shape {tuple(histories.shape)}")
    if not bool(torch.isfinite(histories).all()):
        raise ValueError("histories must be finite (NaN or Inf found)")
    live = histories.norm(dim=1) > 0  # (n,)
    weights = histories.new_zeros(histories.shape[0], dtype=torch.float64)  # (n,)
    unique = torch.zeros_like(weights)  # (n,)
    if live.any():
        cs = cosine_matrix(histories[live].double())  # (m, m); fp64: 1 − cs near 0 is what separates peers
        unique[live] = uniqueness(cs)
        top = None
        if scale_rows is not None:
            observed = float(unique[:scale_rows].max()) if scale_rows > 0 else 0.0
            top = max(observed, RECORD_SCALE_SHARE * float(unique.max()))
        weights[live] = weights_from_uniqueness(unique[live], top)
    return weights, unique


def first_sight_uniqueness(models: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """:func:`uniqueness` ``(k,)`` of this merge's updates ``models − own`` ``(k, d)`` among themselves.

    What a peer never weighed before counts for in the reference: near-identical newcomers (a Sybil
    swarm arriving) ~0, an honest newcomer about what its dissimilarity to the others earns. A model
    equal to ``own`` has no direction and gets 0.
    """
    return sybilwall_scores(models - own)[1]


def weighted_median(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise weighted median ``(d,)`` of the rows of ``stacked`` ``(n, d)``, weights ``(n,)``.

    Per column: the value where the cumulative weight of the sorted values first reaches half the total;
    where it lands exactly on half, the mean of that value and the next (so equal weights give the plain
    median, the mean of the two middle values for even ``n``). Rows of weight 0 take no part.

    Raises
    ------
    ValueError
        Shapes disagree, a weight is negative or not finite, or every weight is 0.
    """
    if stacked.dim() != 2 or weights.shape != (stacked.shape[0],):
        raise ValueError(f"need an (n, d) stack and (n,) weights, got {tuple(stacked.shape)} and "
                         f"{tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not weights.sum() > 0:
        raise ValueError("weights must be finite, non-negative and not all 0")
    keep = weights > 0  # (n,)
    rows, w = stacked[keep], weights[keep].double()  # (m, d), (m,)
    if rows.shape[0] == 1:
        return rows[0].clone()
    values, order = rows.sort(dim=0)  # (m, d) each
    cum = w[order].cumsum(dim=0)  # (m, d)
    half = w.sum() / 2
    tol = 1e-12 * float(w.sum())
    lower = (cum < half - tol).sum(dim=0, keepdim=True)  # (1, d): first index reaching half
    upper = (cum <= half + tol).sum(dim=0, keepdim=True).clamp_(max=rows.shape[0] - 1)  # (1, d): next
    return (values.gather(0, lower) + values.gather(0, upper)).squeeze(0) / 2


def weighted_merge(own: torch.Tensor, models: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(own + Σ_k w_k models_k) / (1 + Σ_k w_k)``: own weight 1, row ``k`` weighted by ``weights[k]``.

    Shapes: ``own`` ``(d,)``, ``models`` ``(k, d)``, ``weights`` ``(k,)``; returns ``(d,)``.
    """
    if models.shape[0] != weights.shape[0]:
        raise ValueError(f"{models.shape[0]} models but {weights.shape[0]} weights")
    w = weights.to(own.dtype)  # (k,)
    return (own + w @ models) / (1.0 + w.sum())


# -- explicit per-node state -------------------------------------------------------------------------
@dataclass(slots=True)
class History:
    """One peer's accumulated updates ``h`` ``(d,)``; ``prev`` is its last model (only without a base)."""

    h: torch.Tensor
    prev: torch.Tensor | None
    round: int


def observe_model(entry: History | None, model: torch.Tensor, *, base: torch.Tensor | None,
                  round: int, own: torch.Tensor | None = None) -> History:
    """Add the update ``model − previous model`` to ``entry`` (``None``: first sight); return the entry.

    With ``base`` (the swarm's initial model) the previous model of a first sight is ``base`` and the
    sum telescopes to ``model − base``; without it, a first sight only remembers ``model``.
    With ``own`` (relative histories: the reference point), the update is ``model − own`` and ``base``
    plays no part.
    """
    if own is not None:
        return History(h=(model - own) if entry is None else entry.h + (model - own), prev=None, round=round)
    if base is not None:
        return History(h=model - base, prev=None, round=round)
    if entry is None or entry.prev is None:
        return History(h=torch.zeros_like(model), prev=model.clone(), round=round)
    return History(h=entry.h + (model - entry.prev), prev=model.clone(), round=round)


class SybilWallState:
    """Per-peer update histories observed by one node: at most ``max_peers``, least recently seen evicted.

    ``state_dict()`` holds only strings, ints and tensors (``torch.save``/``weights_only`` safe).
    """

    def __init__(self, max_peers: int = 1024) -> None:
        if max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {max_peers}")
        self.max_peers = max_peers
        self.histories: OrderedDict[str, History] = OrderedDict()
        self.uniqueness: dict[str, float] = {}  # each peer's uniqueness at the last merge that weighed it

    def observe(self, peer: str, model: torch.Tensor, *, base: torch.Tensor | None, round: int,
                own: torch.Tensor | None = None) -> None:
        """Account ``peer``'s model ``(d,)`` received at our ``round`` (relative to ``own`` if given)."""
        self.histories[peer] = observe_model(self.histories.pop(peer, None), model, base=base, round=round,
                                             own=own)
        while len(self.histories) > self.max_peers:
            evicted, _ = self.histories.popitem(last=False)
            self.uniqueness.pop(evicted, None)

    def trust(self, peer: str) -> float:
        """``peer``'s :func:`uniqueness` at the last merge that weighed it; 0 for a peer never weighed."""
        return self.uniqueness.get(peer, 0.0)

    def __len__(self) -> int:
        return len(self.histories)

    def state_dict(self) -> dict[str, Any]:
        peers = list(self.histories)
        entries = list(self.histories.values())
        with_prev = [e.prev for e in entries if e.prev is not None]
        return {
            "max_peers": self.max_peers,
            "peers": peers,
            "rounds": [e.round for e in entries],
            "h": torch.stack([e.h for e in entries]) if entries else torch.empty(0, 0),  # (n, d)
            "has_prev": torch.tensor([e.prev is not None for e in entries], dtype=torch.bool),  # (n,)
            "prev": torch.stack(with_prev) if with_prev else torch.empty(0, 0),  # (m, d)
            # last uniqueness, −1 for a peer never weighed
            "uniqueness": torch.tensor([self.uniqueness.get(p, -1.0) for p in peers], dtype=torch.float64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (replaces the current histories)."""
        peers, rounds, h, has_prev, prev = (state[k] for k in ("peers", "rounds", "h", "has_prev", "prev"))
        if not len(peers) == len(rounds) == len(has_prev) == h.shape[0]:
            raise ValueError("inconsistent sybilwall state: peers, rounds and histories differ in length")
        if int(has_prev.sum()) != prev.shape[0]:
            raise ValueError("inconsistent sybilwall state: previous models do not match has_prev")
        self.max_peers = int(state["max_peers"])
        unique = state.get("uniqueness")  # absent in states saved before the weighted reference
        if unique is not None and len(unique) != len(peers):
            raise ValueError("inconsistent sybilwall state: uniqueness and peers differ in length")
        self.histories = OrderedDict()
        self.uniqueness = {}
        prev_rows = iter(prev)
        for i, peer in enumerate(peers):
            p = next(prev_rows).clone() if bool(has_prev[i]) else None
            self.histories[str(peer)] = History(h=h[i].clone(), prev=p, round=int(rounds[i]))
            if unique is not None and float(unique[i]) >= 0:
                self.uniqueness[str(peer)] = float(unique[i])


# -- the aggregator --------------------------------------------------------------------------------
class SybilWall(Aggregator):
    """SybilWall merge; its state is a :class:`SybilWallState` passed in ``context.state``.

    ``context.extras`` may hold ``"records"`` (origin id → gossiped history ``(d,)``, any float dtype)
    and ``"base"`` (the swarm's initial model ``(d,)``). Without a state (no context), a throwaway one is
    used: every peer is new, so without a base every weight is 0 and the result is ``own``.
    """

    name = "sybilwall"
    MODES = ("weighted", "relative", "absolute")
    form: ClassVar[str] = "sybilwall[:weighted|relative|absolute] (how a peer's update history is taken)"

    def __init__(self, *, max_peers: int = 1024, mode: str = "weighted") -> None:
        if mode not in self.MODES:
            raise ValueError(f"sybilwall mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.max_peers = max_peers
        self.relative = mode in ("relative", "weighted")
        self.weighted_reference = mode == "weighted"

    @classmethod
    def from_args(cls, args: str) -> Self:
        """``""`` (weighted) or a mode; ``ValueError`` naming the form otherwise."""
        if args and args not in cls.MODES:
            raise ValueError(f"bad argument {args!r}: expected {cls.form}")
        return cls(mode=args or "weighted")

    def new_state(self) -> SybilWallState:
        return SybilWallState(self.max_peers)

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        stacked = stack_inputs(own, received)  # (1 + k, d): checks shapes and finiteness
        context = context if context is not None else MergeContext()
        state = context.state if context.state is not None else self.new_state()
        if not isinstance(state, SybilWallState):
            raise ValueError(f"sybilwall needs a SybilWallState, got {type(state).__name__}")
        base = context.extras.get("base")
        base = None if base is None else _checked(base, own, "base")
        center = None
        if self.weighted_reference:  # each input counted by its uniqueness ("The reference")
            trust = torch.tensor([1.0, *(state.trust(p) for p in received)], dtype=torch.float64)  # (1 + k,)
            new = torch.tensor([False, *(p not in state.uniqueness for p in received)])  # (1 + k,)
            if new.any():
                trust[new] = first_sight_uniqueness(stacked[1:], own)[new[1:]]
            center = weighted_median(stacked, trust)  # (d,)
        elif self.relative:  # the round's robust consensus (module docstring)
            center = stacked.median(dim=0).values  # (d,)
        for peer, model in received.items():
            state.observe(peer, model, base=base, round=context.round, own=center)
        weights, unique = self.peer_scores(state, context.extras.get("records", {}), own)
        state.uniqueness.update((p, unique[p]) for p in state.histories)
        w = torch.tensor([weights.get(peer, 0.0) for peer in received], dtype=torch.float64)  # (k,)
        return weighted_merge(own, stacked[1:], w)

    @staticmethod
    def peer_weights(state: SybilWallState, records: Mapping[str, torch.Tensor],
                     own: torch.Tensor) -> dict[str, float]:
        """Weight of every known peer: observed histories first, then records of unobserved origins."""
        return SybilWall.peer_scores(state, records, own)[0]

    @staticmethod
    def peer_scores(state: SybilWallState, records: Mapping[str, torch.Tensor],
                    own: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        """Weight and :func:`uniqueness` of every known peer (as :meth:`peer_weights`)."""
        gossiped = [p for p in records if p not in state.histories]
        ids = [*state.histories, *gossiped]
        histories = own.new_empty(len(ids), own.shape[0], dtype=torch.float64)  # (n, d)
        for row, entry in enumerate(state.histories.values()):
            histories[row].copy_(entry.h)
        for row, peer in enumerate(gossiped, start=len(state.histories)):
            histories[row].copy_(_checked(records[peer], own, f"record of {peer}"))
        weights, unique = sybilwall_scores(histories, scale_rows=len(state.histories))
        return dict(zip(ids, weights.tolist(), strict=True)), dict(zip(ids, unique.tolist(), strict=True))


def _checked(vec: Any, own: torch.Tensor, what: str) -> torch.Tensor:
    """``vec`` as ``own``'s dtype and device, after checking its shape and finiteness (ValueError)."""
    if not isinstance(vec, torch.Tensor) or vec.shape != own.shape:
        raise ValueError(f"{what} must be a tensor of shape {tuple(own.shape)}")
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{what} must be finite (NaN or Inf found)")
    return vec.to(own)

