"""Local SGD training of one node's model, and the flat-vector view of model state.

Gossip exchanges models as one flat float32 vector: :func:`flatten_state` concatenates every
floating-point entry of ``model.state_dict()`` (parameters and float buffers) in state_dict order,
and :func:`assign_flat_` writes such a vector back. :func:`spec_fingerprint` lets peers check that
they hold the same architecture before merging.

:class:`LocalTrainer` owns the model, its optimizer and the batch sampler. The node runs
:meth:`LocalTrainer.train_steps` in a worker thread while the event loop reads or writes the
vector, so a lock guards the model: it is held for each SGD step, never across all of them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from p2pnode.errors import ConfigError, TaskError
from p2pnode.tasks.base import TaskData

logger = logging.getLogger(__name__)

_EVAL_BATCH = 256  # with channels-last CNNs on one CPU thread, faster than 1,024 (see channels_last_helps)
_DEVICE_ALLOWED = "auto | cpu | cuda | cuda:N"


def limit_threads(n: int | None) -> None:
    """Cap torch's intra-op (and, if still possible, inter-op) CPU threads.

    Parameters
    ----------
    n
        Thread count; ``None`` or ``0`` leaves torch's default.
    """
    if not n:
        return
    if n < 0:
        raise ConfigError("threads", n, "integer >= 0")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        # Only allowed before any inter-op work has started; the intra-op cap matters most.
        logger.debug("torch inter-op thread count already fixed; left at %d", torch.get_num_interop_threads())


def resolve_device(name: str) -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a device that exists here.

    Raises
    ------
    ConfigError
        For an unknown name, or a CUDA device that is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError("device", name, _DEVICE_ALLOWED)
    if not torch.cuda.is_available():
        raise ConfigError("device", name, "auto | cpu | cuda (no CUDA device is available here)")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError("device", name, f"auto | cpu | cuda | cuda:0..cuda:{count - 1}")
    return device


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def flatten_state(model: nn.Module) -> torch.Tensor:
    """Return a CPU float32 1-D copy of all floating-point state_dict entries, in order."""
    parts = [v.detach().reshape(-1).to("cpu", torch.float32) for _, v in _float_entries(model)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)


def model_spec(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Return ``(name, shape)`` of each entry of the flat vector, in order."""
    return [(k, tuple(v.shape)) for k, v in _float_entries(model)]


def spec_fingerprint(model: nn.Module) -> bytes:
    """Return a 16-byte blake2b digest over the names, shapes and dtypes of the flat entries."""
    h = hashlib.blake2b(digest_size=16)
    for k, v in _float_entries(model):
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}\n".encode())
    return h.digest()


def channels_last_helps(model: nn.Module, device: torch.device) -> bool:
    """True for a model with convolution weights (4-D parameters) on the CPU.

    There torch's channels-last kernels are much faster: measured with ``py-spy`` on a fashion-mnist node,
    the evaluation took 61% of its CPU time and max-pooling alone 36%; with channels-last weights a
    training step of the CNN (batch 32, one thread) takes 6.5 ms instead of 9.3 ms and a 2,000-image
    evaluation 129 ms instead of 494 ms (with 256-image batches instead of 1,024). The flat vector is the
    same either way: it is built from the tensors' logical order (``reshape``), not their memory.
    """
    return device.type == "cpu" and any(p.dim() == 4 for p in model.parameters())


@torch.no_grad()
def assign_flat_(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector (as produced by :func:`flatten_state`) back into ``model`` in place.

    Raises
    ------
    ValueError
        If ``flat`` is not 1-D or its length differs from the model's flat size.
    """
    _apply_flat(model, flat, add=False)


@torch.no_grad()
def _apply_flat(model: nn.Module, flat: torch.Tensor, *, add: bool) -> None:
    entries = _float_entries(model)
    total = sum(v.numel() for _, v in entries)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, model needs ({total},)")
    if not entries:
        return
    flat = flat.to(entries[0][1].device)
    offset = 0
    for _, tensor in entries:
        chunk = flat[offset : offset + tensor.numel()].view_as(tensor).to(tensor.dtype)
        if add:
            tensor.add_(chunk)
        else:
            tensor.copy_(chunk)
        offset += tensor.numel()


class LocalTrainer:
    """SGD with momentum on one node's shard, plus thread-safe access to the flat model vector.

    Parameters
    ----------
    model
        The task's model; moved to ``device``.
    data
        This node's shard and the test split; copied to ``device`` once.
    lr, momentum, batch_size
        SGD hyper-parameters.
    device
        Where to train and evaluate.
    seed
        Seeds the batch sampler (a private :class:`torch.Generator`) and the validation split.
    val_fraction
        Share of the shard held out as a local validation split (see :func:`stratified_split`) for
        :meth:`class_f1`; ``0.0`` (the default) keeps the whole shard for training.
    """

    def __init__(
        self,
        model: nn.Module,
        data: TaskData,
        *,
        lr: float,
        momentum: float,
        batch_size: int,
        device: torch.device,
        seed: int,
        val_fraction: float = 0.0,
        polyak: bool = False,
        lr_tau: float = 0.0,
        max_grad_norm: float = 0.0,
    ) -> None:
        if len(data.train_y) == 0:
            raise TaskError("this node's training shard is empty; use fewer shards or another partition")
        if batch_size < 1:
            raise ConfigError("task.batch_size", batch_size, "integer >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError("val_fraction", val_fraction, "0 <= val_fraction < 1")
        self.device = device
        self.model = model.to(device).train()
        if channels_last_helps(self.model, device):
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._eval_model = copy.deepcopy(self.model).eval()
        self.num_classes = data.num_classes
        self.class_counts = torch.bincount(data.train_y, minlength=data.num_classes)  # whole shard, (C,)
        train_idx, val_idx = stratified_split(data.train_y, val_fraction, seed)
        self.val_x, self.val_y = data.train_x[val_idx].to(device), data.train_y[val_idx].to(device)
        self.val_class_counts = torch.bincount(data.train_y[val_idx], minlength=data.num_classes)
        self._f1_model = copy.deepcopy(self.model).eval()
        self._f1_lock = threading.Lock()
        if len(val_idx):
            data = TaskData(data.train_x[train_idx], data.train_y[train_idx], data.test_x, data.test_y,
                            data.num_classes)
        self.train_x, self.train_y = data.train_x.to(device), data.train_y.to(device)
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)
        self.batch_size = min(batch_size, len(self.train_y))
        # polyak: m ← βm + (1−β)g (MoNNA's momentum; torch's dampening=β); otherwise heavy-ball m ← βm + g
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum,
                                         dampening=momentum if polyak else 0.0)
        self.base_lr, self.lr_tau = lr, lr_tau
        self.max_grad_norm = max_grad_norm  # > 0: each step's gradient is clipped to this L2 norm
        self._generator = torch.Generator().manual_seed(seed % 2**64)
        self._perm = torch.empty(0, dtype=torch.int64, device=device)
        self._cursor = 0
        self._lock = threading.Lock()
        self._num_params = sum(v.numel() for _, v in _float_entries(self.model))
        self.steps_done = 0

    @property
    def num_params(self) -> int:
        """Length of the flat model vector."""
        return self._num_params

    def train_steps(self, n: int, between: Callable[[], None] | None = None) -> float:
        """Run ``n`` SGD steps and return their mean cross-entropy loss.

        The lock is taken for each step, so readers and writers of the vector interleave. ``between`` is
        called after each step, outside the lock (a training process serves its parent's requests there,
        see :mod:`p2pnode.train_process`).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        total = torch.zeros((), device=self.device)
        for _ in range(n):
            idx = self._next_batch()
            if self.lr_tau > 0:  # MoNNA's schedule γ_t = γ0 / (1 + t/τ), t = SGD steps so far
                for group in self.optimizer.param_groups:
                    group["lr"] = self.base_lr / (1.0 + self.steps_done / self.lr_tau)
            with self._lock:
                self.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self.train_x[idx]), self.train_y[idx])
                loss.backward()
                if self.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                self.optimizer.step()
                self.steps_done += 1
            total += loss.detach()
            if between is not None:
                between()
        return float(total.item()) / n

    def _next_batch(self) -> torch.Tensor:
        if self._cursor + self.batch_size > len(self._perm):
            perm = torch.randperm(len(self.train_y), generator=self._generator)
            self._perm, self._cursor = perm.to(self.device), 0
        idx = self._perm[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return idx

    @torch.no_grad()
    def evaluate(self, max_samples: int | None = None) -> tuple[float, float]:
        """Return ``(accuracy, mean cross-entropy)`` on the first ``max_samples`` test samples.

        The current weights are copied under the lock into a private eval-mode copy of the model,
        so training may continue while the evaluation runs.
        """
        n = len(self.test_y) if max_samples is None else min(max_samples, len(self.test_y))
        if n < 1:
            raise ValueError("nothing to evaluate: the test split is empty or max_samples < 1")
        with self._lock:
            self._eval_model.load_state_dict(self.model.state_dict())
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, n, _EVAL_BATCH):
            stop = min(start + _EVAL_BATCH, n)
            x, y = self.test_x[start:stop], self.test_y[start:stop]
            logits = self._eval_model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
        return float(correct.item()) / n, float(loss_sum.item()) / n

    @torch.no_grad()
    def class_f1(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-class F1 of the model given by ``flat`` on the local validation split.

        ``flat`` is loaded into a private eval-mode copy of the model (the live model is untouched,
        training may continue). Returns a CPU float32 tensor of shape ``(num_classes,)``; see
        :func:`per_class_f1` for classes without validation samples.

        Raises
        ------
        ValueError
            If there is no validation split (``val_fraction`` was 0) or ``flat`` has the wrong length.
        """
        if len(self.val_y) == 0:
            raise ValueError("no local validation split: build the LocalTrainer with val_fraction > 0")
        with self._f1_lock:
            _apply_flat(self._f1_model, flat, add=False)
            preds = torch.cat([self._f1_model(self.val_x[i : i + _EVAL_BATCH]).argmax(dim=1)
                               for i in range(0, len(self.val_y), _EVAL_BATCH)])
        return per_class_f1(preds, self.val_y, self.num_classes).cpu()

    def get_flat(self) -> torch.Tensor:
        """Return a CPU float32 copy of the flat model vector."""
        with self._lock:
            return flatten_state(self.model)

    def set_flat_(self, flat: torch.Tensor) -> None:
        """Replace the model's weights by ``flat`` (raises ValueError on a length mismatch)."""
        with self._lock:
            _apply_flat(self.model, flat, add=False)

    def add_flat_(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the model's weights in place, on the model's device."""
        with self._lock:
            _apply_flat(self.model, delta, add=True)

    def reset_momentum(self) -> None:
        """Forget the optimizer's momentum buffers (after restoring weights that did not produce them)."""
        with self._lock:
            self.optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        """Return a detached CPU snapshot of model, optimizer, sampler and step count."""
        with self._lock:
            return {
                "model": _to_cpu(self.model.state_dict()),
                "optimizer": _to_cpu(self.optimizer.state_dict()),
                "steps_done": self.steps_done,
                "generator": self._generator.get_state(),
                "perm": self._perm.cpu(),
                "cursor": self._cursor,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot taken by :meth:`state_dict` (the same task and architecture)."""
        with self._lock:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.steps_done = int(state["steps_done"])
            self._generator.set_state(state["generator"])
            self._perm = state["perm"].to(self.device)
            self._cursor = int(state["cursor"])


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into ``(train, validation)``, class by class.

    Every class with ``n_c >= 2`` samples gives ``min(n_c - 1, max(1, round(fraction * n_c)))`` random
    samples to validation (at least one, and at least one stays for training); a class with a single
    sample stays in training. ``fraction == 0`` gives ``(all indices, empty)``.

    Parameters
    ----------
    labels
        ``(n,)`` int64 class labels of the shard.
    fraction
        Target share of each class held out, ``0 <= fraction < 1``.
    seed
        Seeds the choice (a private generator; global RNG state is untouched).

    Returns
    -------
    tuple of torch.Tensor
        Sorted int64 index tensors ``(train, validation)``; disjoint, together ``0..n-1``.
    """
    labels = labels.cpu()
    everything = torch.arange(len(labels))
    if fraction <= 0.0:
        return everything, torch.empty(0, dtype=torch.int64)
    generator = torch.Generator().manual_seed((seed * 7919 + 17) % 2**64)
    val_parts = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n_c = len(members)
        if n_c < 2:
            continue
        n_val = min(n_c - 1, max(1, round(fraction * n_c)))
        val_parts.append(members[torch.randperm(n_c, generator=generator)[:n_val]])
    val = torch.sort(torch.cat(val_parts)).values if val_parts else torch.empty(0, dtype=torch.int64)
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[val] = True
    return everything[~in_val], val


def per_class_f1(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class F1 ``2 TP / (2 TP + FP + FN)`` of predicted vs true labels, shape ``(num_classes,)``.

    A class that is neither present in ``target`` nor predicted (0/0) scores 0.
    """
    tp = torch.bincount(target[preds == target], minlength=num_classes).double()
    fp = torch.bincount(preds[preds != target], minlength=num_classes).double()
    fn = torch.bincount(target[preds != target], minlength=num_classes).double()
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))
    return f1[:num_classes].float()


def _to_cpu(tree: Any) -> Any:
    """Deep-copy a nested dict/list of tensors onto the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to_cpu(v) for v in tree)
    return copy.deepcopy(tree)
