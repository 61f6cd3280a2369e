"""ErrorFeedback (error feedback + DGC momentum correction/masking/clipping), stream states, bench."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codecs import ErrorFeedback, Layout, make_codec
from protocols.codecs.bench import bench_codecs, clone_bandwidth_gbs, format_table
from protocols.codecs.topk import TopKCodec, keep_count
from tests.unit.test_codecs import ALL_SPECS

LAYOUT = Layout(((6, 4, 3, 3), (6,), (10, 24), (10,)))
# A small CNN shaped like the fashion-MNIST task's (conv 1→8, conv 8→16, fc 16·7·7→10).
CNN = Layout(((8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 784), (10,)))


def _increments(seed: int, n: int, layout: Layout = LAYOUT) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.numel, generator=g) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 6))
def test_error_feedback_conserves_the_sum(spec: str, seed: int, steps: int) -> None:
    stream = ErrorFeedback(make_codec(spec), LAYOUT)
    codec = make_codec(spec)
    increments = _increments(seed, steps)

    sent = torch.stack([codec.decode(stream.encode(inc), LAYOUT) for inc in increments]).sum(0)

    total = torch.stack(increments).sum(0)
    assert torch.allclose(sent + stream.residual, total, atol=1e-4 * float(total.abs().max()) + 1e-6)


def test_error_feedback_eventually_sends_everything_with_topk() -> None:
    codec = make_codec("topk:0.1")
    stream = ErrorFeedback(codec, LAYOUT)
    x = torch.randn(LAYOUT.numel)

    sent = codec.decode(stream.encode(x), LAYOUT)
    for _ in range(40):
        sent += codec.decode(stream.encode(torch.zeros(LAYOUT.numel)), LAYOUT)

    assert torch.allclose(sent, x, atol=1e-3)


def test_dgc_momentum_correction_and_masking() -> None:
    codec = make_codec("topk:0.05")
    stream = ErrorFeedback(codec, LAYOUT, momentum=0.9)
    g1, g2 = _increments(1, 2)

    first = codec.decode(stream.encode(g1), LAYOUT)
    sent1 = first != 0
    assert stream.velocity is not None
    assert torch.all(stream.velocity[sent1] == 0)  # momentum factor masking
    assert torch.equal(stream.velocity[~sent1], g1[~sent1])
    assert torch.all(stream.residual[sent1].abs() <= first[sent1].abs() * 2**-10)  # v ≈ 0 where sent
    assert torch.equal(stream.residual[~sent1], g1[~sent1])

    velocity, residual = stream.velocity.clone(), stream.residual.clone()
    stream.encode(g2)
    expected_u = 0.9 * velocity + g2
    assert torch.allclose(stream.residual + codec.decode(codec.encode(residual + expected_u, LAYOUT), LAYOUT),
                          residual + expected_u, atol=1e-5)


def test_clipping_scales_the_increment() -> None:
    stream = ErrorFeedback(make_codec("dense"), LAYOUT, clip=1.0)
    x = torch.randn(LAYOUT.numel) * 100

    out = make_codec("dense").decode(stream.encode(x), LAYOUT)

    assert float(out.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(out, x / x.norm(), atol=1e-6)


@pytest.mark.parametrize(("momentum", "clip"), [(-0.1, None), (1.0, None), (0.0, 0.0), (0.0, -1.0)])
def test_error_feedback_refuses_bad_settings(momentum: float, clip: float | None) -> None:
    with pytest.raises(ValueError, match="momentum|clip"):
        ErrorFeedback(make_codec("dense"), LAYOUT, momentum=momentum, clip=clip)


def test_error_feedback_refuses_non_finite_increments() -> None:
    x = torch.zeros(LAYOUT.numel)
    x[0] = float("nan")

    with pytest.raises(ValueError, match="NaN"):
        ErrorFeedback(make_codec("topk:0.1"), LAYOUT).encode(x)


def test_sparsity_warmup_schedule() -> None:
    codec = TopKCodec(0.001, warmup=8)

    assert [codec.density(step) for step in range(10)] == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625,
                                                          0.00390625, 0.00390625, 0.001, 0.001]
    assert TopKCodec(0.1, warmup=4).density(2) == 0.1  # never sparser than RATIO
    assert TopKCodec(0.01).density(0) == 0.01  # no warm-up by default


def test_warmup_runs_through_error_feedback_stream_state() -> None:
    d = 4000
    layout = Layout.flat(d)
    stream = ErrorFeedback(TopKCodec(0.001, warmup=4), layout, momentum=0.5)

    counts = [int((make_codec("topk:0.001").decode(stream.encode(torch.randn(d)), layout) != 0).sum())
              for _ in range(6)]

    assert counts == [keep_count(p, d) for p in (0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001)]


@pytest.mark.parametrize("spec", ["terngrad", "topk:0.05:6", "powersgd:2", "int8"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_roundtrip_continues_identically(spec: str, momentum: float) -> None:
    a = ErrorFeedback(make_codec(spec), LAYOUT, momentum=momentum, clip=50.0)
    first, later = _increments(5, 3), _increments(6, 3)
    for inc in first:
        a.encode(inc)
    b = ErrorFeedback(make_codec(spec), LAYOUT, momentum=momentum, clip=50.0)

    b.load_state_dict(a.state_dict())

    assert [a.encode(inc) for inc in later] == [b.encode(inc) for inc in later]


def test_state_dict_is_a_copy() -> None:
    stream = ErrorFeedback(make_codec("topk:0.1"), LAYOUT)
    stream.encode(torch.randn(LAYOUT.numel))
    snapshot = stream.state_dict()

    stream.encode(torch.randn(LAYOUT.numel))

    assert not torch.equal(snapshot["residual"], stream.residual)
    assert snapshot["codec_state"] == {"step": 1}


def test_load_state_dict_refuses_other_stream() -> None:
    state = ErrorFeedback(make_codec("topk:0.1"), LAYOUT).state_dict()

    with pytest.raises(ValueError, match="checkpoint"):
        ErrorFeedback(make_codec("topk:0.2"), LAYOUT).load_state_dict(state)
    with pytest.raises(ValueError, match="momentum"):
        ErrorFeedback(make_codec("topk:0.1"), LAYOUT, momentum=0.5).load_state_dict(state)


def test_codec_states_roundtrip_directly() -> None:
    codec = make_codec("powersgd:2")
    a = codec.new_state(LAYOUT)
    x = torch.randn(LAYOUT.numel)
    codec.encode(x, LAYOUT, a)
    b = codec.new_state(LAYOUT)
    assert a is not None
    assert b is not None

    b.load_state_dict(a.state_dict())

    assert codec.encode(x, LAYOUT, a) == codec.encode(x, LAYOUT, b)
    assert make_codec("dense").new_state(LAYOUT) is None


def test_encode_refuses_a_state_of_another_codec() -> None:
    with pytest.raises(ValueError, match="State"):
        make_codec("topk:0.1").encode(torch.zeros(LAYOUT.numel), LAYOUT,
                                      make_codec("terngrad").new_state(LAYOUT))
    with pytest.raises(ValueError, match="layout"):
        make_codec("powersgd:2").encode(torch.zeros(CNN.numel), CNN,
                                        make_codec("powersgd:2").new_state(LAYOUT))


def test_bench_small_layouts_and_table() -> None:
    messages: list[str] = []

    result = bench_codecs(["fp16", "topk:0.01", "powersgd:2"], sizes={"flat": 5000}, layouts={"cnn": CNN},
                          repeats=1, threads=1, progress=messages.append)

    rows = {(r["layout"], r["codec"]): r for r in result["rows"]}
    codecs = ("fp16", "topk:0.01", "powersgd:2", "hivemind:fp16", "hivemind:scaled-fp16")
    assert set(rows) == {(lay, c) for lay in ("cnn", "flat") for c in codecs}
    assert rows["cnn", "fp16"]["bytes"] == 16 + 2 * CNN.numel
    assert rows["cnn", "fp16"]["ratio"] == pytest.approx(4 * CNN.numel / (16 + 2 * CNN.numel))
    reference = rows["flat", "hivemind:fp16"]["rel_error"]
    assert rows["flat", "fp16"]["rel_error"] == pytest.approx(reference, rel=0.01)
    assert all(r["encode_gbs"] > 0 and r["decode_gbs"] > 0 for r in result["rows"])
    assert result["clone_gbs"] > 0
    assert result["machine"]["cpu_count"]
    assert messages
    assert "| cnn | topk:0.01 |" in format_table(result)
    assert torch.get_num_threads() >= 1


def test_bench_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown codec"):
        bench_codecs(["zip"], sizes={"x": 10})
    with pytest.raises(ValueError, match="repeats"):
        bench_codecs(["fp16"], sizes={"x": 10}, repeats=0)


def test_clone_bandwidth_is_positive() -> None:
    assert clone_bandwidth_gbs(1000, repeats=1) > 0
