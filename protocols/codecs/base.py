"""The codec contract: a :class:`Layout` of parameter tensors and the abstract :class:`Codec`.

A codec turns a flat 1-D float32 vector (the model, or an increment of it, laid out as
:class:`Layout` says) into bytes and back. The vector may live on an accelerator: the codec then
quantizes, selects or factorizes it there and copies only the compact result into the payload, and
``decode(..., device=...)`` copies the compact payload to the device and expands it there.

Every payload starts with the same 16-byte header (see :mod:`protocols.codecs.wire`) naming the
codec, its parameter and the layout, so a payload made by another codec or for another model is
rejected before its body is read.

Decoders treat their input as hostile: they compute the exact payload size from the trusted local
layout (and, for ``topk``, from one count that is bounded by the layout) and compare it with
``len(data)`` before allocating anything, check every header field and index, and refuse NaN/Inf.
Every problem with the bytes raises :class:`CodecError`; nothing else escapes ``decode``.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from protocols.errors import ProtocolError

__all__ = ["Codec", "CodecError", "CodecState", "Layout"]


class CodecError(ProtocolError):
    """A payload that this codec cannot accept: truncated, extended, wrong header, bad values."""


@dataclass(frozen=True)
class Layout:
    """How a flat ``(numel,)`` fp32 vector splits into parameter tensors, in order.

    Attributes
    ----------
    shapes
        The tensor shapes in order; tensor ``i`` occupies ``flat[offsets[i]:offsets[i + 1]]``.
        A ``()`` shape is a scalar (one element).

    Raises
    ------
    ValueError
        A shape is not a tuple of non-negative ints.
    """

    shapes: tuple[tuple[int, ...], ...]
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _crc: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes = tuple(tuple(shape) for shape in self.shapes)
        for shape in shapes:
            if any(type(n) is not int or n < 0 for n in shape):
                raise ValueError(f"layout shapes must be tuples of non-negative ints, got {shape!r}")
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + math.prod(shape))
        blob = b"".join(len(s).to_bytes(1, "little") + b"".join(n.to_bytes(8, "little") for n in s)
                        for s in shapes)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "_crc", zlib.crc32(blob))

    @property
    def numel(self) -> int:
        """Total number of elements, ``sum(prod(shape))``."""
        return self._offsets[-1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """``len(shapes) + 1`` start offsets; the last one is :attr:`numel`."""
        return self._offsets

    @property
    def crc(self) -> int:
        """CRC-32 of the shapes (ndim byte + 8-byte little-endian dims each), sent in every header."""
        return self._crc

    def sizes(self) -> list[int]:
        """Element count of each tensor, in order."""
        return [b - a for a, b in zip(self._offsets[:-1], self._offsets[1:])]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` (1-D, ``numel`` long) reshaped to each of :attr:`shapes`."""
        return [flat[a:b].view(shape) for (a, b), shape in
                zip(zip(self._offsets[:-1], self._offsets[1:]), self.shapes)]

    @classmethod
    def flat(cls, d: int) -> Layout:
        """One 1-D tensor of ``d`` elements."""
        return cls(((d,),))

    @classmethod
    def of(cls, model: torch.nn.Module) -> Layout:
        """The layout of ``model.parameters()`` in order (as ``parameters_to_vector`` flattens it)."""
        return cls(tuple(tuple(p.shape) for p in model.parameters()))


class CodecState(Protocol):
    """Per-stream encoder state returned by :meth:`Codec.new_state`; checkpointable."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Codec(ABC):
    """Encode a flat fp32 vector laid out as a :class:`Layout` to bytes, and decode it back.

    Contract
    --------
    ``encode(x, layout, state)``: ``x`` is a 1-D float32 tensor of ``layout.numel`` finite elements,
    on the CPU or on an accelerator (where the work is done); it is never modified. ``state`` (from
    :meth:`new_state`, or ``None``) is updated in place and stays on the CPU. Returns exactly
    :meth:`wire_bytes` bytes (``topk`` during sparsity warm-up: see there). Raises ``ValueError`` for
    a wrong shape/dtype or non-finite input. Codecs that round stochastically (``terngrad``) draw
    from the device's generator there, so a device payload differs from a CPU one; the others give
    the same payload wherever ``x`` lives (up to floating-point rounding of device arithmetic).

    ``decode(data, layout, device=None)``: returns a new writable 1-D float32 tensor of
    ``layout.numel`` finite elements, on the CPU (``device=None``: the host path) or on ``device``
    (the payload's compact parts are copied there and expanded there). Raises :class:`CodecError`
    for any malformed ``data`` and nothing else, with either path.

    Attributes
    ----------
    name
        Registry name (``"topk"``).
    codec_id
        The byte that names this codec in the header.
    spec
        Canonical spec string that :func:`protocols.codecs.registry.make_codec` accepts (``"topk:0.01"``).
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    usage: ClassVar[str]
    spec: str

    @classmethod
    @abstractmethod
    def from_args(cls, args: list[str]) -> Codec:
        """Build from the ``:``-separated arguments of a spec; raise ``ValueError`` if they are bad."""

    def new_state(self, layout: Layout) -> CodecState | None:
        """Fresh per-stream encoder state for ``layout``; ``None`` for stateless codecs."""
        return None

    @abstractmethod
    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        """Encode ``x`` (see the class contract).

        Raises
        ------
        ValueError
            ``x`` is not a finite 1-D float32 tensor of ``layout.numel`` elements, or ``state``
            belongs to another codec or layout.
        """

    @abstractmethod
    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        """Decode an untrusted payload (see the class contract), onto ``device`` if one is given.

        Raises
        ------
        CodecError
            Wrong length, header, codec, parameter or layout; out-of-range or non-finite values.
        """

    @abstractmethod
    def wire_bytes(self, layout: Layout) -> int:
        """The exact length of the payload :meth:`encode` produces for ``layout``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"
