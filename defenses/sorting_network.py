"""Coordinate-wise order statistics of an ``(n, d)`` stack through a comparator network.

For the small ``n`` of a gossip round (own model plus a handful of received ones) and large ``d``,
``torch.sort``/``torch.median``/``torch.quantile`` along ``dim=0`` are slow on CPU (each column is a
tiny sort with per-column overhead). A comparator network instead treats every row as one wire and
every comparator ``(a, b)`` as two vector operations, ``wire_a, wire_b ← min, max``, applied to all
columns at once. Columns are processed in cache-sized chunks.

The network is Batcher's odd-even merge sort (Batcher 1968, "Sorting networks and their
applications") on the next power of two, with the comparators that touch padding wires (``b ≥ n``)
removed — padding wires hold ``+∞`` and never move — and then pruned backwards to the comparators
that can influence the requested output positions. Every comparator permutes the values of a column,
so after a pruned network the requested wires hold their order statistics and the other wires hold
the remaining values in some order (which is all the trimmed mean needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import torch

Comparator = tuple[int, int]

# Columns per chunk on CPU: n rows × 64 KiB stay in L2 cache. Every operation below works on one
# row of a chunk, fewer elements than torch's intra-op grain (32768), so none of them enters the
# thread pool: hundreds of small parallel regions per call stall for whole scheduler slices when
# another process holds a core (measured 10-100× slower on a busy 2-vCPU machine).
CPU_CHUNK = 16_384

@lru_cache(maxsize=256)
def batcher_network(n: int) -> tuple[Comparator, ...]:
    """Comparators ``(a, b)``, ``a < b``, of Batcher's odd-even merge sort for ``n`` wires."""
    size = 1
    while size < n:
        size *= 2
    comparators: list[Comparator] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in comparators if b < n)


@lru_cache(maxsize=256)
def pruned_network(n: int, outputs: frozenset[int]) -> tuple[Comparator, ...]:
    """The comparators of :func:`batcher_network` that can affect the wires in ``outputs``."""
    needed = set(outputs)
    kept: list[Comparator] = []
    for a, b in reversed(batcher_network(n)):
        if a in needed or b in needed:
            kept.append((a, b))
            needed.update((a, b))
    return tuple(reversed(kept))


def _run_network(wires: list[torch.Tensor], spare: torch.Tensor, comparators: Sequence[Comparator]) -> None:
    """Apply ``comparators`` to ``wires`` (each ``(c,)``; the list and the buffers are modified)."""
    for a, b in comparators:
        wa, wb = wires[a], wires[b]
        torch.minimum(wa, wb, out=spare)
        torch.maximum(wa, wb, out=wb)
        wires[a], spare = spare, wa


def reduce_order_statistics(stacked: torch.Tensor, outputs: frozenset[int],
                            reduce: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """Sort each column of ``stacked`` enough to place ``outputs`` and reduce the wires to one row.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor; not modified.
    outputs:
        Positions ``p`` (``0 ≤ p < n``) whose wire must hold the ``p``-th smallest value of its column.
    reduce:
        Maps the ``n`` wires of one column chunk (each ``(c,)``) to the chunk's result ``(c,)``.

    Returns
    -------
    torch.Tensor
        ``(d,)``: ``reduce`` applied chunk by chunk.
    """
    n, d = stacked.shape
    comparators = pruned_network(n, outputs)
    out = torch.empty(d, dtype=stacked.dtype, device=stacked.device)  # (d,)
    chunk = max(1, min(CPU_CHUNK, d) if stacked.device.type == "cpu" else d)
    rows = list(torch.empty(n + 1, chunk, dtype=stacked.dtype, device=stacked.device))  # scratch
    for start in range(0, d, chunk):
        width = min(chunk, d - start)
        views = [row[:width] for row in rows]  # (n + 1) × (width,)
        wires = [views[i].copy_(stacked[i, start : start + width]) for i in range(n)]
        _run_network(wires, views[n], comparators)
        out[start : start + width] = reduce(wires)
    return out
