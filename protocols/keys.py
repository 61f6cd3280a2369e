"""Ed25519 keys and libp2p peer ids.

An Ed25519 libp2p peer id is ``base58(multihash_identity(PublicKey protobuf))``: the bytes
``00 24 08 01 12 20 <32-byte public key>``. The public key is therefore recoverable from the
peer id, and a signature can be checked from the id alone.
"""

from __future__ import annotations

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


def verify_raw(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by the raw 32-byte key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by ``peer_id``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(pubkey_from_peer_id(peer_id))
        key.verify(signature, message)
    except (InvalidSignature, ProtocolError, ValueError):
        return False
    return True
