"""Codecs: hand-computed cases, round-trip error bounds, exact wire sizes, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols.codecs import CODECS, Codec, CodecError, Layout, make_codec
from protocols.codecs.layouts import RESNET50_NUMEL, resnet50_layout
from protocols.codecs.powersgd import low_rank_dims
from protocols.codecs.topk import TopKCodec, keep_count
from protocols.errors import ProtocolError

ALL_SPECS = ["dense", "fp16", "bf16", "int8", "int8:16", "terngrad", "topk:0.01", "topk:0.3", "topk:1",
             "powersgd:1", "powersgd:2"]

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
layouts = st.lists(shapes, min_size=0, max_size=6).map(lambda s: Layout(tuple(s)))
nonempty_layouts = layouts.filter(lambda layout: layout.numel > 0)


@st.composite
def layout_and_vector(draw: st.DrawFn, layout_strategy: st.SearchStrategy[Layout] = layouts,
                      bound: float = 1e4) -> tuple[Layout, torch.Tensor]:
    """A layout and a finite fp32 vector for it with ``|x| <= bound``."""
    layout = draw(layout_strategy)
    elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
    array = draw(hnp.arrays(np.float32, layout.numel, elements=elements))
    return layout, torch.from_numpy(array.copy())


LAYOUT = Layout(((8, 3, 3, 3), (8,), (10, 72), (10,), ()))


def _roundtrip(spec: str, x: torch.Tensor, layout: Layout = LAYOUT) -> torch.Tensor:
    codec = make_codec(spec)
    return codec.decode(codec.encode(x, layout), layout)


# ---------------------------------------------------------------- layout and registry


def test_layout_offsets_numel_and_split() -> None:
    layout = Layout(((2, 3), (4,), ()))

    assert layout.numel == 11
    assert layout.offsets == (0, 6, 10, 11)
    assert layout.sizes() == [6, 4, 1]
    assert [p.shape for p in layout.split(torch.zeros(11))] == [(2, 3), (4,), ()]
    assert Layout.flat(5) == Layout(((5,),))


def test_layout_of_model_follows_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 2))

    assert Layout.of(model).shapes == ((4, 1, 3, 3), (4,), (2, 4), (2,))


def test_layout_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        Layout(((2, -1),))


def test_resnet50_layout_has_torchvision_size() -> None:
    layout = resnet50_layout()

    assert layout.numel == RESNET50_NUMEL == 25_557_032
    assert len(layout.shapes) == 161


def test_registry_names_and_specs_roundtrip() -> None:
    assert set(CODECS) == {"dense", "fp16", "bf16", "int8", "terngrad", "topk", "powersgd"}
    for spec in ["dense", "fp16", "bf16", "int8", "int8:1024", "terngrad", "terngrad:7", "topk:0.01",
                 "topk:0.001:400", "powersgd:2", "powersgd:4:3"]:
        codec = make_codec(spec)
        assert isinstance(codec, Codec)
        assert codec.spec == spec
        assert make_codec(codec.spec).spec == spec


@pytest.mark.parametrize("spec", ["nope", "topk", "topk:0", "topk:1.5", "topk:x", "topk:0.1:-3", "int8:100",
                                  "int8:8", "dense:1", "fp16:x", "powersgd", "powersgd:0", "powersgd:256",
                                  "terngrad:-1", "terngrad:a", ""])
def test_bad_specs_raise_value_error_with_usage(spec: str) -> None:
    with pytest.raises(ValueError, match="usage|valid codecs|takes no arguments|must be"):
        make_codec(spec)


def test_unknown_codec_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="dense, fp16, bf16, int8, terngrad, topk, powersgd"):
        make_codec("zip")


def test_codec_error_is_a_protocol_error() -> None:
    assert issubclass(CodecError, ProtocolError)


# ---------------------------------------------------------------- encoder input checks


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", [torch.zeros(LAYOUT.numel, dtype=torch.float64),
                                 torch.zeros(LAYOUT.numel + 1), torch.zeros(1, LAYOUT.numel)])
def test_encode_refuses_wrong_tensor(spec: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="expected a 1-D float32"):
        make_codec(spec).encode(bad, LAYOUT)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite_input(spec: str, value: float) -> None:
    x = torch.randn(LAYOUT.numel)
    x[5] = value

    with pytest.raises(ValueError, match="NaN or Inf"):
        make_codec(spec).encode(x, LAYOUT)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_non_contiguous_input_is_encoded_by_value(spec: str) -> None:
    base = torch.randn(2 * LAYOUT.numel)
    codec = make_codec(spec)

    assert codec.encode(base[::2], LAYOUT) == codec.encode(base[::2].clone(), LAYOUT)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_decode_returns_new_writable_tensor_and_leaves_input_alone(spec: str) -> None:
    x = torch.randn(LAYOUT.numel)
    before = x.clone()
    codec = make_codec(spec)
    payload = codec.encode(x, LAYOUT)

    out = codec.decode(payload, LAYOUT)
    out.add_(1.0)

    assert torch.equal(x, before)
    assert out.dtype == torch.float32
    assert out.shape == (LAYOUT.numel,)
    assert codec.decode(payload, LAYOUT).data_ptr() != out.data_ptr()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_layout_roundtrips(spec: str) -> None:
    layout = Layout(())
    codec = make_codec(spec)

    payload = codec.encode(torch.zeros(0), layout)

    assert len(payload) == codec.wire_bytes(layout)
    assert codec.decode(payload, layout).numel() == 0


# ---------------------------------------------------------------- hand-computed cases


def test_dense_wire_is_header_plus_little_endian_fp32() -> None:
    layout = Layout.flat(2)
    payload = make_codec("dense").encode(torch.tensor([1.0, -2.0]), layout)

    assert len(payload) == 24
    assert payload[:4] == bytes([0xCD, 1, 1, 0])
    assert payload[8:16] == (2).to_bytes(8, "little")
    assert payload[16:] == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"


def test_fp16_rounds_and_saturates() -> None:
    x = torch.tensor([1.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 70000.0, -1e9, 1e-9])

    out = _roundtrip("fp16", x, Layout.flat(6))

    assert out.tolist()[:3] == [1.0, 1.0, 1.0 + 2**-9]  # ties to even
    assert out.tolist()[3:5] == [65504.0, -65504.0]
    assert abs(out[5].item() - 1e-9) <= 2**-25


def test_bf16_rounds_to_nearest_even_on_the_fp32_bits() -> None:
    x = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, 3.0e38, -3.4e38])

    out = _roundtrip("bf16", x, Layout.flat(5))

    assert out.tolist()[:3] == [1.0, 1.0 + 2**-6, 1.0 + 2**-7]
    assert out[3].item() == pytest.approx(3.0e38, rel=2**-8)
    assert out[4].item() == -float(torch.finfo(torch.bfloat16).max)  # saturates, no Inf


def test_int8_block_scales_and_codes() -> None:
    x = torch.cat([torch.linspace(-1.0, 1.0, 16), torch.zeros(16), torch.tensor([254.0, 1.0])])
    codec = make_codec("int8:16")
    layout = Layout.flat(34)

    payload = codec.encode(x, layout)
    scales = np.frombuffer(payload, "<f4", 3, 16)
    codes = np.frombuffer(payload, np.int8, offset=28)

    assert len(payload) == 16 + 4 * 3 + 34
    assert scales.tolist() == pytest.approx([1 / 127, 0.0, 2.0])
    assert codes[[0, 15]].tolist() == [-127, 127]
    assert codes[16:32].tolist() == [0] * 16
    assert codes[32:].tolist() == [127, 0]  # 1.0 / 2.0 rounds half to even
    out = codec.decode(payload, layout)
    assert out[32:].tolist() == [254.0, 0.0]
    assert torch.allclose(out[:16], x[:16], atol=0.5 / 127)


def test_terngrad_values_are_ternary_per_layer_and_extremes_are_kept() -> None:
    layout = Layout(((4,), (3,)))
    x = torch.tensor([0.5, -2.0, 0.0, 1.0, 0.0, 0.3, -0.3])

    out = _roundtrip("terngrad", x, layout)

    assert set(out[:4].tolist()) <= {-2.0, 0.0, 2.0}
    assert out[1].item() == -2.0
    assert out[2].item() == 0.0
    s = float(torch.tensor(0.3))
    assert set(out[4:].tolist()) <= {-s, 0.0, s}
    assert out[4].item() == 0.0
    assert torch.all(out * x >= 0)


def test_terngrad_is_unbiased_over_many_draws() -> None:
    base = torch.tensor([0.1, -0.5, 1.0, 0.0, 0.3, -0.9])
    copies = 20_000
    layout = Layout(((copies, 6),))

    out = _roundtrip("terngrad:3", base.repeat(copies), layout).view(copies, 6)

    sigma = torch.sqrt(base.abs() * (1 - base.abs()) / copies)
    assert torch.all((out.mean(0) - base).abs() <= 5 * sigma + 1e-6)


def test_terngrad_stream_state_draws_fresh_randomness() -> None:
    codec = make_codec("terngrad")
    layout = Layout.flat(1000)
    x = torch.full((1000,), 0.5)
    x[0] = 1.0
    state = codec.new_state(layout)

    first, second = codec.encode(x, layout, state), codec.encode(x, layout, state)

    assert first != second
    assert codec.encode(x, layout) == codec.encode(x, layout)  # stateless: seeded per call


@pytest.mark.parametrize("d", [1, 7, 1000, 300_000])
def test_topk_picks_exactly_the_largest_entries(d: int) -> None:
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    codec = make_codec("topk:0.01")
    k = keep_count(0.01, d)

    out = codec.decode(codec.encode(x, Layout.flat(d)), Layout.flat(d))

    expected = set(torch.topk(x.abs(), k).indices.tolist())
    assert set(torch.nonzero(out).view(-1).tolist()) == expected
    kept = torch.tensor(sorted(expected))
    assert torch.allclose(out[kept], x[kept], rtol=2**-11, atol=float(x.abs().max()) * 2**-24)


def test_topk_count_rounding() -> None:
    assert keep_count(0.01, 300) == 3
    assert keep_count(0.01, 301) == 4
    assert keep_count(0.001, 10) == 1
    assert keep_count(1.0, 10) == 10
    assert keep_count(0.5, 0) == 0


def test_topk_is_well_past_50x_at_one_percent() -> None:
    codec = make_codec("topk:0.01")

    assert 4 * RESNET50_NUMEL / codec.wire_bytes(resnet50_layout()) > 120


def test_topk_keeps_zeros_when_there_are_few_nonzeros() -> None:
    x = torch.zeros(100)
    x[3] = -4.0

    out = _roundtrip("topk:0.05", x, Layout.flat(100))

    assert torch.equal(out, x)


def test_powersgd_is_exact_for_rank_one_matrices() -> None:
    g = torch.Generator().manual_seed(1)
    matrix = torch.outer(torch.randn(20, generator=g), torch.randn(30, generator=g))
    bias = torch.randn(20, generator=g)
    layout = Layout(((20, 30), (20,)))
    x = torch.cat([matrix.view(-1), bias])

    for rank in (1, 2, 5):
        out = _roundtrip(f"powersgd:{rank}", x, layout)
        assert torch.allclose(out[:600], x[:600], atol=1e-5 * float(matrix.abs().max()))
        assert torch.equal(out[600:], bias)


def test_powersgd_warm_start_converges_on_a_fixed_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(2)
    spectrum = torch.diag(torch.tensor([10.0, 3.0, 1.0]))
    matrix = torch.randn(40, 3, generator=g) @ spectrum @ torch.randn(3, 50, generator=g)
    layout = Layout(((40, 50),))
    codec = make_codec("powersgd:2")
    state = codec.new_state(layout)

    flat = matrix.view(-1)
    errors = [float((codec.decode(codec.encode(flat, layout, state), layout) - flat).norm())
              for _ in range(6)]

    best = float(torch.linalg.svdvals(matrix)[2])  # Eckart-Young: the rank-2 optimum
    assert errors[-1] <= errors[0]
    assert errors[-1] == pytest.approx(best, rel=1e-2)


def test_powersgd_sends_small_and_thin_tensors_dense() -> None:
    assert low_rank_dims((64, 3, 3, 3), 2) == (64, 27)
    assert low_rank_dims((10,), 2) is None
    assert low_rank_dims((2, 100), 2) is None  # min dim not above the rank
    assert low_rank_dims((3, 3), 1) == (3, 3)  # 1 * (3 + 3) < 9 floats
    assert low_rank_dims((2, 2), 1) is None  # 1 * (2 + 2) == 4 saves nothing
    codec = make_codec("powersgd:2")
    assert codec.wire_bytes(Layout(((64, 3, 3, 3), (64,)))) == 16 + 4 * (2 * (64 + 27) + 64)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=25, deadline=None)
@given(data=layout_and_vector())
def test_wire_bytes_is_exact(spec: str, data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data
    codec = make_codec(spec)

    assert len(codec.encode(x, layout)) == codec.wire_bytes(layout)


@settings(max_examples=60, deadline=None)
@given(data=layout_and_vector())
def test_dense_is_lossless(data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data

    assert torch.equal(_roundtrip("dense", x, layout), x)


@settings(max_examples=60, deadline=None)
@given(data=layout_and_vector(bound=65504.0))
def test_fp16_error_is_half_an_ulp(data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data

    err = (_roundtrip("fp16", x, layout).double() - x.double()).abs()

    assert torch.all(err <= torch.clamp(x.double().abs() * 2**-11, min=2**-25))


@settings(max_examples=60, deadline=None)
@given(data=layout_and_vector(bound=float(np.float32(3e38))))
def test_bf16_error_is_half_an_ulp(data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data

    err = (_roundtrip("bf16", x, layout).double() - x.double()).abs()

    assert torch.all(err <= torch.clamp(x.double().abs() * 2**-8, min=2**-134))


@pytest.mark.parametrize("block", [16, 256])
@settings(max_examples=40, deadline=None)
@given(data=layout_and_vector())
def test_int8_error_is_half_a_step_per_block(block: int, data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data
    out = _roundtrip(f"int8:{block}", x, layout)

    for start in range(0, layout.numel, block):
        chunk = x[start:start + block].double()
        step = float(chunk.abs().max()) / 127
        assert torch.all((out[start:start + block].double() - chunk).abs() <= step * 0.5001 + 1e-37)


@settings(max_examples=40, deadline=None)
@given(data=layout_and_vector(), seed=st.integers(0, 2**16))
def test_terngrad_output_is_sign_consistent_ternary(data: tuple[Layout, torch.Tensor], seed: int) -> None:
    layout, x = data
    out = _roundtrip(f"terngrad:{seed}", x, layout)

    for part, decoded in zip(layout.split(x), layout.split(out)):
        scale = float(part.abs().max()) if part.numel() else 0.0
        assert set(decoded.reshape(-1).tolist()) <= {-scale, 0.0, scale}
        assert torch.all(decoded * part >= 0)


@pytest.mark.parametrize("ratio", [0.01, 0.2, 1.0])
@settings(max_examples=40, deadline=None)
@given(data=layout_and_vector(nonempty_layouts))
def test_topk_keeps_the_top_k_within_fp16_error(ratio: float, data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data
    k = keep_count(ratio, layout.numel)
    out = _roundtrip(f"topk:{ratio}", x, layout)

    magnitude = x.abs()
    threshold = float(torch.topk(magnitude, k).values[-1])
    scale = float(magnitude.max())
    above, below = magnitude > threshold, magnitude < threshold
    assert torch.all(out[below] == 0)
    assert int((out != 0).sum()) <= k
    bound = magnitude.double() * 2**-11 + scale * 2**-23
    assert torch.all((out[above].double() - x[above].double()).abs() <= bound[above])


@pytest.mark.parametrize("rank", [1, 3])
@settings(max_examples=40, deadline=None)
@given(data=layout_and_vector(bound=100.0))
def test_powersgd_projects_each_matrix(rank: int, data: tuple[Layout, torch.Tensor]) -> None:
    layout, x = data
    out = _roundtrip(f"powersgd:{rank}", x, layout)

    for shape, part, decoded in zip(layout.shapes, layout.split(x), layout.split(out)):
        dims = low_rank_dims(shape, rank)
        if dims is None:
            assert torch.equal(decoded, part)
            continue
        matrix, approx = part.reshape(dims).double(), decoded.reshape(dims).double()
        assert torch.linalg.matrix_rank(approx, atol=1e-3 * float(matrix.norm()) + 1e-12) <= rank
        assert float((matrix - approx).norm()) <= float(matrix.norm()) * (1 + 1e-4) + 1e-6


def test_topk_wire_bytes_during_warmup_follows_payload_bytes() -> None:
    codec = TopKCodec(0.01, warmup=4)
    layout = Layout.flat(10_000)
    state = codec.new_state(layout)
    x = torch.randn(10_000)

    sizes = [len(codec.encode(x, layout, state)) for _ in range(5)]

    densities = [0.25, 0.0625, 0.015625, 0.01]  # max(RATIO, 4**-(stage + 1))
    assert sizes[:4] == [TopKCodec.payload_bytes(10_000, keep_count(p, 10_000)) for p in densities]
    assert sizes[4] == codec.wire_bytes(layout)
