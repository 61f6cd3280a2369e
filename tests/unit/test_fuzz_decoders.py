"""Every decoder of untrusted bytes, fuzzed (targets in ``p2pnode.bench.fuzz_targets``).

For arbitrary bytes and for mutations of valid encodings, a decoder returns a valid object or raises its
documented typed error (ProtocolError and its subclasses, CodecError, SpsaError, ControlError, the frame
header's MessageRejected), never anything else; a length claimed on the wire is checked before anything
is allocated for it. The ``…-signed`` targets sign the fuzzed bytes, so the parsers behind the signature
are reached; the atheris harness (``scripts/fuzz_atheris.py``) runs the same targets coverage-guided.
"""

from __future__ import annotations

import time
import tracemalloc

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.bench.fuzz_targets import FINGERPRINT, KEY, LAYOUT, DecoderTarget, build_targets
from protocols.envelope import uvarint
from protocols.spsa import origin_tag

TARGETS = build_targets()
NAMES = sorted(TARGETS)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# byte strings that make parsers take unusual branches: extreme ints, msgpack headers claiming 4 GiB,
# NaN and Inf in the float formats on the wire
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff" * 4, b"\xff" * 8, b"\xc6\xff\xff\xff\xff",
               b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
               b"\xcf" + b"\xff" * 8, b"\xd3\x80" + bytes(7), b"\xcb\x7f\xf8" + bytes(6), b"\x00\x00\xc0\x7f",
               b"\x00\x00\x80\x7f", b"\x00\x7c", b"\x80\x7f", b"\xc0", b"\xc1", b"\xc7\x01\x01x")


def decodes(target: DecoderTarget, data: bytes) -> bool:
    """True if ``data`` decoded (and the result is valid), False if it raised the target's typed error."""
    try:
        out = target.decode(data)
    except target.errors:
        return False
    target.check(out)
    return True


@st.composite
def mutations(draw: st.DrawFn, samples: tuple[bytes, ...]) -> bytes:
    """A valid sample changed 1–4 times: bit flips, interesting bytes inserted or written over, cuts,
    deletions, appended bytes, or spliced with another sample."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 6))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[pos % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            data[pos:pos] = draw(st.sampled_from(INTERESTING))
        elif op == 2:
            chunk = draw(st.sampled_from(INTERESTING))
            data[pos:pos + len(chunk)] = chunk
        elif op == 3:
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == 4:
            del data[pos:]
        elif op == 5:
            data += draw(st.binary(min_size=1, max_size=32))
        else:
            other = draw(st.sampled_from(samples))
            data = data[:pos] + other[draw(st.integers(0, len(other))):]
    return bytes(data)


@pytest.mark.parametrize("name", NAMES)
def test_valid_samples_decode(name: str) -> None:
    target = TARGETS[name]
    assert all(decodes(target, sample) for sample in target.samples)


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_the_typed_error(name: str, data: bytes) -> None:
    decodes(TARGETS[name], data)


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.data())
def test_mutated_valid_encodings_decode_or_raise_the_typed_error(name: str, data: st.DataObject) -> None:
    target = TARGETS[name]
    decodes(target, data.draw(mutations(target.samples)))


def _huge_model_data() -> bytes:
    """A model payload whose data field claims 4 GiB (bin 32) and holds 3 bytes."""
    head = msgpack.packb({"v": 1, "fp": FINGERPRINT, "r": 1, "n": LAYOUT.numel, "dt": "f32"})
    return bytes([0x86]) + head[1:] + msgpack.packb("data") + b"\xc6\xff\xff\xff\xff" + b"abc"


def _topk_claiming(k: int) -> bytes:
    sample = bytearray(TARGETS["codec:topk:0.1"].samples[0])
    sample[16:24] = k.to_bytes(8, "little")
    return bytes(sample)


def _dense_claiming(numel: int) -> bytes:
    sample = bytearray(TARGETS["codec:dense"].samples[0][:64])
    sample[8:16] = numel.to_bytes(8, "little")
    return bytes(sample)


def _state_with(log: object = None, pending: object = None) -> bytes:
    model, good_log, good_pending, step = msgpack.unpackb(TARGETS["spsa-state"].samples[0], raw=False)
    return msgpack.packb([model, good_log if log is None else log,
                          good_pending if pending is None else pending, step])


def _log_with_codes(codes: object) -> dict[str, object]:
    log = msgpack.unpackb(TARGETS["spsa-state"].samples[0], raw=False)[1]
    log["origins"][KEY.peer_id]["codes"] = codes
    return log


def _replica_claiming_4_gib() -> bytes:
    head = msgpack.packb({"v": 1, "fp": FINGERPRINT, "r": 1, "c": "topk:0.1", "base": b"", "new": bytes(16),
                          "ack": b""})
    return bytes([0x88]) + head[1:] + msgpack.packb("data") + b"\xc6\xff\xff\xff\xff"


HUGE_CLAIMS = [
    ("frame-header", b"\x00" + (2**56 - 1).to_bytes(7, "big")),
    ("exchange", b"\x92\xc6\xff\xff\xff\xff" + b"x"),
    ("exchange", b"\xdd\xff\xff\xff\xff"),
    ("model", _huge_model_data()),
    ("model", msgpack.packb({"v": 1, "fp": FINGERPRINT, "r": 1, "n": 2**40, "dt": "f32", "data": b""})),
    ("envelope-signed", bytes([255]) + b"push"),
    ("envelope-signed", bytes([4]) + b"push" + b"\xff" * 9 + b"\x7f"),
    ("codec:topk:0.1", _topk_claiming(2**63)),
    ("codec:topk:0.01", _topk_claiming(LAYOUT.numel + 1)),
    ("codec:dense", _dense_claiming(2**40)),
    ("replica:topk:0.1", _replica_claiming_4_gib()),
    ("spsa-batch", b"\x02" + uvarint(2**62) + b"x"),
    ("spsa-summary", b"\x02" + origin_tag(KEY.peer_id) + uvarint(1) + uvarint(2**62)),
    ("spsa-summary", b"\x02" + (origin_tag(KEY.peer_id) + uvarint(2**62) + uvarint(0)) * 17),
    ("spsa-state", _state_with(log=_log_with_codes([[0, 2**40]]))),  # once passed to bytes(): a TiB
    ("spsa-state", _state_with(pending=[[KEY.peer_id, 2**64 - 1, 0, 1]])),
    ("spsa-state", b"\x94\xc6\xff\xff\xff\xff"),
    ("record", b"\x92\xc6\x7f\xff\xff\xff"),
    ("sybil-record-signed", msgpack.packb([1, KEY.peer_id, 3, 2**40, "f16", b""])),
    ("control", b"P2PC\x01" + bytes(2**20)),
    ("control-signed", b"[" * 1000),
]


HUGE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(HUGE_CLAIMS)]


@pytest.mark.parametrize(("name", "data"), HUGE_CLAIMS, ids=HUGE_IDS)
def test_a_claimed_huge_length_is_refused_at_once_without_allocating_it(name: str, data: bytes) -> None:
    target = TARGETS[name]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(target.errors):
            target.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 4 * len(data) + 2**20, f"{peak:,} bytes allocated for a {len(data):,}-byte input"
