"""Compression codecs for model and increment payloads (see :mod:`protocols.codecs.base`).

``make_codec("topk:0.01")`` builds one; :class:`ErrorFeedback` wraps any codec as a gradient
compressor with error feedback and DGC momentum correction.
"""

from protocols.codecs.base import Codec, CodecError, CodecState, Layout
from protocols.codecs.feedback import ErrorFeedback
from protocols.codecs.registry import CODECS, make_codec

__all__ = ["CODECS", "Codec", "CodecError", "CodecState", "ErrorFeedback", "Layout", "make_codec"]
