"""Codecs on hostile input: malformed payloads raise CodecError and nothing else, before allocating."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codecs import CodecError, Layout, eliasfano, make_codec
from protocols.codecs.topk import TopKCodec
from protocols.codecs.wire import HEADER_BYTES
from tests.unit.test_codecs import ALL_SPECS

LAYOUT = Layout(((8, 3, 3, 3), (8,), (10, 72), (10,), ()))
X = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(0))
PAYLOADS = {spec: make_codec(spec).encode(X, LAYOUT) for spec in ALL_SPECS}


def _decode_is_safe(spec: str, data: bytes, layout: Layout = LAYOUT) -> None:
    """Decoding either raises CodecError or returns a finite tensor of the right size."""
    try:
        out = make_codec(spec).decode(data, layout)
    except CodecError:
        return
    assert out.shape == (layout.numel,)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_valid_payload_decodes(spec: str) -> None:
    assert make_codec(spec).decode(PAYLOADS[spec], LAYOUT).shape == (LAYOUT.numel,)


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_truncated_or_extended_payload_is_rejected(spec: str, data: st.DataObject) -> None:
    payload = PAYLOADS[spec]
    cut = data.draw(st.integers(0, len(payload) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=64))

    for bad in (payload[:cut], payload + extra):
        with pytest.raises(CodecError):
            make_codec(spec).decode(bad, LAYOUT)


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=3000))
def test_random_bytes_never_raise_anything_else(spec: str, data: bytes) -> None:
    _decode_is_safe(spec, data)


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_flipped_body_bytes_never_raise_anything_else(spec: str, data: st.DataObject) -> None:
    payload = bytearray(PAYLOADS[spec])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(HEADER_BYTES, len(payload) - 1))
        payload[pos] ^= data.draw(st.integers(1, 255))

    _decode_is_safe(spec, bytes(payload))


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("pos", range(HEADER_BYTES))
def test_any_header_change_is_rejected(spec: str, pos: int) -> None:
    payload = bytearray(PAYLOADS[spec])
    payload[pos] ^= 0x01

    with pytest.raises(CodecError):
        make_codec(spec).decode(bytes(payload), LAYOUT)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_payload_for_another_codec_or_layout_is_rejected(spec: str) -> None:
    same_numel = Layout(((LAYOUT.numel,),))
    for other in ALL_SPECS:
        same_family = other.split(":")[0] == spec.split(":")[0]
        if not same_family or (other != spec and not spec.startswith("topk")):  # topk: k is in the payload
            with pytest.raises(CodecError):
                make_codec(spec).decode(PAYLOADS[other], LAYOUT)
    for layout in (Layout.flat(3), same_numel):
        with pytest.raises(CodecError):
            make_codec(spec).decode(PAYLOADS[spec], layout)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_like_payloads_are_accepted(spec: str, kind: type) -> None:
    out = make_codec(spec).decode(kind(PAYLOADS[spec]), LAYOUT)

    assert torch.equal(out, make_codec(spec).decode(PAYLOADS[spec], LAYOUT))


@pytest.mark.parametrize("bad", [None, "text", 12, [1, 2]])
def test_non_bytes_payload_is_a_codec_error(bad: object) -> None:
    with pytest.raises(CodecError, match="must be bytes"):
        make_codec("dense").decode(bad, LAYOUT)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_huge_layout_with_short_payload_allocates_nothing(spec: str) -> None:
    huge = Layout.flat(2**40)
    codec = make_codec(spec)
    header = struct.pack("<BBBBIQ", 0xCD, 1, codec.codec_id, PAYLOADS[spec][3], huge.crc, huge.numel)
    lying = header + struct.pack("<Qf", 2**40, 1.0) + b"\x00" * 64  # topk: a count of 2**40

    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            codec.decode(lying, huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---------------------------------------------------------------- crafted bad values


def _with_value(payload: bytes, offset: int, fmt: str, value: float) -> bytes:
    out = bytearray(payload)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


NAN_CASES = [("dense", HEADER_BYTES + 4 * 7, "<f", float("nan")),
             ("dense", HEADER_BYTES, "<f", float("inf")),
             ("fp16", HEADER_BYTES + 2 * 3, "<e", float("nan")),
             ("fp16", HEADER_BYTES, "<e", float("-inf")),
             ("bf16", HEADER_BYTES + 2 * 3, "<H", 0x7FC0),
             ("bf16", HEADER_BYTES, "<H", 0xFF80),
             ("int8", HEADER_BYTES, "<f", float("nan")),
             ("int8", HEADER_BYTES, "<f", -1.0),
             ("int8", HEADER_BYTES, "<f", 3e38),
             ("terngrad", HEADER_BYTES, "<f", float("inf")),
             ("terngrad", HEADER_BYTES + 4, "<f", -0.5),
             ("topk:0.3", HEADER_BYTES + 8, "<f", float("nan")),
             ("topk:0.3", HEADER_BYTES + 8, "<f", -1.0),
             ("topk:0.3", HEADER_BYTES + 12, "<e", float("inf")),
             ("powersgd:2", HEADER_BYTES + 4, "<f", float("nan")),
             ("powersgd:2", HEADER_BYTES, "<f", 3e38)]  # finite factors, product overflows


@pytest.mark.parametrize(("spec", "offset", "fmt", "value"), NAN_CASES)
def test_non_finite_or_out_of_range_values_are_rejected(spec: str, offset: int, fmt: str,
                                                        value: float) -> None:
    bad = _with_value(PAYLOADS[spec], offset, fmt, value)
    with pytest.raises(CodecError):
        make_codec(spec).decode(bad, LAYOUT)


def test_topk_product_overflow_is_rejected() -> None:
    huge_scale = _with_value(PAYLOADS["topk:0.3"], HEADER_BYTES + 8, "<f", 3e38)
    bad = _with_value(huge_scale, HEADER_BYTES + 12, "<e", 2.0)

    with pytest.raises(CodecError, match="NaN or Inf"):
        make_codec("topk:0.3").decode(bad, LAYOUT)


def test_int8_code_minus_128_is_rejected() -> None:
    payload = bytearray(PAYLOADS["int8"])
    payload[-1] = 0x80

    with pytest.raises(CodecError, match="-128"):
        make_codec("int8").decode(bytes(payload), LAYOUT)


def test_terngrad_code_3_and_padding_are_rejected() -> None:
    layout = Layout.flat(5)  # two code bytes, three padding codes in the second
    codec = make_codec("terngrad")
    payload = codec.encode(torch.tensor([1.0, 0.5, -0.5, 0.0, 1.0]), layout)

    for pos, value in ((-2, 0b11), (-1, 0b0100)):
        bad = bytearray(payload)
        bad[pos] = value
        with pytest.raises(CodecError):
            codec.decode(bytes(bad), layout)


def _topk_payload(d: int, indices: list[int], extra_bits: int = 0) -> bytes:
    """A topk payload for ``Layout.flat(d)`` with hand-picked (possibly invalid) Elias-Fano indices."""
    layout, k = Layout.flat(d), len(indices)
    head = make_codec("topk:1").encode(torch.ones(d), layout)[:HEADER_BYTES]
    coded = bytearray(eliasfano.encode(np.array(indices, dtype=np.int64), d))
    low, high = eliasfano.encoded_bytes(d, k)
    assert len(coded) == low + high
    coded[-1] |= extra_bits
    return head + struct.pack("<Qf", k, 1.0) + np.ones(k, "<f2").tobytes() + bytes(coded)


def test_crafted_topk_payload_helper_is_valid() -> None:
    out = make_codec("topk:0.5").decode(_topk_payload(10, [1, 4, 9]), Layout.flat(10))

    assert torch.nonzero(out).view(-1).tolist() == [1, 4, 9]


@pytest.mark.parametrize(("d", "indices"), [(10, [3, 3]),  # duplicate
                                             (64, [5, 4]),  # same high part, decreasing low part
                                             (10, [15]),  # high part fits, index >= d
                                             (40, [2, 45])])
def test_topk_bad_indices_are_rejected(d: int, indices: list[int]) -> None:
    with pytest.raises(CodecError, match="strictly increasing"):
        make_codec("topk:0.5").decode(_topk_payload(d, indices), Layout.flat(d))


def test_topk_extra_set_bit_in_index_coding_is_rejected() -> None:
    good = _topk_payload(1000, [1, 500])
    bad = bytearray(good)
    bad[-1] |= 0x01 if not bad[-1] & 0x01 else 0x02

    with pytest.raises(CodecError):
        make_codec("topk:0.5").decode(bytes(bad), Layout.flat(1000))


@pytest.mark.parametrize("k", [0, LAYOUT.numel + 1, 2**63])
def test_topk_count_out_of_range_is_rejected(k: int) -> None:
    bad = bytearray(PAYLOADS["topk:0.3"])
    struct.pack_into("<Q", bad, HEADER_BYTES, k)

    with pytest.raises(CodecError, match="count"):
        make_codec("topk:0.3").decode(bytes(bad), LAYOUT)


def test_topk_other_count_with_matching_length_decodes() -> None:
    codec = TopKCodec(0.01)
    payload = TopKCodec(0.3).encode(X, LAYOUT)  # warm-up densities reach the decoder like this

    assert int((codec.decode(payload, LAYOUT) != 0).sum()) == 0.3 * LAYOUT.numel // 1 + 1
