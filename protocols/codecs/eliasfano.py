"""Elias-Fano coding of a strictly increasing index set (Elias 1974; Fano 1971).

``k`` indices in ``[0, d)`` are split into ``l = floor(log2(d / k))`` low bits (``l = 0`` when
``k >= d``), stored verbatim, and the high part ``h_i = idx_i >> l``, stored in unary as a bit vector
of ``U = k + ((d - 1) >> l) + 1`` bits with bit ``h_i + i`` set. Bits are packed little-endian (bit
``j`` of the stream is bit ``j % 8`` of byte ``j // 8``) and each part is padded to whole bytes with
zeros. Size: ``ceil(k l / 8) + ceil(U / 8)`` bytes, about ``k (2 + log2(d / k)) / 8``; it depends on
``(d, k)`` only, so a decoder knows it before reading anything.
"""

from __future__ import annotations

import numpy as np

from protocols.codecs.base import CodecError


def low_bits(d: int, k: int) -> int:
    """``l = floor(log2(d / k))`` for ``1 <= k < d``, else 0."""
    return (d // k).bit_length() - 1 if 0 < k < d else 0


def upper_bits(d: int, k: int) -> int:
    """``U = k + ((d - 1) >> l) + 1`` (0 when ``d == 0``)."""
    return k + ((d - 1) >> low_bits(d, k)) + 1 if d > 0 else 0


def encoded_bytes(d: int, k: int) -> tuple[int, int]:
    """``(low part bytes, high part bytes)`` for ``k`` indices in ``[0, d)``."""
    return -(-k * low_bits(d, k) // 8), -(-upper_bits(d, k) // 8)


def encode(indices: np.ndarray, d: int) -> bytes:
    """Code strictly increasing int64 ``indices`` in ``[0, d)`` (the caller guarantees both)."""
    k = len(indices)
    l_bits = low_bits(d, k)
    if l_bits:
        shifts = np.arange(l_bits, dtype=np.int64)
        low = ((indices[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        low_part = np.packbits(low, bitorder="little").tobytes()
    else:
        low_part = b""
    unary = np.zeros(upper_bits(d, k), dtype=np.uint8)
    unary[(indices >> l_bits) + np.arange(k, dtype=np.int64)] = 1
    return low_part + np.packbits(unary, bitorder="little").tobytes()


def decode(low_part: np.ndarray, high_part: np.ndarray, d: int, k: int) -> np.ndarray:
    """Decode ``k`` indices from the two uint8 parts (sizes as :func:`encoded_bytes` says).

    Returns
    -------
    numpy.ndarray
        Strictly increasing int64 indices in ``[0, d)``.

    Raises
    ------
    CodecError
        Wrong number of set bits, non-zero padding, indices not strictly increasing or ``>= d``.
    """
    l_bits, n_upper = low_bits(d, k), upper_bits(d, k)
    unary = np.unpackbits(high_part, bitorder="little")
    if bool(unary[n_upper:].any()):
        raise CodecError("index coding has non-zero padding bits")
    positions = np.flatnonzero(unary)
    if len(positions) != k:
        raise CodecError(f"index coding holds {len(positions)} indices, header says {k}")
    indices = positions.astype(np.int64) - np.arange(k, dtype=np.int64)
    if l_bits:
        bits = np.unpackbits(low_part, bitorder="little")
        if bool(bits[k * l_bits:].any()):
            raise CodecError("index coding has non-zero padding bits")
        weights = np.left_shift(np.int64(1), np.arange(l_bits, dtype=np.int64))
        low = bits[: k * l_bits].reshape(k, l_bits).astype(np.int64) @ weights
        indices = (indices << l_bits) | low
    if k and (indices[-1] >= d or bool((np.diff(indices) <= 0).any())):
        raise CodecError("indices must be strictly increasing and below the element count")
    return indices
