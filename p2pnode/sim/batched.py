"""Many nodes' models as the rows of one tensor, trained and evaluated in batches (``torch.func.vmap``).

:class:`ModelStack` holds the flat models of n nodes as one ``(n, d)`` tensor (the flat layout of
:func:`p2pnode.trainer.flatten_state`) with their momentum buffers and each node's shard. One
:meth:`ModelStack.train` runs H SGD steps for many rows at once: every step draws each row's
mini-batch exactly as :class:`~p2pnode.trainer.LocalTrainer` does (its own seeded permutation and
cursor), gathers them into one ``(rows, batch, ...)`` tensor (shorter batches padded with weight 0), and
takes one vmapped ``grad`` of the per-row mean cross-entropy through ``torch.func.functional_call``.
The update is ``torch.optim.SGD``'s (heavy-ball or Polyak momentum, MoNNA's ``lr / (1 + t/τ)``).

:class:`RowTrainer` is one row seen through the :class:`LocalTrainer` interface that
:class:`~p2pnode.node.Node`, the attacks, the defenses and the codecs use (``get_flat``, ``add_flat_``,
``train_steps``, ``class_f1``, ...). The simulator trains every live row in one batch *before* the
round's ``Node.run_round`` calls; each row is then *pending*: until its node calls ``train_steps`` (which
returns the batch's loss for that row), ``get_flat`` returns the model from before the steps, so the
node sees exactly the sequence "model, H steps, model" that a real ``LocalTrainer`` gives it.

Only models whose whole float state is parameters (no buffers such as BatchNorm statistics) can be
stacked (:func:`stackable`); the simulator uses real ``LocalTrainer`` objects for the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from p2pnode.errors import ConfigError, TaskError
from p2pnode.trainer import flatten_state, model_spec, per_class_f1, stratified_split

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 2**24  # activation elements one vmapped call may hold (about 64 MiB of float32)


def stackable(model: nn.Module) -> bool:
    """True when the model's flat state is exactly its parameters, in ``named_parameters`` order."""
    if any(True for _ in model.buffers()):
        return False
    names = [n for n, _ in model.named_parameters()]
    return names == [n for n, _ in model_spec(model)]


def activation_elements(model: nn.Module, sample: torch.Tensor) -> int:
    """Output elements of every leaf module for one input sample (a rough size of its activations)."""
    total = [sample.numel()]

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            total.append(out.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(sample.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return max(1, sum(total))


def clip_rows(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each row's gradient to L2 norm ``max_norm`` over all its parameters, as
    ``torch.nn.utils.clip_grad_norm_`` does for one model (scale ``max_norm / (norm + 1e-6)``, at most 1).

    ``grads``: ``{name: (m, *shape)}``; returns new tensors of the same shapes.
    """
    sq = sum(g.detach().pow(2).flatten(1).sum(1) for g in grads.values())  # (m,)
    assert isinstance(sq, torch.Tensor)
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (m,)
    return {name: g * scale.view(-1, *([1] * (g.dim() - 1))) for name, g in grads.items()}


class _Sampler:
    """One row's mini-batch order: LocalTrainer's seeded permutation and cursor, several steps at once."""

    __slots__ = ("batch_size", "cursor", "generator", "n", "perm")

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed % 2**64)
        self.perm = torch.empty(0, dtype=torch.int64)
        self.cursor = 0

    def take(self, steps: int) -> torch.Tensor:
        """``(steps, batch_size)`` local indices: the next ``steps`` batches LocalTrainer would draw."""
        if self.batch_size == self.n:  # every batch is the whole shard (the order does not change the mean)
            return torch.arange(self.n).expand(steps, self.n)
        out, left, bs = [], steps, self.batch_size
        while left:
            if self.cursor + bs > len(self.perm):
                self.perm, self.cursor = torch.randperm(self.n, generator=self.generator), 0
            k = min(left, (len(self.perm) - self.cursor) // bs)
            out.append(self.perm[self.cursor : self.cursor + k * bs].view(k, bs))
            self.cursor += k * bs
            left -= k
        return out[0] if len(out) == 1 else torch.cat(out)


@dataclass(slots=True)
class _Row:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    sampler: _Sampler
    class_counts: torch.Tensor
    val_class_counts: torch.Tensor


class ModelStack:
    """The flat models of ``n`` nodes as one tensor, with batched SGD and evaluation (module docstring).

    Parameters
    ----------
    template
        The task's model; gives the architecture (its own weights are not used). Must be :func:`stackable`.
    init
        Initial flat models, ``(n, d)``, or one ``(d,)`` model every row starts from.
    test_x, test_y
        The shared test split.
    num_classes
        Classes of the task.
    lr, momentum, polyak, lr_tau, max_grad_norm
        The SGD settings of :class:`~p2pnode.trainer.LocalTrainer`.
    device
        Where the stack lives and trains.
    budget
        Activation elements one vmapped call may hold; bigger batches of rows are cut in chunks.
    """

    def __init__(self, template: nn.Module, init: torch.Tensor, *, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, lr: float, momentum: float, polyak: bool = False, lr_tau: float = 0.0,
                 max_grad_norm: float = 0.0, device: torch.device | str = "cpu",
                 budget: int = DEFAULT_BUDGET) -> None:
        if not stackable(template):
            raise ValueError("this model has buffers (e.g. BatchNorm statistics): it cannot be stacked")
        self.device = torch.device(device)
        self.template = template.to(self.device)
        self.spec = []
        offset = 0
        for name, p in template.named_parameters():
            self.spec.append((name, offset, p.numel(), tuple(p.shape)))
            offset += p.numel()
        self.numel = offset
        if init.dim() == 1:
            init = init.unsqueeze(0)
        self.params = init.to(self.device, torch.float32).clone().contiguous()
        self.n = self.params.shape[0]
        if self.params.shape[1] != self.numel:
            raise ValueError(f"init has {self.params.shape[1]} values per row, the model {self.numel}")
        self.momentum_buf = torch.zeros_like(self.params) if momentum else None
        self.has_momentum = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.steps_done = [0] * self.n
        self.lr, self.momentum, self.lr_tau = lr, momentum, lr_tau
        self.max_grad_norm = max_grad_norm
        self.dampening = momentum if polyak else 0.0
        self.test_x, self.test_y = test_x.to(self.device), test_y.to(self.device)
        self.num_classes = num_classes
        self.budget = budget
        self.per_sample = activation_elements(self.template, self.test_x[0])
        self.rows: list[_Row | None] = [None] * self.n
        self.pending: dict[int, float] = {}  # row -> loss of the batch steps its node has not taken yet
        self.before: dict[int, torch.Tensor] = {}  # pending row -> its model before those steps
        self._storage: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, row offsets
        self._grad = vmap(grad_and_value(self._loss))
        self._logits_many = vmap(self._logits, in_dims=(0, None))

    # -- rows ---------------------------------------------------------------------------------------
    def set_data(self, i: int, train_x: torch.Tensor, train_y: torch.Tensor, *, batch_size: int, seed: int,
                 val_fraction: float = 0.0) -> None:
        """Give row ``i`` its shard (split into train/validation as LocalTrainer does) and batch order."""
        if len(train_y) == 0:
            raise TaskError("this node's training shard is empty; use fewer shards or another partition")
        if batch_size < 1:
            raise ConfigError("task.batch_size", batch_size, "integer >= 1")
        class_counts = torch.bincount(train_y, minlength=self.num_classes)
        train_idx, val_idx = stratified_split(train_y, val_fraction, seed)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        if len(val_idx):
            train_x, train_y = train_x[train_idx], train_y[train_idx]
        self.rows[i] = _Row(train_x, train_y, val_x.to(self.device), val_y.to(self.device),
                            _Sampler(len(train_y), batch_size, seed), class_counts,
                            torch.bincount(val_y, minlength=self.num_classes))
        self._storage = None

    def row(self, i: int) -> _Row:
        r = self.rows[i]
        if r is None:
            raise ValueError(f"row {i} has no data (set_data first)")
        return r

    def replace_train_data(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Swap row ``i``'s training samples for others of the same shapes (data poisoning)."""
        r = self.row(i)
        if x.shape != r.train_x.shape or y.shape != r.train_y.shape:
            raise ValueError("replacement training data must keep the shapes")
        r.train_x, r.train_y = x.cpu(), y.cpu()
        self._storage = None

    def _data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._storage is None:
            rows = [self.row(i) for i in range(self.n)]
            sizes = torch.tensor([len(r.train_y) for r in rows], dtype=torch.int64)
            offsets = torch.cumsum(sizes, 0) - sizes
            x = torch.cat([r.train_x for r in rows]).to(self.device)
            y = torch.cat([r.train_y for r in rows]).to(self.device)
            self._storage = (x, y, offsets)
        return self._storage

    # -- functional model ---------------------------------------------------------------------------
    def _unflatten(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: p[o : o + k].view(shape) for name, o, k, shape in self.spec}

    def _logits(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, self._unflatten(p), (x,))

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
              ) -> torch.Tensor:
        logits = functional_call(self.template, params, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum()

    def _chunk_rows(self, samples: int) -> int:
        return max(1, self.budget // max(1, samples * self.per_sample))

    # -- training -----------------------------------------------------------------------------------
    def train(self, rows: Sequence[int], steps: int, *, keep_before: Callable[[int], bool] | None = None
              ) -> dict[int, float]:
        """Run ``steps`` SGD steps on each of ``rows`` (in batches); return each row's mean loss.

        The rows become *pending* (module docstring) with that loss; ``keep_before(i)`` says which rows
        keep their model from before the steps for ``get_flat`` until their node takes the loss.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        rows = list(rows)
        if not rows:
            return {}
        x_all, y_all, offsets = self._data()
        losses: dict[int, float] = {}
        batch = max(self.row(i).sampler.batch_size for i in rows)
        chunk = self._chunk_rows(batch)
        self.template.train()
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            if keep_before is not None:
                for i in part:
                    if keep_before(i):
                        self.before[i] = self.params[i].to("cpu", torch.float32, copy=True)
            losses.update(self._train_chunk(part, steps, x_all, y_all, offsets))
        self.pending.update(losses)
        return losses

    def _train_chunk(self, rows: list[int], steps: int, x_all: torch.Tensor, y_all: torch.Tensor,
                     offsets: torch.Tensor) -> dict[int, float]:
        m = len(rows)
        samplers = [self.row(i).sampler for i in rows]
        sizes = torch.tensor([smp.batch_size for smp in samplers], dtype=torch.int64)
        width = int(sizes.max())
        local = [smp.take(steps) for smp in samplers]
        if any(t.shape[1] != width for t in local):  # pad short batches with sample 0 of the row, weight 0
            local = [F.pad(t, (0, width - t.shape[1])) for t in local]
        index = torch.tensor(rows, dtype=torch.int64)
        idx = (torch.stack(local) + offsets[index].view(m, 1, 1)).to(self.device)  # (m, steps, width)
        weight = ((torch.arange(width).unsqueeze(0) < sizes.unsqueeze(1)) / sizes.unsqueeze(1)).float()
        weight = weight.to(self.device)  # (m, width): 1/batch for real samples, 0 for padding
        index = index.to(self.device)
        p = self.params.index_select(0, index)
        views = self._views(p)
        buf = self.momentum_buf.index_select(0, index) if self.momentum_buf is not None else None
        bufs = self._views(buf) if buf is not None else None
        has = self.has_momentum.index_select(0, index)
        done = torch.tensor([self.steps_done[i] for i in rows], dtype=torch.float32, device=self.device)
        total = torch.zeros(m, device=self.device)
        for s in range(steps):
            b = idx[:, s]
            grads, loss = self._grad(views, x_all[b], y_all[b], weight)
            total += loss.detach()
            if self.max_grad_norm > 0:
                grads = clip_rows(grads, self.max_grad_norm)
            lr: float | torch.Tensor = self.lr
            if self.lr_tau > 0:
                lr = self.lr / (1.0 + (done + s) / self.lr_tau)
            all_have = bufs is not None and bool(has.all())
            for name, g in grads.items():
                if bufs is not None:
                    mb = bufs[name]
                    if all_have:
                        mb.mul_(self.momentum).add_(g, alpha=1.0 - self.dampening)
                    else:
                        shaped = has.view(-1, *([1] * (g.dim() - 1)))
                        mb.copy_(torch.where(shaped, mb * self.momentum + (1.0 - self.dampening) * g, g))
                    g = mb
                if isinstance(lr, torch.Tensor):
                    views[name].sub_(g * lr.view(-1, *([1] * (g.dim() - 1))))
                else:
                    views[name].sub_(g, alpha=lr)
            has = torch.ones_like(has) if bufs is not None else has
        self.params.index_copy_(0, index, p)
        if buf is not None and self.momentum_buf is not None:
            self.momentum_buf.index_copy_(0, index, buf)
        self.has_momentum.index_copy_(0, index, has)
        for i in rows:
            self.steps_done[i] += steps
        return dict(zip(rows, (total / steps).tolist()))

    def _views(self, flat_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter of every row as a view into ``(m, d)`` rows: ``{name: (m, *shape)}``."""
        m = flat_rows.shape[0]
        return {name: flat_rows[:, o : o + k].view(m, *shape) for name, o, k, shape in self.spec}

    def take_pending(self, i: int) -> float | None:
        """The loss of row ``i``'s pending steps (None if there are none); the row is pending no more."""
        self.before.pop(i, None)
        return self.pending.pop(i, None)

    def clear_pending(self) -> None:
        """Forget every pending loss (steps nobody asked for stay taken)."""
        self.pending.clear()
        self.before.clear()

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rows: Sequence[int], max_samples: int | None = None) -> list[tuple[float, float]]:
        """``(accuracy, mean cross-entropy)`` of each row's current model on the first test samples."""
        n = len(self.test_y) if max_samples is None else min(max_samples, len(self.test_y))
        if n < 1:
            raise ValueError("nothing to evaluate: the test split is empty or max_samples < 1")
        rows = list(rows)
        self.template.eval()
        correct = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros(len(rows), device=self.device)
        row_chunk = min(len(rows), max(1, self._chunk_rows(min(n, 256))))
        sample_chunk = max(1, min(n, self.budget // max(1, row_chunk * self.per_sample)))
        for r0 in range(0, len(rows), row_chunk):
            index = torch.tensor(rows[r0 : r0 + row_chunk], dtype=torch.int64, device=self.device)
            p = self.params.index_select(0, index)
            for s0 in range(0, n, sample_chunk):
                s1 = min(n, s0 + sample_chunk)
                x, y = self.test_x[s0:s1], self.test_y[s0:s1]
                logits = self._logits_many(p, x)  # (rows, samples, classes)
                loss = F.cross_entropy(logits.transpose(1, 2), y.expand(len(p), -1), reduction="none")
                loss_sum[r0 : r0 + len(p)] += loss.sum(dim=1)
                correct[r0 : r0 + len(p)] += (logits.argmax(dim=2) == y).sum(dim=1)
        self.template.train()
        return [(c / n, s / n) for c, s in zip(correct.tolist(), loss_sum.tolist())]

    @torch.no_grad()
    def predict(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Class predictions of the model ``flat`` on ``x`` (a batch)."""
        self.template.eval()
        try:
            chunk = max(1, self.budget // self.per_sample)
            return torch.cat([self._logits(flat.to(self.device), x[i : i + chunk]).argmax(dim=1)
                              for i in range(0, len(x), chunk)])
        finally:
            self.template.train()


class RowTrainer:
    """Row ``i`` of a :class:`ModelStack` behind the :class:`~p2pnode.trainer.LocalTrainer` interface.

    ``train_steps`` returns the loss of steps the simulator already took in a batch for this row (the
    row is pending, module docstring), or else trains this row alone. ``model`` is the stack's shared
    template: it gives the architecture (layers, fingerprint), never this row's weights.
    """

    def __init__(self, stack: ModelStack, row: int) -> None:
        self.stack, self.index = stack, row
        r = stack.row(row)
        self.num_classes = stack.num_classes
        self.class_counts = r.class_counts
        self.val_class_counts = r.val_class_counts
        self.val_x, self.val_y = r.val_x, r.val_y
        self.batch_size = r.sampler.batch_size

    # -- what Node, the attacks and the defenses read ----------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.stack.template

    @property
    def device(self) -> torch.device:
        return self.stack.device

    @property
    def num_params(self) -> int:
        return self.stack.numel

    @property
    def steps_done(self) -> int:
        return self.stack.steps_done[self.index]

    @property
    def test_x(self) -> torch.Tensor:
        return self.stack.test_x

    @property
    def test_y(self) -> torch.Tensor:
        return self.stack.test_y

    @property
    def train_x(self) -> torch.Tensor:
        return self.stack.row(self.index).train_x

    @train_x.setter
    def train_x(self, value: torch.Tensor) -> None:
        self.stack.replace_train_data(self.index, value, self.train_y)

    @property
    def train_y(self) -> torch.Tensor:
        return self.stack.row(self.index).train_y

    @train_y.setter
    def train_y(self, value: torch.Tensor) -> None:
        self.stack.replace_train_data(self.index, self.train_x, value)

    # -- training and the flat vector -----------------------------------------------------------------
    def train_steps(self, n: int) -> float:
        """The mean loss of ``n`` SGD steps: the pending batch's, or ``n`` steps of this row alone."""
        loss = self.stack.take_pending(self.index)
        if loss is not None:
            return loss
        self.stack.train([self.index], n)
        loss = self.stack.take_pending(self.index)
        assert loss is not None
        return loss

    def get_flat(self) -> torch.Tensor:
        """A CPU float32 copy of the model (the one from before the pending steps while they are pending)."""
        before = self.stack.before.get(self.index)
        if before is not None:
            return before.clone()
        return self.stack.params[self.index].to("cpu", torch.float32, copy=True)

    def set_flat_(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() != self.stack.numel:
            raise ValueError(f"flat vector has shape {tuple(flat.shape)}, model needs ({self.stack.numel},)")
        self.stack.params[self.index] = flat.to(self.stack.device, torch.float32)

    def add_flat_(self, delta: torch.Tensor) -> None:
        if delta.dim() != 1 or delta.numel() != self.stack.numel:
            raise ValueError(f"flat vector has shape {tuple(delta.shape)}, model needs ({self.stack.numel},)")
        self.stack.params[self.index] += delta.to(self.stack.device, torch.float32)

    def reset_momentum(self) -> None:
        self.stack.has_momentum[self.index] = False
        if self.stack.momentum_buf is not None:
            self.stack.momentum_buf[self.index].zero_()

    # -- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, max_samples: int | None = None) -> tuple[float, float]:
        return self.stack.evaluate([self.index], max_samples)[0]

    def class_f1(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-class F1 of the model ``flat`` on this row's validation split (see LocalTrainer.class_f1)."""
        if len(self.val_y) == 0:
            raise ValueError("no local validation split: build the row with val_fraction > 0")
        preds = self.stack.predict(flat, self.val_x)
        return per_class_f1(preds, self.val_y, self.num_classes).cpu()

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("simulated nodes are not checkpointed")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("simulated nodes are not checkpointed")


def initial_rows(template_factory: Callable[[int], nn.Module], seeds: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), d)`` flat initial models, one per seed (one model built per distinct seed)."""
    cache: dict[int, torch.Tensor] = {}
    for s in seeds:
        if s not in cache:
            cache[s] = flatten_state(template_factory(s))
    return torch.stack([cache[s] for s in seeds])
