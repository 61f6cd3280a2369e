"""Signed membership records: roundtrip, forgery, field limits, fuzzing."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.identity import Identity
from protocols.errors import BadSignature, ProtocolError, TooLarge
from protocols.records import DOMAIN, MAX_MADDRS, MembershipRecord, pack_record, unpack_record

ALICE = Identity.generate()
MALLORY = Identity.generate()


def _record(peer: Identity = ALICE, **overrides: object) -> MembershipRecord:
    rec = MembershipRecord(
        peer_id=peer.peer_id, swarm="s1", maddrs=(f"/ip4/127.0.0.1/tcp/4000/p2p/{peer.peer_id}",),
        round=12, mode="gossip", codec="dense", model_fingerprint=b"\x01" * 16, timestamp=1700000000.5,
    )
    return dataclasses.replace(rec, **overrides)


class _Impostor:
    """Claims ALICE's peer id but signs with MALLORY's key."""

    peer_id = ALICE.peer_id

    def sign(self, message: bytes) -> bytes:
        return MALLORY.sign(message)


def _resign(fields: list, signer: Identity = ALICE) -> bytes:
    body = msgpack.packb(fields)
    return msgpack.packb([body, signer.sign(DOMAIN + body)])


def _fields(rec: MembershipRecord) -> list:
    body, _ = msgpack.unpackb(pack_record(rec, ALICE))
    return msgpack.unpackb(body)


def test_roundtrip() -> None:
    rec = _record()

    assert unpack_record(pack_record(rec, ALICE)) == rec


def test_packed_record_carries_the_public_key() -> None:
    fields = _fields(_record())

    assert fields[2] == ALICE.public_bytes


def test_int_timestamp_and_list_maddrs_are_normalised() -> None:
    rec = _record(timestamp=5, maddrs=["/ip4/1.2.3.4/tcp/1"])

    out = unpack_record(pack_record(rec, ALICE))

    assert out.timestamp == 5.0
    assert out.maddrs == ("/ip4/1.2.3.4/tcp/1",)


def test_signer_must_be_the_record_owner() -> None:
    with pytest.raises(ValueError, match="cannot be signed"):
        pack_record(_record(), MALLORY)


def test_forged_signature_is_refused() -> None:
    data = pack_record(_record(), _Impostor())

    with pytest.raises(BadSignature):
        unpack_record(data)


def test_tampered_field_is_refused() -> None:
    fields = _fields(_record())
    fields[5] = 13  # round
    body = msgpack.packb(fields)
    _, signature = msgpack.unpackb(pack_record(_record(), ALICE))

    with pytest.raises(BadSignature):
        unpack_record(msgpack.packb([body, signature]))


def test_public_key_must_match_peer_id() -> None:
    fields = _fields(_record())
    fields[2] = MALLORY.public_bytes

    with pytest.raises(ProtocolError, match="public key"):
        unpack_record(_resign(fields))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 2),  # version
        (3, ""),  # swarm
        (4, ["/ip4/1.2.3.4/tcp/1"] * (MAX_MADDRS + 1)),
        (4, ["not-a-multiaddr"]),
        (4, "/ip4/1.2.3.4/tcp/1"),
        (5, -1),
        (5, True),
        (6, "m" * 65),
        (8, "fingerprint as str"),
        (9, float("nan")),
        (9, "yesterday"),
    ],
)
def test_signed_but_invalid_fields_are_refused(index: int, value: object) -> None:
    fields = _fields(_record())
    fields[index] = value

    with pytest.raises(ProtocolError):
        unpack_record(_resign(fields))


def test_overlong_maddr_is_refused_by_msgpack_limits() -> None:
    fields = _fields(_record())
    fields[4] = ["/" + "x" * 300]

    with pytest.raises(ProtocolError):
        unpack_record(_resign(fields))


@pytest.mark.parametrize(
    "rec",
    [_record(maddrs=("/ip4/1.2.3.4/tcp/1",) * (MAX_MADDRS + 1)), _record(round=-1), _record(mode=""),
     _record(model_fingerprint=b"x" * 65)],
)
def test_pack_refuses_what_unpack_would_refuse(rec: MembershipRecord) -> None:
    with pytest.raises(ProtocolError):
        pack_record(rec, ALICE)


def test_oversized_record_is_too_large() -> None:
    data = pack_record(_record(), ALICE)

    with pytest.raises(TooLarge):
        unpack_record(data, max_bytes=len(data) - 1)


VALID = pack_record(_record(), ALICE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1024))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        unpack_record(data)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=8 * len(VALID) - 1))
def test_fuzz_bit_flips_never_yield_a_different_record(bit: int) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)

    try:
        rec = unpack_record(bytes(data))
    except ProtocolError:
        return
    assert rec == _record()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_fuzz_truncations_are_refused(cut: int) -> None:
    with pytest.raises(ProtocolError):
        unpack_record(VALID[:cut])
