"""Shared-seed SPSA (MeZO) on an ``nn.Module``: perturb, estimate one scalar, apply scalars.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO, 2023) and Zelikman
et al., "Just One Byte (per gradient)" (2023). For a seed ``s`` let ``z(s) ~ N(0, I)`` over the
trainable parameters. One projected-gradient scalar is

    g = (ℓ(θ + εz) − ℓ(θ − εz)) / (2ε)        (an estimate of zᵀ∇ℓ(θ))

and every node applies every published scalar as ``θ ← θ − η ĝ z(s)``. These updates are additions,
so they commute: applying a set of scalars in any order gives the same model up to fp32 rounding.

Which parameters are perturbed is :func:`spsa_parameters`: the model's own ``spsa_parameters()``
list if it defines one (e.g. only the 192-parameter logit adapter of
:class:`p2pnode.tasks.charlm.AdaptedCharGRU`: SPSA with the one-byte code does not move tens of
thousands of weights in a few thousand scalars), else every trainable parameter.

``z`` is never stored beyond one use: :func:`perturbation` regenerates it from the seed, tensor by
tensor (in :func:`spsa_parameters` order), from a CPU ``torch.Generator``
seeded with ``seed``; each tensor is drawn in float32 on the CPU and then moved to the parameter's
device and dtype. CPU and CUDA models therefore get bit-identical ``z``. (Two CPU hosts agree as
long as they run the same torch version on the same instruction-set path: torch's vectorised
normal sampler uses AVX2 code on x86, which may differ in the last bit from other CPUs; model
fingerprints with a tolerance absorb such drift.)

The seeds and the one-byte code of ``ĝ`` live in :mod:`protocols.spsa`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["apply_scalar_", "apply_scalars_", "max_abs_diff", "model_fingerprint", "perturbation",
           "spsa_parameters", "spsa_scalar", "trainable_parameters"]  # fmt: skip

LossFn = Callable[[nn.Module, Any], torch.Tensor | float]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters SPSA perturbs: those with ``requires_grad``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def spsa_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters SPSA perturbs and updates, in a fixed order.

    ``model.spsa_parameters()`` if the model has that method (it must return parameters of the
    model, each at most once), else :func:`trainable_parameters`. :func:`spsa_scalar` and
    :func:`apply_scalar_` use this; parameters outside it are never touched.

    Raises
    ------
    ValueError
        ``model.spsa_parameters()`` returns something that is not a distinct parameter of ``model``.
    """
    method = getattr(model, "spsa_parameters", None)
    if not callable(method):
        return trainable_parameters(model)
    params = list(method())
    own = {id(p) for p in model.parameters()}
    if len({id(p) for p in params}) != len(params) or any(id(p) not in own for p in params):
        raise ValueError("spsa_parameters() must return distinct parameters of the model")
    return params


def perturbation(params: Iterable[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """Yield ``z(seed)`` tensor by tensor, each shaped, typed and placed like its parameter.

    Parameters
    ----------
    params
        The tensors to perturb, in a fixed order (see :func:`spsa_parameters`).
    seed
        Any int; used modulo ``2**64``.

    Each tensor is drawn with ``torch.randn`` (float32, CPU, one generator for all tensors) and then
    moved; consume the iterator once, in order, and drop the tensors after use.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed % 2**64)
    for p in params:
        z = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        yield z.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def _shift_(params: list[nn.Parameter], seed: int, scale: float) -> None:
    for p, z in zip(params, perturbation(params, seed), strict=True):
        p.add_(z, alpha=scale)


@torch.no_grad()
def spsa_scalar(model: nn.Module, loss_fn: LossFn, batch: Any, seed: int, eps: float = 1e-3) -> float:
    """Return the two-point SPSA scalar ``(ℓ(θ + εz) − ℓ(θ − εz)) / (2ε)`` for ``z = z(seed)``.

    Parameters
    ----------
    model
        Its :func:`spsa_parameters` are perturbed in place and then restored *exactly*: they are
        copied before and copied back after (bit-identical, at the cost of one copy of the
        parameters; regenerating ``z`` to undo the shift would leave fp32 rounding residue).
    loss_fn
        ``loss_fn(model, batch)`` returns a scalar loss (tensor or float); called twice under
        ``torch.no_grad()``. It must be deterministic (no dropout) for the estimate to make sense.
    batch
        Passed through to ``loss_fn``.
    seed
        Seed of ``z`` (see :func:`protocols.spsa.derive_seed`).
    eps
        Perturbation size ε > 0.

    Raises
    ------
    ValueError
        ``eps <= 0``, the model has no parameters to perturb, or a loss is not finite.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    params = spsa_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    saved = [p.detach().clone() for p in params]
    try:
        _shift_(params, seed, eps)
        loss_plus = float(loss_fn(model, batch))
        _shift_(params, seed, -2.0 * eps)
        loss_minus = float(loss_fn(model, batch))
    finally:
        for p, original in zip(params, saved, strict=True):
            p.copy_(original)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        raise ValueError(f"non-finite SPSA losses: {loss_plus}, {loss_minus}")
    return (loss_plus - loss_minus) / (2.0 * eps)


@torch.no_grad()
def apply_scalar_(model: nn.Module, seed: int, g_hat: float, lr: float) -> None:
    """Apply one scalar in place: ``θ ← θ − lr · ĝ · z(seed)`` over :func:`spsa_parameters`.

    Raises
    ------
    ValueError
        ``g_hat`` or ``lr`` is not finite.
    """
    step = -float(lr) * float(g_hat)
    if not math.isfinite(step):
        raise ValueError(f"non-finite update: lr={lr}, g_hat={g_hat}")
    _shift_(spsa_parameters(model), seed, step)


def apply_scalars_(model: nn.Module, scalars: Iterable[tuple[int, float]], lr: float) -> int:
    """Apply ``(seed, ĝ)`` pairs in the given order (any order gives the same model up to rounding).

    Returns the number of scalars applied.
    """
    count = 0
    for seed, g_hat in scalars:
        apply_scalar_(model, seed, g_hat, lr)
        count += 1
    return count


def _flat(model: nn.Module) -> torch.Tensor:
    parts = [v.detach().reshape(-1).to("cpu", torch.float64) for v in model.state_dict().values()
             if v.is_floating_point()]  # fmt: skip
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference over the floating-point state of two same-architecture models.

    Raises
    ------
    ValueError
        The models have different floating-point state sizes.
    """
    fa, fb = _flat(a), _flat(b)
    if fa.shape != fb.shape:
        raise ValueError(f"models differ in size: {fa.numel()} vs {fb.numel()} values")
    return float((fa - fb).abs().max()) if fa.numel() else 0.0


def model_fingerprint(model: nn.Module, decimals: int = 4) -> str:
    """Hex blake2b (16 bytes) of the floating-point state rounded to ``10**-decimals``.

    Equal fingerprints mean every value agrees to within one quantum ``10**-decimals`` (values are
    rounded to the nearest multiple). Unequal fingerprints do not prove divergence: two values a hair
    apart can straddle a rounding boundary. So treat a mismatch as "compare the vectors" (e.g.
    :func:`max_abs_diff` against a tolerance), not as proof; pick ``decimals`` so that the expected
    cross-node drift (fp32 rounding of commuted updates, ~1e-6) is far below a quantum.
    """
    quantized = torch.round(_flat(model) * 10.0**decimals).to(torch.int64)
    h = hashlib.blake2b(digest_size=16, person=b"p2pnode-spsa-fp")
    h.update(f"{decimals}|{quantized.numel()}|".encode())
    h.update(quantized.numpy().astype("<i8").tobytes())
    return h.hexdigest()
