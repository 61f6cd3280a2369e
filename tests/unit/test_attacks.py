"""The attack suite on small hand-checkable tensors (defenses.attacks)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.attacks import ATTACKS, Attack, apply_trigger, make_attack
from defenses.attacks.adaptive import ALIE, ALIE_GRID, IPM, IPM_GRID, alie_z_max
from defenses.attacks.data_poisoning import Backdoor, LabelFlip, TargetedLabelFlip
from defenses.attacks.model_poisoning import FreeRider, GaussianNoise, SignFlip
from defenses.attacks.search import line_search, merge_damage
from defenses.attacks.sybil import Sybil
from defenses.base import Aggregator, MergeContext, stack_inputs
from defenses.mean import Mean


class Median(Aggregator):
    """Coordinate-wise (lower) median: a naive robust rule, so these tests need no other rule file."""

    name = "test-median"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        return stack_inputs(own, received).median(dim=0).values


class Refuses(Aggregator):
    """A rule whose precondition never holds."""

    name = "test-refuses"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        raise ValueError("2f < n does not hold")


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# honest models of a 2-coordinate toy: own = 1, observed spread around 1 (mean 1, population std √0.025)
OWN = torch.tensor([1.0, 1.0])
OBSERVED = [torch.tensor([v, v]) for v in (0.8, 0.9, 1.1, 1.2)]


# -- sign flip, gaussian, free-rider -----------------------------------------------------------------
def test_sign_flip_sends_minus_the_mean_of_the_observed_models() -> None:
    observed = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]

    crafted = SignFlip().craft(torch.zeros(2), observed, rng=_rng())
    scaled = make_attack("sign-flip:2").craft(torch.zeros(2), observed, rng=_rng())

    assert torch.equal(crafted, torch.tensor([-2.0, -3.0]))
    assert torch.equal(scaled, torch.tensor([-4.0, -6.0]))


def test_sign_flip_before_observing_anything_sends_minus_own() -> None:
    own = torch.tensor([1.0, -2.0])

    crafted = SignFlip().craft(own, [], rng=_rng())

    assert torch.equal(crafted, torch.tensor([-1.0, 2.0]))
    assert torch.equal(own, torch.tensor([1.0, -2.0])), "the input must not be modified"


def test_gaussian_adds_noise_of_the_given_sigma_to_the_mean_reproducibly() -> None:
    observed = [torch.full((20_000,), 2.0), torch.full((20_000,), 4.0)]
    attack = make_attack("gaussian:0.5")

    a = attack.craft(torch.zeros(20_000), observed, rng=_rng(1))
    b = attack.craft(torch.zeros(20_000), observed, rng=_rng(1))

    assert torch.equal(a, b)
    assert abs(float(a.mean()) - 3.0) < 0.02
    assert abs(float(a.std()) - 0.5) < 0.02


def test_free_rider_echoes_the_latest_observed_model_and_never_trains() -> None:
    own, observed = torch.zeros(2), [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 3.0])]

    echoed = FreeRider().craft(own, observed, rng=_rng())
    alone = FreeRider().craft(own, [], rng=_rng())

    assert torch.equal(echoed, observed[-1])
    assert echoed is not observed[-1]
    assert torch.equal(alone, own)
    assert not FreeRider.trains
    assert SignFlip.trains


# -- line search ---------------------------------------------------------------------------------------
def test_merge_damage_is_the_distance_from_the_honest_mean() -> None:
    # mean of {own 0, observed 2, crafted −2} is 0; the honest mean of {0, 2} is 1
    damage = merge_damage(Mean(), torch.zeros(1), [torch.tensor([2.0])], torch.tensor([-2.0]), copies=1)

    assert damage == pytest.approx(1.0)
    assert merge_damage(Refuses(), torch.zeros(1), [], torch.zeros(1), copies=1) == -math.inf


def test_line_search_returns_none_when_the_defense_refuses_every_candidate() -> None:
    best, damages = line_search(Refuses(), OWN, OBSERVED, (1.0, 2.0), lambda eta: OWN * eta, copies=1)

    assert best is None
    assert damages == [-math.inf, -math.inf]


# -- ALIE ------------------------------------------------------------------------------------------------
def test_alie_z_max_follows_baruch_et_al() -> None:
    # n = 20, f = 4: s = ⌊20/2 + 1⌋ − 4 = 7, z = Φ⁻¹(13/20)
    assert alie_z_max(20, 4) == pytest.approx(NormalDist().inv_cdf(0.65))
    assert alie_z_max(4, 1) == 0.0  # s = 2: Φ⁻¹(0.5), nothing to hide in
    assert math.isfinite(alie_z_max(3, 3))


def test_alie_with_a_fixed_z_sends_mean_plus_z_std() -> None:
    crafted = make_attack("alie:1,2").craft(OWN, OBSERVED, rng=_rng())

    assert torch.allclose(crafted, torch.full((2,), 1.0 + 2 * math.sqrt(0.025)))


def test_alie_without_a_defense_stays_within_the_paper_bound() -> None:
    observed = [torch.randn(50, generator=_rng(i)) for i in range(18)]
    attack = ALIE(copies=1)  # n = 1 + 18 + 1 = 20 inputs, f = 1

    crafted = attack.craft(torch.zeros(50), observed, rng=_rng())

    stacked = torch.stack(observed)
    mu, sigma = stacked.mean(0), stacked.std(0, correction=0)
    z = attack.last_coefficient
    assert z is not None
    assert z == pytest.approx(alie_z_max(20, 1))
    assert torch.all((crafted - mu).abs() <= z * sigma + 1e-6)


def test_alie_line_search_against_the_mean_takes_the_largest_z() -> None:
    attack = ALIE(copies=2)

    attack.craft(OWN, OBSERVED, rng=_rng(), defense=Mean())

    assert attack.last_coefficient == max(ALIE_GRID)


def test_alie_line_search_against_the_median_takes_the_smallest_z_that_moves_it_most() -> None:
    # honest values 0.8, 0.9, 1.0 (own), 1.1, 1.2; two copies of 1 + z·0.158 drag the median of the 7
    # up to 1.1 as soon as the crafted value passes 1.1, i.e. from z = 0.75 on the grid
    attack = ALIE(copies=2)

    crafted = attack.craft(OWN, OBSERVED, rng=_rng(), defense=Median())

    assert attack.last_coefficient == 0.75
    sigma = torch.full((2,), 0.025 ** 0.5)
    damages = [merge_damage(Median(), OWN, OBSERVED, attack.candidate(OWN, sigma, z), copies=2)
               for z in ALIE_GRID]
    assert merge_damage(Median(), OWN, OBSERVED, crafted, copies=2) == pytest.approx(max(damages))
    assert max(damages) > merge_damage(Median(), OWN, OBSERVED, OWN, copies=2)


# -- IPM --------------------------------------------------------------------------------------------------
def test_ipm_with_a_fixed_eps_and_without_a_defense() -> None:
    fixed = make_attack("ipm:1,2").craft(OWN, OBSERVED, rng=_rng())
    default = IPM().craft(OWN, OBSERVED, rng=_rng())

    assert torch.allclose(fixed, torch.full((2,), -2.0))
    assert torch.allclose(default, torch.full((2,), -0.5))  # ε = 0.5, i.e. (1 − η)μ with η = 1.5


@pytest.mark.parametrize("defense", [Mean(), Median()], ids=["mean", "median"])
def test_ipm_line_search_picks_the_grid_eps_of_maximal_damage(defense: Aggregator) -> None:
    attack = IPM(copies=2)

    crafted = attack.craft(OWN, OBSERVED, rng=_rng(), defense=defense)

    mu = torch.stack(OBSERVED).mean(0)
    damages = {eps: merge_damage(defense, OWN, OBSERVED, -eps * mu, copies=2) for eps in IPM_GRID}
    chosen = merge_damage(defense, OWN, OBSERVED, crafted, copies=2)
    assert attack.last_coefficient in IPM_GRID
    assert chosen == pytest.approx(max(damages.values()))
    assert chosen > merge_damage(defense, OWN, OBSERVED, mu, copies=2) + 1e-3, "more damage than sending μ"


def test_ipm_against_the_mean_takes_the_largest_eps_and_against_the_median_the_first_best() -> None:
    vs_mean, vs_median = IPM(copies=2), IPM(copies=2)

    vs_mean.craft(OWN, OBSERVED, rng=_rng(), defense=Mean())
    vs_median.craft(OWN, OBSERVED, rng=_rng(), defense=Median())

    assert vs_mean.last_coefficient == max(IPM_GRID)
    assert vs_median.last_coefficient == min(IPM_GRID)  # every ε lands below all honest values: a tie


def test_adaptive_attacks_fall_back_to_the_paper_default_when_the_defense_refuses() -> None:
    attack = IPM()

    attack.craft(OWN, OBSERVED, rng=_rng(), defense=Refuses())

    assert attack.last_coefficient == 0.5


# -- data poisoning ---------------------------------------------------------------------------------------
def test_label_flip_maps_l_to_c_minus_1_minus_l() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 9])

    px, py = LabelFlip().poison_data(x, y, 10, rng=_rng())

    assert torch.equal(py, torch.tensor([9, 8, 7, 0]))
    assert torch.equal(px, x)
    assert torch.equal(y, torch.tensor([0, 1, 2, 9])), "the input must not be modified"
    assert torch.equal(LabelFlip().craft(OWN, OBSERVED, rng=_rng()), OWN), "it gossips honestly"


def test_targeted_label_flip_relabels_only_the_source_class() -> None:
    y = torch.tensor([0, 1, 0, 2, 3])

    _, default = TargetedLabelFlip().poison_data(torch.zeros(5, 1), y, 4, rng=_rng())
    _, custom = make_attack("targeted-label-flip:3,2").poison_data(torch.zeros(5, 1), y, 4, rng=_rng())

    assert torch.equal(default, torch.tensor([1, 1, 1, 2, 3]))
    assert torch.equal(custom, torch.tensor([0, 1, 0, 2, 2]))
    with pytest.raises(ValueError, match="does not exist"):
        TargetedLabelFlip(0, 7).poison_data(torch.zeros(5, 1), y, 4, rng=_rng())


def test_apply_trigger_stamps_a_bright_patch_deterministically() -> None:
    images = torch.rand(2, 1, 6, 6, generator=_rng())
    vectors = torch.zeros(2, 5)

    a, b = apply_trigger(images), apply_trigger(images)
    v = apply_trigger(vectors, value=7.0)

    assert torch.equal(a, b)
    assert torch.all(a[..., 3:, 3:] == images.max())
    assert torch.equal(a[..., :3, :], images[..., :3, :])
    assert torch.equal(a[..., :, :3], images[..., :, :3])
    assert torch.equal(v, torch.tensor([[0.0, 0.0, 7.0, 7.0, 7.0]] * 2))
    assert torch.equal(vectors, torch.zeros(2, 5)), "the input must not be modified"
    with pytest.raises(ValueError, match="batch"):
        apply_trigger(torch.zeros(5))


def test_backdoor_triggers_and_relabels_exactly_the_requested_fraction() -> None:
    x = torch.rand(10, 1, 5, 5, generator=_rng()) * 0.5
    x[0, 0, 0, 0] = 1.0  # the brightest value of the shard
    y = torch.arange(10) % 3 + 1  # no sample is of the target class 0 yet
    attack = make_attack("backdoor:0.3,0")

    px, py = attack.poison_data(x, y, 4, rng=_rng(5))
    again, _ = attack.poison_data(x, y, 4, rng=_rng(5))

    triggered = (px[:, 0, -3:, -3:] == 1.0).flatten(1).all(dim=1)
    assert int(triggered.sum()) == 3
    assert torch.equal(py == 0, triggered)
    assert torch.equal(px[~triggered], x[~triggered])
    assert torch.equal(px[triggered], apply_trigger(x[triggered], value=1.0))
    assert torch.equal(px, again), "same generator state, same poisoned samples"


def test_backdoor_defaults_poison_half_the_shard_with_target_0() -> None:
    attack = Backdoor()
    x, y = torch.zeros(8, 6), torch.ones(8, dtype=torch.int64)
    x[:, 0] = 1.0

    px, py = attack.poison_data(x, y, 2, rng=_rng())

    assert int((py == 0).sum()) == 4
    assert torch.all(px[py == 0, -3:] == 1.0)


# -- sybil ------------------------------------------------------------------------------------------------
def test_sybil_poisons_like_a_targeted_flip_and_sends_near_identical_models() -> None:
    own, y = torch.randn(1000, generator=_rng()), torch.tensor([0, 1, 2])
    attack = make_attack("sybil")

    _, py = attack.poison_data(torch.zeros(3, 1), y, 3, rng=_rng())
    first = attack.craft(own, [], rng=_rng(1))
    second = attack.craft(own, [], rng=_rng(2))  # another identity: another crafting generator

    assert int((py == 1).sum()) >= 2
    assert int((py == 0).sum()) == 0
    assert not torch.equal(first, second)
    assert float((first - second).abs().max()) < 0.01
    assert float(torch.nn.functional.cosine_similarity(first, second, dim=0)) > 0.999


def test_sybil_makes_its_shard_half_source_class_then_flips_it() -> None:
    y = torch.tensor([0] * 10 + [2] * 90)
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)

    px, py = make_attack("sybil").poison_data(x, y, 3, rng=_rng())

    assert px.shape == x.shape
    assert py.shape == y.shape
    assert int((py == 1).sum()) >= 50  # the 50 resampled slots plus original class-0 samples left in place
    assert int((py == 0).sum()) == 0
    assert torch.all(px[py == 1] < 10)  # every sample labelled 1 is one of the class-0 images


def test_sybil_sends_its_start_plus_its_boosted_update() -> None:
    start, own = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 2.0])
    attack = make_attack("sybil:0,1,4,1e-9")

    sent = attack.craft(own, [], rng=_rng(), start=start)

    assert attack.merges
    assert torch.allclose(sent, torch.tensor([3.0, 2.0, -1.0]), atol=1e-6)  # start + 4 * (own - start)


# -- contract and registry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_returns_a_new_vector_and_leaves_inputs_untouched(name: str) -> None:
    attack = make_attack(name)
    own, observed = OWN.clone(), [o.clone() for o in OBSERVED]

    crafted = attack.craft(own, observed, rng=_rng(), defense=Mean())

    assert isinstance(attack, Attack)
    assert crafted.shape == own.shape
    assert crafted is not own
    assert all(crafted is not o for o in observed)
    assert torch.equal(own, OWN)
    assert all(torch.equal(o, e) for o, e in zip(observed, OBSERVED))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(ATTACKS)), seed=st.integers(0, 2**31), n=st.integers(0, 5))
def test_crafted_models_are_finite_for_finite_inputs(name: str, seed: int, n: int) -> None:
    g = _rng(seed)
    own, observed = torch.randn(7, generator=g), [torch.randn(7, generator=g) for _ in range(n)]

    crafted = make_attack(name).craft(own, observed, rng=g, defense=Median())

    assert torch.isfinite(crafted).all()


def test_registry_lists_the_valid_names_for_an_unknown_one() -> None:
    assert set(ATTACKS) == {"sign-flip", "gaussian", "alie", "ipm", "label-flip", "targeted-label-flip",
                            "backdoor", "sybil", "free-rider"}
    with pytest.raises(ValueError, match="valid: .*alie.*sign-flip"):
        make_attack("nope")
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("")


@pytest.mark.parametrize("spec", ["sign-flip:0", "sign-flip:x", "sign-flip:1,2", "gaussian:-1",
                                  "gaussian:nan", "alie:0", "alie:1,0", "alie:1,2,3", "ipm:1.5",
                                  "label-flip:3", "targeted-label-flip:1", "targeted-label-flip:1,1",
                                  "backdoor:1.5", "backdoor:0.5,-1", "sybil:0,1,0", "sybil:0,1,2,0",
                                  "free-rider:1"])
def test_bad_arguments_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="must|usage|different|fraction"):
        make_attack(spec)


def test_arguments_are_parsed() -> None:
    alie = make_attack("alie:3,1.5")
    backdoor = make_attack("backdoor:0.25,7")
    sybil = make_attack("sybil:2,5,3,0.01")

    assert isinstance(alie, ALIE)
    assert (alie.copies, alie.coefficient) == (3, 1.5)
    assert isinstance(backdoor, Backdoor)
    assert (backdoor.fraction, backdoor.target) == (0.25, 7)
    assert isinstance(sybil, Sybil)
    assert (sybil.source, sybil.target, sybil.boost, sybil.noise) == (2, 5, 3.0, 0.01)
    assert isinstance(make_attack("gaussian"), GaussianNoise)
