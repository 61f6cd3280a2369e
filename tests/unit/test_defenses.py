"""The aggregator contract and the plain mean."""

from __future__ import annotations

import pytest
import torch

from defenses import AGGREGATORS, make_aggregator
from defenses.mean import Mean


def test_mean_averages_own_and_received_with_equal_weight() -> None:
    own = torch.tensor([0.0, 3.0])
    received = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([6.0, 3.0])}

    merged = Mean().aggregate(own, received)

    assert torch.equal(merged, torch.tensor([3.0, 2.0]))


def test_mean_without_peers_returns_a_copy_of_own() -> None:
    own = torch.tensor([1.0, 2.0])

    merged = Mean().aggregate(own, {})
    merged.add_(1.0)

    assert torch.equal(own, torch.tensor([1.0, 2.0])), "the input must not be modified"


def test_mean_leaves_inputs_untouched() -> None:
    own, other = torch.randn(5), torch.randn(5)
    own_copy, other_copy = own.clone(), other.clone()

    Mean().aggregate(own, {"p": other})

    assert torch.equal(own, own_copy)
    assert torch.equal(other, other_copy)


@pytest.mark.parametrize("bad", [torch.tensor([float("nan"), 0.0]), torch.tensor([0.0, float("inf")])])
def test_non_finite_input_is_refused(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="finite"):
        Mean().aggregate(torch.zeros(2), {"p": bad})


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        Mean().aggregate(torch.zeros(2), {"p": torch.zeros(3)})


def test_registry_builds_by_name_and_lists_valid_names_on_error() -> None:
    assert isinstance(make_aggregator("mean"), Mean)
    assert "mean" in AGGREGATORS
    with pytest.raises(ValueError, match="valid: .*mean"):
        make_aggregator("nope")
    with pytest.raises(ValueError, match="no arguments"):
        make_aggregator("mean:3")
