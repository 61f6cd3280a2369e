"""Every virtual node's shard, from one load of the dataset.

``make_task(name).load(ShardSpec(i, n))`` per node would decode the dataset n times and give every node
its own copy of the test split. For the built-in ``digits`` and ``fashion-mnist`` tasks, whose shard
is ``whole_train[partition_indices(whole_train_y, spec)]``, :func:`load_shards` loads the dataset once,
computes the whole partition once (the same draws as :func:`p2pnode.tasks.partition.partition_indices`)
and gives each node a slice of the training split and the one shared test split. Other tasks fall back
to one ``load`` per distinct shard.

When there are more shards than training samples (10,000 nodes on the 1,437 digits images), the shard
count is cut to the number of samples and node i takes shard ``i mod count`` (:func:`effective_specs`):
several nodes then share a shard, which the summary reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from p2pnode.tasks import ShardSpec, TaskData, make_task
from p2pnode.tasks.partition import _dirichlet_parts, _iid_parts, parse_partition

logger = logging.getLogger(__name__)

FAST_TASKS = frozenset({"digits", "fashion-mnist"})


def all_parts(labels: np.ndarray, count: int, partition: str, seed: int) -> list[np.ndarray]:
    """Every shard's sorted indices at once: ``[partition_indices(labels, ShardSpec(i, count, ...)) ...]``."""
    kind, alpha = parse_partition(partition)
    rng = np.random.default_rng(seed % 2**64)
    if kind == "iid":
        parts = _iid_parts(len(labels), count, rng)
    else:
        assert alpha is not None
        parts = _dirichlet_parts(np.asarray(labels), count, alpha, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def effective_specs(specs: Sequence[ShardSpec], n_train: int) -> list[ShardSpec]:
    """The specs with their count cut to ``n_train`` (and index taken modulo) where it is larger."""
    out = []
    for s in specs:
        if s.count > n_train:
            s = ShardSpec(index=s.index % n_train, count=n_train, partition=s.partition, seed=s.seed)
        out.append(s)
    return out


def load_shards(task_name: str, data_dir: str | None, specs: Sequence[ShardSpec]
                ) -> tuple[list[TaskData], int]:
    """Each spec's :class:`TaskData` (test split shared by all) and the number of training samples.

    Specs whose count exceeds the training set size are wrapped first (:func:`effective_specs`).
    """
    task = make_task(task_name, data_dir)
    if task_name not in FAST_TASKS:
        cache: dict[ShardSpec, TaskData] = {}
        out = []
        for s in specs:
            if s not in cache:
                cache[s] = task.load(s)
            out.append(cache[s])
        return out, -1
    seed = specs[0].seed if specs else 0
    whole = task.load(ShardSpec(index=0, count=1, partition="iid", seed=seed))
    n_train = len(whole.train_y)
    labels = whole.train_y.numpy()
    parts: dict[tuple[int, str, int], list[np.ndarray]] = {}
    out = []
    for s in effective_specs(specs, n_train):
        key = (s.count, s.partition, s.seed)
        if key not in parts:
            parts[key] = all_parts(labels, s.count, s.partition, s.seed)
        idx = parts[key][s.index]
        out.append(TaskData(train_x=whole.train_x[idx], train_y=whole.train_y[idx], test_x=whole.test_x,
                            test_y=whole.test_y, num_classes=whole.num_classes))
    return out, n_train
