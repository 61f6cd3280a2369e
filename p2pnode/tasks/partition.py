"""Splitting the training split into disjoint per-node shards.

Every node computes the *whole* partition from the shared ``(seed, count)`` and keeps its own
slice, so the shards of a swarm are disjoint and together cover the training split without any
coordination. Two schemes are supported:

- ``"iid"``: a seeded permutation cut into ``count`` near-equal parts.
- ``"dirichlet:ALPHA"``: for every class, proportions drawn from Dir(ALPHA) over the shards decide
  how that class's samples are dealt out; small ALPHA gives skewed label distributions.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from p2pnode.errors import ConfigError, TaskError
from p2pnode.tasks.base import ShardSpec

logger = logging.getLogger(__name__)

PARTITION_ALLOWED = "iid | dirichlet:ALPHA with ALPHA > 0"
_MAX_DIRICHLET_TRIES = 200
_MIN_SHARD_SIZE = 10


def parse_partition(text: str) -> tuple[str, float | None]:
    """Parse a partition spec.

    Parameters
    ----------
    text
        ``"iid"`` or ``"dirichlet:ALPHA"`` with ALPHA a finite float > 0.

    Returns
    -------
    tuple of (str, float or None)
        ``("iid", None)`` or ``("dirichlet", alpha)``.

    Raises
    ------
    ConfigError
        On any other value.
    """
    if text == "iid":
        return "iid", None
    kind, sep, raw_alpha = text.partition(":")
    if kind != "dirichlet" or not sep:
        raise ConfigError("task.partition", text, PARTITION_ALLOWED)
    try:
        alpha = float(raw_alpha)
    except ValueError:
        raise ConfigError("task.partition", text, PARTITION_ALLOWED) from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("task.partition", text, PARTITION_ALLOWED)
    return "dirichlet", alpha


def partition_indices(labels: np.ndarray, shard: ShardSpec) -> np.ndarray:
    """Return the sorted indices of ``shard``'s slice of a training split.

    Parameters
    ----------
    labels
        1-D array of class labels of the whole training split.
    shard
        Which shard, out of how many, with which scheme and seed.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices into ``labels``.

    Raises
    ------
    ConfigError
        If the partition spec or the shard index/count is invalid.
    TaskError
        If a Dirichlet partition cannot give every shard enough samples.
    """
    kind, alpha = parse_partition(shard.partition)
    _check_shard(shard)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise TaskError(f"labels must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(shard.seed % 2**64)
    if kind == "iid":
        parts = _iid_parts(len(labels), shard.count, rng)
    else:
        assert alpha is not None
        parts = _dirichlet_parts(labels, shard.count, alpha, rng)
    return np.sort(parts[shard.index]).astype(np.int64)


def _check_shard(shard: ShardSpec) -> None:
    if shard.count < 1:
        raise ConfigError("task.num_shards", shard.count, "integer >= 1")
    if not 0 <= shard.index < shard.count:
        raise ConfigError("task.shard", shard.index, f"0 <= shard < {shard.count}")


def _iid_parts(n: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), count)


def _dirichlet_parts(
    labels: np.ndarray, count: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Deal each class out by Dir(alpha) proportions; resample until every shard is big enough.

    As in the usual federated-learning benchmarks, a shard that already holds its fair share
    (n / count) gets no more samples, which keeps the retry loop short for small alpha.
    """
    n = len(labels)
    min_size = min(_MIN_SHARD_SIZE, n // count)
    _, inverse = np.unique(labels, return_inverse=True)
    by_class = [np.flatnonzero(inverse == c) for c in range(int(inverse.max(initial=-1)) + 1)]
    for attempt in range(1, _MAX_DIRICHLET_TRIES + 1):
        parts = _dirichlet_attempt(by_class, n, count, alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            logger.debug("dirichlet partition: %d attempt(s), smallest shard %d", attempt, smallest)
            return parts
    raise TaskError(
        f"dirichlet:{alpha} partition of {n} samples into {count} shards left a shard with fewer than "
        f"{min_size} samples after {_MAX_DIRICHLET_TRIES} tries; use a larger ALPHA or fewer shards"
    )


def _dirichlet_attempt(
    by_class: list[np.ndarray], n: int, count: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(count)]
    sizes = np.zeros(count, dtype=np.int64)
    for class_indices in by_class:
        idx = rng.permutation(class_indices)
        open_shards = sizes < n / count  # shards still below their fair share
        props = rng.dirichlet(np.full(count, alpha)) * open_shards
        total = props.sum()
        props = props / total if total > 0 and np.isfinite(total) else open_shards / open_shards.sum()
        cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
        for shard_id, piece in enumerate(np.split(idx, cuts)):
            chunks[shard_id].append(piece)
            sizes[shard_id] += len(piece)
    return [np.concatenate(c) if c else np.empty(0, dtype=np.int64) for c in chunks]
