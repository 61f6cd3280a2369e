"""The ``digits`` task: scikit-learn's 8x8 handwritten digits with a small MLP.

The data ships with scikit-learn (no download). A fixed 360-sample test split, chosen by a
permutation with its own seed, is the same on every node whatever the swarm seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from p2pnode.errors import TaskError
from p2pnode.tasks.base import ShardSpec, Task, TaskData
from p2pnode.tasks.partition import partition_indices

logger = logging.getLogger(__name__)

TEST_SIZE = 360
TEST_SPLIT_SEED = 12345
NUM_CLASSES = 10


class DigitsTask(Task):
    """8x8 digits (1797 samples, 64 features scaled to [0, 1]) and an MLP 64-64-10."""

    name = "digits"

    def __init__(self, data_dir: str | None = None) -> None:
        # The data ships with scikit-learn; ``data_dir`` is accepted for a uniform interface.
        self.data_dir = data_dir

    def build_model(self, seed: int) -> nn.Module:
        """Return a fresh MLP; the same ``seed`` gives bit-identical weights.

        Parameters
        ----------
        seed
            Seeds the weight initialisation only; the global torch RNG is left unchanged.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed % 2**64)
            return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))

    def load(self, shard: ShardSpec) -> TaskData:
        """Return this node's shard of the training split and the fixed test split."""
        x, y = _load_arrays()
        train_idx, test_idx = fixed_split(len(y))
        mine = train_idx[partition_indices(y[train_idx], shard)]
        logger.debug("digits shard %d/%d: %d training samples", shard.index, shard.count, len(mine))
        return TaskData(
            train_x=torch.from_numpy(x[mine]),
            train_y=torch.from_numpy(y[mine]),
            test_x=torch.from_numpy(x[test_idx]),
            test_y=torch.from_numpy(y[test_idx]),
            num_classes=NUM_CLASSES,
        )


def fixed_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, test) indices of the swarm-independent train/test split."""
    perm = np.random.default_rng(TEST_SPLIT_SEED).permutation(n)
    return np.sort(perm[TEST_SIZE:]), np.sort(perm[:TEST_SIZE])


def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise TaskError("the digits task needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y
