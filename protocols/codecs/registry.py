"""The codec registry: ``CODECS`` maps names to classes; :func:`make_codec` parses ``NAME[:ARGS]``."""

from __future__ import annotations

from protocols.codecs.base import Codec
from protocols.codecs.bf16 import BFloat16Codec
from protocols.codecs.dense import DenseCodec
from protocols.codecs.fp16 import Float16Codec
from protocols.codecs.int8 import Int8Codec
from protocols.codecs.powersgd import PowerSGDCodec
from protocols.codecs.terngrad import TernGradCodec
from protocols.codecs.topk import TopKCodec

CODECS: dict[str, type[Codec]] = {
    cls.name: cls
    for cls in (DenseCodec, Float16Codec, BFloat16Codec, Int8Codec, TernGradCodec, TopKCodec, PowerSGDCodec)
}


def usage() -> str:
    """One line per codec: its spec syntax."""
    return "\n".join(f"  {cls.usage}" for cls in CODECS.values())


def make_codec(spec: str) -> Codec:
    """Build a codec from ``"NAME[:ARG[:ARG]]"`` (``"dense"``, ``"topk:0.01"``, ``"powersgd:2"``).

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid ones) or bad arguments (the message gives usage).
    """
    if not isinstance(spec, str):
        raise ValueError(f"codec spec must be a string, got {type(spec).__name__}")
    name, *args = spec.strip().split(":")
    cls = CODECS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}\n{usage()}")
    try:
        return cls.from_args(args)
    except ValueError as exc:
        raise ValueError(f"bad codec spec {spec!r}: {exc}") from None
