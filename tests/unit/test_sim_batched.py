"""Batched training: each row of a ModelStack behaves as a LocalTrainer on the same shard and seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from p2pnode.sim.batched import ModelStack, RowTrainer, initial_rows, stackable
from p2pnode.sim.data import all_parts, effective_specs, load_shards
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.tasks.partition import partition_indices
from p2pnode.trainer import LocalTrainer


def _setup(n: int, *, batch_size: int = 32, val_fraction: float = 0.0, polyak: bool = False,
           lr_tau: float = 0.0, max_grad_norm: float = 0.0) -> tuple[ModelStack, list[LocalTrainer], list]:
    task = make_task("digits")
    datas, _ = load_shards("digits", None, [ShardSpec(i, n, "iid", 0) for i in range(n)])
    stack = ModelStack(task.build_model(0), initial_rows(task.build_model, [0] * n), test_x=datas[0].test_x,
                       test_y=datas[0].test_y, num_classes=10, lr=0.05, momentum=0.9, polyak=polyak,
                       lr_tau=lr_tau, max_grad_norm=max_grad_norm)
    locals_ = []
    for i, d in enumerate(datas):
        stack.set_data(i, d.train_x, d.train_y, batch_size=batch_size, seed=100 + i,
                       val_fraction=val_fraction)
        locals_.append(LocalTrainer(task.build_model(0), d, lr=0.05, momentum=0.9, batch_size=batch_size,
                                    device=torch.device("cpu"), seed=100 + i, val_fraction=val_fraction,
                                    polyak=polyak, lr_tau=lr_tau, max_grad_norm=max_grad_norm))
    return stack, locals_, datas


@pytest.mark.parametrize(("polyak", "lr_tau", "batch_size", "max_grad_norm"),
                         [(False, 0.0, 32, 0.0), (True, 50.0, 16, 0.0), (False, 0.0, 7, 0.0),
                          (False, 0.0, 32, 0.3)])  # digits' gradients are ~1: a 0.3 clip binds on most steps
def test_rows_train_like_local_trainers(polyak: bool, lr_tau: float, batch_size: int,
                                        max_grad_norm: float) -> None:
    stack, locals_, _ = _setup(3, batch_size=batch_size, polyak=polyak, lr_tau=lr_tau,
                               max_grad_norm=max_grad_norm)
    rows = [RowTrainer(stack, i) for i in range(3)]
    for _ in range(3):  # 3 rounds of 15 steps: crosses permutation boundaries, momentum carried over
        losses = stack.train([0, 1, 2], 15)
        for i in range(3):
            expected = locals_[i].train_steps(15)
            assert rows[i].train_steps(15) == pytest.approx(expected, rel=1e-4)
            assert losses[i] == pytest.approx(expected, rel=1e-4)
    for i in range(3):
        assert torch.allclose(rows[i].get_flat(), locals_[i].get_flat(), atol=1e-5)
        assert rows[i].steps_done == 45
        acc, loss = rows[i].evaluate(300)
        ref_acc, ref_loss = locals_[i].evaluate(300)
        assert acc == pytest.approx(ref_acc)
        assert loss == pytest.approx(ref_loss, rel=1e-4)


def test_pending_rows_show_the_model_from_before_their_steps() -> None:
    stack, _, _ = _setup(2)
    row = RowTrainer(stack, 0)
    before = row.get_flat()
    stack.train([0, 1], 5, keep_before=lambda i: i == 0)
    assert torch.equal(row.get_flat(), before)  # pending: its node has not "trained" yet
    loss = row.train_steps(5)
    assert loss > 0
    assert not torch.equal(row.get_flat(), before)
    assert stack.take_pending(0) is None


def test_unasked_row_trains_alone() -> None:
    stack, locals_, _ = _setup(2)
    row = RowTrainer(stack, 1)
    assert row.train_steps(10) == pytest.approx(locals_[1].train_steps(10), rel=1e-4)
    assert stack.steps_done == [0, 10]


def test_flat_vector_ops_and_momentum_reset() -> None:
    stack, locals_, _ = _setup(2)
    row = RowTrainer(stack, 0)
    flat = locals_[1].get_flat()
    row.set_flat_(flat)
    assert torch.equal(row.get_flat(), flat)
    row.add_flat_(torch.ones_like(flat))
    assert torch.allclose(row.get_flat(), flat + 1)
    assert torch.equal(RowTrainer(stack, 1).get_flat(), locals_[0].get_flat())  # the other row untouched
    row.train_steps(3)
    assert bool(stack.has_momentum[0])
    row.reset_momentum()
    assert not bool(stack.has_momentum[0])
    with pytest.raises(ValueError, match="model needs"):
        row.set_flat_(torch.zeros(3))
    assert row.num_params == flat.numel()
    assert row.model is stack.template


def test_class_f1_and_validation_split_like_local_trainer() -> None:
    stack, locals_, _ = _setup(2, val_fraction=0.1)
    row = RowTrainer(stack, 0)
    assert torch.equal(row.val_class_counts, locals_[0].val_class_counts)
    assert len(row.train_y) == len(locals_[0].train_y)
    flat = locals_[1].get_flat()
    assert torch.allclose(row.class_f1(flat), locals_[0].class_f1(flat))


def test_poisoning_through_the_setters_reaches_training() -> None:
    stack, locals_, _ = _setup(2)
    row = RowTrainer(stack, 0)
    flipped = 9 - row.train_y
    row.train_x, row.train_y = row.train_x.clone(), flipped
    locals_[0].train_y = 9 - locals_[0].train_y
    assert row.train_steps(10) == pytest.approx(locals_[0].train_steps(10), rel=1e-4)
    with pytest.raises(ValueError, match="shapes"):
        row.train_y = flipped[:3]


def test_stackable() -> None:
    assert stackable(make_task("digits").build_model(0))
    assert stackable(make_task("fashion-mnist").build_model(0))
    assert not stackable(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def test_shards_equal_the_tasks_own() -> None:
    task = make_task("digits")
    specs = [ShardSpec(i, 7, "dirichlet:0.5", 3) for i in range(7)]
    datas, n_train = load_shards("digits", None, specs)
    assert n_train == 1437
    for spec, data in zip(specs, datas):
        ref = task.load(spec)
        assert torch.equal(ref.train_x, data.train_x)
        assert torch.equal(ref.train_y, data.train_y)
    assert datas[0].test_x is datas[1].test_x  # one test split shared
    labels = datas[0].train_y.new_zeros(100).numpy()
    parts = all_parts(labels, 9, "iid", 5)
    assert all((p == partition_indices(labels, ShardSpec(i, 9, "iid", 5))).all() for i, p in enumerate(parts))


def test_more_nodes_than_samples_share_shards() -> None:
    specs = effective_specs([ShardSpec(i, 3000, "iid", 0) for i in (0, 1436, 1437, 2999)], 1437)
    assert [(s.index, s.count) for s in specs] == [(0, 1437), (1436, 1437), (0, 1437), (125, 1437)]
