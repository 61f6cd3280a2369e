"""Signed envelopes: roundtrip, tampering, swarm/kind checks, limits, replay, fuzzing."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.identity import Identity
from protocols.envelope import DOMAIN, Envelope, ReplayGuard, open_envelope, seal
from protocols.errors import BadSignature, ProtocolError, Replay, TooLarge

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


def test_wire_layout_is_version_sender_signed_signature() -> None:
    version, sender, signed, signature = msgpack.unpackb(_sealed())

    assert (version, sender) == (1, ALICE.peer_id)
    assert msgpack.unpackb(signed) == ["push", ALICE.peer_id, "s1", 3, 7, b"hello"]
    assert len(signature) == 64


def test_empty_payload_and_max_counters_roundtrip() -> None:
    env = open_envelope(_sealed(payload=b"", round=2**63 - 1, seq=0), max_bytes=LIMIT)

    assert (env.payload, env.round, env.seq) == (b"", 2**63 - 1, 0)


def test_tampered_signed_body_is_bad_signature() -> None:
    version, sender, signed, signature = msgpack.unpackb(_sealed())
    forged_body = msgpack.packb(["push", ALICE.peer_id, "s1", 3, 7, b"HELLO"])
    data = msgpack.packb([version, sender, forged_body, signature])

    with pytest.raises(BadSignature):
        open_envelope(data, max_bytes=LIMIT)


def test_claiming_another_sender_is_bad_signature() -> None:
    _, _, signed, signature = msgpack.unpackb(_sealed(MALLORY))
    data = msgpack.packb([1, ALICE.peer_id, signed, signature])

    with pytest.raises(BadSignature):
        open_envelope(data, max_bytes=LIMIT)


def test_inner_sender_must_match_outer_sender() -> None:
    signed = msgpack.packb(["push", ALICE.peer_id, "s1", 3, 7, b"x"])
    data = msgpack.packb([1, MALLORY.peer_id, signed, MALLORY.sign(DOMAIN + signed)])

    with pytest.raises(ProtocolError, match="sender"):
        open_envelope(data, max_bytes=LIMIT)


def test_signature_without_domain_prefix_is_refused() -> None:
    signed = msgpack.packb(["push", ALICE.peer_id, "s1", 3, 7, b"x"])
    data = msgpack.packb([1, ALICE.peer_id, signed, ALICE.sign(signed)])

    with pytest.raises(BadSignature):
        open_envelope(data, max_bytes=LIMIT)


def test_wrong_swarm_is_refused() -> None:
    with pytest.raises(ProtocolError, match="swarm"):
        open_envelope(_sealed(swarm="other"), max_bytes=LIMIT, swarm="s1")


def test_unexpected_kind_is_refused() -> None:
    with pytest.raises(ProtocolError, match="kind"):
        open_envelope(_sealed(kind="evil"), max_bytes=LIMIT, kinds=("push",))


def test_oversized_envelope_is_too_large_before_parsing() -> None:
    data = _sealed(payload=b"x" * 1000)

    with pytest.raises(TooLarge):
        open_envelope(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    "inner",
    [
        ["push", ALICE.peer_id, "s1", -1, 7, b"x"],
        ["push", ALICE.peer_id, "s1", 3, 2**63, b"x"],
        ["push", ALICE.peer_id, "s1", True, 7, b"x"],
        ["push", ALICE.peer_id, "s1", 3.0, 7, b"x"],
        ["push", ALICE.peer_id, "s1", 3, 7, "not bytes"],
        ["", ALICE.peer_id, "s1", 3, 7, b"x"],
        ["push", ALICE.peer_id, "s1", 3, 7],
        {"kind": "push"},
    ],
)
def test_signed_but_malformed_bodies_are_protocol_errors(inner: object) -> None:
    signed = msgpack.packb(inner)
    data = msgpack.packb([1, ALICE.peer_id, signed, ALICE.sign(DOMAIN + signed)])

    with pytest.raises(ProtocolError):
        open_envelope(data, max_bytes=LIMIT)


@pytest.mark.parametrize(
    "outer",
    [
        [2, ALICE.peer_id, b"", b"s" * 64],
        [1, "not-a-peer-id", b"", b"s" * 64],
        [1, ALICE.peer_id, b"", b"short"],
        [1, ALICE.peer_id, "str body", b"s" * 64],
        [1, ALICE.peer_id, b""],
        "just a string",
    ],
)
def test_malformed_outer_layers_are_protocol_errors(outer: object) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(msgpack.packb(outer), max_bytes=LIMIT)


@pytest.mark.parametrize("bad", [{"round": -1}, {"seq": 2**63}, {"kind": ""}, {"swarm": "x" * 200}])
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
        open_envelope(VALID[:cut], max_bytes=LIMIT)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=8 * len(VALID) - 1))
def test_fuzz_bit_flips_never_yield_a_different_valid_envelope(bit: int) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)

    try:
        env = open_envelope(bytes(data), max_bytes=LIMIT)
    except ProtocolError:
        return
    assert env == open_envelope(VALID, max_bytes=LIMIT)  # only a non-semantic byte could change
