"""p2pnode.spsa: shared-seed perturbations, the SPSA scalar, commuting updates, fingerprints."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p2pnode.spsa import (
    apply_scalar_,
    apply_scalars_,
    max_abs_diff,
    model_fingerprint,
    perturbation,
    spsa_parameters,
    spsa_scalar,
    trainable_parameters,
)
from protocols.spsa import decode_scalar, derive_seed, encode_scalar


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def test_perturbation_is_a_function_of_the_seed_only() -> None:
    a, b = make_model(0), make_model(1)
    za = list(perturbation(trainable_parameters(a), 42))
    zb = list(perturbation(trainable_parameters(b), 42))
    zc = list(perturbation(trainable_parameters(a), 43))
    assert [z.shape for z in za] == [p.shape for p in a.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(za, zb))
    assert not torch.equal(za[0], zc[0])
    assert abs(float(torch.cat([z.flatten() for z in za]).std()) - 1.0) < 0.2


def test_perturbation_leaves_the_global_rng_alone() -> None:
    params = trainable_parameters(make_model())
    before = torch.get_rng_state()
    list(perturbation(params, 5))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_perturbation_is_identical_on_cuda() -> None:
    cpu = make_model()
    gpu = copy.deepcopy(cpu).cuda()
    for zc, zg in zip(perturbation(list(cpu.parameters()), 9), perturbation(list(gpu.parameters()), 9)):
        assert zg.device.type == "cuda"
        assert torch.equal(zc, zg.cpu())


def test_spsa_scalar_restores_the_weights_bit_for_bit() -> None:
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    batch = (torch.randn(32, 8), torch.randn(32, 1))
    g = spsa_scalar(model, mse, batch, seed=derive_seed("o", 0, 0), eps=1e-3)
    assert g == g  # finite number
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_spsa_scalar_estimates_the_directional_derivative() -> None:
    model = make_model().double()
    batch = (torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64))
    mse(model, batch).backward()
    seed = 1234
    params = list(model.parameters())
    directional = 0.0
    for p, z in zip(params, perturbation(params, seed)):
        assert p.grad is not None
        directional += float((p.grad * z).sum())
    assert spsa_scalar(model, mse, batch, seed, eps=1e-4) == pytest.approx(directional, rel=1e-3, abs=1e-6)


def test_spsa_scalar_refuses_bad_eps_and_nonfinite_losses() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="eps"):
        spsa_scalar(model, mse, None, 0, eps=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        spsa_scalar(model, lambda m, b: float("nan"), None, 0)


def test_many_one_byte_spsa_steps_reduce_a_linear_regression_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.5
    model = nn.Linear(8, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    with torch.no_grad():
        start = float(mse(model, (x, y)))
    for step in range(400):
        seed = derive_seed("origin", step, 0)
        idx = torch.randint(0, 256, (32,), generator=gen)
        g = spsa_scalar(model, mse, (x[idx], y[idx]), seed)
        apply_scalar_(model, seed, decode_scalar(encode_scalar(g)), lr=0.02)  # through the one-byte code
    with torch.no_grad():
        assert float(mse(model, (x, y))) < 0.1 * start


def test_scalar_updates_commute() -> None:
    scalars = [(derive_seed(origin, step, k), decode_scalar(code))
               for origin in ("a", "b", "c") for step in range(10) for k in range(2)
               for code in [random.Random(f"{origin}{step}{k}").randrange(256)]]
    forward, shuffled = make_model(), make_model()
    mixed = list(scalars)
    random.Random(7).shuffle(mixed)
    assert apply_scalars_(forward, scalars, lr=1e-3) == 60
    apply_scalars_(shuffled, mixed, lr=1e-3)
    assert max_abs_diff(forward, make_model()) > 1e-3  # the updates did something
    assert max_abs_diff(forward, shuffled) < 1e-5
    assert model_fingerprint(forward, decimals=3) == model_fingerprint(shuffled, decimals=3)


def test_apply_scalar_refuses_nonfinite_updates() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        apply_scalar_(make_model(), 0, float("inf"), lr=0.1)


def test_frozen_parameters_are_not_perturbed() -> None:
    model = make_model()
    first = model[0]
    assert isinstance(first, nn.Linear)
    first.weight.requires_grad_(False)
    frozen = first.weight.detach().clone()
    apply_scalar_(model, 3, 1.0, lr=0.1)
    assert torch.equal(first.weight, frozen)
    assert max_abs_diff(model, make_model()) > 0  # the other parameters moved


def test_fingerprint_and_max_abs_diff() -> None:
    a, b = make_model(), make_model()
    assert model_fingerprint(a) == model_fingerprint(b)
    assert max_abs_diff(a, b) == 0.0
    with torch.no_grad():
        b.state_dict()["0.bias"][0] += 0.01
    assert model_fingerprint(a) != model_fingerprint(b)
    assert max_abs_diff(a, b) == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="differ in size"):
        max_abs_diff(a, nn.Linear(2, 2))


class HeadOnly(nn.Module):
    """A model that declares its own SPSA subset (like AdaptedCharGRU)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def spsa_parameters(self) -> list[nn.Parameter]:
        return [self.head.bias]


def test_spsa_parameters_follow_the_model_and_nothing_else_moves() -> None:
    torch.manual_seed(0)
    model = HeadOnly()
    assert spsa_parameters(model) == [model.head.bias]
    assert len(spsa_parameters(make_model())) == 4  # no method: every trainable parameter
    before = copy.deepcopy(model.state_dict())
    batch = (torch.randn(16, 8), torch.randn(16, 1))
    assert math.isfinite(spsa_scalar(model, mse, batch, seed=3))
    apply_scalar_(model, 3, 1.0, lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "head.bias")
    assert not torch.equal(before["head.bias"], after["head.bias"])


def test_spsa_parameters_refuse_foreign_or_repeated_tensors() -> None:
    model = HeadOnly()
    model.spsa_parameters = lambda: [nn.Parameter(torch.zeros(1))]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="distinct parameters"):
        spsa_parameters(model)
    model.spsa_parameters = lambda: [model.head.bias, model.head.bias]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="distinct parameters"):
        spsa_parameters(model)
