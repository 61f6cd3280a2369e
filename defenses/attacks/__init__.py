"""Byzantine behaviours for tests and benchmarks, chosen with ``--attack NAME[:ARGS]``.

Model poisoning crafts the vector an attacker sends (:meth:`Attack.craft`); data poisoning rewrites
its training shard (:meth:`Attack.poison_data`). Like the rest of :mod:`defenses`, this package never
imports ``p2pnode`` or ``protocols``; :mod:`p2pnode.byzantine` runs an attack inside a node.
"""

from defenses.attacks.base import Attack
from defenses.attacks.data_poisoning import apply_trigger
from defenses.attacks.registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "Attack", "apply_trigger", "make_attack"]
