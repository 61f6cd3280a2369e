"""Bristle: prioritizer thirds, hand-computed integrator cases, the nn.Linear layout, the trainer's
validation split and per-class F1, and a small in-memory swarm with a label-flipping node."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from defenses.base import Aggregator, Layer, MergeContext
from defenses.bristle import (
    Bristle,
    BristleState,
    bristle_certainty,
    bristle_integrate,
    bristle_scores,
    bristle_select,
    bristle_weights,
    judged_classes,
    output_head,
    third_counts,
)
from defenses.mean import Mean
from p2pnode.config import NodeConfig, TaskConfig
from p2pnode.identity import Identity
from p2pnode.node import Node, model_layers
from p2pnode.tasks import ShardSpec, TaskData
from p2pnode.tasks.digits import DigitsTask
from p2pnode.trainer import LocalTrainer, per_class_f1, stratified_split
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.records import MembershipRecord

CPU = torch.device("cpu")


def _gate(score: float) -> float:
    """max(0, 10 σ(s/100) − 4), written out independently of the module."""
    return max(0.0, 10.0 / (1.0 + math.exp(-score / 100.0)) - 4.0)


# ---------------------------------------------------------------- prioritizer


def test_third_counts_for_the_paper_setting() -> None:
    # The paper's separate rounding gives round(3.6), round(4.8), round(1.6) = 4, 5, 2 = 11 > K.
    assert (round(0.6**2 * 10), round(2 * 0.4 * 0.6 * 10), round(0.4**2 * 10)) == (4, 5, 2)
    # Largest-remainder apportionment keeps near/middle and caps the total at K.
    assert third_counts(10, 0.4) == (4, 5, 1)
    assert third_counts(10, 0.0) == (10, 0, 0)
    assert third_counts(10, 1.0) == (0, 0, 10)
    assert third_counts(0, 0.4) == (0, 0, 0)


@given(k=st.integers(0, 200), alpha=st.floats(0.0, 1.0))
def test_third_counts_sum_to_k_and_stay_within_one_of_the_quotas(k: int, alpha: float) -> None:
    counts = third_counts(k, alpha)
    quotas = ((1 - alpha) ** 2 * k, 2 * alpha * (1 - alpha) * k, alpha**2 * k)
    assert sum(counts) == k
    assert all(c >= 0 and abs(c - q) < 1 + 1e-6 for c, q in zip(counts, quotas))


@pytest.mark.parametrize(("k", "alpha"), [(-1, 0.4), (10, -0.1), (10, 1.5)])
def test_third_counts_rejects_bad_parameters(k: int, alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        third_counts(k, alpha)


def _line_of_peers(n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Own W at 0, peer j at distance j + 1 (ids sort like their distance)."""
    own = torch.zeros(4)
    return own, {f"p{j:02d}": torch.tensor([float(j + 1), 0.0, 0.0, 0.0]) for j in range(n)}


@pytest.mark.parametrize("seed", range(5))
def test_bristle_select_draws_4_5_1_from_near_middle_far(seed: int) -> None:
    # Prepare: 30 peers, thirds p00-p09 (near), p10-p19 (middle), p20-p29 (far)
    own, peers = _line_of_peers(30)
    # Execute
    chosen = bristle_select(own, peers, k=10, alpha=0.4, rng=random.Random(seed))
    # Assert
    third = [int(p[1:]) // 10 for p in chosen]
    assert len(set(chosen)) == 10
    assert (third.count(0), third.count(1), third.count(2)) == (4, 5, 1)


def test_bristle_select_with_at_most_k_peers_returns_all_nearest_first() -> None:
    own, peers = _line_of_peers(7)
    shuffled = dict(sorted(peers.items(), key=lambda kv: -float(kv[1][0])))
    assert bristle_select(own, shuffled, k=10) == [f"p{j:02d}" for j in range(7)]
    assert bristle_select(own, {}, k=10) == []


def test_bristle_select_fills_the_shortfall_of_a_small_third() -> None:
    # Prepare: 11 peers -> thirds of 4, 4, 3; the middle third cannot give 5
    own, peers = _line_of_peers(11)
    # Execute
    chosen = bristle_select(own, peers, k=10, rng=random.Random(1))
    # Assert
    assert len(set(chosen)) == 10
    assert set(chosen) <= set(peers)
    assert {"p04", "p05", "p06", "p07"} <= set(chosen), "all of the middle third"


def test_bristle_select_rejects_mismatched_or_non_finite_layers() -> None:
    own, peers = _line_of_peers(12)
    with pytest.raises(ValueError, match="elements"):
        bristle_select(own, {**peers, "bad": torch.zeros(3)})
    with pytest.raises(ValueError, match="finite"):
        bristle_select(own, {**peers, "bad": torch.full((4,), float("nan"))})


def test_select_peers_explores_unknown_peers_and_ranks_known_ones() -> None:
    # Prepare: 20 known peers on a line, 5 never seen
    own, known = _line_of_peers(20)
    state = BristleState()
    state.remember(known)
    candidates = [*known, "new0", "new1", "new2", "new3", "new4"]
    # Execute
    chosen = Bristle().select_peers(own, candidates, state, k=10, rng=random.Random(0))
    few = Bristle().select_peers(own, ["new0", "p00"], state, k=10, rng=random.Random(0))
    # Assert
    assert len(chosen) == len(set(chosen)) == 10
    assert sum(p.startswith("new") for p in chosen) == 1, "far-third budget (1) goes to exploration"
    assert sorted(few) == ["new0", "p00"]


# ---------------------------------------------------------------- integrator, hand-computed


def test_peer_better_on_a_class_gets_positive_weight_for_it() -> None:
    # Prepare: own F1 (0.5, 0.5); the peer is better on class 0 and equal on class 1
    f_own = torch.tensor([0.5, 0.5])
    f_peer = torch.tensor([[0.9, 0.5]])
    familiar = torch.tensor([True, True])
    # by hand: δ0 = 4, s0 = 4^3.5 = 128; δ1 = 0, s1 = -0; cert = mean 0.7 - std 0.2 = 0.5
    cert = 0.5
    w0, w1 = _gate(4**3.5) * cert, _gate(0.0) * cert  # 3.8244 * 0.5, 1 * 0.5
    own_cols = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # (C=2, P=2)
    peer_cols = torch.tensor([[[1.0, 3.0], [4.0, 0.0]]])  # (m=1, C, P)
    # Execute
    scores = bristle_scores(f_own, f_peer)
    weights = bristle_weights(f_own, f_peer, familiar)
    merged = bristle_integrate(own_cols, peer_cols, f_own, f_peer, familiar)
    # Assert
    assert scores[0, 0].item() == pytest.approx(128.0)
    assert scores[0, 1].item() == 0.0
    assert bristle_certainty(f_peer, familiar).item() == pytest.approx(cert)
    torch.testing.assert_close(weights, torch.tensor([[w0, w1]], dtype=torch.float64))
    assert w0 == pytest.approx(1.9122, abs=1e-4)
    expected = torch.tensor([[w0 * 1.0 / (1 + w0), w0 * 3.0 / (1 + w0)],
                             [(2.0 + w1 * 4.0) / (1 + w1), 2.0 / (1 + w1)]])
    torch.testing.assert_close(merged, expected)


def test_label_flipping_peer_whose_f1_collapses_gets_no_weight() -> None:
    # Prepare: own F1 0.8 everywhere; a label-flipping peer's F1 collapsed to ~0.02
    f_own = torch.full((4,), 0.8)
    f_peer = torch.full((1, 4), 0.02)
    own_cols, peer_cols = torch.randn(4, 3), 100 * torch.randn(1, 4, 3)
    familiar = torch.tensor([True, True, False, False])
    # Execute
    scores = bristle_scores(f_own, f_peer)
    merged = bristle_integrate(own_cols, peer_cols, f_own, f_peer, familiar)
    # Assert: s = -(7.8^4.8) far below the -100 floor; 10σ(-1) - 4 < 0 -> weight 0
    assert scores[0, 0].item() == pytest.approx(-(7.8**4.8))
    assert _gate(-100.0) == 0.0
    assert torch.count_nonzero(bristle_weights(f_own, f_peer, familiar)) == 0
    torch.testing.assert_close(merged, own_cols)


def test_with_rho_0_a_peer_worse_on_one_class_is_excluded_there_and_from_foreign_classes() -> None:
    # Prepare: 3 classes, class 2 foreign; the peer equals us on class 0 and is much worse on class 1
    f_own = torch.tensor([0.9, 0.9, 0.0])
    f_peer = torch.tensor([[0.9, 0.3, 0.0]])
    familiar = torch.tensor([True, True, False])
    # Execute: rho = 0 judges the peer on every familiar class (DESIGN §4.3 read literally)
    w = bristle_weights(f_own, f_peer, familiar, rho=0.0)
    # Assert: cert = 0.6 - 0.3 = 0.3; class 0: s = 0 -> 1 * 0.3; class 1: s = -(6^4.9) -> 0
    assert w[0, 0].item() == pytest.approx(0.3)
    assert w[0, 1].item() == 0.0
    assert w[0, 2].item() == 0.0, "the unfloored sum -(6^4.9) shuts the peer out of foreign classes"


def test_a_peer_is_judged_only_on_the_familiar_classes_it_knows() -> None:
    # Prepare: the same peer; at rho = 0.7 class 1 (0.3 < 0.7 x 0.9) is a class it does not know
    f_own = torch.tensor([0.9, 0.9, 0.0])
    f_peer = torch.tensor([[0.9, 0.3, 0.0]])
    familiar = torch.tensor([True, True, False])
    # Execute
    judged = judged_classes(f_own, f_peer, familiar, rho=0.7)
    w = bristle_weights(f_own, f_peer, familiar, rho=0.7)
    # Assert: judged on class 0 alone: cert = 0.9 - 0; class 0: gate(0) * 0.9; class 1: not judged -> 0;
    # foreign class 2: gate(sum of judged scores = 0) * 0.9
    assert judged.tolist() == [[True, False, False]]
    assert w[0].tolist() == pytest.approx([0.9, 0.0, 0.9])


def test_a_peer_it_knows_but_worse_on_is_still_penalised() -> None:
    # Prepare: the peer's 0.7 on class 1 is above 0.7 x 0.9 = 0.63, so it is judged there, and worse
    f_own = torch.tensor([0.9, 0.9, 0.0])
    f_peer = torch.tensor([[0.9, 0.7, 0.0]])
    familiar = torch.tensor([True, True, False])
    # Execute
    w = bristle_weights(f_own, f_peer, familiar)  # default rho 0.7
    # Assert: cert = 0.8 - 0.1 = 0.7; class 1: s = -(2^4.9) = -29.86 -> gate 0.2589; foreign: same sum
    s1 = -(2.0**4.9)
    assert w[0, 0].item() == pytest.approx(0.7)
    assert w[0, 1].item() == pytest.approx(_gate(s1) * 0.7)
    assert w[0, 2].item() == pytest.approx(_gate(s1) * 0.7)
    assert 0.0 < w[0, 1].item() < w[0, 0].item()


def test_certainty_takes_a_per_peer_mask_and_is_zero_for_a_peer_judged_on_nothing() -> None:
    f_peer = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.2, 0.2]])
    judged = torch.tensor([[True, True, False], [False, False, False]])
    cert = bristle_certainty(f_peer, judged)
    assert cert.tolist() == pytest.approx([0.7 - 0.2, 0.0])


def test_foreign_classes_use_the_per_peer_weight_from_summed_scores() -> None:
    # Prepare: classes 0, 1 familiar, class 2 foreign; the peer is better on 0, equal on 1
    f_own = torch.tensor([0.5, 0.5, 0.0])
    f_peer = torch.tensor([[0.9, 0.5, 0.0]])
    familiar = torch.tensor([True, True, False])
    own_cols, peer_cols = torch.zeros(3, 1), torch.ones(1, 3, 1)
    # Execute
    merged = bristle_integrate(own_cols, peer_cols, f_own, f_peer, familiar)
    # Assert: foreign weight = gate(128 + 0) * cert 0.5
    w_foreign = _gate(128.0) * 0.5
    assert merged[2, 0].item() == pytest.approx(w_foreign / (1 + w_foreign))


def test_certainty_uses_familiar_classes_only() -> None:
    f_peer = torch.tensor([[0.9, 0.9, 0.0, 0.0]])
    assert bristle_certainty(f_peer, torch.tensor([True, True, False, False])).item() == pytest.approx(0.9)
    assert bristle_certainty(f_peer, torch.tensor([True, True, True, True])).item() == 0.0
    assert bristle_certainty(f_peer, torch.zeros(4, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("bad", [torch.tensor([0.5, 1.5]), torch.tensor([float("nan"), 0.5])])
def test_integrator_rejects_f1_outside_unit_interval(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bristle_integrate(torch.zeros(2, 1), torch.zeros(1, 2, 1), bad, torch.zeros(1, 2),
                          torch.ones(2, dtype=torch.bool))


# ---------------------------------------------------------------- the aggregator on nn.Linear


def _linear_layout(n_features: int, n_classes: int) -> list[Layer]:
    return model_layers(nn.Linear(n_features, n_classes))


def _table_f1(table: Mapping[float, list[float]]) -> object:
    """A class_f1 stub: looks up F1 by the first entry of the flat vector."""
    return lambda flat: torch.tensor(table[round(float(flat[0]), 3)])


def test_bristle_merges_weight_rows_with_their_bias_per_class() -> None:
    # Prepare: Linear(2 features, 2 classes): flat = [W00, W01, W10, W11, b0, b1]
    layers = _linear_layout(2, 2)
    own = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    peer = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    f1 = _table_f1({0.0: [0.5, 0.5], 1.0: [0.9, 0.5]})  # peer better on class 0, equal on class 1
    state = BristleState(class_counts=torch.tensor([3, 4]))
    context = MergeContext(layers=layers, class_f1=f1, state=state)  # type: ignore[arg-type]
    # Execute
    merged = Bristle().aggregate(own, {"p": peer}, context)
    # Assert: class 0 (W row 0 and b0) weight w0, class 1 (row 1 and b1) weight w1
    w0, w1 = _gate(128.0) * 0.5, 0.5
    a0, a1 = w0 / (1 + w0), w1 / (1 + w1)
    torch.testing.assert_close(merged, torch.tensor([a0, a0, a1, a1, a0, a1]))
    assert torch.equal(state.peer_models["p"], peer)
    torch.testing.assert_close(state.last_weights["p"], torch.tensor([w0, w1], dtype=torch.float32))


def test_bristle_needs_class_f1_and_an_output_layer_only_layout() -> None:
    own = torch.zeros(6)
    linear = _linear_layout(2, 2)
    mlp = model_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    f1 = _table_f1({0.0: [0.5, 0.5]})
    with pytest.raises(ValueError, match="class_f1"):
        Bristle().aggregate(own, {"p": own}, MergeContext(layers=linear))
    with pytest.raises(ValueError, match="class_f1"):
        Bristle().aggregate(own, {"p": own})
    with pytest.raises(ValueError, match="only the output layer"):
        output_head(mlp, 9)
    with pytest.raises(ValueError, match="layers"):
        Bristle().aggregate(own, {"p": own}, MergeContext(class_f1=f1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Bristle().aggregate(own, {"p": torch.full((6,), float("inf"))},
                            MergeContext(layers=linear, class_f1=f1))  # type: ignore[arg-type]


def test_bristle_without_peers_returns_a_copy_and_leaves_inputs_alone() -> None:
    layers = _linear_layout(2, 2)
    own, peer = torch.randn(6), torch.randn(6)
    own_copy, peer_copy = own.clone(), peer.clone()
    context = MergeContext(layers=layers, class_f1=lambda flat: torch.full((2,), 0.5))
    alone = Bristle().aggregate(own, {}, context)
    Bristle().aggregate(own, {"p": peer}, context)
    assert torch.equal(alone, own)
    assert alone is not own
    assert torch.equal(own, own_copy)
    assert torch.equal(peer, peer_copy)


@pytest.mark.parametrize(("args", "alpha", "rho"),
                         [("", 0.4, 0.7), ("0.25", 0.25, 0.7), ("0", 0.0, 0.7), ("0.4,0", 0.4, 0.0),
                          ("0.3,1", 0.3, 1.0)])
def test_bristle_from_args(args: str, alpha: float, rho: float) -> None:
    rule = Bristle.from_args(args)
    assert (rule.alpha, rule.rho) == (alpha, rho)


@pytest.mark.parametrize("args", ["x", "1.5", "-0.1", "nan", "0.4,1.5", "0.4,", "0.4,nan", "0.4,0.7,1"])
def test_bristle_from_args_rejects_bad_specs(args: str) -> None:
    with pytest.raises(ValueError, match="bristle"):
        Bristle.from_args(args)


def test_bristle_state_remembers_a_bounded_number_of_peers() -> None:
    state = BristleState(capacity=2)
    state.remember({"a": torch.zeros(1), "b": torch.zeros(1)})
    state.remember({"c": torch.zeros(1), "a": torch.ones(1)})
    assert list(state.peer_models) == ["c", "a"]
    assert state.familiar(3).all()
    enough = BristleState(class_counts=torch.tensor([12, 10, 9, 0]))  # min_familiar = 10
    assert enough.familiar(4).tolist() == [True, True, False, False]
    too_few = BristleState(class_counts=torch.tensor([3, 1, 0]))  # none reaches 10: any sample counts
    assert too_few.familiar(3).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="class_counts"):
        BristleState(class_counts=torch.ones(2)).familiar(3)


# ---------------------------------------------------------------- trainer: validation split, per-class F1


def test_stratified_split_takes_a_share_of_every_class_and_keeps_one_for_training() -> None:
    # Prepare: class 0 x 20, class 1 x 5, class 2 x 2, class 3 x 1
    labels = torch.tensor([0] * 20 + [1] * 5 + [2] * 2 + [3])
    # Execute
    train, val = stratified_split(labels, 0.2, seed=3)
    again = stratified_split(labels, 0.2, seed=3)
    # Assert
    assert torch.bincount(labels[val], minlength=4).tolist() == [4, 1, 1, 0]
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.equal(again[1], val)
    assert len(stratified_split(labels, 0.0, seed=3)[1]) == 0


def test_per_class_f1_matches_a_hand_count() -> None:
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: absent, unpredicted -> 0
    preds = torch.tensor([0, 0, 0, 1])
    target = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(per_class_f1(preds, target, 3), torch.tensor([0.8, 2 / 3, 0.0]))


def _tiny_linear_data() -> TaskData:
    """Two well-separated classes in 2-D plus an absent third class."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=g) + 4, torch.randn(40, 2, generator=g) - 4])
    y = torch.tensor([0] * 40 + [1] * 40)
    return TaskData(train_x=x, train_y=y, test_x=x[:10], test_y=y[:10], num_classes=3)


def test_trainer_val_split_and_class_f1_on_a_tiny_model() -> None:
    # Prepare
    data = _tiny_linear_data()
    trainer = LocalTrainer(nn.Linear(2, 3), data, lr=0.1, momentum=0.0, batch_size=8, device=CPU, seed=0,
                           val_fraction=0.25)
    perfect = nn.Linear(2, 3)
    with torch.no_grad():
        perfect.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]]))
        perfect.bias.zero_()
    flat = torch.cat([perfect.weight.reshape(-1), perfect.bias]).detach()
    live_before = trainer.get_flat()
    # Execute
    f1 = trainer.class_f1(flat)
    # Assert
    assert len(trainer.val_y) == 20
    assert len(trainer.train_y) == 60
    assert trainer.val_class_counts.tolist() == [10, 10, 0]
    assert trainer.class_counts.tolist() == [40, 40, 0]
    torch.testing.assert_close(f1, torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(trainer.get_flat(), live_before), "class_f1 must not touch the live model"
    with pytest.raises(ValueError, match="flat vector"):
        trainer.class_f1(torch.zeros(3))


def test_trainer_without_val_fraction_has_no_split() -> None:
    data = _tiny_linear_data()
    trainer = LocalTrainer(nn.Linear(2, 3), data, lr=0.1, momentum=0.0, batch_size=8, device=CPU, seed=0)
    assert len(trainer.train_y) == 80
    with pytest.raises(ValueError, match="val_fraction"):
        trainer.class_f1(trainer.get_flat())


# ---------------------------------------------------------------- a small swarm with a label flipper


class StaticView:
    """Every other node is in view; sample(k) returns the first k (see tests/unit/test_node.py)."""

    def __init__(self) -> None:
        self.peers: list[MembershipRecord] = []
        self.rejected = 0

    def live(self) -> list[MembershipRecord]:
        return list(self.peers)

    def sample(self, k: int) -> list[MembershipRecord]:
        return self.live()[:k]

    def mark_unreachable(self, peer_id: str) -> None:
        pass

    def mark_alive(self, peer_id: str) -> None:
        pass

    async def refresh(self) -> list[MembershipRecord]:
        return self.live()

    async def run(self, state: object, ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()


class KeepOwn(Aggregator):
    """The attacker never merges, so its poison does not wash out."""

    name = "keep-own"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        return own.clone()


def _digits_linear(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(64, 10)


def _swarm_node(network: MemoryNetwork, data: TaskData, aggregator: Aggregator, seed: int) -> Node:
    config = NodeConfig(device="cpu", task=TaskConfig(name="digits", local_steps=5))
    config.network.swarm = "t"
    config.gossip.fanout = 3
    trainer = LocalTrainer(_digits_linear(0), data, lr=0.1, momentum=0.9, batch_size=16, device=CPU,
                           seed=seed, val_fraction=0.2)
    identity = Identity.generate()
    transport = MemoryTransport(network, identity.peer_id)
    node = Node(config, identity, trainer, transport, StaticView(), aggregator)
    if isinstance(aggregator, Bristle):  # the wiring node.py needs for Bristle
        node.class_f1 = trainer.class_f1
        node.merge_state.class_counts = trainer.val_class_counts
    return node


def _run_swarm(aggregator: type[Aggregator], rounds: int = 12) -> tuple[list[float], list[Node]]:
    task = DigitsTask()
    shards = [task.load(ShardSpec(index=i, count=4, partition="dirichlet:1.0", seed=4)) for i in range(4)]
    flipped = shards[3]
    flipped.train_y = flipped.num_classes - 1 - flipped.train_y  # label flip l -> C-1-l, all classes

    async def scenario() -> tuple[list[float], list[Node]]:
        network = MemoryNetwork()
        nodes = [_swarm_node(network, shards[i], aggregator(), seed=i) for i in range(3)]
        nodes.append(_swarm_node(network, flipped, KeepOwn(), seed=3))
        for node in nodes:
            node.membership.peers = [_record(o.identity.peer_id) for o in nodes if o is not node]  # type: ignore[attr-defined]
            await node.transport.start(node.serve)
        for _ in range(rounds):
            for node in nodes:
                await node.run_round()
        return [n.trainer.evaluate()[0] for n in nodes[:3]], nodes

    return asyncio.run(scenario())


def _record(peer_id: str) -> MembershipRecord:
    return MembershipRecord(peer_id=peer_id, swarm="t", maddrs=(), round=0, mode="gossip", codec="dense",
                            model_fingerprint=b"", timestamp=time.time())


def test_swarm_with_a_label_flipper_stays_accurate_under_bristle() -> None:
    # Execute
    bristle_acc, nodes = _run_swarm(Bristle)
    mean_acc, _ = _run_swarm(Mean)
    # Assert
    attacker = nodes[3].identity.peer_id
    for node in nodes[:3]:
        weights = node.merge_state.last_weights
        assert float(weights[attacker].max()) < 0.05, "the label flipper gets ~0 weight"
        honest = [w for p, w in weights.items() if p != attacker]
        assert honest
        assert all(float(w.max()) > 0.1 for w in honest)
    assert min(bristle_acc) >= 0.85
    assert min(bristle_acc) > min(mean_acc) + 0.1, (bristle_acc, mean_acc)
