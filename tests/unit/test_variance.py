"""Variance-corrected averaging (Tian et al.): the pure correction and the wrapper aggregator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses import Aggregator, Layer, MergeContext, make_aggregator
from defenses.mean import Mean
from defenses.median import Median
from defenses.variance import VarianceCorrected, variance_correct

LAYERS = (
    Layer("conv.weight", 0, (4, 5)),
    Layer("conv.bias", 20, (5,)),
    Layer("scale", 25, ()),
    Layer("bn.running_mean", 26, (3,), is_buffer=True),
    Layer("fc.weight", 29, (3, 3)),
)
D = 38


def models(n: int, seed: int = 0) -> torch.Tensor:
    """(n, D): independent models with different spreads, as from independent initialisations."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)


def layer_var(flat: torch.Tensor, layer: Layer) -> torch.Tensor:
    return torch.var(layer.view(flat), dim=-1, correction=0)


def test_each_weight_layer_gets_the_inputs_mean_variance() -> None:
    stack = models(5)
    merged = stack.mean(0)

    out = variance_correct(merged, stack, LAYERS)

    for layer in (LAYERS[0], LAYERS[1], LAYERS[4]):
        target = layer_var(stack, layer).mean()
        assert layer_var(merged, layer) < 0.6 * target, "averaging shrank the variance"
        torch.testing.assert_close(layer_var(out, layer), target, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.view(out).mean(), layer.view(merged).mean(), rtol=1e-5, atol=1e-6)


def test_scalars_and_buffers_are_untouched() -> None:
    stack = models(4)
    merged = stack.mean(0)

    out = variance_correct(merged, stack, LAYERS)

    for layer in (LAYERS[2], LAYERS[3]):
        assert torch.equal(layer.view(out), layer.view(merged)), layer.name


def test_elements_outside_every_layer_are_untouched() -> None:
    stack = models(3)
    merged = stack.mean(0)

    out = variance_correct(merged, stack, LAYERS[:1])

    assert torch.equal(out[20:], merged[20:])


def test_include_self_false_takes_the_target_from_the_received_models_only() -> None:
    stack = models(4, seed=3)
    merged = stack.mean(0)
    layer = LAYERS[0]

    out = variance_correct(merged, stack, LAYERS, include_self=False)

    target = layer_var(stack[1:], layer).mean()
    torch.testing.assert_close(layer_var(out, layer), target, rtol=1e-5, atol=1e-7)


def test_mix_zero_is_the_identity_and_mix_interpolates() -> None:
    stack = models(4, seed=1)
    merged = stack.mean(0)
    full = variance_correct(merged, stack, LAYERS)

    assert torch.equal(variance_correct(merged, stack, LAYERS, mix=0.0), merged)
    torch.testing.assert_close(variance_correct(merged, stack, LAYERS, mix=0.25), 0.75 * merged + 0.25 * full)


def test_inputs_are_not_modified() -> None:
    stack = models(4)
    merged = stack.mean(0)
    stack_copy, merged_copy = stack.clone(), merged.clone()

    variance_correct(merged, stack, LAYERS)

    assert torch.equal(stack, stack_copy)
    assert torch.equal(merged, merged_copy)


def test_a_constant_merged_layer_is_left_as_it_is() -> None:
    stack = models(3)
    merged = stack.mean(0)
    merged[0:20] = 0.25

    out = variance_correct(merged, stack, LAYERS)

    assert torch.equal(out[0:20], merged[0:20])


@settings(deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), mix=st.floats(0.0, 1.0))
def test_variance_moves_to_the_target_by_mix(n: int, seed: int, mix: float) -> None:
    stack = models(n, seed)
    merged = stack.mean(0)
    layer = LAYERS[0]
    scale = torch.sqrt(layer_var(stack, layer).mean() / layer_var(merged, layer))

    out = variance_correct(merged, stack, LAYERS, mix=mix)

    expected_std = torch.sqrt(layer_var(merged, layer)) * (1 + mix * (scale - 1))
    torch.testing.assert_close(torch.sqrt(layer_var(out, layer)), expected_std, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "layers", "match"), [
    ({"mix": 1.5}, LAYERS, "mix"),
    ({"eps": -1.0}, LAYERS, "eps"),
    ({}, (Layer("too-far", 30, (10,)),), "outside"),
])
def test_bad_arguments_raise(kwargs: dict[str, Any], layers: tuple[Layer, ...], match: str) -> None:
    stack = models(3)
    with pytest.raises(ValueError, match=match):
        variance_correct(stack.mean(0), stack, layers, **kwargs)


def test_no_rows_for_the_target_raises() -> None:
    stack = models(1)
    with pytest.raises(ValueError, match="at least one model"):
        variance_correct(stack[0], stack, LAYERS, include_self=False)


# -- the wrapper ------------------------------------------------------------------------------------
def split(stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return stack[0].clone(), {f"p{i}": row.clone() for i, row in enumerate(stack[1:])}


@pytest.mark.parametrize("inner", [Mean(), Median()], ids=lambda a: a.name)
def test_wrapper_corrects_the_inner_merge(inner: Aggregator) -> None:
    stack = models(5, seed=2)
    own, received = split(stack)

    out = VarianceCorrected(inner).aggregate(own, received, MergeContext(layers=LAYERS))

    torch.testing.assert_close(out, variance_correct(inner.aggregate(own, received), stack, LAYERS))


def test_wrapper_needs_the_layer_layout() -> None:
    own, received = split(models(3))
    wrapped = make_aggregator("mean", variance_correction=True)

    with pytest.raises(ValueError, match="layer layout"):
        wrapped.aggregate(own, received)
    with pytest.raises(ValueError, match="layer layout"):
        wrapped.aggregate(own, received, MergeContext())


def test_wrapper_with_nothing_received_returns_own() -> None:
    own = models(1)[0]

    out = VarianceCorrected(Mean()).aggregate(own, {}, MergeContext(layers=LAYERS))

    assert torch.equal(out, own)


class _Stateful(Aggregator):
    name = "stateful"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        return own.clone()

    def new_state(self) -> object:
        return {"history": []}


def test_wrapper_state_is_the_inner_state() -> None:
    assert VarianceCorrected(_Stateful()).new_state() == {"history": []}
    with pytest.raises(ValueError, match="mix"):
        VarianceCorrected(Mean(), mix=-0.1)
