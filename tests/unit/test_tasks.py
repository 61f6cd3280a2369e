"""Built-in tasks (digits, fashion-mnist), user plug-in tasks and the task registry."""

from __future__ import annotations

import gzip
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pnode.errors import ConfigError, TaskError
from p2pnode.tasks import TASKS, ShardSpec, Task, make_task
from p2pnode.tasks.digits import DigitsTask
from p2pnode.tasks.fashion_mnist import DEFAULT_DATA_DIR, MEAN, STD, FashionMnistTask, parse_idx

# ---------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_ranges() -> None:
    # Execute
    data = DigitsTask().load(ShardSpec())
    # Assert
    assert data.train_x.shape == (1437, 64)
    assert data.test_x.shape == (360, 64)
    assert data.train_x.dtype == data.test_x.dtype == torch.float32
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    assert float(data.train_x.min()) >= 0.0
    assert float(data.train_x.max()) <= 1.0
    assert set(data.test_y.tolist()) == set(range(10))
    assert data.num_classes == 10


def test_digits_test_split_is_fixed_across_seeds_and_shards() -> None:
    # Execute
    a = DigitsTask().load(ShardSpec(0, 1, "iid", 0))
    b = DigitsTask().load(ShardSpec(2, 4, "dirichlet:0.5", 99))
    # Assert
    assert torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.test_y, b.test_y)
    assert len(b.train_y) < len(a.train_y)


def test_digits_shards_cover_the_training_split() -> None:
    # Execute
    shards = [DigitsTask().load(ShardSpec(i, 4, "iid", 5)) for i in range(4)]
    # Assert
    assert sum(len(s.train_y) for s in shards) == 1437
    rows = torch.cat([s.train_x for s in shards])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(DigitsTask().load(ShardSpec()).train_x, dim=0))


@pytest.mark.parametrize("task", [DigitsTask(), FashionMnistTask()])
def test_build_model_is_deterministic_and_leaves_global_rng_alone(task: Task) -> None:
    # Prepare
    rng_before = torch.get_rng_state()
    # Execute
    a, b = task.build_model(7).state_dict(), task.build_model(7).state_dict()
    c = task.build_model(8).state_dict()
    # Assert
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_fashion_model_output_shape() -> None:
    model = FashionMnistTask().build_model(0)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


# ---------------------------------------------------------------- fashion-mnist


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, *, gz: bool = True, payload: bytes | None = None) -> None:
    raw = payload if payload is not None else _idx_bytes(array)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def _tiny_dataset(
    root: Path, *, gz: bool = True, n_train: int = 30, n_test: int = 12
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(root / name, array, gz=gz)
    return arrays


@pytest.fixture(autouse=True)
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("P2PNODE_CACHE", str(cache))
    return cache


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_from_debian_path() -> None:
    # Execute
    data = FashionMnistTask().load(ShardSpec(0, 6, "iid", 0))
    # Assert
    assert data.train_x.shape == (10000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32
    assert abs(float(data.test_x.mean())) < 0.05
    assert abs(float(data.test_x.std()) - 1.0) < 0.05
    assert torch.equal(torch.bincount(data.test_y), torch.full((10,), 1000))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loads_tiny_idx_files_and_caches(
    tmp_path: Path, cache_env: Path, gz: bool
) -> None:
    # Prepare
    arrays = _tiny_dataset(tmp_path / "data", gz=gz)
    task = FashionMnistTask(data_dir=str(tmp_path / "data"))
    # Execute
    data = task.load(ShardSpec())
    again = task.load(ShardSpec())
    # Assert
    assert data.train_x.shape == (30, 1, 28, 28)
    assert data.test_x.shape == (12, 1, 28, 28)
    pixels = (data.test_x * STD + MEAN) * 255.0
    np.testing.assert_allclose(pixels.squeeze(1).numpy(), arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert len(list(cache_env.glob("*.npy"))) == 4
    assert not list(cache_env.glob("*.tmp"))
    assert torch.equal(again.train_x, data.train_x)


def test_fashion_mnist_cache_is_invalidated_when_the_file_changes(tmp_path: Path) -> None:
    # Prepare
    _tiny_dataset(tmp_path / "data")
    task = FashionMnistTask(data_dir=str(tmp_path / "data"))
    first = task.load(ShardSpec())
    # Execute: rewrite the test labels with different content (and size)
    _write_idx(tmp_path / "data" / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    _write_idx(tmp_path / "data" / "t10k-labels-idx1-ubyte", np.ones(5, np.uint8))
    second = task.load(ShardSpec())
    # Assert
    assert len(first.test_y) == 12
    assert second.test_y.tolist() == [1] * 5


def test_fashion_mnist_truncated_idx_raises_task_error(tmp_path: Path) -> None:
    # Prepare: header says 30 images but one is missing
    _tiny_dataset(tmp_path)
    images = np.zeros((30, 28, 28), np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, payload=_idx_bytes(images)[:-784])
    # Execute / Assert
    with pytest.raises(TaskError, match="truncated or corrupt") as info:
        FashionMnistTask(data_dir=str(tmp_path)).load(ShardSpec())
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_corrupt_gzip_raises_task_error(tmp_path: Path) -> None:
    # Prepare
    _tiny_dataset(tmp_path)
    gz_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:-12])
    # Execute / Assert
    with pytest.raises(TaskError, match="cannot read"):
        FashionMnistTask(data_dir=str(tmp_path)).load(ShardSpec())


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMnistTask(data_dir=str(tmp_path)).load(ShardSpec())
    assert "--data-dir" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x01\x00\x08\x01", b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", b"\x00\x00\x08\x03\x00\x00"],
    ids=["empty", "bad-magic", "float-type", "short-header"],
)
def test_parse_idx_rejects_malformed_headers(raw: bytes) -> None:
    with pytest.raises(TaskError):
        parse_idx(raw)


def test_parse_idx_decodes_dims() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx_bytes(array)), array)


def test_unreadable_cache_file_is_rebuilt(tmp_path: Path, cache_env: Path) -> None:
    # Prepare
    _tiny_dataset(tmp_path / "data")
    task = FashionMnistTask(data_dir=str(tmp_path / "data"))
    expected = task.load(ShardSpec())
    for f in cache_env.glob("*.npy"):
        f.write_bytes(b"garbage")
    # Execute
    data = task.load(ShardSpec())
    # Assert
    assert torch.equal(data.train_x, expected.train_x)


# ---------------------------------------------------------------- user tasks and registry


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_user_task_factory_receives_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _write_module(tmp_path, monkeypatch, "p2p_user_task_a", """
        from p2pnode.tasks.digits import DigitsTask

        class MyTask(DigitsTask):
            name = "mine"

        def make(data_dir=None):
            task = MyTask()
            task.seen_data_dir = data_dir
            return task
    """)
    # Execute
    task = make_task("p2p_user_task_a:make", data_dir="/some/dir")
    # Assert
    assert isinstance(task, Task)
    assert task.seen_data_dir == "/some/dir"  # type: ignore[attr-defined]
    assert task.load(ShardSpec()).train_x.shape == (1437, 64)


def test_user_task_duck_typed_factory_without_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    _write_module(tmp_path, monkeypatch, "p2p_user_task_b", """
        class Duck:
            def build_model(self, seed):
                return None

            def load(self, shard):
                return None

        def make():
            return Duck()
    """)
    # Execute
    task = make_task("p2p_user_task_b:make", data_dir="/ignored")
    # Assert
    assert type(task).__name__ == "Duck"


def test_user_task_factory_returning_garbage_is_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "p2p_user_task_c", "def make():\n    return 42\n")
    with pytest.raises(ConfigError, match="returned a int"):
        make_task("p2p_user_task_c:make")


def test_user_task_factory_raising_is_task_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch, "p2p_user_task_d", "def make():\n    raise RuntimeError('boom')\n")
    with pytest.raises(TaskError, match="boom"):
        make_task("p2p_user_task_d:make")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("p2p_no_such_module_xyz:make", "p2p_no_such_module_xyz"),
        ("p2pnode.tasks.digits:no_such_factory", "no_such_factory"),
        ("p2pnode.tasks.digits:TEST_SIZE", "not callable"),
        ("p2pnode.tasks.digits:", "package.module:factory"),
        (":make", "package.module:factory"),
    ],
)
def test_user_task_bad_specs_are_config_errors(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="task.name") as info:
        make_task(spec)
    assert needle in str(info.value)


def test_make_task_returns_registered_tasks() -> None:
    assert set(TASKS) == {"digits", "fashion-mnist", "fashion-mnist-transfer", "shakespeare-charlm"}
    assert isinstance(make_task("digits"), DigitsTask)
    fm = make_task("fashion-mnist", data_dir="/tmp/x")
    assert isinstance(fm, FashionMnistTask)
    assert fm.data_dir == Path("/tmp/x")


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="task.name") as info:
        make_task("cifar10")
    assert "digits" in info.value.allowed
    assert "fashion-mnist" in info.value.allowed
    assert "package.module:factory" in info.value.allowed
