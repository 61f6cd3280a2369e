"""protocols.spsa: seeds, the one-byte code, batch wire format, signed batches and the scalar log."""

from __future__ import annotations

import math
import random

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.identity import Identity
from protocols.envelope import seal
from protocols.errors import ProtocolError, TooLarge
from protocols.spsa import (
    DECODE_TABLE,
    ENVELOPE_KIND,
    MAX_MAGNITUDE,
    MIN_MAGNITUDE,
    REL_ERROR_BOUND,
    BannedOrigin,
    Equivocation,
    ScalarBatch,
    ScalarLog,
    SpsaError,
    decode_batch,
    decode_scalar,
    decode_scalars,
    decode_summary,
    derive_seed,
    encode_batch,
    encode_scalar,
    encode_scalars,
    encode_summary,
    open_batch,
    origin_tag,
    seal_batch,
)

ALICE = Identity.generate()
BOB = Identity.generate()
SWARM = "test-swarm"
F32_SLACK = 1e-7  # the decode table holds float32-rounded values


def batch(origin: str, start: int, codes: list[int], k: int = 2) -> ScalarBatch:
    return ScalarBatch(origin=origin, start=start, k=k, codes=bytes(codes))


# --------------------------------------------------------------------------- seeds


def test_derive_seed_is_pinned_63_bit_and_sensitive_to_every_id() -> None:
    seed = derive_seed("12D3KooWorigin", 7, 1)
    assert seed == derive_seed("12D3KooWorigin", 7, 1)
    assert 0 <= seed < 2**63
    others = {derive_seed("12D3KooWorigin", 8, 1), derive_seed("12D3KooWorigin", 7, 0),
              derive_seed("12D3KooWorigim", 7, 1)}
    assert seed not in others
    assert len(others) == 3
    assert derive_seed("a", 0, 0) == 7625539296023521214  # stable across hosts and releases


@pytest.mark.parametrize(("origin", "step", "k"), [("", 0, 0), ("a", -1, 0), ("a", 2**63, 0), ("a", 0, -1),
                                                   ("a", 0, 2**32), ("a", True, 0), ("x" * 129, 0, 0)])
def test_derive_seed_rejects_bad_ids(origin: str, step: int, k: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        derive_seed(origin, step, k)


# --------------------------------------------------------------------------- one-byte code


@pytest.mark.parametrize(("g", "code"), [(1.0, 64), (-1.0, 192), (0.0, 0), (-0.0, 0), (math.inf, 127),
                                         (-math.inf, 255), (1e-9, 0), (-1e9, 255), (math.e, 72)])
def test_encode_hand_cases(g: float, code: int) -> None:
    assert encode_scalar(g) == code


def test_decode_ends_of_the_range() -> None:
    assert decode_scalar(0) == pytest.approx(MIN_MAGNITUDE, rel=F32_SLACK)
    assert decode_scalar(127) == pytest.approx(MAX_MAGNITUDE, rel=F32_SLACK)
    assert decode_scalar(255) == pytest.approx(-MAX_MAGNITUDE, rel=F32_SLACK)
    assert decode_scalar(64) == 1.0
    assert pytest.approx(0.0645, abs=1e-4) == REL_ERROR_BOUND


@pytest.mark.parametrize("code", [-1, 256, 1.0, True])
def test_decode_rejects_non_codes(code: int) -> None:
    with pytest.raises(ValueError, match="0..255"):
        decode_scalar(code)


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        encode_scalar(math.nan)


@given(st.floats(min_value=MIN_MAGNITUDE, max_value=MAX_MAGNITUDE), st.booleans())
def test_round_trip_within_the_documented_bound(magnitude: float, negative: bool) -> None:
    g = -magnitude if negative else magnitude
    g_hat = decode_scalar(encode_scalar(g))
    assert (g_hat < 0) == negative
    assert abs(g_hat / g - 1.0) <= REL_ERROR_BOUND + F32_SLACK


@given(st.floats(min_value=MAX_MAGNITUDE * 1.0001, allow_infinity=True, allow_nan=False), st.booleans())
def test_large_values_clamp_to_the_largest_magnitude(magnitude: float, negative: bool) -> None:
    g_hat = decode_scalar(encode_scalar(-magnitude if negative else magnitude))
    assert g_hat == pytest.approx(-MAX_MAGNITUDE if negative else MAX_MAGNITUDE, rel=F32_SLACK)


@given(st.floats(min_value=0.0, max_value=MIN_MAGNITUDE * 0.999))
def test_tiny_values_clamp_to_the_smallest_magnitude(magnitude: float) -> None:
    assert decode_scalar(encode_scalar(magnitude)) == pytest.approx(MIN_MAGNITUDE, rel=F32_SLACK)


@given(st.lists(st.floats(allow_nan=False), max_size=50))
def test_vectorised_code_matches_the_scalar_one(values: list[float]) -> None:
    codes = encode_scalars(np.asarray(values))
    assert codes.dtype == np.uint8
    assert [int(c) for c in codes] == [encode_scalar(v) for v in values]
    assert list(decode_scalars(codes)) == [decode_scalar(int(c)) for c in codes]
    assert list(decode_scalars(bytes(codes))) == list(decode_scalars(codes))


def test_vectorised_code_accepts_tensors_and_keeps_shape() -> None:
    t = torch.tensor([[0.5, -2.0], [0.0, 100.0]])
    codes = encode_scalars(t)
    assert codes.shape == (2, 2)
    assert np.array_equal(decode_scalars(torch.from_numpy(codes.astype(np.int64))), DECODE_TABLE[codes])


# --------------------------------------------------------------------------- batches


def test_batch_round_trip_and_layout() -> None:
    b = batch("12D3KooWx", 5, [1, 2, 3, 4, 5, 6], k=3)
    assert (b.n_steps, b.stop, b.step_codes(6)) == (2, 7, bytes([4, 5, 6]))
    assert list(b.scalars())[4] == ("12D3KooWx", 6, 1, 5)
    raw = encode_batch(b)
    assert raw == bytes([2, 3, 1, 2, 3, 4, 5, 6])  # version, uvarint K, the codes
    assert decode_batch(raw, origin="12D3KooWx", start=5, max_steps=2, max_k=3) == b


@pytest.mark.parametrize("raw", [
    b"", b"\x01\x02abcd", b"\x03\x02abcd", b"\x02", b"\x02\x00abcd", b"\x02\x05abcd", b"\x02\x02abc",
    b"\x02\x02", b"\x02\x80", b"\x02\x82\x00ab", b"\x02\x02abcdef", "text", None,
])  # fmt: skip
def test_decode_batch_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(SpsaError):
        decode_batch(raw, origin="peer", start=0, max_steps=2, max_k=4)


@pytest.mark.parametrize(("origin", "start"), [("", 0), (7, 0), ("p", -1), ("p", 2**63 - 1), ("p", 1.0)])
def test_decode_batch_rejects_bad_envelope_fields(origin: object, start: object) -> None:
    with pytest.raises(SpsaError):
        decode_batch(b"\x02\x02abcd", origin=origin, start=start, max_steps=2, max_k=4)  # type: ignore[arg-type]


def test_decode_batch_bounds_the_size_before_parsing() -> None:
    raw = encode_batch(batch("p", 0, [7] * 1000, k=2))
    with pytest.raises(SpsaError) as info:
        decode_batch(raw, origin="p", start=0, max_steps=10, max_k=2)
    assert isinstance(info.value, TooLarge)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_decode_batch_fuzz_raises_only_spsa_error(raw: bytes) -> None:
    try:
        decode_batch(raw, origin="p", start=0, max_steps=16, max_k=4)
    except SpsaError:
        pass


@given(st.data())
def test_truncated_and_bit_flipped_batches_raise_only_spsa_error(data: st.DataObject) -> None:
    raw = bytearray(encode_batch(batch("12D3KooWpeer", 3, list(range(16)), k=4)))
    cut = data.draw(st.integers(0, 2))  # shorter than version + K + one step
    with pytest.raises(SpsaError):
        decode_batch(bytes(raw[:cut]), origin="p", start=3, max_steps=16, max_k=4)
    pos, bit = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(0, 7))
    raw[pos] ^= 1 << bit
    try:
        decode_batch(bytes(raw), origin="p", start=3, max_steps=16, max_k=4)
    except SpsaError:
        pass


# --------------------------------------------------------------------------- signed batches


def test_sealed_batch_verifies_after_forwarding_and_keeps_its_bytes() -> None:
    b = batch(ALICE.peer_id, 0, [1, 2, 3, 4])
    sealed = seal_batch(ALICE, b, swarm=SWARM)
    forwarded = bytes(sealed)  # a forwarder passes the exact bytes on; nothing binds it to a receiver
    opened = open_batch(forwarded, swarm=SWARM, max_steps=4, max_k=2)
    assert opened == b
    assert opened.sealed == sealed


def test_only_the_origin_can_seal() -> None:
    with pytest.raises(ValueError, match="not the batch origin"):
        seal_batch(BOB, batch(ALICE.peer_id, 0, [1, 2]), swarm=SWARM)


def test_a_batch_is_its_sealers_and_a_sealed_size_is_small() -> None:
    payload = encode_batch(batch(ALICE.peer_id, 0, [1, 2]))
    sealed = seal(BOB, kind=ENVELOPE_KIND, swarm=SWARM, round=0, seq=0, payload=payload)
    assert open_batch(sealed, swarm=SWARM, max_steps=4, max_k=2).origin == BOB.peer_id  # never ALICE's
    codes = bytes(250)
    big = ScalarBatch(origin=ALICE.peer_id, start=10_000, k=1, codes=codes)
    size = len(seal_batch(ALICE, big, swarm=SWARM))
    assert size - len(codes) <= 99 + len(ENVELOPE_KIND) + 3 + 3 + 2  # 286 bytes of overhead in version 1


@pytest.mark.parametrize("kw", [{"swarm": "other"}, {"max_steps": 1}, {"max_k": 1}])
def test_open_batch_checks_swarm_and_limits(kw: dict[str, object]) -> None:
    sealed = seal_batch(ALICE, batch(ALICE.peer_id, 0, [1, 2, 3, 4]), swarm=SWARM)
    args: dict[str, object] = {"swarm": SWARM, "max_steps": 4, "max_k": 2} | kw
    with pytest.raises(SpsaError):
        open_batch(sealed, **args)  # type: ignore[arg-type]


def test_open_batch_refuses_mismatched_envelope_counters_and_kinds() -> None:
    payload = encode_batch(batch(ALICE.peer_id, 4, [1, 2]))
    for kind, rnd in ((ENVELOPE_KIND, 3), ("model", 4)):
        with pytest.raises(SpsaError):
            open_batch(seal(ALICE, kind=kind, swarm=SWARM, round=rnd, seq=4, payload=payload),
                       swarm=SWARM, max_steps=4, max_k=2)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tampered_sealed_batches_raise_only_spsa_error(data: st.DataObject) -> None:
    sealed = bytearray(seal_batch(ALICE, batch(ALICE.peer_id, 0, [9, 8, 7, 6]), swarm=SWARM))
    pos = data.draw(st.integers(0, len(sealed) - 1))
    sealed[pos] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(SpsaError):
        open_batch(bytes(sealed), swarm=SWARM, max_steps=4, max_k=2)


# --------------------------------------------------------------------------- scalar log


def test_log_applies_each_scalar_once() -> None:
    log = ScalarLog(k=2)
    first = log.add(batch("a", 0, [1, 2, 3, 4]))
    assert first == [("a", 0, 0, 1), ("a", 0, 1, 2), ("a", 1, 0, 3), ("a", 1, 1, 4)]
    assert log.add(batch("a", 0, [1, 2, 3, 4])) == []
    assert log.add(batch("a", 1, [3, 4, 5, 6])) == [("a", 2, 0, 5), ("a", 2, 1, 6)]
    assert log.summary() == {"a": 2}


def test_summary_is_the_contiguous_prefix() -> None:
    log = ScalarLog(k=1)
    log.add(batch("a", 1, [1], k=1))
    log.add(batch("b", 0, [1, 1], k=1))
    log.add(batch("b", 3, [1], k=1))
    assert log.summary() == {"a": -1, "b": 1}
    log.add(batch("b", 2, [1], k=1))
    assert log.summary()["b"] == 3


def test_equivocation_bans_the_origin_and_changes_nothing() -> None:
    log = ScalarLog(k=2)
    log.add(batch("a", 0, [1, 2]))
    with pytest.raises(Equivocation) as info:
        log.add(batch("a", 0, [1, 3, 5, 5]))
    assert (info.value.origin, info.value.step, info.value.k, info.value.known, info.value.received) == (
        "a", 0, 1, 2, 3)
    assert "a" in log.banned
    assert "a" not in log.summary()
    with pytest.raises(BannedOrigin):
        log.add(batch("a", 5, [1, 2]))
    assert isinstance(info.value, ProtocolError)


def test_log_refuses_wrong_k_far_steps_and_too_many_origins() -> None:
    log = ScalarLog(k=2, max_origins=2, max_pending_steps=10)
    with pytest.raises(SpsaError, match="k=3"):
        log.add(batch("a", 0, [1, 2, 3], k=3))
    with pytest.raises(SpsaError, match="window"):
        log.add(batch("a", 10, [1, 2]))
    log.add(batch("a", 9, [1, 2]))
    log.add(batch("b", 0, [1, 2]))
    with pytest.raises(SpsaError, match="origins"):
        log.add(batch("c", 0, [1, 2]))
    assert log.add(batch("a", 0, [1, 2])) == [("a", 0, 0, 1), ("a", 0, 1, 2)]


def test_missing_for_serves_compact_runs() -> None:
    log = ScalarLog(k=1)
    log.add(batch("a", 0, [1, 2], k=1))
    log.add(batch("a", 2, [3], k=1))
    log.add(batch("a", 5, [6, 7], k=1))
    log.add(batch("b", 0, [9], k=1))
    served = log.missing_for({"a": 0, "b": 0})
    assert served == [batch("a", 1, [2, 3], k=1), batch("a", 5, [6, 7], k=1)]
    assert log.missing_for({}, max_steps=1) == [batch("a", 0, [1], k=1), batch("b", 0, [9], k=1)]


def test_missing_for_forwards_the_origin_signed_bytes() -> None:
    log, peer = ScalarLog(k=2), ScalarLog(k=2)
    first = open_batch(seal_batch(ALICE, batch(ALICE.peer_id, 0, [1, 2, 3, 4]), swarm=SWARM),
                       swarm=SWARM, max_steps=8, max_k=2)
    log.add(first)
    log.add(batch(ALICE.peer_id, 2, [5, 6]))  # e.g. learned unsigned from a simulator
    served = log.missing_for(peer.summary())
    assert served[0].sealed == first.sealed
    assert served[1].sealed is None
    forwarded = open_batch(served[0].sealed or b"", swarm=SWARM, max_steps=8, max_k=2)
    assert len(peer.add(forwarded)) == 4


def test_signed_copy_of_known_steps_is_kept_for_forwarding() -> None:
    log = ScalarLog(k=2)
    plain = batch(ALICE.peer_id, 0, [1, 2])
    log.add(plain)
    signed = open_batch(seal_batch(ALICE, plain, swarm=SWARM), swarm=SWARM, max_steps=8, max_k=2)
    assert log.add(signed) == []
    assert log.missing_for({})[0].sealed == signed.sealed


def test_retention_forgets_old_codes_but_never_reapplies_them() -> None:
    log = ScalarLog(k=1, max_retained_steps=3)
    log.add(batch("a", 0, list(range(10)), k=1))
    assert log.add(batch("a", 0, [0], k=1)) == []
    assert log.add(batch("a", 0, [99], k=1)) == []  # forgotten: cannot tell, but never applied twice
    assert [b.start for b in log.missing_for({})] == [7]
    assert log.summary() == {"a": 9}


def test_state_dict_round_trip_through_msgpack() -> None:
    log = ScalarLog(k=2)
    log.add(open_batch(seal_batch(ALICE, batch(ALICE.peer_id, 0, [1, 2]), swarm=SWARM),
                       swarm=SWARM, max_steps=8, max_k=2))
    log.add(batch("b", 3, [1, 2]))
    log.ban("evil")
    packed = msgpack.packb(log.state_dict(), use_bin_type=True)
    state = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    restored = ScalarLog(k=2)
    restored.load_state_dict(state)
    assert restored.summary() == log.summary()
    assert restored.banned == {"evil"}
    assert restored.missing_for({}) == log.missing_for({})
    assert restored.missing_for({})[0].sealed == log.missing_for({})[0].sealed
    assert restored.add(batch("b", 3, [1, 2, 7, 7])) == [("b", 4, 0, 7), ("b", 4, 1, 7)]
    with pytest.raises(ValueError, match="k"):
        ScalarLog(k=3).load_state_dict(state)


def test_summary_wire_format_round_trip_and_limits() -> None:
    summary = {"a": -1, "b": 300}
    raw = encode_summary(summary)
    assert raw == b"\x02" + origin_tag("a") + b"\x00\x00" + origin_tag("b") + bytes([0xAD, 0x02, 0x00])
    log = ScalarLog(k=1)
    log.add(batch("a", 0, [1], k=1))
    log.add(batch("b", 0, [1], k=1))
    assert log.resolve(decode_summary(raw, max_origins=2)) == {"a": (-1, ()), "b": (300, ())}
    assert ScalarLog(k=1).resolve(decode_summary(raw, max_origins=2)) == {
        "#" + origin_tag("a").hex(): (-1, ()), "#" + origin_tag("b").hex(): (300, ())}  # unknown tags stay
    for bad in (encode_summary({"a": 1, "b": 2, "c": 3}), b"\x02" + (origin_tag("a") + b"\x00\x00") * 2,
                b"\x01", b"", b"\x02" + origin_tag("a"), b"\x02" + origin_tag("a") + b"\x80",
                b"\x02" + origin_tag("a") + b"\x00", b"\x02" + origin_tag("a") + b"\x00\x21",
                b"\x02" + origin_tag("a") + b"\x00\x01\x00", b"\x02abc"):
        with pytest.raises(SpsaError):
            decode_summary(bad, max_origins=2)
    for held in (-2, (5, ((6, 7),)), (5, ((8, 7),)), (5, ((7, 8), (9, 9))), (0, ((2, 2),) * 40)):
        with pytest.raises(ValueError, match="varint|run"):
            encode_summary({"a": held})  # type: ignore[dict-item]


def test_holdings_list_the_runs_above_the_prefix_and_peers_are_not_sent_them() -> None:
    log = ScalarLog(k=1)
    for start in (0, 1, 4, 5, 9):
        log.add(batch("a", start, [start + 1], k=1))
    holdings = log.holdings()
    assert holdings == {"a": (1, ((4, 5), (9, 9)))}
    assert log.resolve(decode_summary(encode_summary(holdings), max_origins=1)) == holdings
    peer = ScalarLog(k=1)
    for start in (0, 2, 5):
        peer.add(batch("a", start, [start + 1], k=1))
    sent = [s for b in log.missing_for(peer.holdings()) for s in range(b.start, b.stop)]
    assert sent == [1, 4, 9]  # step 5 is in the peer's run, steps 2 and 3 we do not have


def test_a_new_origin_whose_tag_collides_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import protocols.spsa as spsa

    monkeypatch.setattr(spsa, "origin_tag", lambda origin: b"\x00" * 8)
    log = ScalarLog(k=1)
    log.add(batch("a", 0, [1], k=1))
    with pytest.raises(SpsaError, match="tag"):
        log.add(batch("b", 0, [1], k=1))
    assert log.add(batch("a", 1, [2], k=1)) == [("a", 1, 0, 2)]


# --------------------------------------------------------------------------- properties


Delivery = tuple[set[tuple[str, int, int, int]], list[ScalarBatch], list[ScalarBatch]]


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    """Scalars of up to 3 origins, cut into batches; two delivery orders with duplicates."""
    truth: set[tuple[str, int, int, int]] = set()
    batches: list[ScalarBatch] = []
    for origin in ["o1", "o2", "o3"][: draw(st.integers(1, 3))]:
        codes = draw(st.lists(st.integers(0, 255), min_size=2, max_size=24).filter(lambda c: len(c) % 2 == 0))
        truth |= {(origin, i // 2, i % 2, c) for i, c in enumerate(codes)}
        n_steps = len(codes) // 2
        for _ in range(draw(st.integers(1, 6))):
            start = draw(st.integers(0, n_steps - 1))
            stop = draw(st.integers(start + 1, n_steps))
            batches.append(batch(origin, start, codes[2 * start : 2 * stop]))
        batches.append(batch(origin, 0, codes))  # so the batches cover everything
    seed = draw(st.integers(0, 2**32))
    first = batches + random.Random(seed).choices(batches, k=len(batches))
    second = list(first)
    random.Random(seed + 1).shuffle(first)
    random.Random(seed + 2).shuffle(second)
    return truth, first, second


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries())
def test_any_interleaving_applies_every_scalar_exactly_once(
    case: Delivery,
) -> None:
    truth, first, second = case
    applied = []
    for order in (first, second):
        log = ScalarLog(k=2)
        scalars = [s for b in order for s in log.add(b)]
        assert len(scalars) == len(set(scalars))
        assert set(scalars) == truth
        applied.append(log.summary())
    assert applied[0] == applied[1]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries(), st.integers(0, 2**32))
def test_anti_entropy_converges_two_logs(
    case: Delivery, seed: int
) -> None:
    truth, first, _ = case
    a, b = ScalarLog(k=2), ScalarLog(k=2)
    got: dict[int, set[tuple[str, int, int, int]]] = {id(a): set(), id(b): set()}
    rng = random.Random(seed)
    for item in first:
        log = rng.choice([a, b])
        got[id(log)] |= set(log.add(item))
    for src, dst in ((a, b), (b, a)):
        for item in src.missing_for(dst.summary()):
            new = set(dst.add(item))
            assert not new & got[id(dst)]
            got[id(dst)] |= new
    assert got[id(a)] == got[id(b)] == truth
    assert a.summary() == b.summary()


@given(deliveries(), st.data())
def test_any_changed_code_is_equivocation(
    case: Delivery, data: st.DataObject
) -> None:
    _, first, _ = case
    log = ScalarLog(k=2)
    for item in first:
        log.add(item)
    victim = data.draw(st.sampled_from(first))
    pos = data.draw(st.integers(0, len(victim.codes) - 1))
    codes = bytearray(victim.codes)
    codes[pos] = (codes[pos] + data.draw(st.integers(1, 255))) % 256
    with pytest.raises(Equivocation):
        log.add(ScalarBatch(origin=victim.origin, start=victim.start, k=2, codes=bytes(codes)))
    assert victim.origin in log.banned
