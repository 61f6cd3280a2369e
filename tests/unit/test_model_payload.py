"""Full-model fp32 payload: roundtrip, mismatches, limits, non-finite values, fuzzing."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import PayloadMismatch, ProtocolError, TooLarge
from protocols.model import ModelPayload, decode_model, encode_model

FP = b"arch-fingerprint"


def _body(flat: torch.Tensor, **overrides: object) -> dict:
    body = msgpack.unpackb(encode_model(flat, fingerprint=FP, round=4))
    body.update(overrides)
    return body


def test_roundtrip_is_exact_and_writable() -> None:
    flat = torch.randn(1000)

    out = decode_model(encode_model(flat, fingerprint=FP, round=4), expected_numel=1000, fingerprint=FP)

    assert isinstance(out, ModelPayload)
    assert torch.equal(out.flat, flat)
    assert out.round == 4
    assert out.fingerprint == FP
    out.flat.add_(1.0)  # writable, and not aliasing the sender's tensor
    assert not torch.equal(out.flat, flat)


def test_wire_is_a_map_with_little_endian_data() -> None:
    body = _body(torch.tensor([1.0, -2.0]))

    assert body == {"v": 1, "fp": FP, "r": 4, "n": 2, "dt": "f32",
                    "data": b"\x00\x00\x80\x3f\x00\x00\x00\xc0"}


def test_empty_model_roundtrips() -> None:
    data = encode_model(torch.empty(0), fingerprint=FP, round=0)

    out = decode_model(data, expected_numel=0, fingerprint=FP)

    assert out.flat.numel() == 0


def test_non_contiguous_view_is_encoded_by_value() -> None:
    flat = torch.arange(10, dtype=torch.float32)[::2]

    out = decode_model(encode_model(flat, fingerprint=FP, round=1), expected_numel=5, fingerprint=FP)

    assert torch.equal(out.flat, flat)


@pytest.mark.parametrize("bad", [torch.zeros(2, 2), torch.zeros(3, dtype=torch.float64)])
def test_encode_refuses_wrong_shape_or_dtype(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="1-D float32"):
        encode_model(bad, fingerprint=FP, round=0)


def test_fingerprint_mismatch() -> None:
    data = encode_model(torch.zeros(4), fingerprint=b"other", round=0)

    with pytest.raises(PayloadMismatch, match="fingerprint"):
        decode_model(data, expected_numel=4, fingerprint=FP)


def test_element_count_mismatch() -> None:
    data = encode_model(torch.zeros(3), fingerprint=FP, round=0)

    with pytest.raises(PayloadMismatch, match="element count"):
        decode_model(data, expected_numel=4, fingerprint=FP)


def test_claimed_count_with_short_data_is_refused() -> None:
    data = msgpack.packb(_body(torch.zeros(4), n=8, data=b"\x00" * 16))

    with pytest.raises(PayloadMismatch):
        decode_model(data, expected_numel=8, fingerprint=FP)


def test_larger_than_the_model_is_too_large_before_parsing() -> None:
    data = encode_model(torch.zeros(1000), fingerprint=FP, round=0)

    with pytest.raises(TooLarge):
        decode_model(data, expected_numel=10, fingerprint=FP)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    flat = torch.zeros(5)
    flat[3] = value

    with pytest.raises(PayloadMismatch, match="NaN or Inf"):
        decode_model(encode_model(flat, fingerprint=FP, round=0), expected_numel=5, fingerprint=FP)


@pytest.mark.parametrize(
    "overrides", [{"v": 2}, {"dt": "f16"}, {"r": -1}, {"r": 1.5}, {"n": True}, {"data": "str"}, {"extra": 1}]
)
def test_malformed_fields_are_protocol_errors(overrides: dict) -> None:
    data = msgpack.packb(_body(torch.zeros(2), **overrides))

    with pytest.raises(ProtocolError):
        decode_model(data, expected_numel=2, fingerprint=FP)


VALID = encode_model(torch.linspace(-1, 1, 16), fingerprint=FP, round=9)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        decode_model(data, expected_numel=16, fingerprint=FP)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_fuzz_truncations_are_refused(cut: int) -> None:
    with pytest.raises(ProtocolError):
        decode_model(VALID[:cut], expected_numel=16, fingerprint=FP)


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=0, max_value=8 * len(VALID) - 1))
def test_fuzz_bit_flips_raise_only_protocol_errors(bit: int) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)

    try:
        out = decode_model(bytes(data), expected_numel=16, fingerprint=FP)
    except ProtocolError:
        return
    assert out.flat.shape == (16,)
    assert bool(torch.isfinite(out.flat).all())
