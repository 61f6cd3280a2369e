"""Sharding the training split: disjointness, coverage, determinism, skew, bad specs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.errors import ConfigError, TaskError
from p2pnode.tasks.base import ShardSpec
from p2pnode.tasks.partition import parse_partition, partition_indices

_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _all_shards(labels: np.ndarray, count: int, partition: str, seed: int) -> list[np.ndarray]:
    return [partition_indices(labels, ShardSpec(i, count, partition, seed)) for i in range(count)]


def _assert_disjoint_cover(shards: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(shards)
    assert len(merged) == n
    assert np.array_equal(np.sort(merged), np.arange(n))
    for s in shards:
        assert s.dtype == np.int64
        assert np.all(np.diff(s) > 0)


def _labels(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


@_SETTINGS
@given(count=st.integers(1, 16), n=st.integers(0, 500), seed=st.integers(0, 2**32))
def test_iid_shards_are_disjoint_covering_and_balanced(count: int, n: int, seed: int) -> None:
    # Prepare
    labels = _labels(n, 10, seed)
    # Execute
    shards = _all_shards(labels, count, "iid", seed)
    # Assert
    _assert_disjoint_cover(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@_SETTINGS
@given(
    count=st.integers(1, 16),
    n=st.integers(400, 2000),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_shards_are_disjoint_covering_and_big_enough(
    count: int, n: int, alpha: float, seed: int
) -> None:
    # Prepare
    labels = _labels(n, 10, seed)
    # Execute
    shards = _all_shards(labels, count, f"dirichlet:{alpha}", seed)
    # Assert
    _assert_disjoint_cover(shards, n)
    assert min(len(s) for s in shards) >= min(10, n // count)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_partition_is_deterministic_in_seed(partition: str) -> None:
    # Prepare
    labels = _labels(1000, 10, 0)
    # Execute
    first = partition_indices(labels, ShardSpec(2, 5, partition, 7))
    again = partition_indices(labels, ShardSpec(2, 5, partition, 7))
    other_seed = partition_indices(labels, ShardSpec(2, 5, partition, 8))
    # Assert
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)


def _mean_top_class_fraction(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]))


def test_dirichlet_small_alpha_is_skewed_compared_to_iid() -> None:
    # Prepare
    labels = np.repeat(np.arange(10), 300)
    # Execute
    iid = _mean_top_class_fraction(labels, _all_shards(labels, 10, "iid", 3))
    skewed = _mean_top_class_fraction(labels, _all_shards(labels, 10, "dirichlet:0.1", 3))
    # Assert
    assert iid < 0.2
    assert skewed > 0.5


def test_dirichlet_impossible_raises_task_error() -> None:
    # Prepare: one class only, so nothing balances the shards and tiny alpha starves most of them
    labels = np.zeros(200, dtype=np.int64)
    # Execute / Assert
    with pytest.raises(TaskError, match="fewer than 10 samples"):
        partition_indices(labels, ShardSpec(0, 10, "dirichlet:0.001", 0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("iid", ("iid", None)), ("dirichlet:0.5", ("dirichlet", 0.5)), ("dirichlet:3", ("dirichlet", 3.0))],
)
def test_parse_partition_accepts_valid_specs(text: str, expected: tuple[str, float | None]) -> None:
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "IID", "iid:1", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan",
     "dirichlet:inf", "dirichlet:abc", "Dirichlet:1", "pathological:2"],
)
def test_parse_partition_rejects_bad_specs(text: str) -> None:
    with pytest.raises(ConfigError, match="task.partition") as info:
        parse_partition(text)
    assert "dirichlet:ALPHA" in info.value.allowed


def test_partition_indices_rejects_bad_spec_and_shard() -> None:
    labels = _labels(50, 3, 0)
    with pytest.raises(ConfigError, match="task.partition"):
        partition_indices(labels, ShardSpec(0, 2, "dirichlet:0", 0))
    with pytest.raises(ConfigError, match="task.shard"):
        partition_indices(labels, ShardSpec(2, 2, "iid", 0))
    with pytest.raises(ConfigError, match="task.num_shards"):
        partition_indices(labels, ShardSpec(0, 0, "iid", 0))
