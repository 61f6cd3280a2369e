"""The task contract: what a node trains and how it is evaluated.

A *task* owns a model architecture and a data source. Every node of a swarm builds the same
architecture (so models can be merged element-wise) and takes its own disjoint shard of the
training split; evaluation always uses the held-out test split, which no node trains on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Which disjoint slice of the training split a node trains on.

    Attributes
    ----------
    index, count:
        This node's shard ``index`` out of ``count`` shards (``0 <= index < count``).
    partition:
        ``"iid"`` (uniform random split) or ``"dirichlet:ALPHA"`` (per-class proportions drawn
        from Dir(ALPHA); small ALPHA means skewed label distributions).
    seed:
        Seeds the partition. Every node of a swarm must use the same seed and count so that
        shards are disjoint and together cover the training split.
    """

    index: int = 0
    count: int = 1
    partition: str = "iid"
    seed: int = 0


@dataclass(slots=True)
class TaskData:
    """Tensors of one node's shard and of the shared test split (all on CPU).

    ``train_x``: (n_train, *input_shape) float32; ``train_y``: (n_train,) int64.
    ``test_x``: (n_test, *input_shape) float32; ``test_y``: (n_test,) int64.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


class Task(ABC):
    """A learning task: a model factory and a data loader.

    Implementations must be deterministic given ``seed`` (same architecture and same initial
    weights on every node when the swarm seed is shared) and must never download anything:
    data comes from local files (``data_dir`` or a system package path) or a package.
    Loading raises :class:`p2pnode.errors.TaskError` with a message that says how to get the data.
    """

    name: ClassVar[str]

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """Return a freshly initialised model; same ``seed`` gives bit-identical weights."""

    @abstractmethod
    def load(self, shard: ShardSpec) -> TaskData:
        """Return this node's training shard and the full held-out test split."""
