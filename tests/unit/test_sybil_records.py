"""SybilWall records: roundtrip, relaying, forgery and tampering, size and value limits, fuzzing."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.identity import Identity
from protocols.errors import BadSignature, PayloadMismatch, ProtocolError, TooLarge
from protocols.sybil_records import (
    DOMAIN,
    MAX_HOP,
    pack_sybil_record,
    record_max_bytes,
    relay_sybil_record,
    unpack_sybil_record,
)

ALICE = Identity.generate()
MALLORY = Identity.generate()
N = 16
LIMIT = 1 << 20
HISTORY = torch.linspace(-2.0, 2.0, N)


def _packed(signer: Identity = ALICE, *, origin: str | None = None, round: int = 5, hop: int = 0,
            history: torch.Tensor = HISTORY) -> bytes:
    return pack_sybil_record(signer, origin=origin or signer.peer_id, round=round, hop=hop, history=history)


def _unpack(data: bytes, numel: int = N):
    return unpack_sybil_record(data, expected_numel=numel, max_bytes=LIMIT)


def _resigned(fields: list, *, hop: int = 0, signer: Identity = ALICE) -> bytes:
    """A record whose signed body is ``fields``, correctly signed by ``signer`` (tests the body checks)."""
    signed = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([hop, signer.peer_id, signed, signer.sign(DOMAIN + signed)], use_bin_type=True)


def _fields(history: bytes | None = None, **overrides: object) -> list:
    data = history if history is not None else HISTORY.half().numpy().astype("<f2").tobytes()
    base = {"v": 1, "origin": ALICE.peer_id, "round": 5, "numel": N, "dtype": "f16", "data": data}
    base.update(overrides)
    return list(base.values())


# ---------------------------------------------------------------- roundtrip and relaying


def test_roundtrip_keeps_origin_round_hop_and_the_fp16_history() -> None:
    rec = _unpack(_packed(round=9, hop=0))

    assert (rec.origin, rec.round, rec.hop, rec.numel) == (ALICE.peer_id, 9, 0, N)
    assert rec.history().dtype == torch.float16
    assert torch.equal(rec.history(), HISTORY.half())


def test_history_is_a_writable_copy_that_cannot_alter_the_record() -> None:
    rec = _unpack(_packed())

    rec.history().add_(1.0)

    assert torch.equal(rec.history(), HISTORY.half())


def test_a_relay_changes_only_the_unsigned_hop() -> None:
    rec = _unpack(_packed(hop=0))

    relayed = _unpack(relay_sybil_record(rec, hop=3))

    assert relayed.hop == 3
    assert (relayed.origin, relayed.round, relayed.signed, relayed.signature) == (
        rec.origin, rec.round, rec.signed, rec.signature)


def test_fp16_halves_the_size_of_an_fp32_history() -> None:
    numel = 114_314  # the fashion-mnist CNN

    size = len(_packed(history=torch.zeros(numel)))

    assert 2 * numel < size <= record_max_bytes(numel)


# ---------------------------------------------------------------- forgery and tampering


def test_a_relay_cannot_alter_the_history() -> None:
    hop, origin, signed, signature = msgpack.unpackb(_packed())
    tampered = bytearray(signed)
    tampered[-1] ^= 0x01  # one bit of the last history element

    with pytest.raises(BadSignature):
        _unpack(msgpack.packb([hop + 1, origin, bytes(tampered), signature]))


def test_a_relay_cannot_move_a_record_to_another_origin() -> None:
    hop, _, signed, signature = msgpack.unpackb(_packed())

    with pytest.raises(BadSignature):
        _unpack(msgpack.packb([hop, MALLORY.peer_id, signed, signature]))


def test_a_record_signed_by_someone_else_is_refused() -> None:
    forged = _resigned(_fields(origin=ALICE.peer_id), signer=MALLORY)  # outer origin: MALLORY's id
    hop, _, signed, signature = msgpack.unpackb(forged)

    with pytest.raises(ProtocolError, match="origin"):
        _unpack(forged)  # MALLORY signed a body that claims ALICE
    with pytest.raises(BadSignature):
        _unpack(msgpack.packb([hop, ALICE.peer_id, signed, signature]))


def test_packing_for_another_origin_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be signed"):
        _packed(MALLORY, origin=ALICE.peer_id)


def test_signature_is_domain_separated() -> None:
    signed = msgpack.packb(_fields(), use_bin_type=True)
    undomained = msgpack.packb([0, ALICE.peer_id, signed, ALICE.sign(signed)])

    with pytest.raises(BadSignature):
        _unpack(undomained)


# ---------------------------------------------------------------- sizes and values


def test_too_large_is_refused_before_parsing() -> None:
    data = _packed()

    with pytest.raises(TooLarge):
        unpack_sybil_record(data, expected_numel=N, max_bytes=len(data) - 1)
    with pytest.raises(TooLarge):
        unpack_sybil_record(b"\x00" * (record_max_bytes(N) + 1), expected_numel=N, max_bytes=LIMIT)


def test_a_record_of_another_model_size_is_refused() -> None:
    with pytest.raises(PayloadMismatch, match="elements"):
        _unpack(_packed(), numel=N + 1)
    with pytest.raises(ProtocolError):
        _unpack(_packed(), numel=N // 2)  # too long for a history that small


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_history_is_refused(bad: float) -> None:
    values = HISTORY.half().clone()
    values[3] = bad
    data = values.numpy().astype("<f2").tobytes()

    with pytest.raises(PayloadMismatch, match="NaN or Inf"):
        _unpack(_resigned(_fields(history=data)))


def test_packing_refuses_what_fp16_cannot_hold() -> None:
    with pytest.raises(ValueError, match="fp16"):
        _packed(history=torch.full((N,), 1e6))
    with pytest.raises(ValueError, match="fp16"):
        _packed(history=torch.full((N,), float("nan")))


@pytest.mark.parametrize(("overrides", "match"), [
    ({"v": 2}, "version"),
    ({"dtype": "f32"}, "dtype"),
    ({"numel": N - 1}, "elements"),
    ({"round": -1}, "round"),
    ({"data": b"\x00" * (2 * N - 2)}, "bytes"),
])
def test_signed_body_fields_are_checked(overrides: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        _unpack(_resigned(_fields(**overrides)))


def test_hop_is_bounded() -> None:
    rec = _unpack(_packed())

    assert _unpack(relay_sybil_record(rec, hop=MAX_HOP)).hop == MAX_HOP
    with pytest.raises(ValueError, match="hop"):
        relay_sybil_record(rec, hop=MAX_HOP + 1)
    _, origin, signed, signature = msgpack.unpackb(_packed())
    with pytest.raises(ProtocolError, match="hop"):
        _unpack(msgpack.packb([MAX_HOP + 1, origin, signed, signature]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    try:
        _unpack(data)
    except ProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255))
def test_flipping_any_byte_of_a_record_never_passes_silently_altered(position: int, xor: int) -> None:
    data = bytearray(_packed())
    position %= len(data)
    data[position] ^= xor or 1

    try:
        rec = _unpack(bytes(data))
    except ProtocolError:
        return
    assert rec.origin == ALICE.peer_id
    assert torch.equal(rec.history(), HISTORY.half())  # only the unsigned hop may have changed
