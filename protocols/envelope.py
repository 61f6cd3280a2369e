"""Signed envelopes: every message between two nodes travels inside one.

Wire format (version 3, raw bytes; every message of the swarm pays it, so it is kept tight)::

    0x03 | sender public key (32) | len(kind) (1) | kind (ASCII) | uvarint round | uvarint seq
         | payload (the rest) | signature (64)

``signature`` is Ed25519, by the sender's key, over
``b"p2pnode-envelope-v3\x00" + len(swarm) (1) + swarm + SHA-256(<every byte before the signature>)``
(:func:`signing_input`). The sender's libp2p peer id is derived from the key (see
:mod:`protocols.keys`), so no key exchange is needed; the swarm name is bound by the signature but not
sent (both ends know it). The domain prefix keeps an envelope signature from ever being valid as a
membership record or any other signed object. Counters are unsigned LEB128 varints, minimal, below
2**63. Overhead: 99 + len(kind) bytes plus the two varints (1–9 bytes each) — 120 bytes for a
6-letter kind, a small round and a nanosecond ``seq`` (version 1, msgpack with the 52-character peer
id twice and the swarm name, took 211).

Why the digest (version 2 signed the bytes themselves): Ed25519 hashes what it signs with SHA-512,
twice to sign and once to verify, so sealing a model cost two passes over it and opening one, plus
three copies of the payload. Version 3 hashes it once with SHA-256 (faster than SHA-512 where the CPU
has SHA extensions), signs 52 to 180 bytes and copies the payload once on each side (measured in
BENCHMARKS.md, "Hot paths"). A forged envelope now needs a SHA-256 collision or a broken Ed25519.

:func:`open_envelope` checks the size before anything else, verifies the signature before parsing
the signed fields, then checks every field. Any malformed input raises a
:class:`~protocols.errors.ProtocolError` subclass and nothing else.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import msgpack

from protocols.errors import BadSignature, ProtocolError, Replay, TooLarge
from protocols.keys import Signer, peer_id_from_pubkey, pubkey_from_peer_id, verify_raw

VERSION = 3
DOMAIN = b"p2pnode-envelope-v3\x00"
SIGNATURE_BYTES = 64
PUBKEY_BYTES = 32
MAX_COUNTER = 2**63  # round and seq are non-negative and below this
MAX_NAME_CHARS = 128  # kind, swarm, peer id
#: Bytes an envelope adds to its payload, at most (kind of 128 characters, two 9-byte varints).
MAX_OVERHEAD = 1 + PUBKEY_BYTES + 1 + MAX_NAME_CHARS + 9 + 9 + SIGNATURE_BYTES

_UNPACK_ERRORS = (ValueError, TypeError, OverflowError, msgpack.UnpackException)
_HEAD = 1 + PUBKEY_BYTES  # version byte and key
_MIN_BYTES = _HEAD + 1 + 1 + 1 + 1 + SIGNATURE_BYTES  # one-letter kind, two one-byte varints, no payload


@dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, verified envelope: ``sender`` signed every field (``swarm`` through the domain)."""

    kind: str
    sender: str
    swarm: str
    round: int
    seq: int
    payload: bytes


def uvarint(value: int) -> bytes:
    """Unsigned LEB128 of ``0 <= value < 2**63`` (1–9 bytes)."""
    if not is_counter(value):
        raise ProtocolError(f"varint must be an int in [0, 2**63), got {value!r}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_uvarint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Parse a minimal LEB128 varint below 2**63 at ``pos``; return ``(value, next position)``.

    Raises
    ------
    ProtocolError
        Truncated, longer than 9 bytes, not minimal (a trailing zero byte) or 2**63 and above.
    """
    value, shift = 0, 0
    for i in range(pos, min(pos + 9, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and i > pos:
                raise ProtocolError("varint is not minimal")
            if value >= MAX_COUNTER:
                raise ProtocolError("varint is 2**63 or more")
            return value, i + 1
        shift += 7
    raise ProtocolError("truncated or overlong varint")


@lru_cache(maxsize=4096)
def _peer_id(key: bytes) -> str:
    return peer_id_from_pubkey(key)


@lru_cache(maxsize=4096)
def _pubkey(peer_id: str) -> bytes:
    return pubkey_from_peer_id(peer_id)


def _domain(swarm: str) -> bytes:
    raw = _check_name(swarm, "swarm").encode()
    if len(raw) > MAX_NAME_CHARS:
        raise ProtocolError(f"swarm name is longer than {MAX_NAME_CHARS} bytes")
    return DOMAIN + bytes([len(raw)]) + raw


def signing_input(swarm: str, *signed: bytes | memoryview) -> bytes:
    """What an envelope's signature covers: the domain, the swarm, and SHA-256 of every byte before the
    signature (given in one or more consecutive parts, so that the sender need not join them first)."""
    digest = hashlib.sha256()
    for part in signed:
        digest.update(part)
    return _domain(swarm) + digest.digest()


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
    """Sign and serialise one message from ``signer`` for ``swarm``.

    Raises
    ------
    ProtocolError
        If a field would be refused by :func:`open_envelope` (empty or non-ASCII names, counters out
        of range, a signer whose peer id is not an Ed25519 one).
    """
    if not (isinstance(kind, str) and kind.isascii()):
        raise ProtocolError(f"kind must be an ASCII string, got {kind!r}")
    _check_name(kind, "kind")
    if not (is_counter(round) and is_counter(seq)):
        raise ProtocolError(f"round and seq must be ints in [0, 2**63), got {round!r}, {seq!r}")
    header = b"".join((bytes([VERSION]), _pubkey(signer.peer_id), bytes([len(kind)]), kind.encode(),
                       uvarint(round), uvarint(seq)))
    signature = signer.sign(signing_input(swarm, header, payload))
    return b"".join((header, payload, signature))  # the one copy of the payload


def open_envelope(
    data: bytes, *, max_bytes: int, swarm: str, kinds: Collection[str] | None = None
) -> Envelope:
    """Verify and parse an envelope from an untrusted peer.

    Parameters
    ----------
    data:
        The bytes as received.
    max_bytes:
        Largest accepted envelope; checked before any parsing.
    swarm:
        Our swarm: the signature only verifies for the swarm the sender sealed it for.
    kinds:
        If given, the envelope's kind must be one of these.

    Raises
    ------
    TooLarge
        ``len(data) > max_bytes``.
    BadSignature
        The signature does not verify against the sender's key (also: another swarm).
    ProtocolError
        Anything else malformed (layout, version, counters, kind).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"envelope must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise TooLarge(f"envelope of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _MIN_BYTES:
        raise ProtocolError(f"envelope of {len(data)} bytes is shorter than the smallest one")
    if data[0] != VERSION:
        raise ProtocolError(f"unsupported envelope version {data[0]}")
    view = memoryview(data)
    key, signed, signature = bytes(view[1:_HEAD]), view[:-SIGNATURE_BYTES], bytes(view[-SIGNATURE_BYTES:])
    if not verify_raw(key, signing_input(swarm, signed), signature):
        raise BadSignature("envelope signature does not verify (sender key, swarm or bytes differ)")
    return _parse_signed(signed, key, swarm=swarm, kinds=kinds)


def _parse_signed(signed: memoryview, key: bytes, *, swarm: str, kinds: Collection[str] | None
                  ) -> Envelope:
    n = signed[_HEAD]
    end = _HEAD + 1 + n
    if not 0 < n <= MAX_NAME_CHARS or end > len(signed):
        raise ProtocolError("kind length out of range")
    raw_kind = bytes(signed[_HEAD + 1 : end])
    if not raw_kind.isascii():
        raise ProtocolError("kind must be ASCII")
    kind = raw_kind.decode()
    if kinds is not None and kind not in kinds:
        raise ProtocolError(f"unexpected envelope kind {kind!r}")
    rnd, pos = read_uvarint(signed, end)
    seq, pos = read_uvarint(signed, pos)
    try:
        sender = _peer_id(key)
    except ValueError as exc:  # cannot happen for 32 bytes; kept so that only ProtocolError escapes
        raise ProtocolError(str(exc)) from exc
    return Envelope(kind=kind, sender=sender, swarm=swarm, round=rnd, seq=seq, payload=bytes(signed[pos:]))


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
