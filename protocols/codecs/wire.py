"""Shared wire helpers: the 16-byte header, input checks, finiteness checks, little-endian views.

Header (16 bytes, little-endian, ``struct`` format ``<BBBBIQ``)::

    magic 0xCD | version 1 | codec id | codec parameter byte | layout CRC-32 (u32) | numel (u64)

The parameter byte is codec specific (``int8``: log2 of the block size, ``powersgd``: the rank,
others 0). A decoder checks every field against its own configuration and the local layout.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from typing import Any

import numpy as np
import torch

from protocols.codecs.base import CodecError, Layout

MAGIC = 0xCD
VERSION = 1
HEADER = struct.Struct("<BBBBIQ")
HEADER_BYTES = HEADER.size  # 16
LITTLE = sys.byteorder == "little"


def check_input(x: torch.Tensor, layout: Layout) -> None:
    """Refuse anything but a 1-D float32 tensor of ``layout.numel`` elements (on the CPU or a device).

    Raises
    ------
    ValueError
        Wrong type, shape or dtype.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.dtype != torch.float32 or x.numel() != layout.numel:
        raise ValueError(f"expected a 1-D float32 tensor of {layout.numel} elements, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")


def off_host(x: torch.Tensor) -> bool:
    """``x`` lives on an accelerator: the codec then computes there and copies only its compact result.

    The device paths write little-endian payloads through native views, so a big-endian host (no CUDA
    host is one) sends device tensors through the host path after one copy (see :func:`to_host`).
    """
    return x.device.type != "cpu" and LITTLE


def to_host(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU (itself when it is there already)."""
    return x if x.device.type == "cpu" else x.cpu()


def check_finite_input(array: np.ndarray) -> None:
    """Raise ``ValueError`` if a float array holds NaN or Inf (encoders refuse such input)."""
    if not bool(np.isfinite(array).all()):
        raise ValueError("codec input contains NaN or Inf")


def check_finite_tensor(x: torch.Tensor) -> None:
    """:func:`check_finite_input` for a tensor on any device (one reduction there, one sync)."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("codec input contains NaN or Inf")


def pack(head: bytes, *tensors: torch.Tensor) -> bytes:
    """``head`` then the raw bytes of each tensor (any device, native little-endian), one copy each.

    Each tensor is copied from its device straight into the payload buffer, so a device encoder moves
    only its compact result (fp16 halves, int8 codes, packed bits) and nothing is copied twice.
    """
    sizes = [t.numel() * t.element_size() for t in tensors]
    out = bytearray(len(head) + sum(sizes))
    out[: len(head)] = head
    pos = len(head)
    for t, size in zip(tensors, sizes):
        if size:
            torch.frombuffer(out, dtype=t.dtype, offset=pos, count=t.numel()).copy_(t.reshape(-1))
        pos += size
    return out  # type: ignore[return-value]  # bytearray: bytes-like, one copy less than bytes(out)


def to_device(view: memoryview, dtype: torch.dtype, offset: int, count: int,
              device: torch.device) -> torch.Tensor:
    """``count`` little-endian items of ``dtype`` at ``offset`` of a payload, as a new tensor on ``device``.

    Callers have checked the length already. One copy: host bytes straight to the device.
    """
    if count == 0:
        return torch.empty(0, dtype=dtype, device=device)
    if not LITTLE:
        np_dtype = {torch.float32: "f4", torch.float16: "f2", torch.int16: "i2", torch.int8: "i1",
                    torch.uint8: "u1"}[dtype]
        return torch.from_numpy(le_array(view, np_dtype, offset, count).copy()).to(device)
    with warnings.catch_warnings():  # a read-only buffer: only read here, copied to the device
        warnings.simplefilter("ignore", UserWarning)
        host = torch.frombuffer(view, dtype=dtype, offset=offset, count=count)
    return host.to(device, copy=True)


def check_finite_output(t: torch.Tensor, what: str) -> None:
    """Raise :class:`CodecError` if a decoded tensor (any device) holds NaN or Inf."""
    if t.numel():
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # NaN propagates into both; one sync
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise CodecError(f"{what} contains NaN or Inf")


def header(codec_id: int, param: int, layout: Layout) -> bytes:
    """The 16-byte header for a payload of codec ``codec_id`` with parameter byte ``param``."""
    return HEADER.pack(MAGIC, VERSION, codec_id, param, layout.crc, layout.numel)


def as_buffer(data: Any) -> memoryview:
    """A flat byte view of ``data``.

    Raises
    ------
    CodecError
        ``data`` is not bytes, bytearray or a memoryview.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(data).__name__}")
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def check_header(view: memoryview, codec_id: int, param: int, layout: Layout, min_len: int) -> None:
    """Check ``len(view) >= min_len >= 16`` and every header field.

    Raises
    ------
    CodecError
        Too short, or a header field differs from what this codec and layout expect.
    """
    if len(view) < max(min_len, HEADER_BYTES):
        raise CodecError(f"payload of {len(view)} bytes is shorter than {max(min_len, HEADER_BYTES)}")
    magic, version, cid, par, crc, numel = HEADER.unpack_from(view, 0)
    if magic != MAGIC or version != VERSION:
        raise CodecError(f"bad magic/version {magic:#x}/{version}")
    if cid != codec_id:
        raise CodecError(f"payload is for codec id {cid}, expected {codec_id}")
    if par != param:
        raise CodecError(f"codec parameter byte {par}, expected {param}")
    if numel != layout.numel or crc != layout.crc:
        raise CodecError(f"payload is for another layout (numel {numel}, crc {crc:#010x}), expected "
                         f"numel {layout.numel}, crc {layout.crc:#010x}")


def check_length(view: memoryview, expected: int) -> None:
    """Raise :class:`CodecError` unless ``len(view) == expected`` (run before any allocation)."""
    if len(view) != expected:
        raise CodecError(f"payload is {len(view)} bytes, expected exactly {expected}")


def le_array(view: memoryview, dtype: str, offset: int, count: int) -> np.ndarray:
    """A read-only native-order array of ``count`` little-endian ``dtype`` items at ``offset``.

    Callers have checked the length already; this never copies on little-endian hosts.
    """
    array = np.frombuffer(view, dtype="<" + dtype, count=count, offset=offset)
    return array if LITTLE else array.astype(dtype)


def to_le_bytes(array: np.ndarray) -> np.ndarray:
    """``array`` contiguous and in little-endian byte order (a no-op for the usual case)."""
    array = np.ascontiguousarray(array)
    return array if LITTLE else array.astype(array.dtype.newbyteorder("<"))


def check_finite(array: np.ndarray, what: str) -> None:
    """Raise :class:`CodecError` if a decoded float array holds NaN or Inf."""
    if not bool(np.isfinite(array).all()):
        raise CodecError(f"{what} contains NaN or Inf")


def check_half_bits(bits: np.ndarray, exponent_mask: int, what: str) -> None:
    """Raise :class:`CodecError` if any 16-bit float (as uint16 ``bits``) is NaN or Inf.

    ``exponent_mask`` is ``0x7C00`` for IEEE fp16 and ``0x7F80`` for bfloat16.
    """
    if bool(((bits & exponent_mask) == exponent_mask).any()):
        raise CodecError(f"{what} contains NaN or Inf")


def join(*parts: Any) -> bytes:
    """Concatenate header and buffer-protocol parts into one ``bytes`` (one copy)."""
    return b"".join(parts)
