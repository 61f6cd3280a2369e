"""Shared wire helpers: the 16-byte header, input checks, finiteness checks, little-endian views.

Header (16 bytes, little-endian, ``struct`` format ``<BBBBIQ``)::

    magic 0xCD | version 1 | codec id | codec parameter byte | layout CRC-32 (u32) | numel (u64)

The parameter byte is codec specific (``int8``: log2 of the block size, ``powersgd``: the rank,
others 0). A decoder checks every field against its own configuration and the local layout.
"""

from __future__ import annotations

import struct
import sys
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
    """Refuse anything but a 1-D float32 CPU tensor of ``layout.numel`` elements.

    Raises
    ------
    ValueError
        Wrong type, shape, dtype or device.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() != layout.numel:
        raise ValueError(f"expected a 1-D float32 CPU tensor of {layout.numel} elements, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")


def check_finite_input(array: np.ndarray) -> None:
    """Raise ``ValueError`` if a float array holds NaN or Inf (encoders refuse such input)."""
    if not bool(np.isfinite(array).all()):
        raise ValueError("codec input contains NaN or Inf")


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
