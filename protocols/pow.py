"""Proof of work on identities: a static crypto puzzle that makes each peer id cost key generations.

S/Kademlia (Baumgart & Mies, "S/Kademlia: A Practicable Approach Towards Secure Key-Based Routing",
2007) prices node ids with a *static puzzle*: an id counts only if a hash of its public key starts with
``c`` zero bits. Here::

    accepted(pk, N)  ⇔  sha256(b"p2pnode-identity-pow-v1\\x00" + pk) has N leading zero bits

where ``pk`` is the raw 32-byte Ed25519 public key (recoverable from the peer id, see
:mod:`protocols.keys`). Keys are random, so grinding one takes a geometric number of key generations
with mean ``2**N``; checking one costs one sha256. The domain is swarm-independent: a ground key works
in every swarm (an operator pays once per machine), and by the same token an attacker's ground
identities work everywhere too; the puzzle prices identities, it does not bind them to a swarm.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from protocols.errors import ProtocolError
from protocols.keys import pubkey_from_peer_id

DOMAIN = b"p2pnode-identity-pow-v1\x00"
MAX_BITS = 64


def leading_zero_bits(digest: bytes) -> int:
    """Number of leading zero bits of ``digest`` (``8 * len(digest)`` for an all-zero one)."""
    value = int.from_bytes(digest, "big")
    return 8 * len(digest) - value.bit_length()


def pow_bits_of(public_key: bytes) -> int:
    """How many leading zero bits the puzzle hash of the raw Ed25519 ``public_key`` has."""
    return leading_zero_bits(hashlib.sha256(DOMAIN + public_key).digest())


def has_pow(public_key: bytes, bits: int) -> bool:
    """True iff ``public_key`` solves the puzzle with ``bits`` leading zero bits (always for ``bits`` 0).

    Raises
    ------
    ValueError
        ``bits`` is outside ``[0, MAX_BITS]``.
    """
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [0, {MAX_BITS}], got {bits}")
    return bits == 0 or pow_bits_of(public_key) >= bits


@lru_cache(maxsize=8192)
def peer_id_has_pow(peer_id: str, bits: int) -> bool:
    """:func:`has_pow` for a peer id; False for anything that is not an Ed25519 peer id (when ``bits`` > 0).

    Cached (8,192 ids): the check runs on every incoming request and membership record.
    """
    if bits == 0:
        return True
    try:
        return has_pow(pubkey_from_peer_id(peer_id), bits)
    except ProtocolError:
        return False
