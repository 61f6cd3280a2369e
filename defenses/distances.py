"""Squared L2 distances of the rows of an ``(n, d)`` stack, one cache-sized column chunk at a time.

``torch.cdist`` and ``(stack − point)`` both make full passes with an ``(n, d)`` temporary or a
per-pair loop; here each chunk of ``c`` columns is centred into a small scratch buffer that stays
in cache and is reduced at once (``‖·‖²`` per row, or a rank-``c`` Gram update), so the stack is read
once. Sums are accumulated per chunk, which also keeps float32 rounding error low for large ``d``.
"""

from __future__ import annotations

import torch

SCRATCH_ELEMENTS = 2**17  # per chunk on CPU: n × c floats = 512 KiB of float32, well inside L2


def _chunk(stacked: torch.Tensor) -> int:
    n, d = stacked.shape
    if stacked.device.type != "cpu":
        return max(d, 1)
    return max(1024, SCRATCH_ELEMENTS // max(n, 1))


def sq_distances_to(stacked: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``‖x_i − point‖²`` for every row ``x_i`` of ``stacked``.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor; not modified.
    point:
        ``(d,)`` tensor of the same dtype and device.

    Returns
    -------
    torch.Tensor
        ``(n,)`` squared distances.
    """
    n, d = stacked.shape
    total = torch.zeros(n, dtype=stacked.dtype, device=stacked.device)  # (n,)
    step = _chunk(stacked)
    for start in range(0, d, step):
        diff = stacked[:, start : start + step] - point[start : start + step]  # (n, c)
        total += torch.linalg.vector_norm(diff, dim=1).square_()
    return total


def centred_gram(stacked: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``G = (X − centre)(X − centre)ᵀ`` of the rows of ``stacked`` around ``centre``.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor ``X``; not modified.
    centre:
        ``(d,)`` tensor of the same dtype and device.

    Returns
    -------
    torch.Tensor
        ``(n, n)``; ``G_ii + G_jj − 2 G_ij = ‖x_i − x_j‖²``.
    """
    n, d = stacked.shape
    gram = torch.zeros(n, n, dtype=stacked.dtype, device=stacked.device)  # (n, n)
    step = _chunk(stacked)
    for start in range(0, d, step):
        diff = stacked[:, start : start + step] - centre[start : start + step]  # (n, c)
        gram.addmm_(diff, diff.T)
    return gram
