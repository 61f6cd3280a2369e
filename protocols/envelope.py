"""Signed envelopes: every message between two nodes travels inside one.

Wire format (msgpack)::

    [1, sender_peer_id, signed: bin, signature: bin]
    signed = msgpack([kind, sender_peer_id, swarm, round, seq, payload: bin])

``signature`` is Ed25519 over ``b"p2pnode-envelope-v1\\x00" + signed`` by the key that
``sender_peer_id`` encodes (see :mod:`protocols.keys`), so no key exchange is needed. The domain
prefix keeps an envelope signature from ever being valid as a membership record or any other
signed object.

:func:`open_envelope` checks the size before parsing, parses with msgpack limits derived from
``max_bytes``, verifies the signature *before* parsing ``signed``, then checks every field.
Any malformed input raises a :class:`~protocols.errors.ProtocolError` subclass and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import msgpack

from protocols.errors import BadSignature, ProtocolError, Replay, TooLarge
from protocols.keys import Signer, verify

VERSION = 1
DOMAIN = b"p2pnode-envelope-v1\x00"
SIGNATURE_BYTES = 64
MAX_COUNTER = 2**63  # round and seq are non-negative and below this
MAX_NAME_CHARS = 128  # kind, swarm, peer id

_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope: ``sender`` signed every field."""

    kind: str
    sender: str
    swarm: str
    round: int
    seq: int
    payload: bytes


def unpack_limited(
    data: bytes, *, max_bin: int, max_str: int = MAX_NAME_CHARS, max_array: int = 16, max_map: int = 0
) -> Any:
    """``msgpack.unpackb`` with explicit limits, no ext types, and ProtocolError for any failure.

    Parameters
    ----------
    data:
        Untrusted bytes holding exactly one msgpack object.
    max_bin, max_str, max_array, max_map:
        Largest ``bin`` length, ``str`` length, array length and map length accepted.
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_bin,
            max_str_len=max_str,
            max_array_len=max_array,
            max_map_len=max_map,
            max_ext_len=0,
        )
    except _UNPACK_ERRORS as exc:
        raise ProtocolError(f"malformed msgpack: {exc}") from exc


def is_counter(value: object) -> bool:
    """True for a non-negative ``int`` below 2**63 (``bool`` is refused)."""
    return type(value) is int and 0 <= value < MAX_COUNTER


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise ProtocolError(f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    return value


def seal(signer: Signer, *, kind: str, swarm: str, round: int, seq: int, payload: bytes) -> bytes:
    """Sign and serialise one message from ``signer``.

    Raises
    ------
    ProtocolError
        If a field would be refused by :func:`open_envelope` (empty names, negative counters).
    """
    sender = signer.peer_id
    _check_name(kind, "kind")
    _check_name(swarm, "swarm")
    _check_name(sender, "sender")
    if not (is_counter(round) and is_counter(seq)):
        raise ProtocolError(f"round and seq must be ints in [0, 2**63), got {round!r}, {seq!r}")
    signed = msgpack.packb([kind, sender, swarm, round, seq, bytes(payload)], use_bin_type=True)
    signature = signer.sign(DOMAIN + signed)
    return msgpack.packb([VERSION, sender, signed, signature], use_bin_type=True)


def open_envelope(
    data: bytes, *, max_bytes: int, swarm: str | None = None, kinds: Collection[str] | None = None
) -> Envelope:
    """Verify and parse an envelope from an untrusted peer.

    Parameters
    ----------
    data:
        The bytes as received.
    max_bytes:
        Largest accepted envelope; checked before any parsing.
    swarm:
        If given, the envelope must be addressed to this swarm.
    kinds:
        If given, the envelope's kind must be one of these.

    Raises
    ------
    TooLarge
        ``len(data) > max_bytes``.
    BadSignature
        The signature does not verify against the sender's peer id.
    ProtocolError
        Anything else malformed (layout, types, counters, swarm, kind).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise TooLarge(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    outer = unpack_limited(bytes(data), max_bin=max_bytes, max_array=4)
    if not (isinstance(outer, list) and len(outer) == 4):
        raise ProtocolError("envelope must be a 4-element array")
    version, sender, signed, signature = outer
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"unsupported envelope version {version!r}")
    _check_name(sender, "sender")
    if not (isinstance(signed, bytes) and isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES):
        raise ProtocolError("envelope body and signature must be bytes (signature: 64)")
    if not verify(sender, DOMAIN + signed, signature):
        raise BadSignature(f"envelope signature does not verify for sender {sender}")
    return _parse_signed(signed, sender, max_bytes=max_bytes, swarm=swarm, kinds=kinds)


def _parse_signed(
    signed: bytes, sender: str, *, max_bytes: int, swarm: str | None, kinds: Collection[str] | None
) -> Envelope:
    inner = unpack_limited(signed, max_bin=max_bytes, max_array=6)
    if not (isinstance(inner, list) and len(inner) == 6):
        raise ProtocolError("signed body must be a 6-element array")
    kind, inner_sender, env_swarm, rnd, seq, payload = inner
    _check_name(kind, "kind")
    _check_name(env_swarm, "swarm")
    if inner_sender != sender:
        raise ProtocolError("inner sender differs from the outer sender")
    if swarm is not None and env_swarm != swarm:
        raise ProtocolError(f"envelope for swarm {env_swarm!r}, expected {swarm!r}")
    if kinds is not None and kind not in kinds:
        raise ProtocolError(f"unexpected envelope kind {kind!r}")
    if not (is_counter(rnd) and is_counter(seq)):
        raise ProtocolError("round and seq must be ints in [0, 2**63)")
    if not isinstance(payload, bytes):
        raise ProtocolError("payload must be bytes")
    return Envelope(kind=kind, sender=sender, swarm=env_swarm, round=rnd, seq=seq, payload=payload)


class ReplayGuard:
    """Refuses an envelope whose ``seq`` is not above the last one seen from its sender.

    Keeps at most ``max_peers`` senders, evicting the least recently seen; an evicted sender's
    next envelope is accepted whatever its ``seq`` (bounded memory beats perfect replay memory).
    Senders must therefore use strictly increasing sequence numbers across restarts (e.g. a
    nanosecond clock). Call :meth:`check` last, on envelopes that passed every other check, so a
    message rejected for another reason does not advance the sender's counter.
    """

    def __init__(self, max_peers: int = 10_000) -> None:
        if max_peers < 1:
            raise ValueError(f"max_peers must be >= 1, got {max_peers}")
        self.max_peers = max_peers
        self._last: OrderedDict[str, int] = OrderedDict()

    def check(self, env: Envelope) -> None:
        """Record ``env.seq`` for ``env.sender``; raise :class:`Replay` if it is not new."""
        last = self._last.get(env.sender)
        if last is not None and env.seq <= last:
            raise Replay(f"seq {env.seq} from {env.sender} is not above the last seen {last}")
        self._last[env.sender] = env.seq
        self._last.move_to_end(env.sender)
        while len(self._last) > self.max_peers:
            self._last.popitem(last=False)

    def __len__(self) -> int:
        return len(self._last)
