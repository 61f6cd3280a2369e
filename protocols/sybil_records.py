"""SybilWall peer records: a peer's accumulated update history, signed by that peer.

A record says "my history ``h`` at my round ``r`` is this vector" (DESIGN §4.2). Its origin signs it,
so the relays that gossip it onward cannot forge or alter it; the hop count is *not* signed, because
every relay increments it (a relay can lie about it, which only changes how often the record is
forwarded, never the weights computed from it).

Wire format (msgpack)::

    [hop, origin, signed: bin, signature: bin]
    signed = msgpack([1, origin, round, numel, "f16", data: bin])      # data: numel little-endian fp16

``signature`` is Ed25519 over ``b"p2pnode-sybilwall-record-v1\\x00" + signed`` by the key that
``origin`` encodes. fp16 halves the size of an fp32 history (the fashion-mnist CNN, 114,314 parameters:
229 KB instead of 457 KB); the cosine similarities SybilWall computes do not need more precision.

:func:`unpack_sybil_record` bounds the message by the expected element count before parsing, verifies
the signature before parsing ``signed``, then checks the version, origin, round, element count, dtype,
data length and that every value is finite. A relay keeps the ``signed`` bytes and the signature as they
came and re-wraps them with a new hop (:func:`relay_sybil_record`): it never re-encodes what was signed.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from protocols.envelope import MAX_NAME_CHARS, SIGNATURE_BYTES, is_counter, unpack_limited
from protocols.errors import BadSignature, PayloadMismatch, ProtocolError, TooLarge
from protocols.keys import Signer, verify

VERSION = 1
DOMAIN = b"p2pnode-sybilwall-record-v1\x00"
DTYPE = "f16"
MAX_HOP = 64
_OVERHEAD = 256  # everything but data: array headers, origin, counters, signature


@dataclass(frozen=True, slots=True)
class SybilRecord:
    """A verified record. ``signed`` and ``signature`` are kept byte for byte so it can be relayed.

    Attributes
    ----------
    origin:
        The peer whose history this is; it signed ``round`` and the history.
    round:
        The origin's round when it signed (a newer round replaces an older record).
    hop:
        Hop distance as the sender claimed it (unsigned; 0 = the sender's own record).
    numel:
        Length of the history vector.
    """

    origin: str
    round: int
    hop: int
    numel: int
    signed: bytes
    signature: bytes

    def history(self) -> torch.Tensor:
        """A fresh, writable fp16 CPU tensor of shape ``(numel,)`` (the data is the tail of ``signed``)."""
        tail = memoryview(self.signed)[len(self.signed) - 2 * self.numel :]
        return torch.from_numpy(np.frombuffer(tail, dtype="<f2").astype(np.float16))


def record_max_bytes(numel: int) -> int:
    """The largest well-formed record of a ``numel``-element history."""
    return 2 * numel + _OVERHEAD


def pack_sybil_record(signer: Signer, *, origin: str, round: int, hop: int, history: torch.Tensor) -> bytes:
    """Sign ``history`` (converted to fp16) as ``origin``'s record at ``round``, sent with ``hop``.

    Raises
    ------
    ValueError
        ``signer`` is not ``origin``, ``history`` is not 1-D, it is not finite in fp16 (NaN, Inf, or a
        value beyond ±65504), or ``round``/``hop`` is out of range.
    """
    if signer.peer_id != origin:
        raise ValueError(f"a record of {origin} cannot be signed by {signer.peer_id}")
    if history.dim() != 1:
        raise ValueError(f"history must be 1-D, got shape {tuple(history.shape)}")
    if not is_counter(round):
        raise ValueError(f"round must be an int in [0, 2**63), got {round!r}")
    array = history.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2", copy=False)
    if not np.isfinite(array).all():
        raise ValueError("history is not finite in fp16 (NaN, Inf, or |value| > 65504)")
    signed = msgpack.packb([VERSION, origin, round, array.size, DTYPE, array.tobytes()], use_bin_type=True)
    return _wrap(hop, origin, signed, signer.sign(DOMAIN + signed))


def relay_sybil_record(record: SybilRecord, *, hop: int) -> bytes:
    """Serialise a verified ``record`` unchanged except for ``hop`` (what a relay sends on)."""
    return _wrap(hop, record.origin, record.signed, record.signature)


def _wrap(hop: int, origin: str, signed: bytes, signature: bytes) -> bytes:
    if not (is_counter(hop) and hop <= MAX_HOP):
        raise ValueError(f"hop must be an int in [0, {MAX_HOP}], got {hop!r}")
    return msgpack.packb([hop, origin, signed, signature], use_bin_type=True)


def unpack_sybil_record(data: bytes, *, expected_numel: int, max_bytes: int) -> SybilRecord:
    """Verify and parse a record from an untrusted peer, for a model of ``expected_numel`` parameters.

    Raises
    ------
    TooLarge
        ``data`` is longer than ``max_bytes`` or than a record of ``expected_numel`` elements can be.
    BadSignature
        The signature does not verify against ``origin``.
    PayloadMismatch
        Wrong element count, dtype or data length, or a NaN/Inf value.
    ProtocolError
        Anything else malformed (layout, types, hop above ``MAX_HOP``, version, origin mismatch).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"record must be bytes, got {type(data).__name__}")
    limit = min(max_bytes, record_max_bytes(expected_numel))
    if len(data) > limit:
        raise TooLarge(f"sybilwall record of {len(data)} bytes exceeds the limit of {limit}")
    outer = unpack_limited(bytes(data), max_bin=limit, max_array=4)
    if not (isinstance(outer, list) and len(outer) == 4):
        raise ProtocolError("sybilwall record must be a 4-element array")
    hop, origin, signed, signature = outer
    if not (is_counter(hop) and hop <= MAX_HOP):
        raise ProtocolError(f"hop must be an int in [0, {MAX_HOP}], got {hop!r}")
    if not isinstance(origin, str) or not 0 < len(origin) <= MAX_NAME_CHARS:
        raise ProtocolError("origin must be a short non-empty string")
    if not (isinstance(signed, bytes) and isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise ProtocolError("record body and signature must be bytes (signature: 64)")
    if not verify(origin, DOMAIN + signed, signature):
        raise BadSignature(f"sybilwall record signature does not verify for {origin}")
    rnd, numel = _parse_signed(signed, origin, expected_numel=expected_numel)
    return SybilRecord(origin=origin, round=rnd, hop=hop, numel=numel, signed=signed, signature=signature)


def _parse_signed(signed: bytes, origin: str, *, expected_numel: int) -> tuple[int, int]:
    """Check the signed body; return ``(round, numel)``."""
    inner = unpack_limited(signed, max_bin=2 * expected_numel, max_array=6)
    if not (isinstance(inner, list) and len(inner) == 6):
        raise ProtocolError("signed record body must be a 6-element array")
    version, inner_origin, rnd, numel, dtype, raw = inner
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"unsupported sybilwall record version {version!r}")
    if inner_origin != origin:
        raise ProtocolError("signed origin differs from the outer origin")
    if not is_counter(rnd):
        raise ProtocolError(f"round must be an int in [0, 2**63), got {rnd!r}")
    if dtype != DTYPE:
        raise PayloadMismatch(f"history dtype {dtype!r}, expected {DTYPE!r}")
    if type(numel) is not int or numel != expected_numel:
        raise PayloadMismatch(f"history of {numel!r} elements, expected {expected_numel}")
    if not isinstance(raw, bytes) or len(raw) != 2 * numel or not signed.endswith(raw):
        raise PayloadMismatch(f"history data must be the final {2 * numel} bytes of the signed body")
    if not np.isfinite(np.frombuffer(raw, dtype="<f2")).all():
        raise PayloadMismatch("history contains NaN or Inf")
    return rnd, numel
