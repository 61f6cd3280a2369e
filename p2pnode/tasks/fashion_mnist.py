"""The ``fashion-mnist`` task: Zalando's 28x28 clothing images with a small CNN.

Data comes from the four standard IDX files (gzipped or not) in ``data_dir`` or, by default, in
``/usr/share/datasets/fashion-mnist/`` (Debian package ``dataset-fashion-mnist``); nothing is ever
downloaded. Decoded arrays are cached as ``.npy`` files under ``$P2PNODE_CACHE`` (default
``~/.cache/p2pnode``), keyed by source path, size and mtime, and written atomically so that many
node processes starting at once never see a half-written cache file.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import nn

from p2pnode.errors import TaskError
from p2pnode.tasks.base import ShardSpec, Task, TaskData
from p2pnode.tasks.partition import partition_indices

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
NUM_CLASSES = 10
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_HOWTO = "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR"
_IDX_UBYTE = 0x08


class FashionMnistTask(Task):
    """Fashion-MNIST (60k train / 10k test, 1x28x28, standardised) and a two-layer CNN."""

    name = "fashion-mnist"

    def __init__(self, data_dir: str | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR

    def build_model(self, seed: int) -> nn.Module:
        """Return a fresh CNN; the same ``seed`` gives bit-identical weights.

        Parameters
        ----------
        seed
            Seeds the weight initialisation only; the global torch RNG is left unchanged.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed % 2**64)
            return nn.Sequential(
                nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES),
            )  # fmt: skip

    def load(self, shard: ShardSpec) -> TaskData:
        """Return this node's shard of the 60k training images and the full 10k test split."""
        arrays = {key: _load_idx_cached(self._find(stem)) for key, stem in FILES.items()}
        _check_pairs(arrays)
        mine = partition_indices(arrays["train_y"], shard)
        logger.debug("fashion-mnist shard %d/%d: %d training samples", shard.index, shard.count, len(mine))
        return TaskData(
            train_x=_to_tensor(arrays["train_x"][mine]),
            train_y=torch.from_numpy(arrays["train_y"][mine].astype(np.int64)),
            test_x=_to_tensor(arrays["test_x"]),
            test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
            num_classes=NUM_CLASSES,
        )

    def _find(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            path = self.data_dir / name
            if path.is_file():
                return path
        raise TaskError(f"fashion-mnist file {stem}[.gz] not found in {self.data_dir}; {_HOWTO}")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = images.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    return torch.from_numpy((x - MEAN) / STD)


def _check_pairs(arrays: dict[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise TaskError(f"fashion-mnist {split} images have shape {images.shape}, expected (N, 28, 28)")
        if labels.ndim != 1 or len(labels) != len(images):
            raise TaskError(f"fashion-mnist {split}: {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and labels.max() >= NUM_CLASSES:
            raise TaskError(f"fashion-mnist {split} labels out of range 0..9: max {labels.max()}")


def parse_idx(raw: bytes, *, source: str = "<idx>") -> np.ndarray:
    """Decode an IDX file of unsigned bytes (magic ``00 00 08 NDIM``, big-endian uint32 dims).

    Parameters
    ----------
    raw
        The whole (decompressed) file content.
    source
        Name used in error messages.

    Raises
    ------
    TaskError
        If the header is malformed or the payload size does not match the dimensions.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise TaskError(f"{source} is not an IDX file (bad magic); {_HOWTO}")
    if raw[2] != _IDX_UBYTE:
        raise TaskError(f"{source}: unsupported IDX element type 0x{raw[2]:02x} (only unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise TaskError(f"{source}: truncated IDX header ({len(raw)} bytes, {ndim} dims); {_HOWTO}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise TaskError(
            f"{source}: IDX payload has {len(raw) - header} bytes but header {dims} needs {expected} "
            f"(truncated or corrupt file); {_HOWTO}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: Path) -> np.ndarray:
    """Read and decode one IDX file, gunzipping it when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise TaskError(f"cannot read {path}: {exc}; {_HOWTO}") from exc
    return parse_idx(raw, source=str(path))


def cache_dir() -> Path:
    """Return the decoded-data cache directory: ``$P2PNODE_CACHE`` or ``~/.cache/p2pnode``."""
    env = os.environ.get("P2PNODE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "p2pnode"


def _cache_path(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    digest = hashlib.blake2b(key, digest_size=8).hexdigest()
    return cache_dir() / f"fashion-mnist-{path.name.split('.')[0]}-{digest}.npy"


def _load_idx_cached(path: Path) -> np.ndarray:
    try:
        cached = _cache_path(path)
    except OSError as exc:
        raise TaskError(f"cannot stat {path}: {exc}; {_HOWTO}") from exc
    if cached.is_file():
        try:
            return np.load(cached, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache file %s: %s", cached, exc)
    array = read_idx(path)
    write_cache_atomic(cached, lambda fh: np.save(fh, array, allow_pickle=False))
    return array


def write_cache_atomic(target: Path, save: Callable[[IO[bytes]], None]) -> None:
    """Write a cache file with ``save(fh)`` via a temp file and ``os.replace``; failures only log."""
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as fh:
            tmp_name = fh.name
            save(fh)
        os.chmod(tmp_name, 0o644)  # a shared cache: NamedTemporaryFile creates 0600 files
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        logger.warning("cannot write cache file %s: %s", target, exc)
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
