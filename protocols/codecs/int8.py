"""``int8[:BLOCK]``: blockwise absmax 8-bit quantisation (symmetric, round to nearest).

The flat vector is cut into blocks of ``B`` consecutive elements (default 256, a power of two in
[16, 65536]; the last block may be short, blocks ignore layer boundaries). Block ``j`` has the fp32
scale ``s_j = max|x_block| / 127`` and codes ``q_i = round(x_i / s_j)`` in [-127, 127]; the
decoder returns ``q_i * s_j``, so ``|x̂_i - x_i| <= s_j / 2`` (plus fp32 rounding).

Wire: 16-byte header (param = log2 B) + ``ceil(d / B)`` little-endian float32 scales + ``d`` int8
codes; ``wire_bytes = 16 + 4 ceil(d / B) + d``. The decoder refuses the code -128, negative or
non-finite scales, and scales above ``FLT_MAX / 127`` (the product would overflow).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, CodecError, Layout

MAX_SCALE = float(np.finfo(np.float32).max) / 127.0
CHUNK = 1 << 16  # elements per encoder chunk (256 KiB of fp32)


class Int8Codec(Codec):
    """Blockwise absmax int8 with one fp32 scale per block; ``wire_bytes = 16 + 4 ceil(d/B) + d``."""

    name: ClassVar[str] = "int8"
    codec_id: ClassVar[int] = 4
    usage: ClassVar[str] = "int8[:BLOCK]  (BLOCK a power of two in [16, 65536], default 256)"

    def __init__(self, block: int = 256) -> None:
        if type(block) is not int or block < 16 or block > 65536 or block & (block - 1):
            raise ValueError(f"int8 block must be a power of two in [16, 65536], got {block!r}")
        self.block = block
        self.log_block = block.bit_length() - 1
        self.spec = "int8" if block == 256 else f"int8:{block}"

    @classmethod
    def from_args(cls, args: list[str]) -> Int8Codec:
        if len(args) > 1 or (args and not args[0].isdigit()):
            raise ValueError(f"usage: {cls.usage}")
        return cls(int(args[0])) if args else cls()

    def _blocks(self, d: int) -> int:
        return -(-d // self.block)

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if wire.off_host(x):
            return self._encode_off_host(x.detach(), layout)
        flat = wire.to_host(x).detach().reshape(-1)
        d, block, nblocks = layout.numel, self.block, self._blocks(layout.numel)
        head = wire.header(self.codec_id, self.log_block, layout)
        out = bytearray(len(head) + 4 * nblocks + d)  # scales and codes are written straight into it
        out[: len(head)] = head
        if d == 0:
            return out  # type: ignore[return-value]
        # the host is little-endian, as wire.pack assumes
        scales = torch.frombuffer(out, dtype=torch.float32, offset=len(head), count=nblocks)
        codes = torch.frombuffer(out, dtype=torch.int8, offset=len(head) + 4 * nblocks, count=d)
        # chunks of whole blocks small enough to stay in cache: each pass after the first reads the chunk
        # from cache instead of memory (with torch's vectorised kernels, 1.4x numpy's throughput and about
        # 4x that of whole-array passes on 25.6M elements)
        step = max(block, CHUNK // block * block)
        scratch = torch.empty(min(step, d), dtype=torch.float32)
        for start in range(0, d, step):
            stop = min(start + step, d)
            first = start // block
            self._encode_chunk(flat[start:stop], scales[first: first + -(-(stop - start) // block)],
                               codes[start:stop], scratch[: stop - start])
        return out  # type: ignore[return-value]  # bytearray: bytes-like, one copy less than bytes(out)

    def _encode_chunk(self, part: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor,
                      scratch: torch.Tensor) -> None:
        """Scales and codes of whole blocks ``part`` (the array's last block may be short)."""
        n, block = len(part), self.block
        full = n // block * block
        rows = [(part[:full].view(-1, block), scales[: full // block], scratch[:full].view(-1, block),
                 codes[:full])] if full else []
        if full < n:
            rows.append((part[full:].view(1, -1), scales[full // block:], scratch[full:].view(1, -1),
                         codes[full:]))
        for blocks, scale, quotient, code in rows:
            torch.amax(blocks.abs(), dim=1, out=scale)
            if not bool(torch.isfinite(scale).all()):
                raise ValueError("codec input contains NaN or Inf")
            scale.div_(127.0)
            torch.div(blocks, torch.where(scale > 0, scale, 1.0)[:, None], out=quotient)
            quotient.round_().clamp_(-127, 127)  # round half to even, as the device path and np.rint
            code.copy_(quotient.view(-1))  # float to int8: exact, the values are integers in [-127, 127]

    def _encode_off_host(self, x: torch.Tensor, layout: Layout) -> bytes:
        """:meth:`encode` on the tensor's device (same arithmetic); only scales and codes are copied."""
        d, block = layout.numel, self.block
        full = d // block * block
        parts = [x[:full].view(-1, block)] + ([x[full:].view(1, -1)] if full < d else [])
        # max|x| / 127 as the host path; a divisor on the device (CUDA multiplies by a host scalar's inverse)
        scales = [part.abs().amax(dim=1) / part.new_tensor(127.0) for part in parts]
        if not bool(torch.isfinite(torch.cat(scales)).all()):
            raise ValueError("codec input contains NaN or Inf")
        codes = []
        for part, scale in zip(parts, scales):
            quotient = part / torch.where(scale > 0, scale, 1)[:, None]
            codes.append(quotient.round_().clamp_(-127, 127).to(torch.int8))  # round half to even, as rint
        return wire.pack(wire.header(self.codec_id, self.log_block, layout), *scales, *codes)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, self.log_block, layout, wire.HEADER_BYTES)
        d, block, nblocks = layout.numel, self.block, self._blocks(layout.numel)
        scales = wire.le_array(view, "f4", wire.HEADER_BYTES, nblocks)
        if not bool(((scales >= 0) & (scales <= MAX_SCALE)).all()):  # also false for NaN
            raise CodecError("int8 scales must be finite, non-negative and at most FLT_MAX / 127")
        if device is not None:
            return self._decode_on(torch.device(device), view, scales, d)
        codes = np.frombuffer(view, dtype=np.int8, count=d, offset=wire.HEADER_BYTES + 4 * nblocks)
        if bool((codes == -128).any()):
            raise CodecError("int8 code -128 is not used by this codec")
        out = codes.astype(np.float32)
        full = d // block * block
        blocks = out[:full].reshape(-1, block)  # a view: scaled in place
        blocks *= scales[: full // block, None]
        if full < d:
            out[full:] *= scales[-1]
        return torch.from_numpy(out)

    def _decode_on(self, device: torch.device, view: memoryview, scales: np.ndarray, d: int) -> torch.Tensor:
        """The rest of :meth:`decode` on ``device``: codes copied there, checked and scaled there."""
        codes = wire.to_device(view, torch.int8, wire.HEADER_BYTES + 4 * len(scales), d, device)
        if bool((codes == -128).any()):
            raise CodecError("int8 code -128 is not used by this codec")
        out = codes.float()
        scale = torch.from_numpy(scales.copy()).to(device)
        full = d // self.block * self.block
        out[:full].view(-1, self.block).mul_(scale[: full // self.block, None])
        if full < d:
            out[full:] *= scale[-1]
        return out

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 4 * self._blocks(layout.numel) + layout.numel
