"""The robust merge rules: hand-computed cases, naive references, byzfl, preconditions, registry."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from defenses import AGGREGATORS, Aggregator, make_aggregator
from defenses.centered_clip import CenteredClip, centered_clip_rule
from defenses.krum import Krum, MultiKrum, krum_rule, krum_scores, multi_krum_rule, squared_distances
from defenses.median import Median, median_rule
from defenses.nna import NNA, monna_lr, monna_momentum, nna_rule
from defenses.sorting_network import CPU_CHUNK, reduce_order_statistics
from defenses.trimmed_mean import TrimmedMean, trimmed_mean_rule
from defenses.variance import VarianceCorrected
from p2pnode.bench.defenses import load_byzfl_aggregators

BYZFL = load_byzfl_aggregators()
needs_byzfl = pytest.mark.skipif(BYZFL is None, reason="byzfl (test extra) is not installed")


def col(*values: float) -> torch.Tensor:
    """An (n, 1) stack from scalars: row k = (values[k],)."""
    return torch.tensor(values, dtype=torch.float32)[:, None]


def random_stack(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) float32, rows of different scales and offsets (no ties with probability 1)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 3 + 0.1
    return torch.randn(n, d, generator=g) * scale + torch.randn(n, 1, generator=g)


stacks = st.builds(random_stack, n=st.integers(1, 14), d=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))


# -- naive references (float64, loops) --------------------------------------------------------------
def naive_trimmed_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    cols = [sorted(x[:, j].double().tolist()) for j in range(x.shape[1])]
    return torch.tensor([sum(c[f : len(c) - f]) / (len(c) - 2 * f) for c in cols], dtype=torch.float64)


def naive_krum_scores(x: torch.Tensor, f: int) -> list[float]:
    rows = x.double()
    n = len(rows)
    dists = [[float(((rows[i] - rows[j]) ** 2).sum()) for j in range(n) if j != i] for i in range(n)]
    return [sum(sorted(d)[: n - f - 2]) for d in dists]


def naive_centered_clip(x: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    rows = x.double()
    v = rows[0].clone()
    for _ in range(iterations):
        step = torch.zeros_like(v)
        for r in rows:
            z = r - v
            norm = float(z.norm())
            step += z * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / len(rows)
    return v


def best_rows(scores: list[float], k: int, *, gap: float) -> list[int]:
    """Indices of the k smallest scores; hypothesis discards draws with a near-tie at the cut-off."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    if k < len(scores):
        assume(scores[order[k]] - scores[order[k - 1]] > gap * (1 + abs(scores[order[k]])))
    return order[:k]


# -- hand-computed cases ----------------------------------------------------------------------------
def test_median_odd_and_even_counts() -> None:
    x = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, -5.0]])

    assert torch.equal(median_rule(x), torch.tensor([1.0, 10.0]))
    x4 = torch.cat([x, torch.tensor([[100.0, 0.0]])])
    assert torch.equal(median_rule(x4), torch.tensor([1.5, 5.0]))  # mean of the two middle values


def test_trimmed_mean_drops_f_at_each_end() -> None:
    assert torch.equal(trimmed_mean_rule(col(0, 100, 2, 1, 3), 1), torch.tensor([2.0]))
    assert torch.equal(trimmed_mean_rule(col(0, 100, 2, 1, 3), 0), torch.tensor([21.2]))


def test_krum_picks_the_most_central_input_and_own_wins_ties() -> None:
    x = col(3, 100, 0, 1, 2)  # F=1: each score sums the 2 nearest squared distances

    assert krum_scores(x, 1).tolist() == [5.0, 97.0**2 + 98.0**2, 5.0, 2.0, 2.0]
    assert torch.equal(krum_rule(x, 1), torch.tensor([1.0]))  # rows 3 and 4 tie: the lower row wins
    assert torch.equal(krum_rule(col(0, 1, 10), 0), torch.tensor([0.0]))  # own and row 1 tie at 1


def test_multi_krum_averages_the_m_best() -> None:
    x = col(3, 100, 0, 1, 2)

    assert torch.equal(multi_krum_rule(x, 1, 2), torch.tensor([1.5]))
    assert torch.equal(multi_krum_rule(x, 1, 3), torch.tensor([2.0]))  # rows 3, 4, then 0 (tie with 2)


def test_centered_clip_one_step_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])  # ‖(3, 4)‖ = 5 clips to (0.6, 0.8)

    out = centered_clip_rule(x, tau=1.0, iterations=1)

    torch.testing.assert_close(out, torch.tensor([0.2, 0.8 / 3]))


def test_centered_clip_with_a_large_radius_is_the_mean() -> None:
    x = random_stack(6, 5, seed=1)

    torch.testing.assert_close(centered_clip_rule(x, tau=1e9), x.mean(0))


def test_nna_keeps_own_and_the_nearest() -> None:
    x = col(0, 1, 5, -2)  # F=1: keep 3 = own + the two nearest (1 and −2)

    torch.testing.assert_close(nna_rule(x, 1), torch.tensor([-1.0 / 3]))
    torch.testing.assert_close(nna_rule(x, 0), torch.tensor([1.0]))


@pytest.mark.parametrize("f", [3, 4, 50])
def test_nna_with_more_f_than_inputs_allow_keeps_only_own(f: int) -> None:
    x = col(7, 1, 5, -2)

    out = nna_rule(x, f)

    assert torch.equal(out, torch.tensor([7.0]))
    out += 1
    assert x[0, 0] == 7.0, "the result must be a copy"


def test_monna_helpers() -> None:
    assert monna_lr(0.1, 0, 100.0) == pytest.approx(0.1)
    assert monna_lr(0.1, 100, 100.0) == pytest.approx(0.05)
    m, g = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(monna_momentum(m, g, 0.9), torch.tensor([0.9, 0.1]))
    with pytest.raises(ValueError, match="tau"):
        monna_lr(0.1, 1, 0.0)
    with pytest.raises(ValueError, match="beta"):
        monna_momentum(m, g, 1.0)


# -- the comparator network -------------------------------------------------------------------------
def wire(p: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda wires: wires[p]


@pytest.mark.parametrize("n", range(1, 15))
def test_network_sorts_every_zero_one_column(n: int) -> None:
    # 0-1 principle: a comparator network that sorts all 0/1 inputs sorts every input.
    x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n))).T  # (n, 2**n)

    for p in range(n):
        out = reduce_order_statistics(x, frozenset({p}), wire(p))
        assert torch.equal(out, torch.sort(x, dim=0).values[p]), f"position {p}"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17, 31, 40])
def test_median_and_trimmed_mean_match_sorting_across_chunks(n: int) -> None:
    x = random_stack(n, CPU_CHUNK + 7, seed=n)  # two chunks, the second short
    s = torch.sort(x.double(), dim=0).values
    f = (n - 1) // 2

    torch.testing.assert_close(median_rule(x).double(), s[(n - 1) // 2 : n // 2 + 1].mean(0))
    torch.testing.assert_close(trimmed_mean_rule(x, f).double(), s[f : n - f].mean(0))


@pytest.mark.parametrize("n", [1, 3, 16, 40])
def test_pairwise_distances_match_cdist(n: int) -> None:
    x = random_stack(n, 1000, seed=n).double() + 100.0  # far from the origin: centring matters
    expected = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2

    torch.testing.assert_close(squared_distances(x), expected, atol=1e-9 * float(expected.max()), rtol=1e-9)


def test_float64_stacks_stay_float64() -> None:
    x = random_stack(7, 4, seed=0).double()

    for out in (median_rule(x), trimmed_mean_rule(x, 2), krum_rule(x, 2), nna_rule(x, 2),
                multi_krum_rule(x, 2, 3), centered_clip_rule(x, 1.0)):
        assert out.dtype == torch.float64


# -- random inputs against naive references ---------------------------------------------------------
@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks)
def test_median_matches_numpy(x: torch.Tensor) -> None:
    expected = torch.from_numpy(np.median(x.double().numpy(), axis=0))
    torch.testing.assert_close(median_rule(x).double(), expected, rtol=1e-6, atol=1e-6)


@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks, st.integers(0, 6))
def test_trimmed_mean_matches_loops(x: torch.Tensor, f: int) -> None:
    assume(2 * f < x.shape[0])
    expected = naive_trimmed_mean(x, f)
    torch.testing.assert_close(trimmed_mean_rule(x, f).double(), expected, rtol=1e-5, atol=1e-5)


@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks, st.integers(0, 5))
def test_krum_matches_loops(x: torch.Tensor, f: int) -> None:
    assume(x.shape[0] > 2 * f + 2)
    scores = naive_krum_scores(x, f)
    (best,) = best_rows(scores, 1, gap=1e-4)

    torch.testing.assert_close(krum_scores(x, f).double(), torch.tensor(scores, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(krum_rule(x, f), x[best])


@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks, st.integers(0, 5), st.integers(1, 14))
def test_multi_krum_matches_loops(x: torch.Tensor, f: int, m: int) -> None:
    n = x.shape[0]
    assume(n > 2 * f + 2 and m <= n - f)
    chosen = best_rows(naive_krum_scores(x, f), m, gap=1e-4)

    torch.testing.assert_close(multi_krum_rule(x, f, m), x[chosen].mean(0), rtol=1e-5, atol=1e-5)


@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks, st.floats(0.01, 10.0), st.integers(1, 4))
def test_centered_clip_matches_loops(x: torch.Tensor, tau: float, iterations: int) -> None:
    expected = naive_centered_clip(x, tau, iterations)
    out = centered_clip_rule(x, tau, iterations).double()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@settings(deadline=None)  # timing varies with machine load; the work is tiny
@given(stacks, st.integers(0, 16))
def test_nna_matches_loops(x: torch.Tensor, f: int) -> None:
    n = x.shape[0]
    dist = [float((x[j].double() - x[0].double()).norm()) for j in range(1, n)]
    keep = max(0, n - f - 1)
    chosen = [0] + [j + 1 for j in best_rows(dist, keep, gap=1e-4)] if keep else [0]

    torch.testing.assert_close(nna_rule(x, f), x[chosen].mean(0), rtol=1e-5, atol=1e-5)


# -- against byzfl ----------------------------------------------------------------------------------
Rule = Callable[[torch.Tensor], torch.Tensor]


def byzfl_pairs() -> list[tuple[str, Rule, Rule, int]]:
    """(rule, ours, byzfl's, least n byzfl accepts). byzfl's Krum uses n − f − 1 neighbours: f + 1 there."""
    assert BYZFL is not None
    agg = BYZFL

    def clipping(x: torch.Tensor) -> torch.Tensor:
        cc = agg.CenteredClipping(L=3, tau=1.0)
        cc.m = x[0]
        return cc(x)

    return [
        ("median", median_rule, agg.Median(), 1),
        ("trimmed-mean", lambda x: trimmed_mean_rule(x, 2), agg.TrMean(f=2), 5),
        ("krum", lambda x: krum_rule(x, 2), agg.Krum(f=3), 7),
        ("multi-krum", lambda x: multi_krum_rule(x, 2, x.shape[0] - 3), agg.MultiKrum(f=3), 7),
        ("centered-clip", lambda x: centered_clip_rule(x, 1.0, 3), clipping, 1),
        ("nna", lambda x: nna_rule(x, 2), agg.MoNNA(f=2, idx=0), 5),
    ]


@needs_byzfl
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 14), d=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_rules_match_byzfl(n: int, d: int, seed: int) -> None:
    x = random_stack(n, d, seed)
    for rule, ours, theirs, least in byzfl_pairs():
        if n < least:
            continue
        expected = theirs(x.clone())
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4, msg=f"{rule} differs from byzfl")


# -- preconditions, purity, registry -----------------------------------------------------------------
@pytest.mark.parametrize(("call", "match"), [
    (lambda: trimmed_mean_rule(col(1, 2, 3, 4), 2), "2F < n"),
    (lambda: trimmed_mean_rule(col(1, 2, 3), -1), "0 <= F"),
    (lambda: krum_rule(col(1, 2, 3, 4), 1), r"n > 2F \+ 2"),
    (lambda: multi_krum_rule(col(1, 2, 3, 4, 5), 1, 5), "M <= n - F"),
    (lambda: multi_krum_rule(col(1, 2, 3, 4, 5), 1, 0), "1 <= M"),
    (lambda: centered_clip_rule(col(1, 2), 0.0), "TAU > 0"),
    (lambda: centered_clip_rule(col(1, 2), float("nan")), "TAU > 0"),
    (lambda: centered_clip_rule(col(1, 2), 1.0, 0), "L >= 1"),
    (lambda: nna_rule(col(1, 2), -1), "F >= 0"),
    (lambda: median_rule(torch.zeros(0, 3)), "n >= 1"),
])
def test_preconditions_raise_value_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


ALL_RULES: list[Aggregator] = [Median(), TrimmedMean(f=1), Krum(f=1), MultiKrum(f=1, m=3),
                               CenteredClip(tau=0.5), NNA(f=2)]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_aggregate_leaves_inputs_untouched_and_refuses_non_finite(rule: Aggregator) -> None:
    own = torch.randn(6)
    received = {f"p{i}": torch.randn(6) for i in range(5)}
    copies = {k: v.clone() for k, v in received.items()}
    own_copy = own.clone()

    merged = rule.aggregate(own, received)
    merged += 1.0

    assert torch.equal(own, own_copy)
    assert all(torch.equal(received[k], copies[k]) for k in received)
    with pytest.raises(ValueError, match="finite"):
        rule.aggregate(own, {**received, "bad": torch.full((6,), float("inf"))})


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_aggregate_with_nothing_received_returns_a_copy_of_own(rule: Aggregator) -> None:
    own = torch.randn(4)

    merged = rule.aggregate(own, {})

    assert torch.equal(merged, own)
    assert merged.data_ptr() != own.data_ptr()


@pytest.mark.parametrize(("spec", "expected"), [
    ("median", Median()), ("trimmed-mean:2", TrimmedMean(f=2)), ("krum:3", Krum(f=3)),
    ("multi-krum:3,10", MultiKrum(f=3, m=10)), ("centered-clip:0.5", CenteredClip(tau=0.5)),
    ("centered-clip:2,5", CenteredClip(tau=2.0, iterations=5)), ("nna:4", NNA(f=4)),
])
def test_registry_parses_specs(spec: str, expected: Aggregator) -> None:
    assert make_aggregator(spec) == expected


@pytest.mark.parametrize(("spec", "match"), [
    ("krum", "missing arguments: expected krum:F with integer F >= 0"),
    ("krum:-1", "krum:F with integer F >= 0"),
    ("krum:x", "krum:F with integer F >= 0"),
    ("trimmed-mean:1,2", "trimmed-mean:F"),
    ("multi-krum:3", "multi-krum:F,M"),
    ("multi-krum:3,0", "multi-krum:F,M"),
    ("centered-clip:-1", "centered-clip:TAU"),
    ("centered-clip:inf", "centered-clip:TAU"),
    ("centered-clip:1,0", "centered-clip:TAU"),
    ("nna:1.5", "nna:F"),
    ("median:1", "no arguments"),
])
def test_registry_refuses_bad_specs_with_the_expected_form(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_aggregator(spec)


def test_registry_lists_every_rule_with_its_form_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'geomed'; valid: ") as info:
        make_aggregator("geomed")

    ours = ("centered-clip:TAU[,L]", "krum:F", "mean", "median", "multi-krum:F,M", "nna:F", "trimmed-mean:F")
    assert all(form in str(info.value) for form in ours)


def test_registry_names_are_the_classes_names_and_variance_correction_wraps() -> None:
    assert all(cls.name == name for name, cls in AGGREGATORS.items())
    wrapped = make_aggregator("nna:2", variance_correction=True)
    assert isinstance(wrapped, VarianceCorrected)
    assert isinstance(wrapped.inner, NNA)
