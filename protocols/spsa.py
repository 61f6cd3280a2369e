"""Shared-seed SPSA scalars: seeds, the one-byte code, signed scalar batches and the scalar log.

Zelikman et al., "Just One Byte (per gradient)" (2023) and Malladi et al., "Fine-Tuning Language
Models with Just Forward Passes" (MeZO, 2023): every node applies ``θ ← θ − η ĝ z(seed)`` for every
published scalar ``ĝ``, where ``z(seed)`` is regenerated from a seed derived from
``(origin, step, k)``. Only the seed's ids and one byte per scalar travel.

One-byte code (sign bit + 7-bit log-magnitude, scale ``S = SCALE = 8``)::

    q    = clamp(floor(S · ln|g| + 1/2), −64, 63)
    code = (0x80 if g < 0 else 0) | (q + 64)
    ĝ    = (−1 if code & 0x80 else +1) · float32(e^{q/S})

Representable magnitudes are ``[e^{−64/S}, e^{63/S}] = [3.35e-4, 2.63e3]``; inside that range the
relative error is ``|ĝ/g − 1| <= e^{1/(2S)} − 1 = 6.45 %`` (plus float32 rounding of the table),
outside it the magnitude is clamped to the nearest end. ``g == 0`` (and ``−0.0``) encodes as code 0,
the smallest magnitude with a ``+`` sign. NaN is refused. Decoding is a fixed 256-entry table of
float32-rounded values, so every host decodes a byte to the same number.

Batch wire format (version 2). A batch is one :mod:`protocols.envelope` envelope sealed by its
*origin*: kind ``"sb"``, ``round`` = first step ``s``, ``seq`` = last step ``s + n − 1``, payload
``0x02 | uvarint K | n·K codes`` (step-major: the code of ``(s + i, j)`` at offset ``i·K + j``). The
origin is the envelope's sender, so a batch of ``n·K`` scalars costs ``n·K + 106`` bytes or so (the
version-1 msgpack batch in a version-1 envelope cost ``n·K + 286``).

Signing. The envelope binds no receiver, so the exact sealed bytes can be forwarded by any node and
still verify as signed by the origin: :func:`open_batch` verifies the Ed25519 signature *before*
parsing the payload. Replay protection for batches comes from :class:`ScalarLog` (each scalar is
applied exactly once), not from :class:`~protocols.envelope.ReplayGuard`: a forwarded batch
legitimately arrives many times and out of order, so callers must not run a per-sender ReplayGuard
on these envelopes.

Summary wire format (version 2; anti-entropy, "which steps of which origin do you hold")::

    0x02 | repeated: tag (8) | uvarint (prefix + 1) | uvarint R | R × (uvarint gap, uvarint length − 1)

``prefix`` is the last step of the contiguous run from step 0; the ``R <= MAX_RUNS`` runs are steps held
beyond it (scalars that arrived before an earlier batch of their origin), each starting ``gap + 2``
steps after the end of the previous run (or of the prefix). Without them, a peer would resend
everything above the prefix.

``tag = blake2b(origin, 8 bytes, person "p2pnode-tag-v1")`` names an origin in 8 bytes instead of
its 52-character peer id; a log refuses a new origin whose tag collides with a known one's (finding
one on purpose takes ~2^64 key generations). A tag the receiver does not know stays a distinct,
unknown entry, so two summaries only compare equal when they name the same origins.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols.envelope import (
    MAX_NAME_CHARS,
    MAX_OVERHEAD,
    is_counter,
    open_envelope,
    read_uvarint,
    seal,
    uvarint,
)
from protocols.errors import ProtocolError, TooLarge
from protocols.keys import Signer

VERSION = 2
SCALE = 8.0
Q_MIN, Q_MAX = -64, 63
MIN_MAGNITUDE = math.exp(Q_MIN / SCALE)
MAX_MAGNITUDE = math.exp(Q_MAX / SCALE)
REL_ERROR_BOUND = math.exp(1.0 / (2.0 * SCALE)) - 1.0
ENVELOPE_KIND = "sb"  # "SPSA batch": two letters, it is on the wire of every batch copy
TAG_BYTES = 8
MAX_RUNS = 32  # runs above the prefix a summary may list per origin
Runs = tuple[tuple[int, int], ...]  # (first step, last step) of each run held above the prefix
Holding = tuple[int, Runs]  # (prefix, runs): what a log holds of one origin
MAX_K = 2**16
_SEED_PERSON = b"p2pnode-spsa-v1"
_TAG_PERSON = b"p2pnode-tag-v1"
_BATCH_OVERHEAD = 1 + 3  # version byte and uvarint K (K <= 2**16)

#: ``DECODE_TABLE[code]`` is the decoded scalar (a float32 value held in a float64).
DECODE_TABLE: npt.NDArray[np.float64] = np.array(
    [(-1.0 if c & 0x80 else 1.0) * float(np.float32(math.exp(((c & 0x7F) + Q_MIN) / SCALE)))
     for c in range(256)], dtype=np.float64)  # fmt: skip
DECODE_TABLE.setflags(write=False)


class SpsaError(ProtocolError):
    """A malformed, oversized, out-of-window or refused scalar batch (or summary)."""


class Equivocation(SpsaError):
    """An origin published two different codes for the same ``(origin, step, k)``.

    ``origin``, ``step`` and ``k`` name the scalar; ``known`` and ``received`` are the two codes.
    """

    def __init__(self, origin: str, step: int, k: int, known: int, received: int) -> None:
        self.origin, self.step, self.k, self.known, self.received = origin, step, k, known, received
        super().__init__(f"origin {origin} equivocated on step {step}, k {k}: code {known} then {received}")


class BannedOrigin(SpsaError):
    """A batch from an origin that this log has banned."""


# --------------------------------------------------------------------------- seeds and codes


def derive_seed(origin: str, step: int, k: int) -> int:
    """Return the 63-bit perturbation seed of scalar ``k`` of ``origin``'s step ``step``.

    ``blake2b(len(o) as 2-byte LE ‖ o ‖ step as 8-byte LE ‖ k as 4-byte LE, digest 8 bytes,
    person = b"p2pnode-spsa-v1")`` read little-endian, top bit cleared; ``o`` is the origin's
    UTF-8 bytes. Pure and stable across hosts, Python versions and byte orders.

    Raises
    ------
    ValueError
        ``origin`` is empty or longer than 128 characters, ``step`` is not in ``[0, 2**63)`` or
        ``k`` not in ``[0, 2**32)``.
    """
    raw = origin.encode() if isinstance(origin, str) else b""
    if not 0 < len(origin) <= MAX_NAME_CHARS:
        raise ValueError(f"origin must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    if not is_counter(step) or type(k) is not int or not 0 <= k < 2**32:
        raise ValueError(f"step must be in [0, 2**63) and k in [0, 2**32), got {step!r}, {k!r}")
    message = len(raw).to_bytes(2, "little") + raw + step.to_bytes(8, "little") + k.to_bytes(4, "little")
    digest = hashlib.blake2b(message, digest_size=8, person=_SEED_PERSON).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def encode_scalar(g: float) -> int:
    """Return the one-byte code (0..255) of ``g`` (see the module docstring).

    Raises
    ------
    ValueError
        ``g`` is NaN.
    """
    return int(encode_scalars(np.asarray([g], dtype=np.float64))[0])


def decode_scalar(code: int) -> float:
    """Return the scalar ``ĝ`` that the one-byte ``code`` stands for.

    Raises
    ------
    ValueError
        ``code`` is not an int in ``0..255``.
    """
    if type(code) is not int or not 0 <= code <= 255:
        raise ValueError(f"code must be an int in 0..255, got {code!r}")
    return float(DECODE_TABLE[code])


def encode_scalars(values: Any) -> npt.NDArray[np.uint8]:
    """Vectorised :func:`encode_scalar`: any array-like (numpy array, CPU/CUDA tensor, list).

    Returns a uint8 array of the same shape.

    Raises
    ------
    ValueError
        Any value is NaN.
    """
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    g = np.asarray(values, dtype=np.float64)
    if np.isnan(g).any():
        raise ValueError("cannot encode NaN")
    magnitude = np.abs(g)
    with np.errstate(divide="ignore"):
        log_mag = np.log(magnitude)  # -inf for 0, +inf for inf: both clamp below
    q = np.clip(np.floor(SCALE * log_mag + 0.5), Q_MIN, Q_MAX).astype(np.int64)
    sign = np.where(g < 0, 0x80, 0)
    return (sign | (q - Q_MIN)).astype(np.uint8)


def decode_scalars(codes: Any) -> npt.NDArray[np.float64]:
    """Vectorised :func:`decode_scalar`: ``bytes`` or an integer array-like of codes 0..255.

    Raises
    ------
    ValueError
        A code is outside ``0..255``.
    """
    if isinstance(codes, bytes | bytearray | memoryview):
        idx = np.frombuffer(bytes(codes), dtype=np.uint8)
    else:
        if hasattr(codes, "detach"):
            codes = codes.detach().cpu().numpy()
        idx = np.asarray(codes)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() > 255):
            raise ValueError("codes must be integers in 0..255")
    return DECODE_TABLE[idx.astype(np.int64)]


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True)
class ScalarBatch:
    """The codes of ``n_steps`` consecutive steps of one origin, ``k`` codes per step.

    ``codes[i * k + j]`` is the code of scalar ``j`` of step ``start + i``. ``sealed`` holds the
    origin-signed envelope this batch came in (forward these exact bytes), or ``None`` for an
    unsigned batch; it takes no part in equality.

    Raises
    ------
    ValueError
        On construction, for an empty origin, a bad counter or ``len(codes)`` not a positive
        multiple of ``k``.
    """

    origin: str
    start: int
    k: int
    codes: bytes
    sealed: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not 0 < len(self.origin) <= MAX_NAME_CHARS:
            raise ValueError(f"origin must be a non-empty string of at most {MAX_NAME_CHARS} characters")
        if type(self.k) is not int or not 0 < self.k <= MAX_K:
            raise ValueError(f"k must be an int in [1, {MAX_K}], got {self.k!r}")
        if not isinstance(self.codes, bytes) or not self.codes or len(self.codes) % self.k:
            raise ValueError(f"codes must be non-empty bytes, a multiple of k={self.k} long")
        if not (is_counter(self.start) and is_counter(self.start + self.n_steps)):
            raise ValueError(f"steps {self.start}..+{self.n_steps} are outside [0, 2**63)")

    @property
    def n_steps(self) -> int:
        """Number of steps covered."""
        return len(self.codes) // self.k

    @property
    def stop(self) -> int:
        """One past the last step covered."""
        return self.start + self.n_steps

    def step_codes(self, step: int) -> bytes:
        """The ``k`` codes of ``step`` (which must be in ``[start, stop)``)."""
        i = step - self.start
        return self.codes[i * self.k : (i + 1) * self.k]

    def scalars(self) -> Iterator[tuple[str, int, int, int]]:
        """Yield ``(origin, step, k, code)`` for every scalar, in step-major order."""
        for i, code in enumerate(self.codes):
            yield self.origin, self.start + i // self.k, i % self.k, code


def encode_batch(batch: ScalarBatch) -> bytes:
    """The payload of a sealed batch: ``0x02 | uvarint K | codes`` (origin and steps are in the envelope)."""
    return bytes([VERSION]) + uvarint(batch.k) + batch.codes


def max_batch_bytes(max_steps: int, max_k: int) -> int:
    """Largest batch payload of at most ``max_steps`` steps of at most ``max_k`` codes."""
    return max_steps * max_k + _BATCH_OVERHEAD


def decode_batch(data: bytes, *, origin: str, start: int, max_steps: int, max_k: int) -> ScalarBatch:
    """Parse a batch payload from untrusted bytes (``origin`` and ``start`` come from its envelope).

    Raises
    ------
    TooLarge
        ``data`` is longer than a batch within the limits can be (a :class:`SpsaError` too).
    SpsaError
        Anything malformed: version, ``K`` out of range, codes not a positive multiple of ``K``, more
        than ``max_steps`` steps, counters out of range.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SpsaError(f"batch must be bytes, got {type(data).__name__}")
    if len(data) > max_batch_bytes(max_steps, max_k):
        raise _TooLargeBatch(f"batch of {len(data)} bytes exceeds {max_batch_bytes(max_steps, max_k)}")
    data = bytes(data)
    if not data or data[0] != VERSION:
        raise SpsaError(f"unsupported batch version {data[:1]!r}")
    try:
        k, pos = read_uvarint(data, 1)
    except ProtocolError as exc:
        raise SpsaError(f"bad K: {exc}") from exc
    if not 0 < k <= min(max_k, MAX_K):
        raise SpsaError(f"k must be an int in [1, {min(max_k, MAX_K)}], got {k}")
    codes = data[pos:]
    n = len(codes) // k
    if not codes or len(codes) % k or n > max_steps:
        raise SpsaError(f"codes must be 1..{max_steps} steps of k={k} bytes, got {len(codes)} bytes")
    if not (isinstance(origin, str) and 0 < len(origin) <= MAX_NAME_CHARS):
        raise SpsaError("origin must be a non-empty string")
    if not (is_counter(start) and is_counter(start + n)):
        raise SpsaError(f"steps {start}..+{n} are outside [0, 2**63)")
    return ScalarBatch(origin=origin, start=start, k=k, codes=codes)


class _TooLargeBatch(SpsaError, TooLarge):
    """Both a :class:`SpsaError` and a :class:`~protocols.errors.TooLarge`."""


def seal_batch(signer: Signer, batch: ScalarBatch, *, swarm: str) -> bytes:
    """Sign ``batch`` as its origin, for ``swarm``; the result may be forwarded verbatim.

    Raises
    ------
    ValueError
        ``signer`` is not the batch's origin (only an origin can sign its scalars).
    """
    if signer.peer_id != batch.origin:
        raise ValueError(f"signer {signer.peer_id} is not the batch origin {batch.origin}")
    return seal(signer, kind=ENVELOPE_KIND, swarm=swarm, round=batch.start, seq=batch.stop - 1,
                payload=encode_batch(batch))


def max_sealed_bytes(max_steps: int, max_k: int) -> int:
    """Largest sealed batch that :func:`open_batch` accepts with these limits."""
    return max_batch_bytes(max_steps, max_k) + MAX_OVERHEAD


def open_batch(data: bytes, *, swarm: str, max_steps: int, max_k: int) -> ScalarBatch:
    """Verify and parse a sealed batch, received from its origin or from any forwarder.

    Order: size bound, Ed25519 signature of the envelope sender (the origin), only then the envelope
    fields and the batch payload; finally the envelope's ``seq`` must be the batch's last step. The
    returned batch carries ``sealed=data`` for forwarding.

    Raises
    ------
    SpsaError
        For anything invalid; the envelope's own errors (``BadSignature``, ``TooLarge``...) are
        re-raised as :class:`SpsaError` with the original as ``__cause__``.
    """
    try:
        env = open_envelope(data, max_bytes=max_sealed_bytes(max_steps, max_k), swarm=swarm,
                            kinds=(ENVELOPE_KIND,))
    except ProtocolError as exc:
        raise SpsaError(f"bad batch envelope: {exc}") from exc
    batch = decode_batch(env.payload, origin=env.sender, start=env.round, max_steps=max_steps, max_k=max_k)
    if env.seq != batch.stop - 1:
        raise SpsaError("envelope counters do not match the batch steps")
    return ScalarBatch(origin=batch.origin, start=batch.start, k=batch.k, codes=batch.codes,
                       sealed=bytes(data))


# --------------------------------------------------------------------------- summaries


def origin_tag(origin: str) -> bytes:
    """The 8-byte name of ``origin`` in summaries."""
    return hashlib.blake2b(origin.encode(), digest_size=TAG_BYTES, person=_TAG_PERSON).digest()


def encode_summary(summary: Mapping[str, int | Holding]) -> bytes:
    """Serialise an anti-entropy summary, ``{origin: prefix}`` or ``{origin: (prefix, runs)}`` (module doc).

    Raises
    ------
    ValueError
        A prefix below −1, more than :data:`MAX_RUNS` runs, or runs that are not increasing, disjoint
        and separated from the prefix and from each other by a gap.
    """
    parts = [bytes([VERSION])]
    for origin, held in summary.items():
        prefix, runs = (held, ()) if isinstance(held, int) else held
        if len(runs) > MAX_RUNS:
            raise ValueError(f"at most {MAX_RUNS} runs per origin, got {len(runs)}")
        parts += [origin_tag(origin), uvarint(prefix + 1), uvarint(len(runs))]
        end = prefix
        for first, last in runs:
            if not end + 2 <= first <= last:
                raise ValueError(f"run {first}..{last} does not start after a gap past step {end}")
            parts += [uvarint(first - end - 2), uvarint(last - first)]
            end = last
    return b"".join(parts)


def decode_summary(data: bytes, *, max_origins: int) -> dict[bytes, Holding]:
    """Parse a summary from untrusted bytes into ``{tag: (prefix, runs)}``.

    Resolve the tags with :meth:`ScalarLog.resolve`.

    Raises
    ------
    SpsaError
        Oversized (more than ``max_origins`` entries, checked by size first), a repeated tag, too many
        runs, steps past 2**63, or malformed.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SpsaError(f"summary must be bytes, got {type(data).__name__}")
    limit = 1 + max_origins * (TAG_BYTES + 10 + MAX_RUNS * 18)
    if len(data) > limit:
        raise _TooLargeBatch(f"summary of {len(data)} bytes exceeds {limit}")
    data = bytes(data)
    if not data or data[0] != VERSION:
        raise SpsaError(f"unsupported summary version {data[:1]!r}")
    out: dict[bytes, Holding] = {}
    pos = 1
    try:
        while pos < len(data):
            tag = data[pos : pos + TAG_BYTES]
            if len(tag) != TAG_BYTES:
                raise SpsaError("truncated summary tag")
            if tag in out:
                raise SpsaError("summary names an origin twice")
            if len(out) >= max_origins:
                raise SpsaError(f"summary names more than {max_origins} origins")
            value, pos = read_uvarint(data, pos + TAG_BYTES)
            n_runs, pos = read_uvarint(data, pos)
            if n_runs > MAX_RUNS:
                raise SpsaError(f"summary lists {n_runs} runs for one origin (at most {MAX_RUNS})")
            end, runs = value - 1, []
            for _ in range(n_runs):
                gap, pos = read_uvarint(data, pos)
                length, pos = read_uvarint(data, pos)
                first = end + 2 + gap
                end = first + length
                if not is_counter(end):
                    raise SpsaError("summary run goes past step 2**63")
                runs.append((first, end))
            out[tag] = (value - 1, tuple(runs))
    except SpsaError:
        raise
    except ProtocolError as exc:  # from read_uvarint
        raise SpsaError(f"bad summary: {exc}") from exc
    return out


# --------------------------------------------------------------------------- the scalar log


@dataclass(slots=True)
class _OriginLog:
    """What a log knows of one origin: all steps ``<= prefix`` are known (those ``< floor`` forgotten)."""

    prefix: int = -1
    floor: int = 0
    codes: dict[int, bytes] = field(default_factory=dict)  # step -> k codes, for steps >= floor
    signed: list[ScalarBatch] = field(default_factory=list)  # sealed batches kept for forwarding


def _covers_unsigned(log: _OriginLog, batch: ScalarBatch) -> bool:
    """True if ``batch`` covers a retained step that no stored signed batch covers."""
    steps = {s for s in range(max(batch.start, log.floor), batch.stop) if s in log.codes}
    for kept in log.signed:
        steps.difference_update(range(kept.start, kept.stop))
    return bool(steps)


class ScalarLog:
    """Every node's record of the scalars it has applied: exactly-once, equivocation, anti-entropy.

    Parameters
    ----------
    k:
        Scalars per step, shared by the swarm; a batch with another ``k`` is refused.
    max_origins:
        Most origins tracked. A new origin beyond it is refused (never evicted: forgetting an origin
        would make its scalars look new again and break exactly-once application).
    max_pending_steps:
        Receive window: a scalar for a step above ``prefix + max_pending_steps`` of its origin is
        refused, which bounds the steps held beyond a gap.
    max_retained_steps:
        Contiguous steps kept per origin to serve peers that lag; older ones are forgotten but
        remain *known* (their steps are ``<= prefix``), so they are never applied twice. A peer
        lagging further than this needs a model resync.

    Memory is O(max_origins · (max_pending_steps + max_retained_steps) · k) codes, plus the sealed
    batches that supplied them (each kept batch supplied at least one retained or pending step).
    A log is not thread-safe.
    """

    def __init__(self, *, k: int, max_origins: int = 1024, max_pending_steps: int = 4096,
                 max_retained_steps: int = 65_536) -> None:
        if type(k) is not int or not 0 < k <= MAX_K:
            raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
        if min(max_origins, max_pending_steps, max_retained_steps) < 1:
            raise ValueError("max_origins, max_pending_steps and max_retained_steps must be >= 1")
        self.k = k
        self.max_origins = max_origins
        self.max_pending_steps = max_pending_steps
        self.max_retained_steps = max_retained_steps
        self._origins: dict[str, _OriginLog] = {}
        self._banned: set[str] = set()
        self._tags: dict[bytes, str] = {}  # origin_tag -> origin, for every origin ever tracked

    @property
    def banned(self) -> frozenset[str]:
        """Origins whose batches are refused."""
        return frozenset(self._banned)

    def ban(self, origin: str) -> None:
        """Refuse ``origin``'s batches from now on and drop what is stored for it.

        Its already applied scalars stay applied (undoing them is the node's business: resync).
        """
        self._banned.add(origin)
        self._origins.pop(origin, None)

    def add(self, batch: ScalarBatch) -> list[tuple[str, int, int, int]]:
        """Record a batch; return its scalars not seen before, as ``(origin, step, k, code)``.

        The batch is checked as a whole before anything is recorded, so on any error nothing
        changes (except the ban after an equivocation).

        Raises
        ------
        BannedOrigin
            The origin is banned.
        Equivocation
            A code differs from a known one for the same ``(origin, step, k)``; the origin is banned.
        SpsaError
            Wrong ``k``, too many origins, or a step beyond the receive window.
        """
        origin = batch.origin
        if origin in self._banned:
            raise BannedOrigin(f"origin {origin} is banned")
        if batch.k != self.k:
            raise SpsaError(f"batch has k={batch.k}, this swarm uses k={self.k}")
        log = self._origins.get(origin)
        if log is None:
            if len(self._origins) >= self.max_origins:
                raise SpsaError(f"already tracking {self.max_origins} origins; {origin} refused")
            tag = origin_tag(origin)
            if self._tags.get(tag, origin) != origin:
                raise SpsaError(f"origin {origin} has the summary tag of {self._tags[tag]}; refused")
            log = _OriginLog()
        if batch.stop - 1 > log.prefix + self.max_pending_steps:
            raise SpsaError(f"step {batch.stop - 1} of {origin} is beyond the window "
                            f"(prefix {log.prefix} + {self.max_pending_steps})")
        new_steps = self._new_steps(log, batch)
        if batch.sealed is not None and (new_steps or _covers_unsigned(log, batch)):
            log.signed.append(batch)  # kept so that its origin-signed bytes can be forwarded
        if not new_steps:
            return []
        if origin not in self._origins:
            self._tags[origin_tag(origin)] = origin
        self._origins[origin] = log
        for step in new_steps:
            log.codes[step] = batch.step_codes(step)
        self._advance(log)
        return [(origin, step, j, code) for step in new_steps
                for j, code in enumerate(batch.step_codes(step))]

    def _new_steps(self, log: _OriginLog, batch: ScalarBatch) -> list[int]:
        new_steps = []
        for step in range(max(batch.start, log.floor), batch.stop):
            known, received = log.codes.get(step), batch.step_codes(step)
            if known is None:
                new_steps.append(step)
            elif known != received:
                j = next(j for j in range(self.k) if known[j] != received[j])
                self.ban(batch.origin)
                raise Equivocation(batch.origin, step, j, known[j], received[j])
        return new_steps

    def _advance(self, log: _OriginLog) -> None:
        while log.prefix + 1 in log.codes:
            log.prefix += 1
        new_floor = log.prefix + 1 - self.max_retained_steps
        if new_floor > log.floor:
            for step in range(log.floor, new_floor):
                log.codes.pop(step, None)
            log.floor = new_floor
            log.signed = [b for b in log.signed if b.stop > new_floor]

    def summary(self) -> dict[str, int]:
        """Per origin, the highest step ``t`` with every step ``<= t`` known (``-1``: step 0 missing)."""
        return {origin: log.prefix for origin, log in self._origins.items()}

    def holdings(self) -> dict[str, Holding]:
        """Per origin, ``(prefix, runs)``: the prefix of :meth:`summary` and up to :data:`MAX_RUNS` runs
        of steps held beyond it (the first ones; a peer may then resend some of the later ones)."""
        out: dict[str, Holding] = {}
        for origin, log in self._origins.items():
            runs: list[tuple[int, int]] = []
            for step in sorted(s for s in log.codes if s > log.prefix):
                if runs and step == runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], step)
                elif len(runs) < MAX_RUNS:
                    runs.append((step, step))
                else:
                    break
            out[origin] = (log.prefix, tuple(runs))
        return out

    def resolve(self, tagged: Mapping[bytes, Holding]) -> dict[str, Holding]:
        """A decoded summary ``{tag: prefix}`` as ``{origin: prefix}``; a tag this log never tracked
        becomes the key ``"#" + hex`` (it names no origin, and compares unequal to every summary of ours)."""
        return {self._tags.get(tag) or "#" + tag.hex(): prefix for tag, prefix in tagged.items()}

    def missing_for(
        self, peer_summary: Mapping[str, int | Holding], *, max_steps: int | None = None
    ) -> list[ScalarBatch]:
        """Batches holding what a peer with ``peer_summary`` lacks (steps above its prefix and outside
        its runs, when the summary gives ``(prefix, runs)``).

        Steps covered by a stored origin-signed batch are served as those batches (forward their
        ``sealed`` bytes); any other steps as unsigned batches, one per contiguous run. Steps this
        log has forgotten (below its retention floor) cannot be served. ``max_steps`` caps the
        steps served per origin (earliest first).
        """
        out: list[ScalarBatch] = []
        for origin, log in self._origins.items():
            held = peer_summary.get(origin, -1)
            peer_prefix, runs = (held, ()) if isinstance(held, int) else held
            wanted = sorted(s for s in log.codes
                            if s > peer_prefix and not any(a <= s <= b for a, b in runs))
            if max_steps is not None:
                wanted = wanted[:max_steps]
            out.extend(self._serve(origin, log, wanted))
        return out

    def _serve(self, origin: str, log: _OriginLog, wanted: list[int]) -> list[ScalarBatch]:
        remaining, out = set(wanted), []
        for batch in sorted(log.signed, key=lambda b: (b.start, -b.n_steps)):
            covered = remaining.intersection(range(batch.start, batch.stop))
            if covered:
                out.append(batch)
                remaining -= covered
        run: list[int] = []
        for step in sorted(remaining) + [-2]:
            if run and step != run[-1] + 1:
                codes = b"".join(log.codes[s] for s in run)
                out.append(ScalarBatch(origin=origin, start=run[0], k=self.k, codes=codes))
                run = []
            run.append(step)
        return out

    def state_dict(self) -> dict[str, Any]:
        """A plain snapshot (ints, strs, bytes, lists, dicts) for checkpoints; msgpack-able."""
        return {
            "v": VERSION, "k": self.k, "banned": sorted(self._banned),
            "origins": {origin: {"prefix": log.prefix, "floor": log.floor,
                                 "codes": sorted(log.codes.items()),
                                 "signed": [(b.start, b.codes, b.sealed) for b in log.signed]}
                        for origin, log in self._origins.items()},
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this log's content by a snapshot from :meth:`state_dict` (a trusted local file).

        Raises
        ------
        ValueError
            Wrong version or ``k``, or an inconsistent snapshot.
        """
        if state.get("v") != VERSION or state.get("k") != self.k:
            raise ValueError(f"snapshot has version {state.get('v')!r} and k {state.get('k')!r}, "
                             f"expected {VERSION} and {self.k}")
        origins: dict[str, _OriginLog] = {}
        for origin, entry in state["origins"].items():
            log = _OriginLog(prefix=int(entry["prefix"]), floor=int(entry["floor"]),
                             codes={int(s): bytes(c) for s, c in entry["codes"]})
            log.signed = [ScalarBatch(origin=origin, start=int(s), k=self.k, codes=bytes(c),
                                      sealed=None if sealed is None else bytes(sealed))
                          for s, c, sealed in entry["signed"]]
            if any(len(c) != self.k for c in log.codes.values()) or log.floor > log.prefix + 1:
                raise ValueError(f"inconsistent snapshot for origin {origin}")
            origins[origin] = log
        self._origins, self._banned = origins, set(state["banned"])
        self._tags = {origin_tag(o): o for o in [*origins, *self._banned]}
