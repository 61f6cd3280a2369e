"""Ed25519 keys and libp2p peer ids.

An Ed25519 libp2p peer id is ``base58(multihash_identity(PublicKey protobuf))``: the bytes
``00 24 08 01 12 20 <32-byte public key>``. The public key is therefore recoverable from the
peer id, and a signature can be checked from the id alone.
"""

from __future__ import annotations

import functools
from typing import Protocol

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols.errors import ProtocolError

# identity multihash (0x00), length 36, then PublicKey{Type=Ed25519(1), Data=<32 bytes>}
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_MAX_PEER_ID_CHARS = 64


class Signer(Protocol):
    """Anything that can sign as a peer (``p2pnode.identity.Identity`` in the daemon)."""

    @property
    def peer_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def peer_id_from_pubkey(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW…``) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return base58.b58encode(_PEER_ID_PREFIX + public_key).decode()


def pubkey_from_peer_id(peer_id: str) -> bytes:
    """Recover the raw Ed25519 public key from a peer id; ProtocolError for any other id kind."""
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise ProtocolError("peer id must be a short string")
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ProtocolError("peer id is not base58") from exc
    if len(raw) != len(_PEER_ID_PREFIX) + 32 or not raw.startswith(_PEER_ID_PREFIX):
        raise ProtocolError("peer id is not an Ed25519 identity multihash")
    return raw[len(_PEER_ID_PREFIX) :]


_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(public_key: bytes) -> tuple[int, int] | None:
    """The affine Edwards point of a 32-byte encoding (RFC 8032 §5.1.3), or None if it encodes none."""
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    sign = public_key[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        x = (x * _SQRT_M1) % _P
        if (v * x * x - u) % _P != 0:
            return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(x: int, y: int, z: int) -> tuple[int, int, int]:
    """Projective doubling on -x² + y² = 1 + d·x²y² (no inversion; "dbl-2008-bbjlp")."""
    b, c, d = (x + y) ** 2 % _P, x * x % _P, y * y % _P
    f = (d - c) % _P
    j = (f - 2 * z * z) % _P
    return (b - c - d) * j % _P, f * (-c - d) % _P, f * j % _P


@functools.lru_cache(maxsize=4096)
def is_weak_key(public_key: bytes) -> bool:
    """True for a key that is no point or a point of small order (8·P = 0).

    With such a key, some signatures verify for every message (the all-zero key with the all-zero
    signature does), so it must never be accepted as anyone's identity.
    """
    point = _decode_point(public_key)
    if point is None:
        return True
    x, y, z = point[0], point[1], 1
    for _ in range(3):
        x, y, z = _double(x, y, z)
    return x == 0 and y == z  # the neutral element (0 : Z : Z)


def verify_raw(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by the raw 32-byte key.

    Keys of small order are refused whatever the signature (see :func:`is_weak_key`).
    """
    if len(public_key) != 32 or is_weak_key(bytes(public_key)):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by ``peer_id``."""
    try:
        return verify_raw(pubkey_from_peer_id(peer_id), message, signature)
    except ProtocolError:
        return False
