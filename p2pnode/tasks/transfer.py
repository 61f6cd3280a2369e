"""The ``fashion-mnist-transfer`` task: a frozen pretrained CNN feature extractor and a linear head.

Bristle (Verbraeken, de Vos and Pouwelse, DESIGN §4.3) assumes transfer learning: the feature
layers are pretrained on *public* data and frozen, and only the output layer
``W (features x classes)`` is trained and gossiped. This task builds that setting from the
Fashion-MNIST files alone, with three disjoint parts:

- the **public slice**: a fixed ``1/6`` of the 60k training images (10,000), chosen by a
  permutation with its own seed (:data:`PUBLIC_SPLIT_SEED`, independent of the swarm seed). Only
  the feature extractor is pretrained on it; no node ever trains on it;
- the **private pool**: the other 50,000 training images, dealt out to nodes by
  :class:`~p2pnode.tasks.base.ShardSpec` exactly like the other tasks (``iid`` / ``dirichlet``);
- the **test split**: the separate 10k test file, used only for evaluation.

Pretraining (:class:`PretrainRecipe`, seeded, CPU, a few seconds to a minute on two cores) trains
the extractor with a throw-away linear head, then the frozen extractor computes the standardised
feature vectors of every training and test image once. Extractor weights and features are cached
atomically under ``$P2PNODE_CACHE`` (default ``~/.cache/p2pnode``), keyed by a hash of the data and
the recipe, behind a file lock so that many node processes starting at once pretrain only once.

Because the features are frozen, :meth:`FashionMnistTransferTask.load` returns *features* as the
inputs and the model is only ``nn.Linear(feature_dim, 10)``: the flat vector nodes exchange is the
head's ``weight`` (classes x features, row-major) followed by its ``bias`` (classes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pnode.errors import TaskError
from p2pnode.tasks.base import ShardSpec, Task, TaskData
from p2pnode.tasks.fashion_mnist import (
    FILES,
    MEAN,
    NUM_CLASSES,
    STD,
    FashionMnistTask,
    _check_pairs,
    _load_idx_cached,
    cache_dir,
    write_cache_atomic,
)
from p2pnode.tasks.partition import partition_indices

logger = logging.getLogger(__name__)

PUBLIC_SPLIT_SEED = 0x5EED_B015  # fixed: the public slice is the same for every swarm
PUBLIC_FRACTION_DENOM = 6  # public slice = n // 6 training images (10,000 of 60,000)
CACHE_VERSION = 1  # bump when the extractor architecture or feature computation changes
_EXTRACT_BATCH = 512
_STD_EPS = 1e-6


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainRecipe:
    """How the feature extractor is pretrained on the public slice (part of the cache key).

    Attributes
    ----------
    epochs:
        Passes over the public slice.
    batch_size:
        Mini-batch size.
    lr:
        Adam learning rate.
    seed:
        Seeds the initial weights and the batch order.
    feature_dim:
        Width of the feature vector (the head's input size).
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    feature_dim: int = 64

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.feature_dim < 1 or not self.lr > 0:
            raise ValueError(f"invalid pretraining recipe {self}: need epochs, batch_size, feature_dim >= 1, "
                             "lr > 0")


@dataclass(frozen=True, slots=True)
class Features:
    """Standardised frozen features of the whole training split and of the test split."""

    train: np.ndarray  # (n_train, feature_dim) float32
    test: np.ndarray  # (n_test, feature_dim) float32


def public_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted ``(private_pool, public)`` indices into a training split of ``n`` images.

    The split depends only on ``n`` (fixed seed), so every node of every swarm agrees on it.
    """
    perm = np.random.default_rng(PUBLIC_SPLIT_SEED).permutation(n)
    n_public = n // PUBLIC_FRACTION_DENOM
    return np.sort(perm[: n - n_public]).astype(np.int64), np.sort(perm[n - n_public :]).astype(np.int64)


def shard_indices(train_labels: np.ndarray, shard: ShardSpec) -> np.ndarray:
    """Return the sorted indices (into the full training split) of ``shard``'s part of the private pool."""
    pool, _ = public_split(len(train_labels))
    return pool[partition_indices(np.asarray(train_labels)[pool], shard)]


def build_extractor(recipe: PretrainRecipe) -> nn.Module:
    """Return a freshly initialised extractor ``(N, 1, 28, 28) -> (N, feature_dim)`` (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(recipe.seed % 2**64)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, recipe.feature_dim), nn.ReLU(),
        )  # fmt: skip


def pretrain_extractor(images: torch.Tensor, labels: torch.Tensor, recipe: PretrainRecipe) -> nn.Module:
    """Train an extractor (with a throw-away linear head) on public data; return it frozen, in eval mode.

    Parameters
    ----------
    images
        ``(N, 1, 28, 28)`` float32, standardised.
    labels
        ``(N,)`` int64 in ``0..9``.
    recipe
        Epochs, batch size, learning rate, seed.
    """
    extractor = build_extractor(recipe)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((recipe.seed + 1) % 2**64)
        head = nn.Linear(recipe.feature_dim, NUM_CLASSES)
    model = nn.Sequential(extractor, head).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    generator = torch.Generator().manual_seed(recipe.seed % 2**64)
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        logger.debug("pretraining epoch %d: loss %.4f", epoch + 1, total / max(1, len(order)))
    extractor.eval().requires_grad_(False)
    return extractor


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Apply a frozen extractor batch by batch; returns ``(N, feature_dim)`` float32."""
    parts = [extractor(images[i : i + _EXTRACT_BATCH]) for i in range(0, len(images), _EXTRACT_BATCH)]
    return torch.cat(parts) if parts else torch.empty(0, 0)


def to_images(raw: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> standardised float32 ``(N, 1, 28, 28)`` (as in the fashion-mnist task)."""
    x = raw.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return torch.from_numpy((x - MEAN) / STD)


class FashionMnistTransferTask(Task):
    """Fashion-MNIST through a frozen pretrained CNN; the model is only the linear output layer.

    Parameters
    ----------
    data_dir
        Directory with the four Fashion-MNIST IDX files (default: the Debian package path).
    recipe
        How the extractor is pretrained (tests use a tiny one).
    """

    name = "fashion-mnist-transfer"

    def __init__(self, data_dir: str | None = None, recipe: PretrainRecipe | None = None) -> None:
        self._source = FashionMnistTask(data_dir)
        self.data_dir = self._source.data_dir
        self.recipe = recipe or PretrainRecipe()
        self._features: Features | None = None

    def build_model(self, seed: int) -> nn.Module:
        """Return a fresh ``nn.Linear(feature_dim, 10)``; the same ``seed`` gives identical weights."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed % 2**64)
            return nn.Linear(self.recipe.feature_dim, NUM_CLASSES)

    def load(self, shard: ShardSpec) -> TaskData:
        """Return the frozen features of this node's shard of the private pool and of the test split."""
        arrays = self._arrays()
        features = self.features(arrays)
        mine = shard_indices(arrays["train_y"], shard)
        logger.debug("%s shard %d/%d: %d training samples", self.name, shard.index, shard.count, len(mine))
        return TaskData(
            train_x=torch.from_numpy(features.train[mine]),
            train_y=torch.from_numpy(arrays["train_y"][mine].astype(np.int64)),
            test_x=torch.from_numpy(features.test),
            test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
            num_classes=NUM_CLASSES,
        )

    def features(self, arrays: dict[str, np.ndarray] | None = None) -> Features:
        """Return the frozen features (from memory, the disk cache, or by pretraining now)."""
        if self._features is None:
            arrays = arrays if arrays is not None else self._arrays()
            self._features = _cached_features(arrays, self.recipe)
        return self._features

    def _arrays(self) -> dict[str, np.ndarray]:
        # The fashion-mnist task's own IDX reader and decoded-array cache (same package).
        arrays = {key: _load_idx_cached(self._source._find(stem)) for key, stem in FILES.items()}
        _check_pairs(arrays)
        return arrays


def _cache_key(arrays: dict[str, np.ndarray], recipe: PretrainRecipe) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"v{CACHE_VERSION}|{sorted(asdict(recipe).items())}|{PUBLIC_SPLIT_SEED}\n".encode())
    for key in sorted(FILES):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.shape}|{a.dtype}\n".encode())
        h.update(a.data)
    return h.hexdigest()


def _cached_features(arrays: dict[str, np.ndarray], recipe: PretrainRecipe) -> Features:
    key = _cache_key(arrays, recipe)
    base = cache_dir() / f"fashion-mnist-transfer-{key}"
    features_path = base.with_name(base.name + "-features.npz")
    cached = _read_features(features_path)
    if cached is not None:
        return cached
    with _file_lock(base.with_name(base.name + ".lock")):
        cached = _read_features(features_path)  # another process may have finished meanwhile
        if cached is not None:
            return cached
        features, extractor = _compute(arrays, recipe)
        _save_npz_atomic(base.with_name(base.name + "-extractor.npz"),
                         {k: v.numpy() for k, v in extractor.state_dict().items()})
        _save_npz_atomic(features_path, {"train": features.train, "test": features.test})
    return features


def _compute(arrays: dict[str, np.ndarray], recipe: PretrainRecipe) -> tuple[Features, nn.Module]:
    """Pretrain on the public slice, then extract and standardise (public-slice statistics) all features."""
    _, public = public_split(len(arrays["train_y"]))
    if len(public) == 0:
        raise TaskError("the training split is too small to reserve a public pretraining slice")
    started = time.perf_counter()
    images = to_images(arrays["train_x"])
    labels = torch.from_numpy(arrays["train_y"].astype(np.int64))
    extractor = pretrain_extractor(images[public], labels[public], recipe)
    pretrained = time.perf_counter()
    train = extract(extractor, images)
    test = extract(extractor, to_images(arrays["test_x"]))
    mean, std = train[public].mean(dim=0), train[public].std(dim=0, unbiased=False) + _STD_EPS
    features = Features(train=((train - mean) / std).numpy(), test=((test - mean) / std).numpy())
    logger.info("pretrained the fashion-mnist-transfer extractor on %d public images in %.1f s; "
                "features extracted in %.1f s", len(public), pretrained - started,
                time.perf_counter() - pretrained)
    return features, extractor


def _read_features(path: Path) -> Features | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Features(train=npz["train"], test=npz["test"])
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring unreadable cache file %s: %s", path, exc)
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (best effort: without a writable cache, no lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        logger.warning("cannot create lock file %s: %s", path, exc)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _save_npz_atomic(target: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` via a temp file and ``os.replace``; failures only log."""
    write_cache_atomic(target, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]
