"""Small-order Ed25519 public keys are refused: with them some signatures verify for every message."""

from __future__ import annotations

import pytest

from p2pnode.identity import Identity
from protocols.keys import is_weak_key, peer_id_from_pubkey, verify, verify_raw

P = 2**255 - 19
ORDER_8 = ["26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
           "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
           "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
           "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"]


def _encode(y: int, sign: int) -> bytes:
    raw = bytearray(y.to_bytes(32, "little"))
    raw[31] |= sign << 7
    return bytes(raw)


SMALL_ORDER = [_encode(1, 0), _encode(P - 1, 0), _encode(0, 0), _encode(0, 1), *map(bytes.fromhex, ORDER_8)]


def test_the_all_zero_key_no_longer_signs_everything() -> None:
    assert not verify_raw(bytes(32), b"any message", bytes(64))
    assert not verify(peer_id_from_pubkey(bytes(32)), b"any message", bytes(64))


@pytest.mark.parametrize("key", SMALL_ORDER, ids=lambda k: k.hex()[:8])
def test_every_small_order_point_is_weak(key: bytes) -> None:
    assert is_weak_key(key)
    assert not verify_raw(key, b"m", key + bytes(32))  # R = the key itself, S = 0: valid without the check


def test_encodings_of_no_point_are_weak_and_real_keys_are_not() -> None:
    assert is_weak_key(_encode(P, 0))  # y >= p
    assert is_weak_key(_encode(2, 0))  # y = 2 is on no point of the curve
    for _ in range(50):
        identity = Identity.generate()
        assert not is_weak_key(identity.public_bytes)
        assert verify_raw(identity.public_bytes, b"m", identity.sign(b"m"))
