"""``terngrad[:SEED]``: TernGrad (Wen et al., NeurIPS 2017), per-layer scale × {-1, 0, +1}.

For layer ``l`` with ``s_l = max_i |x_i|``, element ``i`` becomes ``s_l · sign(x_i) · b_i`` with
``b_i ~ Bernoulli(|x_i| / s_l)``, so ``E[x̂] = x`` (stochastic rounding; the gradient clipping of the
paper is left to the caller). The Bernoulli draws ``b_i = [u_i < |x_i| / s_l]`` use ``u = torch.rand(d,
generator=g)``: with a stream state (:meth:`TernGradCodec.new_state`) ``g`` is a ``torch.Generator``
seeded with ``SEED`` once and carried across calls; with ``state=None`` a generator seeded with
``SEED`` is made for each call, so repeated stateless calls on the same input give the same payload.

Wire: 16-byte header (param 0) + ``L`` little-endian float32 layer scales + ``ceil(d / 4)`` bytes of
2-bit codes (element ``4j + t`` in bits ``2t..2t+1`` of byte ``j``; 0 → 0, 1 → +s, 2 → -s; code 3 and
non-zero padding are refused); ``wire_bytes = 16 + 4 L + ceil(d / 4)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, CodecError, Layout

_VALUES = np.array([0.0, 1.0, -1.0, 0.0], dtype=np.float32)
# _BYTE_VALUES[b] are the four values (before scaling) that the packed byte b stands for.
_BYTE_VALUES = _VALUES[(np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3]


@dataclass
class TernGradState:
    """The random stream of one encoder: a seeded ``torch.Generator``."""

    seed: int
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict[str, Any]:
        """``{"seed": int, "generator": ByteTensor}``."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


def pack_pairs(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 codes in 0..3 (length a multiple of 4) four to a byte, the first in the low bits.

    Each little-endian word ``c0 + c1·2^8 + c2·2^16 + c3·2^24`` times ``2^24 + 2^18 + 2^12 + 2^6``
    has ``c0 + 4 c1 + 16 c2 + 64 c3`` in its top byte (the other partial products land below bit
    24 without overlapping, or above bit 31), so one multiply and one shift pack a whole word.
    """
    words = codes.view("<u4")
    return ((words * np.uint32(0x01041040)) >> np.uint32(24)).astype(np.uint8)


def parse_seed(usage: str, args: list[str]) -> int:
    """The optional non-negative integer ``SEED`` argument; ``ValueError`` with ``usage`` otherwise."""
    if len(args) > 1 or (args and not args[0].isdigit()):
        raise ValueError(f"usage: {usage}")
    return int(args[0]) if args else 0


class TernGradCodec(Codec):
    """Stochastic ternary quantisation, 2 bits per element; ``wire_bytes = 16 + 4 L + ceil(d/4)``."""

    name: ClassVar[str] = "terngrad"
    codec_id: ClassVar[int] = 5
    usage: ClassVar[str] = "terngrad[:SEED]  (SEED a non-negative int for the rounding stream, default 0)"

    def __init__(self, seed: int = 0) -> None:
        if type(seed) is not int or seed < 0:
            raise ValueError(f"terngrad seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self.spec = "terngrad" if seed == 0 else f"terngrad:{seed}"

    @classmethod
    def from_args(cls, args: list[str]) -> TernGradCodec:
        return cls(parse_seed(cls.usage, args))

    def new_state(self, layout: Layout) -> TernGradState:
        return TernGradState(self.seed)

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if state is not None and not isinstance(state, TernGradState):
            raise ValueError(f"terngrad needs a TernGradState, got {type(state).__name__}")
        generator = state.generator if state is not None else torch.Generator().manual_seed(self.seed)
        if wire.off_host(x):
            return self._encode_off_host(x.detach(), layout, generator)
        array = wire.to_host(x).detach().numpy()
        magnitude = np.abs(array)
        scales = np.zeros(len(layout.shapes), dtype=np.float32)
        for i, (start, end) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            if end > start:
                scales[i] = magnitude[start:end].max()
                if not np.isfinite(scales[i]):
                    raise ValueError("codec input contains NaN or Inf")
                if scales[i] > 0:
                    magnitude[start:end] /= scales[i]  # now the probability |x| / s of a non-zero
        keep = np.less(torch.rand(layout.numel, generator=generator).numpy(), magnitude)
        codes = np.zeros(-(-layout.numel // 4) * 4, dtype=np.uint8)
        np.left_shift(keep.view(np.uint8), np.signbit(array).view(np.uint8), out=codes[: layout.numel])
        packed = pack_pairs(codes)
        return wire.join(wire.header(self.codec_id, 0, layout), wire.to_le_bytes(scales).data,
                         packed.data)

    def _encode_off_host(self, x: torch.Tensor, layout: Layout, generator: torch.Generator) -> bytes:
        """:meth:`encode` on the tensor's device; only the layer scales and the packed codes are copied.

        The uniforms come from a generator on the device, seeded by one draw from ``generator`` (the
        stream's CPU generator, or a fresh one seeded with SEED), so device payloads are reproducible
        but are not the CPU path's.
        """
        device, d = x.device, layout.numel
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        magnitude = x.abs()
        scales = torch.zeros(len(layout.shapes), dtype=torch.float32, device=device)
        for i, (start, end) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            if end > start:
                scales[i] = magnitude[start:end].amax()
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("codec input contains NaN or Inf")
        codes = torch.zeros(-(-d // 4) * 4, dtype=torch.uint8, device=device)
        if d:
            sizes = torch.tensor(layout.sizes(), dtype=torch.int64, device=device)
            per_element = torch.repeat_interleave(scales, sizes, output_size=d)  # (d,) the layer's s
            probability = magnitude.div_(torch.where(per_element > 0, per_element, 1))
            uniform = torch.rand(d, generator=torch.Generator(device=device).manual_seed(seed), device=device)
            keep = (uniform < probability).to(torch.uint8)
            codes[:d] = keep << torch.signbit(x).to(torch.uint8)  # 0, 1 (+s) or 2 (-s)
        quads = codes.view(-1, 4)
        packed = quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)
        return wire.pack(wire.header(self.codec_id, 0, layout), scales, packed)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, 0, layout, wire.HEADER_BYTES)
        d, nlayers = layout.numel, len(layout.shapes)
        scales = wire.le_array(view, "f4", wire.HEADER_BYTES, nlayers)
        if not bool(((scales >= 0) & (scales <= np.finfo(np.float32).max)).all()):
            raise CodecError("terngrad scales must be finite and non-negative")
        packed = np.frombuffer(view, dtype=np.uint8, offset=wire.HEADER_BYTES + 4 * nlayers)
        pad = 4 * len(packed) - d
        if device is not None:
            return self._decode_on(torch.device(device), view, layout, scales, len(packed), pad)
        if bool((packed & (packed >> 1) & 0x55).any()):
            raise CodecError("terngrad code 3 is not used by this codec")
        if pad and int(packed[-1]) >> (2 * (4 - pad)):
            raise CodecError("terngrad padding codes must be zero")
        out = _BYTE_VALUES[packed].reshape(-1)[:d]
        for scale, start, end in zip(scales, layout.offsets[:-1], layout.offsets[1:]):
            out[start:end] *= scale
        return torch.from_numpy(out)

    def _decode_on(self, device: torch.device, view: memoryview, layout: Layout, scales: np.ndarray,
                   nbytes: int, pad: int) -> torch.Tensor:
        """The rest of :meth:`decode` on ``device``: the packed codes copied there, checked, expanded."""
        d = layout.numel
        if pad and view[-1] >> (2 * (4 - pad)):
            raise CodecError("terngrad padding codes must be zero")
        packed = wire.to_device(view, torch.uint8, wire.HEADER_BYTES + 4 * len(scales), nbytes, device)
        if bool((packed & (packed >> 1) & 0x55).any()):
            raise CodecError("terngrad code 3 is not used by this codec")
        table = torch.from_numpy(_BYTE_VALUES).to(device)  # (256, 4)
        out = table[packed.long()].reshape(-1)[:d]  # (d,)
        if d:
            sizes = torch.tensor(layout.sizes(), dtype=torch.int64, device=device)
            scale = torch.from_numpy(scales.copy()).to(device)
            out *= torch.repeat_interleave(scale, sizes, output_size=d)
        return out

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 4 * len(layout.shapes) + -(-layout.numel // 4)
