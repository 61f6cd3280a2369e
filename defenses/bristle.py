"""Bristle: distance-based peer prioritizer and per-class-F1 integrator for the output layer.

Verbraeken, de Vos and Pouwelse, "Bristle: Decentralized Federated Learning in Byzantine, Non-i.i.d.
Environments". Feature layers are pretrained on disjoint public data and frozen; only the output
layer ``W`` (features x classes in the paper) is trained and exchanged.

Prioritizer (:func:`bristle_select`): sort peers by ``‖W_p − W_i‖``, split the sorted list into
thirds (near, middle, far) and draw ``(1−α)²K``, ``2α(1−α)K`` and ``α²K`` peers from them (α = 0.4,
K = 10). The paper rounds each count separately, which for K = 10, α = 0.4 gives 4 + 5 + 2 = 11 > K;
:func:`third_counts` apportions K by largest remainder instead (4 + 5 + 1 = 10), so the node never
contacts more than K peers.

Integrator (:func:`bristle_integrate`), with ``f_i(c)`` / ``f_p(c)`` the per-class F1 of the own / a
peer's model on the node's small local validation split:

- a peer is judged on the classes ``J_p`` it knows among the node's *familiar* classes (classes with
  enough local validation samples, see :class:`BristleState`; the F1 of a class the node has no or
  almost no samples of carries no evidence): ``J_p = {c familiar : f_p(c) ≥ ρ f_i(c)}`` (ρ = 0.7).
  The authors' code judges a peer on its top-k classes by F1, k the number of classes the peer
  *holds* (known to their experiment harness, ``countPerPeer``); a daemon has no trustworthy count,
  so the relative threshold stands in for it. ρ = 0 judges every peer on every familiar class, as
  DESIGN §4.3 reads literally: under non-IID classes a peer that lacks one of our classes then loses
  its certainty and all say on our foreign classes, and the node barely learns those (measured in
  ``docs/sim/scenarios.md``: honest accuracy 0.775 → 0.822 under attack at ρ = 0 → 0.7);
- ``δ = 10 |f_i(c) − f_p(c)|``; score ``s = δ^(3 + f_i(c))`` if ``f_p(c) > f_i(c)`` else
  ``−δ^(4 + f_i(c))``, floored at −100 for the per-class weights;
- certainty ``cert_p = max(0, mean_c f_p(c) − std_c f_p(c))`` over ``J_p`` (0 if ``J_p`` is empty);
- familiar class ``c``: ``w_pc = max(0, 10 σ(s/100) − 4) · cert_p`` for ``c ∈ J_p`` (0 otherwise)
  and ``W[:, c] = (W_i[:, c] + Σ_p w_pc W_p[:, c]) / (1 + Σ_p w_pc)``;
- foreign class ``c`` (not familiar): one weight per peer from the *sum* of its scores over
  ``J_p``, ``w_p = max(0, 10 σ(Σ_c s_pc / 100) − 4) · cert_p`` with the same normalisation. As in
  the authors' code the sum uses the unfloored scores, so a peer much worse than us on a class it
  is judged on gets no say on classes we cannot check.

The price of ρ > 0: a peer that poisons one class only, and fails it so badly that the class drops
out of ``J_p``, keeps its say on our foreign classes; ρ = 0 shuts it out, but also every honest
peer that lacks one of our classes.

The own model always has weight exactly 1. ``nn.Linear`` stores ``weight`` as (classes x features)
plus ``bias`` (classes): the paper's column ``W[:, c]`` is row ``c`` of the weight together with
``bias[c]``; :func:`output_head` finds both in the flat vector from ``MergeContext.layers``.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from defenses.args import split_args
from defenses.base import Aggregator, Layer, MergeContext, stack_inputs

logger = logging.getLogger(__name__)

DELTA_SCALE = 10.0
SCORE_FLOOR = -100.0
SIGMOID_SCALE = 100.0
DEFAULT_ALPHA = 0.4
DEFAULT_RHO = 0.7


# -- prioritizer -----------------------------------------------------------------------------------
def third_counts(k: int, alpha: float) -> tuple[int, int, int]:
    """How many peers to draw from the near, middle and far thirds; the counts sum to ``k``.

    The quotas ``(1−α)²k, 2α(1−α)k, α²k`` sum to ``k``; each gets its floor and the remaining peers go
    to the largest remainders (ties to the nearer third). ``third_counts(10, 0.4) == (4, 5, 1)``.

    Raises
    ------
    ValueError
        If ``k < 0`` or ``alpha`` is outside ``[0, 1]``.
    """
    if k < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need k >= 0 and 0 <= alpha <= 1, got k={k}, alpha={alpha}")
    quotas = [(1 - alpha) ** 2 * k, 2 * alpha * (1 - alpha) * k, alpha**2 * k]
    counts = [int(q + 1e-9) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (-round(quotas[i] - counts[i], 9), i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def bristle_select(own_w: torch.Tensor, peers_w: Mapping[str, torch.Tensor], k: int = 10,
                   alpha: float = DEFAULT_ALPHA, rng: random.Random | None = None) -> list[str]:
    """Pick up to ``k`` peers: near / middle / far thirds by ``‖W_p − W_i‖`` (DESIGN §4.3).

    Parameters
    ----------
    own_w
        Own output layer (any shape; flattened), e.g. the flat head vector ``(d,)``.
    peers_w
        Last known output layer of each candidate peer, same shape as ``own_w``.
    k, alpha
        Budget and exploration parameter (see :func:`third_counts`).
    rng
        Draws within each third; ``None`` uses a fresh unseeded ``random.Random``.

    Returns
    -------
    list of str
        ``min(k, len(peers_w))`` distinct peer ids. With at most ``k`` candidates all are returned
        (nearest first). When a third holds fewer peers than its count, the shortfall is drawn
        from the remaining peers of the nearest thirds first.

    Raises
    ------
    ValueError
        On a shape mismatch, non-finite input, ``k < 0`` or ``alpha`` outside ``[0, 1]``.
    """
    counts = third_counts(k, alpha)
    ids = list(peers_w)
    if not ids:
        return []
    dist = _distances(own_w, [peers_w[p] for p in ids])  # (n,)
    order = sorted(range(len(ids)), key=lambda j: (float(dist[j]), ids[j]))
    ranked = [ids[j] for j in order]
    if len(ranked) <= k:
        return ranked
    rng = rng or random.Random()
    size, extra = divmod(len(ranked), 3)
    bounds = [0, size + (extra > 0), 2 * size + (extra > 0) + (extra > 1), len(ranked)]
    thirds = [ranked[bounds[t] : bounds[t + 1]] for t in range(3)]
    chosen: list[str] = []
    for third, count in zip(thirds, counts):
        picked = rng.sample(third, min(count, len(third)))
        chosen.extend(sorted(picked, key=ranked.index))
    for third in thirds:  # shortfall of a too-small third: nearest thirds first
        rest = [p for p in third if p not in chosen]
        chosen.extend(rng.sample(rest, min(k - len(chosen), len(rest))))
    return chosen


def _distances(own_w: torch.Tensor, peers: Sequence[torch.Tensor]) -> torch.Tensor:
    own = own_w.reshape(-1).double()
    for w in peers:
        if w.numel() != own.numel():
            raise ValueError(f"peer output layer has {w.numel()} elements, own has {own.numel()}")
    stacked = torch.stack([w.reshape(-1).double() for w in peers])  # (n, d)
    if not (torch.isfinite(stacked).all() and torch.isfinite(own).all()):
        raise ValueError("prioritizer inputs must be finite (NaN or Inf found)")
    return torch.linalg.vector_norm(stacked - own, dim=1)  # (n,)


# -- integrator ------------------------------------------------------------------------------------
def bristle_scores(f_own: torch.Tensor, f_peers: torch.Tensor) -> torch.Tensor:
    """Unfloored scores ``s_pc``: ``δ^(3+f_i)`` if the peer is better on ``c``, else ``−δ^(4+f_i)``.

    ``f_own``: (C,), ``f_peers``: (m, C), F1 values in [0, 1]; returns (m, C) float64.
    """
    f_i, f_p = f_own.double().unsqueeze(0), f_peers.double()  # (1, C), (m, C)
    delta = DELTA_SCALE * (f_i - f_p).abs()
    return torch.where(f_p > f_i, delta.pow(3 + f_i), -delta.pow(4 + f_i))


def judged_classes(f_own: torch.Tensor, f_peers: torch.Tensor, familiar: torch.Tensor,
                   rho: float = DEFAULT_RHO) -> torch.Tensor:
    """(m, C) bool: the familiar classes each peer is judged on, ``f_p(c) ≥ ρ f_i(c)``.

    ``rho = 0`` gives every familiar class for every peer.
    """
    knows = f_peers.double() >= rho * f_own.double().unsqueeze(0)  # (m, C)
    return knows & familiar.unsqueeze(0)


def bristle_certainty(f_peers: torch.Tensor, judged: torch.Tensor) -> torch.Tensor:
    """``cert_p = max(0, mean − std)`` of each peer's F1 over its judged classes; (m, C) -> (m,).

    ``judged`` is (C,) (the same classes for every peer, e.g. the familiar ones) or (m, C) (from
    :func:`judged_classes`). The standard deviation is the population one; a peer judged on no class
    has certainty 0.
    """
    f = f_peers.double()
    mask = judged.expand_as(f).double()  # (m, C)
    n = mask.sum(dim=1)  # (m,)
    mean = (f * mask).sum(dim=1) / n.clamp(min=1.0)
    std = (((f - mean.unsqueeze(1)) ** 2 * mask).sum(dim=1) / n.clamp(min=1.0)).sqrt()
    return torch.where(n > 0, (mean - std).clamp(min=0.0), torch.zeros_like(mean))


def _gate(score: torch.Tensor) -> torch.Tensor:
    """``max(0, 10 σ(s / 100) − 4)``: 0 for bad scores, 1 at s = 0, up to 6 for good ones."""
    return (10.0 * torch.sigmoid(score / SIGMOID_SCALE) - 4.0).clamp(min=0.0)


def bristle_weights(f_own: torch.Tensor, f_peers: torch.Tensor, familiar: torch.Tensor,
                    rho: float = DEFAULT_RHO) -> torch.Tensor:
    """Weight of each peer for each class, (m, C) float64 (own weight is 1 for every class).

    Familiar classes get ``w_pc = gate(max(s_pc, −100)) · cert_p`` where the peer is judged on ``c``
    and 0 where it is not; foreign classes get the per-peer ``w_p = gate(Σ_{c judged} s_pc) · cert_p``.

    Parameters
    ----------
    f_own
        (C,) own per-class F1.
    f_peers
        (m, C) per-class F1 of each peer's model on the same validation split.
    familiar
        (C,) bool, classes present in the node's local data.
    rho
        See :func:`judged_classes`.
    """
    judged = judged_classes(f_own, f_peers, familiar, rho)  # (m, C)
    scores = bristle_scores(f_own, f_peers)  # (m, C)
    cert = bristle_certainty(f_peers, judged).unsqueeze(1)  # (m, 1)
    per_class = _gate(scores.clamp(min=SCORE_FLOOR)) * cert * judged  # (m, C)
    per_peer = _gate(torch.where(judged, scores, 0.0).sum(dim=1, keepdim=True)) * cert  # (m, 1)
    return torch.where(familiar.unsqueeze(0), per_class, per_peer.expand_as(per_class))


def bristle_integrate(own_cols: torch.Tensor, peer_cols: torch.Tensor, f_own: torch.Tensor,
                      f_peers: torch.Tensor, familiar: torch.Tensor,
                      rho: float = DEFAULT_RHO) -> torch.Tensor:
    """Merge the output layer class by class (DESIGN §4.3).

    Parameters
    ----------
    own_cols
        (C, P): row ``c`` holds everything of class ``c`` (the paper's column ``W[:, c]``; for
        ``nn.Linear``, weight row ``c`` and ``bias[c]``).
    peer_cols
        (m, C, P), the peers' output layers in the same layout.
    f_own, f_peers, familiar, rho
        See :func:`bristle_weights`.

    Returns
    -------
    torch.Tensor
        (C, P) in ``own_cols``' dtype: ``(own + Σ_p w_pc peer_p) / (1 + Σ_p w_pc)`` per class.

    Raises
    ------
    ValueError
        On inconsistent shapes or F1 values that are not finite numbers in [0, 1].
    """
    return _integrate(own_cols, peer_cols, f_own, f_peers, familiar, rho)[0]


def _integrate(own_cols: torch.Tensor, peer_cols: torch.Tensor, f_own: torch.Tensor, f_peers: torch.Tensor,
               familiar: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bristle_integrate`, also returning the (m, C) weights it used."""
    _check_integrator_inputs(own_cols, peer_cols, f_own, f_peers, familiar)
    w = bristle_weights(f_own, f_peers, familiar, rho)  # (m, C)
    total = own_cols.double() + torch.einsum("mc,mcp->cp", w, peer_cols.double())  # (C, P)
    return (total / (1.0 + w.sum(dim=0)).unsqueeze(1)).to(own_cols.dtype), w


def _check_integrator_inputs(own_cols: torch.Tensor, peer_cols: torch.Tensor, f_own: torch.Tensor,
                             f_peers: torch.Tensor, familiar: torch.Tensor) -> None:
    c = own_cols.shape[0]
    if own_cols.dim() != 2 or peer_cols.dim() != 3 or peer_cols.shape[1:] != own_cols.shape:
        raise ValueError(f"peer_cols {tuple(peer_cols.shape)} must be (m, *{tuple(own_cols.shape)})")
    m = peer_cols.shape[0]
    if f_own.shape != (c,) or f_peers.shape != (m, c) or familiar.shape != (c,):
        raise ValueError(f"F1 shapes {tuple(f_own.shape)}, {tuple(f_peers.shape)} and familiar "
                         f"{tuple(familiar.shape)} do not match {m} peers x {c} classes")
    if familiar.dtype != torch.bool:
        raise ValueError("familiar must be a bool tensor")
    for f in (f_own, f_peers):
        if not (torch.isfinite(f).all() and (f >= 0).all() and (f <= 1).all()):
            raise ValueError("per-class F1 values must be finite and in [0, 1]")


# -- the output layer inside the flat vector -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutputHead:
    """Where the output layer sits in the flat vector: ``weight`` (C, F) and optional ``bias`` (C,)."""

    weight: Layer
    bias: Layer | None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def columns(self, flat: torch.Tensor) -> torch.Tensor:
        """(d,) -> (C, F [+ 1]): class ``c``'s weight row, followed by ``bias[c]`` if there is one."""
        w = self.weight.view(flat).reshape(self.weight.shape)  # (C, F)
        if self.bias is None:
            return w
        return torch.cat([w, self.bias.view(flat).reshape(-1, 1)], dim=1)  # (C, F + 1)

    def write(self, flat: torch.Tensor, cols: torch.Tensor) -> None:
        """Inverse of :meth:`columns`: write (C, F [+ 1]) back into ``flat`` in place."""
        n_features = self.weight.shape[1]
        self.weight.view(flat).copy_(cols[:, :n_features].reshape(-1))
        if self.bias is not None:
            self.bias.view(flat).copy_(cols[:, n_features])


def output_head(layers: Sequence[Layer], d: int) -> OutputHead:
    """Find the output layer (the last 2-D parameter, with its ``bias``) in the flat-vector layout.

    Raises
    ------
    ValueError
        If the layout is empty, does not cover ``d`` entries, or holds trainable tensors other than
        the output layer: Bristle exchanges only the output layer, so it needs a transfer task
        (e.g. ``fashion-mnist-transfer``) whose model is just that layer.
    """
    if not layers or sum(layer.numel for layer in layers) != d:
        raise ValueError(f"bristle needs MergeContext.layers describing the {d}-entry flat vector")
    params = [layer for layer in layers if not layer.is_buffer]
    weights = [layer for layer in params if len(layer.shape) == 2]
    if not weights:
        raise ValueError("bristle found no 2-D output-layer weight in MergeContext.layers")
    weight = weights[-1]
    prefix = weight.name[: -len("weight")] if weight.name.endswith("weight") else None
    bias = next((layer for layer in params if prefix is not None and layer.name == prefix + "bias"
                 and layer.shape == (weight.shape[0],)), None)
    others = [layer.name for layer in params if layer is not weight and layer is not bias]
    if others:
        raise ValueError(f"bristle merges only the output layer, but the model also trains {others}; "
                         "use a transfer task such as fashion-mnist-transfer")
    return OutputHead(weight=weight, bias=bias)


# -- the aggregator --------------------------------------------------------------------------------
@dataclass(slots=True)
class BristleState:
    """What Bristle keeps between rounds (owned by the node, so it can be checkpointed).

    Attributes
    ----------
    class_counts:
        (C,) local class counts that define the familiar classes: ``count >= min_familiar``, or
        ``count > 0`` if no class reaches that. Set it to the *validation* counts
        (``LocalTrainer.val_class_counts``) so that a familiar class has F1 evidence; ``None``
        treats every class as familiar.
    min_familiar:
        Validation samples a class needs to count as familiar. The F1 of a class seen once or twice
        is noise that inflates ``std_c f_p`` and so zeroes every peer's certainty; such classes are
        better merged as foreign. (Measured on fashion-mnist-transfer, 15 nodes, Dirichlet 0.3,
        5 label flippers: honest accuracy mean/min 0.80/0.57 with ``count > 0``, 0.87/0.86 with 10.)
    peer_models:
        Last flat vector received from each peer, for the prioritizer (least recently updated
        evicted beyond ``capacity``).
    last_weights:
        The per-class weights (C,) given to each peer at the last merge (diagnostics).
    capacity:
        Peers remembered in ``peer_models``.
    """

    class_counts: torch.Tensor | None = None
    peer_models: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    last_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    capacity: int = 1024
    min_familiar: int = 10

    def remember(self, received: Mapping[str, torch.Tensor]) -> None:
        for peer, flat in received.items():
            self.peer_models.pop(peer, None)
            self.peer_models[peer] = flat.detach().clone()
        while len(self.peer_models) > self.capacity:
            self.peer_models.popitem(last=False)

    def familiar(self, num_classes: int) -> torch.Tensor:
        """(C,) bool mask of familiar classes."""
        if self.class_counts is None:
            return torch.ones(num_classes, dtype=torch.bool)
        counts = torch.as_tensor(self.class_counts).reshape(-1)
        if counts.numel() != num_classes:
            raise ValueError(f"class_counts has {counts.numel()} entries, the output layer {num_classes}")
        familiar = counts >= self.min_familiar
        return familiar if bool(familiar.any()) else counts > 0


class Bristle(Aggregator):
    """Bristle's integrator as a merge rule, plus :meth:`select_peers` (its prioritizer) for the node.

    Needs ``context.class_f1`` (per-class F1 of a flat vector on the node's validation split) and
    ``context.layers`` (to find the output layer); ``context.state`` is a :class:`BristleState`.
    """

    name = "bristle"
    form: ClassVar[str] = ("bristle[:ALPHA[,RHO]] with 0 <= ALPHA <= 1 (the prioritizer's exploration, "
                           "default 0.4) and 0 <= RHO <= 1 (a peer is judged on the familiar classes "
                           "where its F1 is at least RHO x ours, default 0.7; 0: all of them)")

    def __init__(self, alpha: float = DEFAULT_ALPHA, rho: float = DEFAULT_RHO) -> None:
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"bad ALPHA={alpha}: expected {self.form}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"bad RHO={rho}: expected {self.form}")
        self.alpha = alpha
        self.rho = rho

    @classmethod
    def from_args(cls, args: str) -> Bristle:
        """``""`` (α = 0.4, ρ = 0.7), ``"ALPHA"`` or ``"ALPHA,RHO"``; ``ValueError`` naming the form
        otherwise."""
        if not args:
            return cls()
        fields = split_args(args, cls.form, least=1, most=2)
        try:
            values = [float(text) for text in fields]
        except ValueError:
            raise ValueError(f"bad arguments {args!r}: expected {cls.form}") from None
        return cls(*values)

    def new_state(self) -> BristleState:
        return BristleState()

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        stack_inputs(own, received)  # shape and finiteness checks
        if context is None or context.class_f1 is None:
            raise ValueError("bristle needs MergeContext.class_f1: build the trainer with a validation split")
        head = output_head(context.layers, own.numel())
        state = context.state if isinstance(context.state, BristleState) else None
        if not received:
            return own.clone()
        peers = list(received)
        f_own = context.class_f1(own)
        f_peers = torch.stack([context.class_f1(received[p]) for p in peers])  # (m, C)
        familiar = (state or BristleState()).familiar(head.num_classes)
        peer_cols = torch.stack([head.columns(received[p]) for p in peers])  # (m, C, P)
        cols, weights = _integrate(head.columns(own), peer_cols, f_own, f_peers, familiar, self.rho)
        merged = own.clone()
        head.write(merged, cols)
        if state is not None:
            state.last_weights = {p: weights[j].float() for j, p in enumerate(peers)}
            state.remember(received)
        logger.debug("bristle merged %d peers; own F1 %s", len(peers), f_own.tolist())
        return merged

    def select_peers(self, own: torch.Tensor, candidates: Sequence[str], state: BristleState, k: int,
                     rng: random.Random | None = None) -> list[str]:
        """Choose up to ``k`` of ``candidates`` (the node's fanout; the paper uses K = 10) this round.

        ``own`` and the remembered peer vectors are whole flat vectors; for a transfer task they are
        exactly the output layer ``W`` and its bias, so the distance is the paper's ``‖W_p − W_i‖``.

        Peers whose model we have never received are the exploration: up to the far-third count
        (at least one) of them are taken first, at random; the rest of the budget goes to
        :func:`bristle_select` over the peers in ``state.peer_models``; unknown peers fill any
        budget left after that.
        """
        rng = rng or random.Random()
        known = {p: state.peer_models[p] for p in candidates if p in state.peer_models}
        unknown = [p for p in candidates if p not in known]
        explore = rng.sample(unknown, min(len(unknown), max(1, third_counts(k, self.alpha)[2]), k))
        chosen = explore + bristle_select(own, known, k - len(explore), self.alpha, rng)
        rest = [p for p in unknown if p not in explore]
        return chosen + rng.sample(rest, min(len(rest), k - len(chosen)))
