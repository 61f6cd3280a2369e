"""``p2pnode bench defenses``: time every merge rule on a pre-stacked ``(n, d)`` tensor, next to byzfl.

For each device (CPU, and CUDA when present) and each ``d``, one random ``(n, d)`` float32 stack is
made once; every rule is called on it once to warm up and then ``repeats`` times, the implementations
of one rule taking turns so that a change in machine load hits them alike; the median wall time is
reported. Rules use ``F = 3`` and ``TAU = 1.0``. Rows:

- ``impl="p2pnode"``: the pure functions under ``defenses`` (no stacking or finiteness check — the
  stack is given, as in byzfl's API);
- ``impl="byzfl"``: byzfl's equivalent with matching semantics (see :data:`BYZFL_EQUIVALENTS`);
- ``impl="reference"``: ``cdist+mean`` (``torch.cdist`` of the pairwise distance matrix plus a
  mean: the textbook cost of a Krum-like rule) and ``nna-floor`` (``n`` distances from own plus a
  mean: the arithmetic NNA cannot avoid).

Each row also has ``min_s``: on a shared machine the minimum shows the cost without interference.

``ratio_vs_byzfl`` is ``p2pnode median_s / byzfl median_s`` for the same rule (< 1: faster).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from defenses.centered_clip import centered_clip_rule
from defenses.krum import krum_rule, multi_krum_rule
from defenses.mean import mean_rule
from defenses.median import median_rule
from defenses.nna import nna_rule
from defenses.trimmed_mean import trimmed_mean_rule

logger = logging.getLogger(__name__)

F = 3
TAU = 1.0
CC_ITERATIONS = 3
Fn = Callable[[torch.Tensor], torch.Tensor]

# byzfl's Krum scores use the n − f − 1 nearest neighbours, Blanchard et al. (and ours) n − F − 2: byzfl
# with f = F + 1 selects exactly what ours does with F. Its MultiKrum averages n − f inputs, so ours
# runs with M = n − F − 1. Its CenteredClipping starts from its attribute ``m``, set to own each call.
BYZFL_EQUIVALENTS = {
    "mean": "Average()",
    "median": "Median()",
    f"trimmed-mean:{F}": f"TrMean(f={F})",
    f"krum:{F}": f"Krum(f={F + 1})",
    f"multi-krum:{F},n-{F + 1}": f"MultiKrum(f={F + 1})",
    f"centered-clip:{TAU}": f"CenteredClipping(m=own, L={CC_ITERATIONS}, tau={TAU})",
    f"nna:{F}": f"MoNNA(f={F}, idx=0)",
}


def load_byzfl_aggregators() -> ModuleType | None:
    """byzfl's ``aggregators`` module, or ``None`` when byzfl is not installed.

    ``byzfl/__init__`` imports its training framework and through it torchvision, whose PyPI wheel is
    built against the CUDA torch and fails to load next to the CPU torch build pinned for this
    project. The aggregators need only torch, numpy and scipy, so when byzfl is not already imported
    its package is entered without running its ``__init__`` (test and benchmark use only).
    """
    if "byzfl.aggregators" in sys.modules:
        return sys.modules["byzfl.aggregators"]
    spec = importlib.util.find_spec("byzfl")
    if spec is None or spec.submodule_search_locations is None:
        return None
    if "byzfl" not in sys.modules:
        sys.modules["byzfl"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
    return importlib.import_module("byzfl.aggregators")


def _ours() -> dict[str, Fn]:
    return {
        "mean": mean_rule,
        "median": median_rule,
        f"trimmed-mean:{F}": lambda x: trimmed_mean_rule(x, F),
        f"krum:{F}": lambda x: krum_rule(x, F),
        f"multi-krum:{F},n-{F + 1}": lambda x: multi_krum_rule(x, F, x.shape[0] - F - 1),
        f"centered-clip:{TAU}": lambda x: centered_clip_rule(x, TAU, CC_ITERATIONS),
        f"nna:{F}": lambda x: nna_rule(x, F),
    }


def _byzfl(agg: ModuleType) -> dict[str, Fn]:
    clipping = agg.CenteredClipping(L=CC_ITERATIONS, tau=TAU)

    def centered_clipping(x: torch.Tensor) -> torch.Tensor:
        clipping.m = x[0]  # byzfl keeps its last result as the next start
        return clipping(x)

    return {
        "mean": agg.Average(),
        "median": agg.Median(),
        f"trimmed-mean:{F}": agg.TrMean(f=F),
        f"krum:{F}": agg.Krum(f=F + 1),
        f"multi-krum:{F},n-{F + 1}": agg.MultiKrum(f=F + 1),
        f"centered-clip:{TAU}": centered_clipping,
        f"nna:{F}": agg.MoNNA(f=F, idx=0),
    }


def _references() -> dict[str, Fn]:
    def cdist_mean(x: torch.Tensor) -> torch.Tensor:
        torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        return x.mean(dim=0)

    def nna_floor(x: torch.Tensor) -> torch.Tensor:
        torch.cdist(x, x[0][None], compute_mode="donot_use_mm_for_euclid_dist")
        return x.mean(dim=0)

    return {"cdist+mean": cdist_mean, "nna-floor": nna_floor}


def _timed(fn: Fn, x: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


Timing = list[float] | str  # seconds of the timed calls, or the error that stopped them


def _time_group(impls: dict[str, Fn], x: torch.Tensor, repeats: int) -> dict[str, Timing]:
    """Seconds of each implementation's timed calls (or its error), the implementations taking turns."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    failed: dict[str, str] = {}
    for _ in range(repeats + 1):  # the first pass is the warm-up
        for name, fn in impls.items():
            if name in failed:
                continue
            try:
                times[name].append(_timed(fn, x))
            except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. torch.quantile's size limit
                failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                logger.warning("%s failed at shape %s: %s", name, tuple(x.shape), failed[name])
            gc.collect()
    return {name: failed.get(name) or ts[1:] for name, ts in times.items()}


def _row(rule: str, impl: str, timing: Timing, ref: Timing | None, base: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"rule": rule, "impl": impl, **base, "median_s": None, "min_s": None,
                           "ratio_vs_byzfl": None}
    if isinstance(timing, str):
        row["error"] = timing
        return row
    row["median_s"], row["min_s"] = statistics.median(timing), min(timing)
    if isinstance(ref, list):
        row["ratio_vs_byzfl"] = row["median_s"] / statistics.median(ref)
    return row


def time_rules(x: torch.Tensor, repeats: int, byzfl: ModuleType | None = None) -> list[dict[str, Any]]:
    """Rows for every rule (and byzfl's equivalent, if given) and the references on the stack ``x``.

    ``x`` is ``(n, d)`` on any device; CUDA calls are timed between two synchronisations.
    """
    n, d = x.shape
    base = {"n": n, "d": d, "device": x.device.type}
    ours, theirs = _ours(), _byzfl(byzfl) if byzfl is not None else {}
    rows: list[dict[str, Any]] = []
    for rule, fn in ours.items():
        impls = {"p2pnode": fn} | ({"byzfl": theirs[rule]} if rule in theirs else {})
        result = _time_group(impls, x, repeats)
        rows += [_row(rule, impl, timing, result.get("byzfl"), base) for impl, timing in result.items()]
    for rule, fn in _references().items():
        rows.append(_row(rule, "reference", _time_group({rule: fn}, x, repeats)[rule], None, base))
    for row in rows:
        logger.info("%s", row)
    return rows


def _rows_at(n: int, d: int, device: str, repeats: int, byzfl: ModuleType | None) -> list[dict[str, Any]]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d)).to(device)  # (n, d)
    try:
        return time_rules(x, repeats, byzfl)
    finally:
        del x
        gc.collect()


def _devices(device: str) -> list[str]:
    if device == "cpu" and torch.cuda.is_available():
        return ["cpu", "cuda"]
    return [device]


def run_defense_bench(*, n: int = 16, dims: Sequence[int] = (1_000_000, 25_600_000), repeats: int = 5,
                      device: str = "cpu", json_path: Path | str | None = None,
                      threads: int | None = None) -> dict[str, Any]:
    """Time each merge rule (and byzfl's equivalents, when importable) on ``(n, d)`` stacks.

    Parameters
    ----------
    n:
        Inputs per merge (own included), ``n > 2F + 2 = 8``.
    dims:
        Vector lengths ``d``; one float32 stack of ``n × d`` is held at a time (25.6M × 16 = 1.6 GB,
        with byzfl's sort-based rules peaking near 5 GB more).
    repeats:
        Timed calls per implementation after one warm-up; the median is reported.
    device:
        ``"cpu"`` runs on CPU and also on CUDA when ``torch.cuda.is_available()``; ``"cuda"`` only there.
    json_path:
        Where to write the result as JSON (``None``: not written).
    threads:
        ``torch.set_num_threads`` for the run (``None``: leave torch's setting); restored afterwards.

    Returns
    -------
    dict
        ``{"rows": [{rule, impl, n, d, device, median_s, min_s, ratio_vs_byzfl}, ...], "byzfl": version or
        None, "byzfl_equivalents": ..., "torch": ..., "threads": ..., "platform": ...}``; a failed
        call has ``median_s = None`` and an ``error``.
    """
    if n <= 2 * F + 2 or repeats < 1:
        raise ValueError(f"bench needs n > {2 * F + 2} and repeats >= 1, got n={n}, repeats={repeats}")
    byzfl = load_byzfl_aggregators()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = [row for dev in _devices(device) for d in dims for row in _rows_at(n, d, dev, repeats, byzfl)]
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    result: dict[str, Any] = {
        "rows": rows, "f": F, "tau": TAU, "repeats": repeats,
        "byzfl": _byzfl_version() if byzfl is not None else None,
        "byzfl_equivalents": BYZFL_EQUIVALENTS, "torch": torch.__version__,
        "threads": used_threads, "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _byzfl_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("byzfl")
    except PackageNotFoundError:
        return None
