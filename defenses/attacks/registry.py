"""Attacks by name: ``make_attack("alie:2")``. New attacks register one entry in ``ATTACKS``."""

from __future__ import annotations

from defenses.attacks.adaptive import ALIE, IPM
from defenses.attacks.base import Attack
from defenses.attacks.data_poisoning import Backdoor, LabelFlip, TargetedLabelFlip
from defenses.attacks.model_poisoning import FreeRider, GaussianNoise, SignFlip
from defenses.attacks.sybil import Sybil

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (SignFlip, GaussianNoise, ALIE, IPM, LabelFlip, TargetedLabelFlip, Backdoor, Sybil, FreeRider)
}


def make_attack(spec: str) -> Attack:
    """Build the attack named by ``spec`` (``NAME`` or ``NAME:ARGS``).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones) or arguments the attack does not take
        (the message shows its usage).
    """
    name, _, args = spec.partition(":")
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {spec!r}; valid: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name].from_args(args)
