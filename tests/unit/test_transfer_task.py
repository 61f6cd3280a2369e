"""The fashion-mnist-transfer task: disjoint public / private / test data, cached deterministic
pretraining, and a linear head on frozen features."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pnode.tasks import TASKS, ShardSpec, make_task
from p2pnode.tasks.fashion_mnist import DEFAULT_DATA_DIR
from p2pnode.tasks.transfer import (
    FashionMnistTransferTask,
    PretrainRecipe,
    public_split,
    shard_indices,
)
from p2pnode.trainer import LocalTrainer, flatten_state

TINY = PretrainRecipe(epochs=1, batch_size=16, feature_dim=8)
N_TRAIN, N_TEST = 60, 12


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _tiny_dataset(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(N_TEST, dtype=np.uint8) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(root / name, array)
    return arrays


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("P2PNODE_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------- disjointness (indices)


def test_public_slice_is_fixed_and_disjoint_from_the_private_pool() -> None:
    # Execute
    pool, public = public_split(60_000)
    # Assert
    assert len(public) == 10_000
    assert len(pool) == 50_000
    assert np.intersect1d(pool, public).size == 0
    assert np.array_equal(np.union1d(pool, public), np.arange(60_000))
    again_pool, again_public = public_split(60_000)
    assert np.array_equal(again_public, public)
    assert np.array_equal(again_pool, pool)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_shards_partition_the_private_pool_and_never_touch_the_public_slice(partition: str) -> None:
    # Prepare
    labels = np.random.default_rng(1).integers(0, 10, 6_000)
    pool, public = public_split(len(labels))
    # Execute
    shards = [shard_indices(labels, ShardSpec(i, 5, partition, seed=7)) for i in range(5)]
    # Assert
    every = np.concatenate(shards)
    assert len(every) == len(np.unique(every)), "shards are pairwise disjoint"
    assert np.array_equal(np.sort(every), pool), "together they cover the private pool"
    assert np.intersect1d(every, public).size == 0


# ---------------------------------------------------------------- load, cache, determinism (tiny data)


def test_load_returns_features_of_the_shard_and_of_the_test_file(tmp_path: Path, cache_env: Path) -> None:
    # Prepare
    arrays = _tiny_dataset(tmp_path / "data")
    task = FashionMnistTransferTask(str(tmp_path / "data"), recipe=TINY)
    shard = ShardSpec(1, 2, "iid", seed=3)
    # Execute
    data = task.load(shard)
    # Assert
    mine = shard_indices(arrays["train-labels-idx1-ubyte"], shard)
    assert data.train_x.shape == (len(mine), 8)
    assert data.train_x.dtype == torch.float32
    assert data.test_x.shape == (N_TEST, 8)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"][mine].tolist()
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    public_features = task.features().train[public_split(N_TRAIN)[1]]
    assert np.allclose(public_features.mean(axis=0), 0.0, atol=1e-4), "standardised on the public slice"
    transfer_files = sorted(p.name.rsplit("-", 1)[-1] for p in cache_env.glob("fashion-mnist-transfer-*"))
    assert transfer_files[1:] == ["extractor.npz", "features.npz"]
    assert transfer_files[0].endswith(".lock")


def test_pretraining_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _tiny_dataset(tmp_path / "data")
    data_dir = str(tmp_path / "data")
    monkeypatch.setenv("P2PNODE_CACHE", str(tmp_path / "cache-a"))
    first = FashionMnistTransferTask(data_dir, recipe=TINY).load(ShardSpec())
    monkeypatch.setenv("P2PNODE_CACHE", str(tmp_path / "cache-b"))
    independent = FashionMnistTransferTask(data_dir, recipe=TINY).load(ShardSpec())
    # Execute: a third instance must read the cache instead of pretraining
    monkeypatch.setattr("p2pnode.tasks.transfer.pretrain_extractor", _fail)
    cached = FashionMnistTransferTask(data_dir, recipe=TINY).load(ShardSpec())
    # Assert
    assert torch.equal(first.train_x, independent.train_x)
    assert torch.equal(first.test_x, independent.test_x)
    assert torch.equal(cached.train_x, independent.train_x)
    assert not list((tmp_path / "cache-b").glob("*.tmp"))


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("pretrained again despite a cache hit")


def test_cache_key_follows_the_recipe_and_the_data(tmp_path: Path, cache_env: Path) -> None:
    # Prepare
    _tiny_dataset(tmp_path / "a")
    _tiny_dataset(tmp_path / "b", seed=1)
    # Execute
    FashionMnistTransferTask(str(tmp_path / "a"), recipe=TINY).load(ShardSpec())
    other_recipe = PretrainRecipe(epochs=1, feature_dim=8, seed=1)
    FashionMnistTransferTask(str(tmp_path / "a"), recipe=other_recipe).load(ShardSpec())
    FashionMnistTransferTask(str(tmp_path / "b"), recipe=TINY).load(ShardSpec())
    # Assert
    assert len(list(cache_env.glob("*-features.npz"))) == 3


def test_unreadable_feature_cache_is_rebuilt(tmp_path: Path, cache_env: Path) -> None:
    _tiny_dataset(tmp_path / "data")
    expected = FashionMnistTransferTask(str(tmp_path / "data"), recipe=TINY).load(ShardSpec())
    for f in cache_env.glob("*-features.npz"):
        f.write_bytes(b"garbage")
    again = FashionMnistTransferTask(str(tmp_path / "data"), recipe=TINY).load(ShardSpec())
    assert torch.equal(again.train_x, expected.train_x)


def test_model_is_a_seeded_linear_head_whose_flat_vector_is_weight_then_bias() -> None:
    # Execute
    task = FashionMnistTransferTask(recipe=TINY)
    a, b, c = task.build_model(5), task.build_model(5), task.build_model(6)
    # Assert
    assert isinstance(a, torch.nn.Linear)
    assert (a.in_features, a.out_features) == (8, 10)
    assert torch.equal(flatten_state(a), flatten_state(b))
    assert not torch.equal(flatten_state(a), flatten_state(c))
    torch.testing.assert_close(flatten_state(a), torch.cat([a.weight.reshape(-1), a.bias]).detach())


def test_registered_under_its_name() -> None:
    task = make_task("fashion-mnist-transfer", data_dir="/tmp/x")
    assert TASKS["fashion-mnist-transfer"] is FashionMnistTransferTask
    assert isinstance(task, FashionMnistTransferTask)
    assert task.data_dir == Path("/tmp/x")


def test_invalid_recipe_is_rejected() -> None:
    with pytest.raises(ValueError, match="recipe"):
        PretrainRecipe(epochs=0)


# ---------------------------------------------------------------- the real data (uses the shared cache)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_head_on_frozen_features_reaches_a_sensible_accuracy() -> None:
    # Prepare: pretraining takes ~30-60 s on 2 CPU cores the first time, then it is a cache hit
    task = FashionMnistTransferTask()
    data = task.load(ShardSpec(0, 5, "iid", seed=0))
    trainer = LocalTrainer(task.build_model(0), data, lr=0.05, momentum=0.9, batch_size=32,
                           device=torch.device("cpu"), seed=0)
    # Execute: one epoch of the 10,000-sample shard
    trainer.train_steps(len(data.train_y) // 32)
    accuracy, _ = trainer.evaluate()
    # Assert
    assert len(data.train_y) == 10_000
    assert accuracy >= 0.80
