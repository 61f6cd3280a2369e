"""``topk:RATIO[:WARMUP]``: top-k sparsification from Deep Gradient Compression (Lin et al., ICLR 2018).

Keeps the ``k = min(d, max(1, ceil(RATIO · d)))`` entries of largest ``|x|`` (``k = 0`` iff ``d = 0``),
ties broken arbitrarily. Selection follows DGC: a threshold is estimated from a random sample of
65,536 entries of ``|x|`` (fixed seed, so encoding is deterministic) aimed at ~1.25 k candidates,
the candidates ``|x| >= threshold`` are gathered and a partial sort on them gives exactly ``k`` (a
partial sort of all of ``|x|`` when the sample undershoots, ``4 k >= d`` or ``d < 2**17``). On
25.6 M elements this is several times faster than ``torch.topk`` on all of them.

Wire (little-endian)::

    header (16, param 0) | k: u64 | scale: f32 | k fp16 values v_i / scale | Elias-Fano indices

with ``scale = max |v_i|`` (so the fp16 values lie in [-1, 1]; 0 if all are zero), the indices
strictly increasing and coded as in :mod:`protocols.codecs.eliasfano`, so::

    wire_bytes = 28 + 2 k + ceil(k l / 8) + ceil((k + ((d - 1) >> l) + 1) / 8),  l = floor(log2(d / k))

about ``k (2 + (2 + log2(d / k)) / 8) + 28`` bytes: at RATIO 0.01 ~3.07 bytes per kept entry, 130×
smaller than fp32. Kept values have relative error <= 2**-11 (abs <= 2**-25 · scale), dropped
ones are lost (use :class:`protocols.codecs.feedback.ErrorFeedback`).

Sparsity warm-up (DGC §3.3) needs a stream state (:meth:`TopKCodec.new_state`): over the first
``WARMUP`` calls (default 0, none) the kept density goes ``max(RATIO, 4**-(s + 1))`` for stage
``s = 4 · step // WARMUP`` in 0..3, i.e. 75 %, 93.75 %, 98.4375 %, 99.6 % sparsity, then ``RATIO``.
``k`` is in the payload, so decoders accept any ``1 <= k <= d``; :meth:`wire_bytes` gives the size
for ``RATIO``, :meth:`TopKCodec.payload_bytes` for any ``k``. Momentum correction, momentum factor
masking and gradient clipping live in :class:`~protocols.codecs.feedback.ErrorFeedback`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import eliasfano, wire
from protocols.codecs.base import Codec, CodecError, Layout
from protocols.codecs.fp16 import FP16_EXPONENT

_COUNT = struct.Struct("<Qf")
_PREFIX = wire.HEADER_BYTES + _COUNT.size  # 28
_EXACT_BELOW = 1 << 17  # below this many elements torch.topk on everything is as fast
_SAMPLE = 1 << 16


@dataclass
class TopKState:
    """Stream state of a top-k encoder: the call counter that drives sparsity warm-up."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        """``{"step": int}``."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.step = int(state["step"])


def keep_count(ratio: float, d: int) -> int:
    """``k = min(d, max(1, ceil(ratio · d)))``, and 0 for ``d == 0``.

    The product is rounded to 9 decimals first so that ``0.01 · 300`` gives 3, not 4.
    """
    return min(d, max(1, math.ceil(round(ratio * d, 9)))) if d else 0


def select(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 indices of ``k`` largest entries of the 1-D ``magnitude`` (DGC sampled threshold).

    numpy rather than torch: on CPU ``np.sort``/``np.flatnonzero`` are 10-100× faster than
    ``Tensor.sort``/``torch.nonzero`` on these sizes.
    """
    d = magnitude.size
    if d >= _EXACT_BELOW and 4 * k < d:
        sample = magnitude[np.random.default_rng(0).integers(0, d, _SAMPLE)]
        target = min(_SAMPLE, math.ceil(1.25 * k * _SAMPLE / d) + 8)
        threshold = np.partition(sample, _SAMPLE - target)[_SAMPLE - target]
        candidates = np.flatnonzero(magnitude >= threshold)
        if candidates.size >= k:
            chosen = np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k:]
            return np.sort(candidates[chosen])
    return np.sort(np.argpartition(magnitude, d - k)[d - k:]) if k else np.zeros(0, dtype=np.int64)


def select_tensor(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`select` on a tensor's device: the same sample, threshold and candidates; sorted int64."""
    d = magnitude.numel()
    if d >= _EXACT_BELOW and 4 * k < d:
        picks = torch.from_numpy(np.random.default_rng(0).integers(0, d, _SAMPLE)).to(magnitude.device)
        target = min(_SAMPLE, math.ceil(1.25 * k * _SAMPLE / d) + 8)
        threshold = torch.kthvalue(magnitude[picks], _SAMPLE - target + 1).values  # np.partition's pick
        candidates = torch.nonzero(magnitude >= threshold).view(-1)
        if candidates.numel() >= k:
            chosen = torch.topk(magnitude[candidates], k, sorted=False).indices
            return torch.sort(candidates[chosen]).values
    if not k:
        return torch.zeros(0, dtype=torch.int64, device=magnitude.device)
    return torch.sort(torch.topk(magnitude, k, sorted=False).indices).values


class TopKCodec(Codec):
    """DGC top-k with fp16 values and Elias-Fano indices; ``wire_bytes`` in the module docstring."""

    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = 6
    usage: ClassVar[str] = "topk:RATIO[:WARMUP]  (0 < RATIO <= 1; WARMUP calls of warm-up, default 0)"

    def __init__(self, ratio: float, warmup: int = 0) -> None:
        if not (isinstance(ratio, float | int) and 0 < ratio <= 1):
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
        if type(warmup) is not int or warmup < 0:
            raise ValueError(f"topk warm-up must be a non-negative int, got {warmup!r}")
        self.ratio = float(ratio)
        self.warmup = warmup
        self.spec = f"topk:{self.ratio:g}" + (f":{warmup}" if warmup else "")

    @classmethod
    def from_args(cls, args: list[str]) -> TopKCodec:
        try:
            if len(args) not in (1, 2) or (len(args) == 2 and not args[1].isdigit()):
                raise ValueError
            return cls(float(args[0]), int(args[1]) if len(args) == 2 else 0)
        except ValueError:
            raise ValueError(f"usage: {cls.usage}") from None

    def new_state(self, layout: Layout) -> TopKState:
        return TopKState()

    def density(self, step: int) -> float:
        """Kept fraction at call ``step`` of a stream (the warm-up schedule)."""
        if step >= self.warmup:
            return self.ratio
        return max(self.ratio, 0.25 ** (4 * step // self.warmup + 1))

    @staticmethod
    def payload_bytes(d: int, k: int) -> int:
        """Exact payload length for ``k`` kept entries out of ``d``."""
        low, high = eliasfano.encoded_bytes(d, k)
        return _PREFIX + 2 * k + low + high

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if state is not None and not isinstance(state, TopKState):
            raise ValueError(f"topk needs a TopKState, got {type(state).__name__}")
        array = None if wire.off_host(x) else wire.to_host(x).detach().numpy()
        if array is None:
            wire.check_finite_tensor(x)
        else:
            wire.check_finite_input(array)
        d = layout.numel
        k = keep_count(self.density(state.step) if state is not None else self.ratio, d)
        if state is not None:
            state.step += 1
        if array is None:
            return self._encode_off_host(x.detach(), layout, k)
        indices = select(np.abs(array), k).astype(np.int64, copy=False)
        values = array[indices]
        scale = float(np.abs(values).max()) if k else 0.0
        half = (values / np.float32(scale) if scale > 0 else values).astype(np.float16)
        return wire.join(wire.header(self.codec_id, 0, layout), _COUNT.pack(k, scale),
                         wire.to_le_bytes(half).data, eliasfano.encode(indices, d))

    def _encode_off_host(self, x: torch.Tensor, layout: Layout, k: int) -> bytes:
        """:meth:`encode`'s selection and scaling on the tensor's device; only k values and indices are
        copied, and the indices are Elias-Fano coded on the host."""
        indices = select_tensor(x.abs(), k)
        values = x[indices]
        scale = float(values.abs().max()) if k else 0.0
        # a divisor on the device, not a Python float: CUDA multiplies by the reciprocal of a host scalar
        half = (values / values.new_tensor(scale) if scale > 0 else values).half()
        coded = eliasfano.encode(indices.cpu().numpy(), layout.numel)
        return wire.join(wire.header(self.codec_id, 0, layout), _COUNT.pack(k, scale),
                         wire.to_le_bytes(half.cpu().numpy()).data, coded)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        indices, values = self._parse(data, layout)
        if device is not None:  # the k values and indices are copied; the zeros are made there
            out_t = torch.zeros(layout.numel, dtype=torch.float32, device=device)
            if len(indices):
                out_t[torch.from_numpy(indices).to(device)] = torch.from_numpy(values).to(device)
            return out_t
        out = np.zeros(layout.numel, dtype=np.float32)
        out[indices] = values
        return torch.from_numpy(out)

    def _parse(self, data: bytes, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
        """The checked indices (strictly increasing int64) and fp32 values of a payload (CodecError)."""
        view = wire.as_buffer(data)
        d = layout.numel
        wire.check_header(view, self.codec_id, 0, layout, _PREFIX)
        k, scale = _COUNT.unpack_from(view, wire.HEADER_BYTES)
        if not (1 <= k <= d or k == d == 0):
            raise CodecError(f"topk count {k} out of range for {d} elements")
        wire.check_length(view, self.payload_bytes(d, k))
        if not (math.isfinite(scale) and scale >= 0):
            raise CodecError("topk scale must be finite and non-negative")
        bits = wire.le_array(view, "u2", _PREFIX, k)
        wire.check_half_bits(bits, FP16_EXPONENT, "topk values")
        with np.errstate(all="ignore"):  # overflow shows up as Inf, refused below
            values = bits.view(np.float16).astype(np.float32) * np.float32(scale)
        wire.check_finite(values, "topk values")
        low, high = eliasfano.encoded_bytes(d, k)
        start = _PREFIX + 2 * k
        indices = eliasfano.decode(np.frombuffer(view, np.uint8, low, start),
                                   np.frombuffer(view, np.uint8, high, start + low), d, k)
        return indices, values

    def wire_bytes(self, layout: Layout) -> int:
        return self.payload_bytes(layout.numel, keep_count(self.ratio, layout.numel))
