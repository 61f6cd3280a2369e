"""SybilWall: FoolsGold weights, the merge, explicit state, and the gossip of origin-signed records."""

from __future__ import annotations

import asyncio
import io
import math
import random
import time
from collections import Counter
from collections.abc import Callable

import msgpack
import pytest
import torch

import defenses.sybilwall as sw
from defenses.base import MergeContext
from defenses.sybilwall import (
    SybilWall,
    SybilWallState,
    cosine_matrix,
    first_sight_uniqueness,
    observe_model,
    pardon,
    sybilwall_scores,
    sybilwall_weights,
    weighted_median,
    weighted_merge,
    weights_from_similarity,
)
from p2pnode.config import NodeConfig, TaskConfig
from p2pnode.identity import Identity
from p2pnode.node import Node
from p2pnode.sybilwall import SybilWallExtension, gossip_weight
from p2pnode.tasks import ShardSpec, make_task
from p2pnode.trainer import LocalTrainer
from p2pnode.transport import MemoryNetwork, MemoryTransport
from protocols.errors import BadSignature, ProtocolError, TooLarge
from protocols.records import MembershipRecord
from protocols.sybil_records import pack_sybil_record, unpack_sybil_record

D = 64


def _sybils_and_honest(n_sybils: int, n_honest: int, *, seed: int = 0) -> torch.Tensor:
    """Rows: ``n_sybils`` near-identical histories, then ``n_honest`` independent ones; ``(n, D)``."""
    g = torch.Generator().manual_seed(seed)
    poison = torch.randn(D, generator=g)
    sybils = [poison + 1e-3 * torch.randn(D, generator=g) for _ in range(n_sybils)]
    honest = [torch.randn(D, generator=g) for _ in range(n_honest)]
    return torch.stack([*sybils, *honest])


# ---------------------------------------------------------------- weights (pure functions)


def test_cosine_matrix_has_a_zero_diagonal_and_is_symmetric() -> None:
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])

    cs = cosine_matrix(h)

    s = 1 / math.sqrt(2)
    torch.testing.assert_close(cs, torch.tensor([[0.0, s, 0.0], [s, 0.0, -s], [0.0, -s, 0.0]]))


@pytest.mark.parametrize("n_sybils", [2, 5, 15])
def test_near_identical_sybils_get_zero_weight_and_distinct_honest_peers_full_weight(n_sybils: int) -> None:
    h = _sybils_and_honest(n_sybils, 3)

    w = sybilwall_weights(h)

    assert w[:n_sybils].max() < 0.01, "more Sybils must not buy the attacker any weight"
    assert w[n_sybils:].min() > 0.9, "independent honest histories keep (nearly) full weight"
    assert w.max() == 1.0


def test_pardoning_forgives_an_honest_peer_that_merely_resembles_the_sybil_cluster() -> None:
    # rows: h1, h2 (honest), s1, s2 (Sybils); h1 resembles the Sybils (0.6), they resemble each other (0.99)
    cs = torch.tensor([[0.0, 0.2, 0.6, 0.6],
                       [0.2, 0.0, 0.1, 0.1],
                       [0.6, 0.1, 0.0, 0.99],
                       [0.6, 0.1, 0.99, 0.0]], dtype=torch.float64)

    pardoned = pardon(cs)

    # v = (0.6, 0.2, 0.99, 0.99): h1's similarity to each Sybil is scaled by 0.6 / 0.99, h2's by 0.2 / 0.99
    assert pardoned[0, 2] == pytest.approx(0.6 * 0.6 / 0.99)
    assert pardoned[1, 0] == pytest.approx(0.2 * 0.2 / 0.6)
    assert pardoned[2, 0] == pytest.approx(0.6), "the more similar peer is never pardoned"
    without = weights_from_similarity(cs, pardoning=False)
    with_ = weights_from_similarity(cs)
    # without: w = (0.4, 0.8, 0.01, 0.01) / 0.8 → logit(0.5) + 0.5 = 0.5 for h1
    assert without[0] == pytest.approx(0.5)
    assert with_[0] == 1.0
    assert with_[1] == 1.0
    assert with_[2:].max() == 0.0


def test_weights_follow_the_logit_formula_between_the_clips() -> None:
    cs = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=torch.float64)  # w = 0.5 for both, /max → 1
    assert torch.equal(weights_from_similarity(cs), torch.ones(2, dtype=torch.float64))
    # w = 1 − 0.45 = 0.55 and 1 − 0.0 = 1 (no pardoning: a row of zeros) → 0.55 → ln(0.55/0.45) + 0.5
    cs = torch.tensor([[0.0, 0.45, 0.0], [0.45, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    w = weights_from_similarity(cs, pardoning=False)
    assert w[0] == pytest.approx(math.log(0.55 / 0.45) + 0.5)
    assert w[2] == 1.0


def test_a_gossiped_record_raises_the_scale_of_the_weights_only_to_its_share() -> None:
    # observed a, b alike at cosine 0.8 (uniqueness 0.2 each); a record r unlike both (uniqueness 1)
    a, b, r = torch.zeros(3, D, dtype=torch.float64)
    a[0], b[0], b[1], r[2] = 1.0, 0.8, 0.6, 1.0
    histories = torch.stack([a, b, r])

    every_row = sybilwall_scores(histories)[0]
    observed_scale = sybilwall_scores(histories, scale_rows=2)[0]

    # every row setting the scale: 0.2 / 1 is below FoolsGold's cut (0.377), a and b get 0
    assert every_row[:2].tolist() == [0.0, 0.0]
    # the record raises the scale to RECORD_SCALE_SHARE x 1 = 0.25 only: 0.2 / 0.25 = 0.8 -> weight 1
    assert sw.RECORD_SCALE_SHARE == 0.25
    assert observed_scale[:2].tolist() == [1.0, 1.0]


def test_a_zero_history_gets_weight_zero_and_does_not_affect_the_others() -> None:
    h = torch.cat([_sybils_and_honest(0, 2), torch.zeros(1, D)])

    w = sybilwall_weights(h)

    assert w.tolist() == [1.0, 1.0, 0.0]


def test_a_single_history_gets_full_weight_and_identical_ones_get_none() -> None:
    v = torch.randn(1, D)

    assert sybilwall_weights(v).tolist() == [1.0]
    assert sybilwall_weights(v.repeat(3, 1)).tolist() == [0.0, 0.0, 0.0]
    assert sybilwall_weights(torch.empty(0, D)).numel() == 0


def test_non_finite_histories_are_refused() -> None:
    h = torch.randn(2, D)
    h[1, 0] = float("nan")

    with pytest.raises(ValueError, match="finite"):
        sybilwall_weights(h)


def test_weighted_merge_gives_own_weight_exactly_one() -> None:
    own = torch.tensor([0.0, 0.0])
    models = torch.tensor([[4.0, 0.0], [0.0, 8.0]])

    merged = weighted_merge(own, models, torch.tensor([1.0, 0.5]))

    torch.testing.assert_close(merged, torch.tensor([4.0, 4.0]) / 2.5)


# ---------------------------------------------------------------- histories and state


def test_history_without_a_base_starts_at_zero_and_accumulates_updates() -> None:
    m1, m2, m3 = torch.tensor([10.0, 10.0]), torch.tensor([11.0, 9.0]), torch.tensor([13.0, 9.5])

    e = observe_model(None, m1, base=None, round=1)
    assert torch.equal(e.h, torch.zeros(2)), "never start from the full model"
    e = observe_model(observe_model(e, m2, base=None, round=2), m3, base=None, round=3)

    torch.testing.assert_close(e.h, (m2 - m1) + (m3 - m2))
    assert e.round == 3


def test_history_with_the_common_initial_model_is_the_sum_of_updates_since_it() -> None:
    base = torch.tensor([10.0, 10.0])

    e = observe_model(None, torch.tensor([11.0, 9.0]), base=base, round=1)
    e = observe_model(e, torch.tensor([13.0, 9.5]), base=base, round=2)

    torch.testing.assert_close(e.h, torch.tensor([3.0, -0.5]))
    assert e.prev is None


def test_state_is_bounded_and_evicts_the_least_recently_seen_peer() -> None:
    state = SybilWallState(max_peers=2)
    for peer in ("a", "b", "a", "c"):
        state.observe(peer, torch.randn(D), base=None, round=1)

    assert list(state.histories) == ["a", "c"]


@pytest.mark.parametrize("with_base", [False, True])
def test_state_dict_roundtrips_through_a_weights_only_torch_save(with_base: bool) -> None:
    base = torch.randn(D) if with_base else None
    state = SybilWallState(max_peers=7)
    for r, peer in enumerate(("a", "b", "a")):
        state.observe(peer, torch.randn(D), base=base, round=r)
    state.uniqueness["a"] = 0.25  # "b" never weighed
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)

    restored = SybilWallState()
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    assert restored.max_peers == 7
    assert list(restored.histories) == ["b", "a"]
    assert restored.uniqueness == {"a": 0.25}
    for peer, entry in state.histories.items():
        again = restored.histories[peer]
        assert torch.equal(again.h, entry.h)
        assert again.round == entry.round
        assert (again.prev is None) == (entry.prev is None)
        assert again.prev is None or entry.prev is None or torch.equal(again.prev, entry.prev)


def test_an_empty_state_roundtrips() -> None:
    restored = SybilWallState()
    restored.load_state_dict(SybilWallState().state_dict())

    assert len(restored) == 0


# ---------------------------------------------------------------- the aggregator


Scenario = tuple[torch.Tensor, dict[str, torch.Tensor], SybilWallState, dict[str, torch.Tensor]]


def _sybilwall_scenario() -> Scenario:
    """Base 0 (so h = m); an honest peer observed earlier; Sybils s1, s2 received now, s3 only gossiped."""
    h = _sybils_and_honest(3, 2, seed=1)  # rows: s1, s2, s3, honest, old
    state = SybilWall().new_state()
    state.observe("old", h[4], base=torch.zeros(D), round=1)
    received = {"s1": h[0], "honest": h[3], "s2": h[1]}
    return torch.zeros(D), received, state, {"s3": h[2].half()}


def test_merge_weighs_each_received_model_by_its_own_peers_weight() -> None:
    own, received, state, records = _sybilwall_scenario()
    ctx = MergeContext(round=2, state=state, extras={"records": records, "base": torch.zeros(D)})

    merged = SybilWall().aggregate(own, received, ctx)

    # weights by peer: old 1, s1 0, honest 1, s2 0, s3 0. A positional zip of the weights of all known
    # histories [old, s1, honest, s2, s3] onto the received models [s1, honest, s2] would give s1 and s2
    # weight 1 and honest 0.
    torch.testing.assert_close(merged, (own + received["honest"]) / 2)
    assert list(state.histories) == ["old", "s1", "honest", "s2"], "received models update the histories"


def test_merge_with_all_honest_peers_is_the_plain_mean() -> None:
    own = torch.randn(D)
    received = {f"p{i}": row for i, row in enumerate(_sybils_and_honest(0, 3))}
    ctx = MergeContext(state=SybilWallState(), extras={"base": torch.zeros(D)})

    merged = SybilWall().aggregate(own, received, ctx)

    torch.testing.assert_close(merged, (own + sum(received.values())) / 4)


def test_an_observation_wins_over_a_self_signed_record_of_the_same_peer() -> None:
    own = torch.zeros(D)
    h = _sybils_and_honest(2, 2)  # rows: s1, s2, honest x, honest y
    # s1 signs an honest-looking history for itself; the model we receive from it is Sybil-like
    records = {"s1": h[2], "s2": h[1], "y": h[3]}
    ctx = MergeContext(state=SybilWallState(), extras={"records": records, "base": torch.zeros(D)})

    merged = SybilWall().aggregate(own, {"s1": h[0]}, ctx)

    torch.testing.assert_close(merged, own, msg="s1's observed history matches s2's record: weight 0")


def test_without_a_state_or_base_every_peer_is_new_and_own_is_returned() -> None:
    own = torch.randn(D)
    received = {"p": torch.randn(D)}
    own_copy, p_copy = own.clone(), received["p"].clone()

    merged = SybilWall(mode="absolute").aggregate(own, received)

    assert torch.equal(merged, own)
    assert merged is not own
    assert torch.equal(own, own_copy), "inputs are not modified"
    assert torch.equal(received["p"], p_copy), "inputs are not modified"


@pytest.mark.parametrize(("extras", "match"), [
    ({"base": torch.zeros(D + 1)}, "base"),
    ({"records": {"x": torch.full((D,), float("inf"))}}, "finite"),
])
def test_bad_extras_are_refused(extras: dict, match: str) -> None:
    ctx = MergeContext(state=SybilWallState(), extras=extras)

    with pytest.raises(ValueError, match=match):
        SybilWall().aggregate(torch.zeros(D), {"p": torch.randn(D)}, ctx)


def test_non_finite_models_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        SybilWall().aggregate(torch.zeros(D), {"p": torch.full((D,), float("nan"))})


# ---------------------------------------------------------------- record gossip (the extension)

N = 8
ME = Identity.generate()


def _ext(identity: Identity = ME, *, seed: int = 0, **kwargs: object) -> SybilWallExtension:
    return SybilWallExtension(identity, numel=N, rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


def _own_attachment(origin: Identity, *, round: int = 1, history: torch.Tensor | None = None) -> bytes:
    h = torch.randn(N) if history is None else history
    return msgpack.packb([pack_sybil_record(origin, origin=origin.peer_id, round=round, hop=0, history=h),
                          None])


def _relayed_attachment(origin: Identity, *, hop: int, round: int = 1) -> bytes:
    rec = pack_sybil_record(origin, origin=origin.peer_id, round=round, hop=hop, history=torch.randn(N))
    return msgpack.packb([None, rec])


def _decode(attachment: bytes | None) -> tuple:
    if attachment is None:
        return None, None
    own, relayed = msgpack.unpackb(attachment)
    parse = lambda b: None if b is None else unpack_sybil_record(b, expected_numel=N, max_bytes=1 << 20)  # noqa: E731
    return parse(own), parse(relayed)


def test_relayed_records_follow_the_hop_distance_distribution() -> None:
    ext = _ext(seed=1234)
    origins: dict[str, int] = {}
    for d in (1, 1, 2, 3, 4, 6):  # one origin per entry, known at distance d
        origin, relay = Identity.generate(), Identity.generate()
        if d == 1:  # a direct neighbour announces its own record
            ext.receive(origin.peer_id, _own_attachment(origin))
        else:
            ext.receive(relay.peer_id, _relayed_attachment(origin, hop=d - 1))
        origins[origin.peer_id] = d
    draws = 20_000

    counts = Counter(_decode(ext.attach("q", 1))[1].origin for _ in range(draws))

    total = sum(gossip_weight(d, 0.8) for d in origins.values())
    for peer, d in origins.items():
        expected = 0.8 * math.exp(-0.8 * (d - 1)) / total
        assert counts[peer] / draws == pytest.approx(expected, abs=4 * math.sqrt(expected / draws) + 1e-3)


def test_relays_skip_the_receiver_and_what_came_from_it_and_never_send_our_own_record() -> None:
    ext = _ext()
    q, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    ext.receive(q.peer_id, _own_attachment(q))  # q's own record, from q
    ext.receive(q.peer_id, _relayed_attachment(a, hop=1))  # a's record, from q
    ext.receive(a.peer_id, _relayed_attachment(b, hop=2))  # b's record, from a
    ext.note_own_model(torch.randn(N), round=1)

    relayed = {_decode(ext.attach(q.peer_id, 1))[1].origin for _ in range(50)}

    assert relayed == {b.peer_id}
    to_other = {_decode(ext.attach("other", 1))[1].origin for _ in range(200)}
    assert to_other == {q.peer_id, a.peer_id, b.peer_id}


def test_received_records_are_stored_one_hop_further_from_the_sender() -> None:
    ext = _ext()
    relay, far = Identity.generate(), Identity.generate()

    ext.receive(relay.peer_id, msgpack.packb([
        pack_sybil_record(relay, origin=relay.peer_id, round=1, hop=0, history=torch.randn(N)),
        pack_sybil_record(far, origin=far.peer_id, round=1, hop=2, history=torch.randn(N))]))

    assert ext.records[relay.peer_id].hop == 1
    assert ext.records[far.peer_id].hop == 3
    assert ext.records[far.peer_id].received_from == relay.peer_id


def test_own_record_is_announced_on_first_contact_then_every_announce_every_rounds() -> None:
    base = torch.randn(N)
    ext = _ext(base=base, announce_every=3)
    model = base + torch.arange(N, dtype=torch.float32)
    sent = []
    for r in range(1, 8):
        ext.note_own_model(model, round=r)
        sent.append(_decode(ext.attach("q", r))[0])

    assert [s is not None for s in sent] == [True, False, False, True, False, False, True]
    first = sent[0]
    assert (first.origin, first.round, first.hop) == (ME.peer_id, 1, 0)
    torch.testing.assert_close(first.history().float(), model - base)
    assert _decode(ext.attach("newcomer", 7))[0].round == 7


def test_nothing_is_attached_before_we_know_anything() -> None:
    assert _ext().attach("q", 1) is None


def test_a_newer_round_replaces_a_record_and_an_older_one_does_not() -> None:
    ext = _ext()
    origin, relay = Identity.generate(), Identity.generate()

    ext.receive(relay.peer_id, _relayed_attachment(origin, hop=1, round=5))
    ext.receive(relay.peer_id, _relayed_attachment(origin, hop=1, round=3))
    ext.receive(relay.peer_id, _relayed_attachment(origin, hop=1, round=5))
    assert ext.records[origin.peer_id].record.round == 5
    old = ext.records[origin.peer_id].record
    ext.receive(relay.peer_id, _relayed_attachment(origin, hop=1, round=6))

    assert ext.records[origin.peer_id].record.round == 6
    assert ext.records[origin.peer_id].record is not old


def test_records_table_is_bounded_least_recently_updated_evicted() -> None:
    ext = _ext(max_records=3)
    relay = Identity.generate()
    origins = [Identity.generate() for _ in range(5)]
    for origin in origins:
        ext.receive(relay.peer_id, _relayed_attachment(origin, hop=1))

    assert list(ext.records) == [o.peer_id for o in origins[2:]]


def test_our_own_record_coming_back_is_ignored() -> None:
    ext = _ext()

    ext.receive("relay", _relayed_attachment(ME, hop=2))

    assert len(ext.records) == 0


def _tampered(victim: Identity, relay: Identity) -> bytes:
    """``relay`` forwards ``victim``'s record with one history bit flipped."""
    rec = pack_sybil_record(victim, origin=victim.peer_id, round=9, hop=1, history=torch.randn(N))
    hop, who, signed, signature = msgpack.unpackb(rec)
    altered = signed[:-1] + bytes([signed[-1] ^ 0x40])
    return msgpack.packb([None, msgpack.packb([hop, who, altered, signature])])


class _Impostor:
    """Claims ``victim``'s peer id but signs with ``key``."""

    def __init__(self, victim: Identity, key: Identity) -> None:
        self.peer_id, self._key = victim.peer_id, key

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _forged(victim: Identity, relay: Identity) -> bytes:
    """``relay`` signs a newer record in ``victim``'s name."""
    rec = pack_sybil_record(_Impostor(victim, relay), origin=victim.peer_id, round=9, hop=1,
                            history=torch.randn(N))
    return msgpack.packb([None, rec])


def _record(origin: Identity, *, hop: int) -> bytes:
    return pack_sybil_record(origin, origin=origin.peer_id, round=9, hop=hop, history=torch.randn(N))


BAD_ATTACHMENTS: dict[str, tuple[Callable[[Identity, Identity], bytes], type[Exception]]] = {
    "tampered": (_tampered, BadSignature),
    "forged": (_forged, BadSignature),
    "someone else's in the own slot": (lambda v, r: msgpack.packb([_record(v, hop=0), None]), ProtocolError),
    "own record in the relayed slot": (lambda v, r: msgpack.packb([None, _record(r, hop=1)]), ProtocolError),
    "relayed at hop 0": (lambda v, r: msgpack.packb([None, _record(v, hop=0)]), ProtocolError),
    "good own record, forged relayed": (
        lambda v, r: msgpack.packb([_record(r, hop=0), msgpack.unpackb(_forged(v, r))[1]]), BadSignature),
    "garbage": (lambda v, r: b"\x92\xc4\x01x", ProtocolError),
    "three slots": (lambda v, r: msgpack.packb([None, None, None]), ProtocolError),
    "oversized": (lambda v, r: b"\x00" * 10_000, TooLarge),
}


@pytest.mark.parametrize("case", list(BAD_ATTACHMENTS))
def test_forged_tampered_or_misplaced_records_are_refused_and_nothing_is_stored(case: str) -> None:
    make, error = BAD_ATTACHMENTS[case]
    ext = _ext()
    victim, relay = Identity.generate(), Identity.generate()
    ext.receive(relay.peer_id, _relayed_attachment(victim, hop=1, round=1))

    with pytest.raises(error):
        ext.receive(relay.peer_id, make(victim, relay))

    assert list(ext.records) == [victim.peer_id], "a bad attachment stores nothing, not even its good part"
    assert ext.records[victim.peer_id].record.round == 1


def test_extras_hand_the_aggregator_histories_and_the_base() -> None:
    base = torch.randn(N)
    ext = _ext(base=base)
    origin = Identity.generate()
    h = torch.randn(N)
    ext.receive("relay", msgpack.packb([None, pack_sybil_record(origin, origin=origin.peer_id, round=1, hop=1,
                                                                history=h)]))

    extras = ext.extras()

    assert torch.equal(extras["base"], base)
    assert torch.equal(extras["records"][origin.peer_id], h.half())


def test_extension_state_dict_roundtrips() -> None:
    ext = _ext()
    ext.note_own_model(torch.randn(N), round=1)
    ext.note_own_model(torch.randn(N), round=2)

    again = _ext()
    again.load_state_dict(ext.state_dict())

    assert ext.own is not None
    assert again.own is not None
    assert torch.equal(again.own.h, ext.own.h)
    assert again.own.round == 2
    assert again.own.prev is not None
    assert ext.own.prev is not None
    assert torch.equal(again.own.prev, ext.own.prev)
    empty = _ext()
    empty.load_state_dict(_ext().state_dict())
    assert empty.own is None


# ---------------------------------------------------------------- three nodes over the in-memory transport


class _StaticView:
    def __init__(self) -> None:
        self.peers: list[MembershipRecord] = []
        self.rejected = 0

    def live(self) -> list[MembershipRecord]:
        return list(self.peers)

    def sample(self, k: int) -> list[MembershipRecord]:
        return self.peers[:k]

    def mark_unreachable(self, peer_id: str) -> None: ...
    def mark_alive(self, peer_id: str) -> None: ...

    async def refresh(self) -> list[MembershipRecord]:
        return self.live()

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()


def _sw_node(network: MemoryNetwork, shard: int) -> Node:
    task_cfg = TaskConfig(name="digits", shard=shard, num_shards=3, local_steps=2)
    config = NodeConfig(device="cpu", task=task_cfg)
    config.network.swarm = "t"
    config.gossip.fanout = 2
    task = make_task("digits")
    trainer = LocalTrainer(task.build_model(0), task.load(ShardSpec(index=shard, count=3)), lr=0.05,
                           momentum=0.9, batch_size=16, device=torch.device("cpu"), seed=shard)
    identity = Identity.generate()
    extension = SybilWallExtension(identity, numel=trainer.num_params, rng=random.Random(shard),
                                   base=trainer.get_flat(), announce_every=1)
    return Node(config, identity, trainer, MemoryTransport(network, identity.peer_id), _StaticView(),
                SybilWall(), extension=extension)


def _member(node: Node) -> MembershipRecord:
    return MembershipRecord(peer_id=node.identity.peer_id, swarm="t", maddrs=(), round=0, mode="gossip",
                            codec="dense", model_fingerprint=b"", timestamp=time.time())


def test_three_nodes_in_a_line_learn_each_others_records_through_the_middle() -> None:
    async def scenario() -> None:
        network = MemoryNetwork()
        a, b, c = (_sw_node(network, i) for i in range(3))  # b — a — c
        a.membership.peers.extend([_member(b), _member(c)])  # type: ignore[attr-defined]
        b.membership.peers.append(_member(a))  # type: ignore[attr-defined]
        c.membership.peers.append(_member(a))  # type: ignore[attr-defined]
        for n in (a, b, c):
            await n.transport.start(n.serve)

        for _ in range(3):
            for n in (a, b, c):
                assert isinstance(n.extension, SybilWallExtension)
                # what node.py will do inside run_round, with the model it is about to send
                n.extension.note_own_model(n.trainer.get_flat(), round=n.round + 1)
                await n.run_round()

        ea, eb, ec = (n.extension for n in (a, b, c))
        assert isinstance(ea, SybilWallExtension)
        assert isinstance(eb, SybilWallExtension)
        assert isinstance(ec, SybilWallExtension)
        ida, idb, idc = (n.identity.peer_id for n in (a, b, c))
        assert {o: k.hop for o, k in ea.records.items()} == {idb: 1, idc: 1}
        assert {o: k.hop for o, k in eb.records.items()} == {ida: 1, idc: 2}
        assert {o: k.hop for o, k in ec.records.items()} == {ida: 1, idb: 2}
        assert eb.records[idc].received_from == ida
        assert set(a.merge_state.histories) == {idb, idc}
        assert all(n.messages_rejected == 0 for n in (a, b, c))

    asyncio.run(scenario())


# ---------------------------------------------------------------- relative histories
def test_relative_history_sums_what_each_model_adds_to_ours() -> None:
    state = SybilWallState()
    state.observe("p", torch.tensor([3.0, 1.0]), base=None, round=1, own=torch.tensor([1.0, 1.0]))
    state.observe("p", torch.tensor([0.0, 5.0]), base=None, round=2, own=torch.tensor([1.0, 2.0]))

    assert torch.equal(state.histories["p"].h, torch.tensor([1.0, 3.0]))  # (2, 0) + (-1, 3)
    assert state.histories["p"].round == 2


def _merged_swarm(n_honest: int, n_sybils: int, rounds: int,
                  seed: int = 0) -> list[tuple[torch.Tensor, dict]]:
    """Rounds of a swarm that mixes well: every model is the common trajectory c(t) plus the sender's own
    update. Honest updates are independent; Sybils stay merged (start from c(t)) and add one boosted
    poisoned direction plus tiny noise. Returns, per round, (own model, received models)."""
    g = torch.Generator().manual_seed(seed)
    poison = torch.randn(D, generator=g)
    out = []
    for t in range(1, rounds + 1):
        c = torch.full((D,), 10.0 * t)  # the shared trajectory dominates every model
        own = c + 0.3 * torch.randn(D, generator=g)
        received = {f"h{i}": c + 0.3 * torch.randn(D, generator=g) for i in range(n_honest)}
        received |= {f"s{i}": c + 4 * 0.3 * poison + 1e-3 * torch.randn(D, generator=g)
                     for i in range(n_sybils)}
        out.append((own, received))
    return out


def test_relative_histories_zero_sybils_that_stay_merged_and_keep_honest_peers() -> None:
    rule, state = SybilWall(), SybilWallState()
    rounds = _merged_swarm(n_honest=4, n_sybils=5, rounds=4)
    for r, (own, received) in enumerate(rounds, start=1):
        ctx = MergeContext(round=r, state=state, extras={"base": torch.zeros(D)})
        merged = rule.aggregate(own, received, ctx)

    w = SybilWall.peer_weights(state, {}, rounds[-1][0])
    assert all(w[f"s{i}"] == 0.0 for i in range(5))
    assert all(w[f"h{i}"] == 1.0 for i in range(4))
    own, received = rounds[-1]
    torch.testing.assert_close(merged, (own + sum(received[f"h{i}"] for i in range(4))) / 5)


@pytest.mark.parametrize("n_sybils", [5, 15])
def test_sybils_that_outnumber_the_honest_inputs_do_not_capture_the_reference(n_sybils: int) -> None:
    # 15 Sybils against own + 4 honest: an unweighted median of the inputs is a Sybil model, so each
    # Sybil's relative update is its own noise and all 15 looked unique (weight 1, merge poisoned)
    rule, state = SybilWall(mode="weighted"), SybilWallState()
    rounds = _merged_swarm(n_honest=4, n_sybils=n_sybils, rounds=4, seed=3)
    for r, (own, received) in enumerate(rounds, start=1):
        merged = rule.aggregate(own, received, MergeContext(round=r, state=state, extras={}))

    w = SybilWall.peer_weights(state, {}, rounds[-1][0])
    assert max(w[f"s{i}"] for i in range(n_sybils)) == 0.0
    assert min(w[f"h{i}"] for i in range(4)) > 0.5
    assert state.trust("s0") < 1e-3, "the last uniqueness is kept"
    assert state.trust("h0") > 0.1
    own, received = rounds[-1]
    honest_mean = (own + sum(received[f"h{i}"] for i in range(4))) / 5
    sybil = received["s0"]
    assert (merged - honest_mean).norm() < 0.1 * (sybil - honest_mean).norm()


def test_newcomers_count_in_the_reference_by_how_unlike_each_others_updates_they_are() -> None:
    g = torch.Generator().manual_seed(5)
    own = torch.randn(D, generator=g)
    poison = torch.randn(D, generator=g)
    sybils = torch.stack([own + poison + 1e-4 * torch.randn(D, generator=g) for _ in range(6)])
    honest = torch.stack([own + torch.randn(D, generator=g) for _ in range(3)])

    u = first_sight_uniqueness(torch.cat([sybils, honest, own[None]]), own)

    assert float(u[:6].max()) < 1e-3
    assert float(u[6:9].min()) > 0.3
    assert float(u[9]) == 0.0, "a model equal to ours has no direction"
    assert first_sight_uniqueness(honest[:1], own).tolist() == [1.0]


def test_the_plain_median_reference_is_captured_by_a_majority_of_sybils() -> None:
    # the documented limitation of sybilwall:relative that the default (weighted) reference removes
    rule, state = SybilWall(mode="relative"), SybilWallState()
    rounds = _merged_swarm(n_honest=4, n_sybils=15, rounds=4, seed=3)
    for r, (own, received) in enumerate(rounds, start=1):
        rule.aggregate(own, received, MergeContext(round=r, state=state, extras={}))

    w = SybilWall.peer_weights(state, {}, rounds[-1][0])
    assert min(w[f"s{i}"] for i in range(15)) > 0.5, "near-identical Sybils should get 0, and do not"


def test_a_first_merge_is_not_captured_by_a_majority_of_arriving_sybils() -> None:
    g = torch.Generator().manual_seed(6)
    own = torch.zeros(D)
    poison = 5 * torch.randn(D, generator=g)
    received = {f"s{i}": poison + 1e-3 * torch.randn(D, generator=g) for i in range(15)}
    received |= {f"h{i}": torch.randn(D, generator=g) for i in range(4)}
    state = SybilWallState()

    SybilWall(mode="weighted").aggregate(own, received, MergeContext(round=1, state=state))

    sybil_h = torch.stack([state.histories[f"s{i}"].h for i in range(15)])
    assert float(sybil_h.norm(dim=1).min()) > 0.5 * float(poison.norm()), "Sybil updates are not noise"
    assert float(cosine_matrix(sybil_h.double()).max()) > 0.999


def test_weighted_median_matches_the_plain_median_for_equal_weights_and_follows_the_weights() -> None:
    x = torch.randn(6, 33)
    for n in range(1, 7):
        torch.testing.assert_close(weighted_median(x[:n], torch.ones(n, dtype=torch.float64)),
                                   x[:n].quantile(0.5, dim=0))
    col = torch.tensor([[0.0], [1.0], [2.0]])
    assert weighted_median(col, torch.tensor([1.0, 0.0, 5.0])).item() == 2.0  # zero weight: no part
    assert weighted_median(col, torch.tensor([3.0, 1.0, 1.0])).item() == 0.0
    assert weighted_median(col, torch.tensor([1.0, 1.0, 2.0])).item() == 1.5  # exactly half: the mean
    with pytest.raises(ValueError, match="not all 0"):
        weighted_median(col, torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        weighted_median(col, torch.ones(2))


def test_mode_is_chosen_by_the_spec() -> None:
    from defenses import make_aggregator

    assert make_aggregator("sybilwall").relative
    assert make_aggregator("sybilwall").weighted_reference  # the default since the sybilwall scenario
    assert make_aggregator("sybilwall:weighted").weighted_reference
    assert make_aggregator("sybilwall:relative").relative
    assert not make_aggregator("sybilwall:relative").weighted_reference
    assert not make_aggregator("sybilwall:absolute").relative
    with pytest.raises(ValueError, match="weighted\\|relative\\|absolute"):
        make_aggregator("sybilwall:other")
