"""The body of a gossip exchange message: a model payload plus an optional attachment.

Wire: msgpack ``[model: bin, attachment: bin | nil]``. The model is a :mod:`protocols.model`
payload; the attachment is opaque here (a defense's side channel, e.g. SybilWall peer records) and is
decoded and checked by whoever consumes it. Both sit inside a signed envelope, so they are only looked
at after the sender's signature has been verified.
"""

from __future__ import annotations

import msgpack

from protocols.envelope import unpack_limited
from protocols.errors import ProtocolError, TooLarge


def pack_exchange(model: bytes, attachment: bytes | None = None) -> bytes:
    """Serialise a model payload and an optional attachment."""
    return msgpack.packb([model, attachment], use_bin_type=True)


def unpack_exchange(data: bytes, *, max_bytes: int) -> tuple[bytes, bytes | None]:
    """Split an exchange body into ``(model payload, attachment or None)``.

    Raises
    ------
    TooLarge
        ``data`` is longer than ``max_bytes``.
    ProtocolError
        Anything that is not a two-element array of ``bin`` and ``bin | nil``.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"exchange body of {len(data)} bytes exceeds the limit of {max_bytes}")
    obj = unpack_limited(data, max_bin=max_bytes, max_str=0, max_array=2)
    if not isinstance(obj, list) or len(obj) != 2:
        raise ProtocolError("exchange body must be [model, attachment]")
    model, attachment = obj
    if not isinstance(model, bytes) or not (attachment is None or isinstance(attachment, bytes)):
        raise ProtocolError("exchange body must hold bin model and bin-or-nil attachment")
    return model, attachment
