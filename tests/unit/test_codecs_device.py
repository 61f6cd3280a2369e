"""The codecs' device paths (used for CUDA tensors), run here on CPU tensors.

``encode`` takes a tensor's device path when :func:`protocols.codecs.wire.off_host` says so; patching
that to ``True`` sends CPU tensors through the very code a CUDA tensor runs, and ``decode(...,
device="cpu")`` is the device decoder. They must give the host path's payloads and values, and refuse
the same malformed payloads with :class:`CodecError` only.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codecs import CodecError, Layout, make_codec, wire
from protocols.codecs.powersgd import PowerSGDState
from protocols.codecs.topk import TopKState, select, select_tensor
from tests.unit.test_codecs import ALL_SPECS
from tests.unit.test_codecs_malformed import LAYOUT, NAN_CASES, PAYLOADS, X, _with_value

BIG = Layout(((64, 3, 5, 5), (64,), (300, 512), (300,), (10,), ()))  # > 2**17 elements: sampled top-k
X_BIG = torch.randn(BIG.numel, generator=torch.Generator().manual_seed(1))
DETERMINISTIC = [s for s in ALL_SPECS if not s.startswith("terngrad")]


@pytest.fixture
def device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor takes the device path of ``encode``."""
    monkeypatch.setattr(wire, "off_host", lambda x: True)


def _device_encode(spec: str, x: torch.Tensor, layout: Layout, state: object = None) -> bytes:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wire, "off_host", lambda t: True)
        return bytes(make_codec(spec).encode(x, layout, state))


@pytest.mark.parametrize("spec", DETERMINISTIC)
@pytest.mark.parametrize(("layout", "x"), [(LAYOUT, X), (BIG, X_BIG)], ids=["small", "big"])
def test_device_encode_gives_the_host_payload(spec: str, layout: Layout, x: torch.Tensor) -> None:
    host = bytes(make_codec(spec).encode(x, layout))
    device = _device_encode(spec, x, layout)

    if spec.startswith("powersgd"):  # torch and numpy matmuls may round differently
        codec = make_codec(spec)
        assert len(device) == len(host)
        torch.testing.assert_close(codec.decode(device, layout), codec.decode(host, layout), rtol=1e-4,
                                   atol=1e-5)
    else:
        assert device == host


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_device_decode_gives_the_host_values(spec: str) -> None:
    codec = make_codec(spec)
    host = codec.decode(PAYLOADS[spec], LAYOUT)

    out = codec.decode(PAYLOADS[spec], LAYOUT, device="cpu")

    assert out.dtype == torch.float32
    assert out.shape == (LAYOUT.numel,)
    assert torch.equal(out, host)
    out += 1  # writable, and not the payload's memory
    assert torch.equal(codec.decode(PAYLOADS[spec], LAYOUT, device="cpu"), host)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_device_paths_handle_an_empty_layout(spec: str) -> None:
    empty = Layout(((0,), (3, 0)))
    payload = _device_encode(spec, torch.zeros(0), empty)

    assert payload == bytes(make_codec(spec).encode(torch.zeros(0), empty))
    assert make_codec(spec).decode(payload, empty, device="cpu").shape == (0,)


def test_topk_device_selection_is_the_host_selection() -> None:
    magnitude = X_BIG.abs()
    for k in (1, 300, 3000, BIG.numel // 3):
        assert torch.equal(select_tensor(magnitude, k), torch.from_numpy(select(magnitude.numpy(), k)))


def test_topk_device_warm_up_advances_the_state(device_path: None) -> None:
    codec, state = make_codec("topk:0.01:4"), TopKState()

    sizes = [len(codec.encode(X, LAYOUT, state)) for _ in range(5)]

    assert state.step == 5
    assert sizes[0] > sizes[-1]


def test_powersgd_device_state_stays_on_the_cpu_and_warm_starts_like_the_host(device_path: None) -> None:
    codec = make_codec("powersgd:2")
    on_device = codec.new_state(BIG)
    on_host = codec.new_state(BIG)

    codec.encode(X_BIG, BIG, on_device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wire, "off_host", lambda t: False)
        codec.encode(X_BIG, BIG, on_host)

    assert isinstance(on_device, PowerSGDState)
    for a, b in zip(on_device.q, on_host.q):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.device.type == "cpu"
            assert a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_terngrad_device_payload_is_reproducible_and_unbiased(device_path: None) -> None:
    codec = make_codec("terngrad")
    x = torch.tensor([0.5, -0.25, 1.0, 0.0, -1.0, 0.75, 0.1])
    layout = Layout(((3,), (4,)))

    assert codec.encode(x, layout) == codec.encode(x, layout), "stateless calls repeat"
    state = codec.new_state(layout)
    draws = torch.stack([codec.decode(codec.encode(x, layout, state), layout, device="cpu")
                         for _ in range(500)])

    assert len({tuple(d.tolist()) for d in draws[:20]}) > 1, "a stream state moves on"
    scales = torch.tensor([1.0] * 3 + [1.0] * 4)
    assert bool(((draws == 0) | (draws.abs() == scales)).all()), "values are 0 or ±(layer scale)"
    torch.testing.assert_close(draws.mean(dim=0), x, atol=0.1, rtol=0)  # 4 standard errors at worst


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_device_encode_refuses_non_finite_input(spec: str, bad: float, device_path: None) -> None:
    x = X.clone()
    x[5] = bad

    with pytest.raises(ValueError, match="NaN or Inf"):
        make_codec(spec).encode(x, LAYOUT)


@pytest.mark.parametrize("spec", ["fp16", "bf16"])
def test_device_encode_clamps_overflow_like_the_host(spec: str) -> None:
    x = X.clone()
    x[3], x[4] = 1e6, -3.4e38

    assert _device_encode(spec, x, LAYOUT) == bytes(make_codec(spec).encode(x, LAYOUT))


# ---------------------------------------------------------------- hostile payloads, device decoder


@pytest.mark.parametrize(("spec", "offset", "fmt", "value"), NAN_CASES)
def test_device_decode_rejects_non_finite_or_out_of_range_values(spec: str, offset: int, fmt: str,
                                                                 value: float) -> None:
    bad = _with_value(PAYLOADS[spec], offset, fmt, value)
    with pytest.raises(CodecError):
        make_codec(spec).decode(bad, LAYOUT, device="cpu")


def test_device_decode_rejects_int8_code_minus_128_and_terngrad_bad_codes() -> None:
    payload = bytearray(PAYLOADS["int8"])
    payload[-1] = 0x80
    with pytest.raises(CodecError, match="-128"):
        make_codec("int8").decode(bytes(payload), LAYOUT, device="cpu")

    layout = Layout.flat(5)
    codec = make_codec("terngrad")
    good = codec.encode(torch.tensor([1.0, 0.5, -0.5, 0.0, 1.0]), layout)
    for pos, value in ((-2, 0b11), (-1, 0b0100)):
        bad = bytearray(good)
        bad[pos] = value
        with pytest.raises(CodecError):
            codec.decode(bytes(bad), layout, device="cpu")


@pytest.mark.parametrize("spec", ALL_SPECS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_device_decode_of_damaged_payloads_raises_only_codec_errors(spec: str, data: st.DataObject) -> None:
    payload = bytearray(PAYLOADS[spec])
    kind = data.draw(st.sampled_from(["cut", "extend", "flip"]))
    if kind == "cut":
        payload = payload[: data.draw(st.integers(0, len(payload) - 1))]
    elif kind == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=32))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(wire.HEADER_BYTES, len(payload) - 1))
            payload[pos] ^= data.draw(st.integers(1, 255))

    try:
        out = make_codec(spec).decode(bytes(payload), LAYOUT, device="cpu")
    except CodecError:
        return
    assert kind == "flip", "a cut or extended payload must be refused"
    assert out.shape == (LAYOUT.numel,)
    assert bool(torch.isfinite(out).all())
