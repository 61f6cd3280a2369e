"""Errors raised while decoding untrusted bytes.

Every decoder in :mod:`protocols` raises a subclass of :class:`ProtocolError` and nothing else
for bad input, so callers can reject-and-count with one ``except`` clause.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Malformed, oversized, unsigned or otherwise invalid bytes from a peer."""


class BadSignature(ProtocolError):
    """The signature does not verify against the claimed sender's key."""


class TooLarge(ProtocolError):
    """A length on the wire exceeds the configured limit (checked before allocating)."""


class Replay(ProtocolError):
    """A message with a sequence number that was already seen (or older) from this sender."""


class PayloadMismatch(ProtocolError):
    """The payload does not fit the expected model (fingerprint, element count, dtype, values)."""
