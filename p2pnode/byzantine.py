"""Byzantine nodes for tests and benchmarks: a :class:`~p2pnode.node.Node` that runs an attack.

An attacker is a node started with ``--attack NAME[:ARGS]`` (:mod:`defenses.attacks`). It runs the
honest round loop and speaks the real protocol — signed envelopes, checked payloads, the configured
merge — and differs only through the hooks the honest :class:`Node` exposes:

- ``outgoing_model``: what it sends is ``attack.craft(own, observed)``, with ``observed`` the models
  it received in its last round that received any (or the omniscient channel, below) and the swarm's
  defense (its own aggregator) for adaptive attacks to tune against;
- ``observe``: keeps the latest received models (at most ``gossip.max_inbox``);
- ``local_training``: a free-rider skips local SGD; every attacker remembers the model it started the
  round's training from (``start``, passed to ``craft``);
- ``_merge``: an attack with ``merges`` set averages its own model with the models received from
  peers that are not its allies (``attack.allies``: the other identities of a Sybil attacker), so it
  stays aligned with the honest swarm; other attackers never adopt honest models.

Data poisoning happens once, when the node is built: :func:`poison_trainer_data` rewrites the
trainer's shard before the first round.

Randomness: crafting draws from a generator seeded by ``(config.seed, peer id)``, so every identity
of a Sybil attacker adds its own noise; data poisoning draws from one seeded by
``(config.seed, task.shard)``, so identities started on the same shard poison it identically.

The omniscient channel (tests and benchmarks only): an in-process runner may pass
``observed_source``, a callable returning the current honest models (e.g. read straight from the
honest nodes' trainers). The attacker then crafts from those instead of what it received — the
strongest "knows every honest model" threat model of the ALIE and IPM papers. Nothing on the wire
changes, and honest nodes never have it; the daemon never sets it.

Honest code paths contain no attack logic: :func:`make_node` returns a plain :class:`Node` unless
``attack.name`` is set.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
from collections.abc import Callable, Sequence

import torch

from defenses import Aggregator
from defenses.attacks import Attack, make_attack
from p2pnode.config import NodeConfig
from p2pnode.errors import ConfigError
from p2pnode.identity import Identity
from p2pnode.node import GossipExtension, Node, PeerView
from p2pnode.trainer import LocalTrainer
from p2pnode.transport.base import Transport

logger = logging.getLogger(__name__)

ObservedSource = Callable[[], Sequence[torch.Tensor]]


def attack_generator(seed: int, salt: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, salt)`` through blake2b (stable across runs and hosts)."""
    digest = hashlib.blake2b(f"{seed}/{salt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def build_attack(config: NodeConfig) -> Attack:
    """The attack named by ``config.attack.name``; ConfigError (listing valid ones) if it is invalid."""
    try:
        return make_attack(config.attack.name)
    except ValueError as exc:
        raise ConfigError("attack.name", config.attack.name, str(exc)) from exc


def infer_num_classes(trainer: LocalTrainer) -> int:
    """Number of classes: the trainer's ``num_classes`` if it records one, else the model's output
    width on one test sample (a copy in eval mode, so no statistics move)."""
    known = getattr(trainer, "num_classes", None)
    if isinstance(known, int):
        return known
    model = copy.deepcopy(trainer.model).eval()
    with torch.no_grad():
        return int(model(trainer.test_x[:1]).shape[-1])


def poison_trainer_data(trainer: LocalTrainer, attack: Attack, num_classes: int,
                        rng: torch.Generator) -> None:
    """Replace ``trainer.train_x`` / ``train_y`` by ``attack.poison_data`` of them; call before training.

    Raises
    ------
    ValueError
        If the attack changed the number of samples or the shapes (the batch sampler relies on them).
    """
    x, y = attack.poison_data(trainer.train_x, trainer.train_y, num_classes, rng=rng)
    if x.shape != trainer.train_x.shape or y.shape != trainer.train_y.shape:
        raise ValueError(f"{attack.name} changed the training set's shape: "
                         f"x {tuple(trainer.train_x.shape)} -> {tuple(x.shape)}, "
                         f"y {tuple(trainer.train_y.shape)} -> {tuple(y.shape)}")
    trainer.train_x, trainer.train_y = x.to(trainer.device), y.to(trainer.device)


class ByzantineNode(Node):
    """A node that sends ``attack.craft(...)`` instead of its model (see the module docstring).

    Parameters
    ----------
    config, identity, trainer, transport, membership, aggregator, extension
        As for :class:`Node`; ``config.attack.name`` names the attack unless ``attack`` is given.
    attack
        The attack to run (default: built from ``config.attack.name``).
    num_classes
        Classes of the task, for data poisoning (default: the model's output width).
    observed_source
        Test and benchmark only: the omniscient channel (module docstring). ``None`` in the daemon.
    """

    role = "byzantine"

    def __init__(self, config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
                 membership: PeerView, aggregator: Aggregator, extension: GossipExtension | None = None, *,
                 attack: Attack | None = None, num_classes: int | None = None,
                 observed_source: ObservedSource | None = None) -> None:
        super().__init__(config, identity, trainer, transport, membership, aggregator, extension)
        self.attack = attack if attack is not None else build_attack(config)
        self.observed_source = observed_source
        self.observed: list[torch.Tensor] = []
        self._max_observed = config.gossip.max_inbox
        self._craft_rng = attack_generator(config.seed, f"craft/{identity.peer_id}")
        self._observed_version = 0
        self._cache: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None  # key, own, crafted
        self.allies = frozenset(config.attack.allies) - {identity.peer_id}
        self._start: torch.Tensor | None = None  # the model before this round's local training
        classes = num_classes if num_classes is not None else infer_num_classes(trainer)
        data_rng = attack_generator(config.seed, f"data/{config.task.shard}")
        poison_trainer_data(trainer, self.attack, classes, data_rng)
        logger.info("this node is a Byzantine attacker: %r", self.attack)

    def local_training(self, steps: int) -> float:
        """H local SGD steps, unless the attack never trains (free-rider: returns loss 0.0)."""
        self._start = self.trainer.get_flat()
        if not self.attack.trains:
            return 0.0
        return self.trainer.train_steps(steps)

    async def _merge(self, sent: torch.Tensor, received: dict[str, torch.Tensor]) -> None:
        """An attack with ``merges`` takes the plain mean of its own model and its non-allies' models.

        Any other attacker never adopts honest models: it keeps training on its own (poisoned) data,
        which makes the untargeted data-poisoning attacks (label flips, backdoor) as strong as they can be.
        """
        if not self.attack.merges:
            return
        own = self.trainer.get_flat()
        others = [m for peer, m in received.items() if peer not in self.allies]
        if others:
            merged = torch.stack([own, *others]).mean(dim=0)
            await asyncio.to_thread(self.trainer.add_flat_, merged - own)

    def observe(self, received: dict[str, torch.Tensor]) -> None:
        """Keep the models of the last round that received any (at most ``gossip.max_inbox``)."""
        if received:
            self.observed = list(received.values())[-self._max_observed:]
            self._observed_version += 1

    def observed_models(self) -> list[torch.Tensor]:
        """What the attack crafts from: the omniscient channel if present, else the observed models."""
        if self.observed_source is not None:
            return list(self.observed_source())
        return list(self.observed)

    def outgoing_model(self, own: torch.Tensor) -> torch.Tensor:
        """The crafted model (1-D float32 CPU); crafted once per round, observation and ``own``."""
        key = (self.round, self._observed_version)
        if self._cache is not None and self._cache[0] == key and self._cache[1] is own:
            return self._cache[2]
        crafted = self.attack.craft(own, self.observed_models(), rng=self._craft_rng, defense=self.aggregator,
                                    start=self._start)
        crafted = crafted.detach().to("cpu", torch.float32).contiguous()
        self._cache = (key, own, crafted)
        return crafted


def make_node(config: NodeConfig, identity: Identity, trainer: LocalTrainer, transport: Transport,
              membership: PeerView, aggregator: Aggregator, *, extension: GossipExtension | None = None,
              num_classes: int | None = None, observed_source: ObservedSource | None = None) -> Node:
    """A plain honest :class:`Node` when ``config.attack.name`` is empty, else a :class:`ByzantineNode`.

    Building a Byzantine node poisons ``trainer``'s data (for data-poisoning attacks) before it returns.

    Raises
    ------
    ConfigError
        For an invalid attack name or arguments.
    ValueError
        If an honest node is given an ``observed_source`` (only attackers may be omniscient).
    """
    if not config.attack.name:
        if observed_source is not None:
            raise ValueError("observed_source is an attacker-only test channel; honest nodes never take one")
        return Node(config, identity, trainer, transport, membership, aggregator, extension)
    return ByzantineNode(config, identity, trainer, transport, membership, aggregator, extension,
                         num_classes=num_classes, observed_source=observed_source)
