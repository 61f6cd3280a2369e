"""Signed envelopes: roundtrip, tampering, swarm/kind checks, limits, replay, fuzzing."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.identity import Identity
from protocols.envelope import DOMAIN, Envelope, ReplayGuard, open_envelope, seal, signing_input
from protocols.errors import BadSignature, ProtocolError, Replay, TooLarge
from protocols.keys import pubkey_from_peer_id

ALICE = Identity.generate()
MALLORY = Identity.generate()
LIMIT = 1 << 16


def _sealed(signer: Identity = ALICE, **overrides: object) -> bytes:
    fields: dict = {"kind": "push", "swarm": "s1", "round": 3, "seq": 7, "payload": b"hello"}
    fields.update(overrides)
    return seal(signer, **fields)


def _env(seq: int, sender: str = ALICE.peer_id) -> Envelope:
    return Envelope(kind="push", sender=sender, swarm="s1", round=0, seq=seq, payload=b"")


# ---------------------------------------------------------------- roundtrip and checks


def test_roundtrip_returns_every_field() -> None:
    data = _sealed()

    env = open_envelope(data, max_bytes=LIMIT, swarm="s1", kinds={"push", "pull"})

    assert env == Envelope(kind="push", sender=ALICE.peer_id, swarm="s1", round=3, seq=7, payload=b"hello")


def _raw(kind: bytes = b"push", round: bytes = b"\x03", seq: bytes = b"\x07", payload: bytes = b"x",
         signer: Identity = ALICE, key: Identity | None = None, version: int = 3,
         swarm: bytes = b"s1") -> bytes:
    """An envelope assembled by hand: ``key``'s public key in the header, signed by ``signer``."""
    signed = (bytes([version]) + pubkey_from_peer_id((key or signer).peer_id) + bytes([len(kind)]) + kind
              + round + seq + payload)
    return signed + signer.sign(DOMAIN + bytes([len(swarm)]) + swarm + hashlib.sha256(signed).digest())


def test_wire_layout_is_version_key_kind_varints_payload_signature() -> None:
    data = _sealed(round=300, seq=7)

    assert data[0] == 3
    assert data[1:33] == pubkey_from_peer_id(ALICE.peer_id)
    assert data[33:38] == b"\x04push"
    assert data[38:41] == bytes([0xAC, 0x02, 0x07])  # LEB128 of 300, then 7
    assert data[41:-64] == b"hello"
    assert len(data) == 41 + 5 + 64
    assert _raw(round=bytes([0xAC, 0x02]), payload=b"hello")[:-64] == data[:-64]


def test_envelope_is_much_smaller_than_version_1() -> None:
    assert len(_sealed(payload=b"", seq=2**62)) <= 99 + 4 + 1 + 9  # 211 bytes in version 1


def test_empty_payload_and_max_counters_roundtrip() -> None:
    env = open_envelope(_sealed(payload=b"", round=2**63 - 1, seq=0), max_bytes=LIMIT, swarm="s1")

    assert (env.payload, env.round, env.seq) == (b"", 2**63 - 1, 0)


def test_tampered_payload_is_bad_signature() -> None:
    data = bytearray(_sealed())
    data[-65] ^= 1

    with pytest.raises(BadSignature):
        open_envelope(bytes(data), max_bytes=LIMIT, swarm="s1")


def test_claiming_another_sender_is_bad_signature() -> None:
    with pytest.raises(BadSignature):
        open_envelope(_raw(signer=MALLORY, key=ALICE), max_bytes=LIMIT, swarm="s1")


def test_signature_without_domain_prefix_is_refused() -> None:
    signed = _raw()[:-64]
    data = signed + ALICE.sign(signed)

    with pytest.raises(BadSignature):
        open_envelope(data, max_bytes=LIMIT, swarm="s1")


def test_wrong_swarm_is_bad_signature() -> None:
    with pytest.raises(BadSignature):
        open_envelope(_sealed(swarm="other"), max_bytes=LIMIT, swarm="s1")


def test_unexpected_kind_is_refused() -> None:
    with pytest.raises(ProtocolError, match="kind"):
        open_envelope(_sealed(kind="evil"), max_bytes=LIMIT, swarm="s1", kinds=("push",))


def test_oversized_envelope_is_too_large_before_parsing() -> None:
    data = _sealed(payload=b"x" * 1000)

    with pytest.raises(TooLarge):
        open_envelope(data, max_bytes=len(data) - 1, swarm="s1")


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": b""},
        {"kind": "pü".encode()},
        {"round": bytes([0x80]), "seq": b"", "payload": b""},  # truncated varint
        {"round": bytes([0x80, 0x00])},  # not minimal
        {"round": bytes([0xFF] * 9 + [0x01])},  # overlong
        {"seq": bytes([0x80] * 9 + [0x01])},  # 2**63 (needs a 10th byte)
        {"kind": bytes([200]) * 1},  # non-ASCII one-letter kind
    ],
)
def test_signed_but_malformed_fields_are_protocol_errors(fields: dict) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(_raw(**fields), max_bytes=LIMIT, swarm="s1")


def test_kind_length_past_the_end_is_a_protocol_error() -> None:
    signed = bytes([3]) + pubkey_from_peer_id(ALICE.peer_id) + bytes([120]) + b"push"
    data = signed + ALICE.sign(signing_input("s1", signed))

    with pytest.raises(ProtocolError):
        open_envelope(data, max_bytes=LIMIT, swarm="s1")


@pytest.mark.parametrize("outer", [b"", b"\x03", _raw(version=1), _raw(version=2), _raw(version=4),
                                   b"\x03" + b"k" * 40])
def test_malformed_outer_layers_are_protocol_errors(outer: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(outer, max_bytes=LIMIT, swarm="s1")


@pytest.mark.parametrize("bad", [{"round": -1}, {"seq": 2**63}, {"kind": ""}, {"kind": "pü"},
                                 {"swarm": "x" * 200}])
def test_seal_refuses_what_open_would_refuse(bad: dict) -> None:
    with pytest.raises(ProtocolError):
        _sealed(**bad)


# ---------------------------------------------------------------- replay guard


def test_replay_guard_refuses_repeated_and_older_seq() -> None:
    guard = ReplayGuard()
    guard.check(_env(5))

    with pytest.raises(Replay):
        guard.check(_env(5))
    with pytest.raises(Replay):
        guard.check(_env(4))
    guard.check(_env(6))


def test_replay_guard_tracks_senders_independently() -> None:
    guard = ReplayGuard()
    guard.check(_env(5))

    guard.check(_env(1, sender=MALLORY.peer_id))

    assert len(guard) == 2


def test_replay_guard_is_bounded_lru() -> None:
    guard = ReplayGuard(max_peers=2)
    guard.check(_env(5, sender="a"))
    guard.check(_env(5, sender="b"))
    guard.check(_env(6, sender="a"))  # "a" is now the most recent
    guard.check(_env(1, sender="c"))  # evicts "b"

    assert len(guard) == 2
    guard.check(_env(1, sender="b"))  # forgotten, so accepted again
    with pytest.raises(Replay):
        guard.check(_env(1, sender="c"))


# ---------------------------------------------------------------- fuzzing

VALID = _sealed(payload=bytes(range(64)))


def _only_protocol_errors(data: bytes) -> None:
    try:
        open_envelope(data, max_bytes=LIMIT, swarm="s1", kinds=("push",))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    _only_protocol_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_fuzz_truncations_raise_only_protocol_errors(cut: int) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(VALID[:cut], max_bytes=LIMIT, swarm="s1")


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=8 * len(VALID) - 1))
def test_fuzz_bit_flips_never_yield_a_different_valid_envelope(bit: int) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)

    try:
        env = open_envelope(bytes(data), max_bytes=LIMIT, swarm="s1")
    except ProtocolError:
        return
    assert env == open_envelope(VALID, max_bytes=LIMIT, swarm="s1")  # only a non-semantic byte could change


def test_a_signature_over_the_bytes_themselves_does_not_verify() -> None:
    # Version 2 signed domain + swarm + the bytes; version 3 signs SHA-256 of them. An envelope signed
    # the old way under the new version byte is refused, so the two rules never mix.
    signed = _sealed()[:-64]
    old_rule = signed + ALICE.sign(b"p2pnode-envelope-v2\x00" + b"\x02s1" + signed)
    same_domain = signed + ALICE.sign(DOMAIN + b"\x02s1" + signed)

    for data in (old_rule, same_domain):
        with pytest.raises(BadSignature):
            open_envelope(data, max_bytes=LIMIT, swarm="s1")
    assert open_envelope(signed + ALICE.sign(signing_input("s1", signed)), max_bytes=LIMIT, swarm="s1")
