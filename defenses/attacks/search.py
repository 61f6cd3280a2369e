"""Line search for adaptive attacks: pick the crafted model that moves a simulated honest merge most.

The attacker simulates one victim's merge: the victim's own model is the attacker's own (it trains
honestly on its shard, so it stands in for an honest model), it receives the ``observed`` honest
models plus ``copies`` copies of the crafted model ``c``, and merges them with the defense in use.
The damage of ``c`` is how far that merge lands from where plain averaging of the honest inputs
would have put it::

    damage(c) = ‖ defense.aggregate(own, observed ∪ {c × copies}) − mean(own, observed) ‖₂

The merge is simulated with ``context=None``, so a stateful defense's real state is never touched.
A candidate the defense refuses (``ValueError``, e.g. a ``2f < n`` precondition) scores ``-inf``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

from defenses.base import Aggregator

logger = logging.getLogger(__name__)


def merge_damage(defense: Aggregator, own: torch.Tensor, observed: Sequence[torch.Tensor],
                 crafted: torch.Tensor, copies: int) -> float:
    """Damage of sending ``crafted`` (see the module docstring); ``-inf`` if the defense refuses it."""
    received = {f"honest-{i}": m for i, m in enumerate(observed)}
    received.update({f"byzantine-{j}": crafted for j in range(copies)})
    reference = torch.stack([own, *observed]).mean(dim=0)  # (m + 1, d) -> (d,)
    try:
        merged = defense.aggregate(own, received)
    except ValueError as exc:
        logger.debug("simulated merge refused a candidate: %s", exc)
        return -math.inf
    return float(torch.linalg.vector_norm(merged - reference))


def line_search(defense: Aggregator, own: torch.Tensor, observed: Sequence[torch.Tensor],
                grid: Sequence[float], craft: Callable[[float], torch.Tensor],
                copies: int) -> tuple[float | None, list[float]]:
    """The grid value whose crafted model ``craft(eta)`` does the most damage, and every value's damage.

    Candidates are built one at a time (a model may be large). Ties go to the first grid value; the
    returned value is ``None`` when the defense refused every candidate.
    """
    damages = [merge_damage(defense, own, observed, craft(eta), copies) for eta in grid]
    best = max(range(len(damages)), key=damages.__getitem__, default=None)
    if best is None or damages[best] == -math.inf:
        return None, damages
    return grid[best], damages
