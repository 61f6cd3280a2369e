"""A member table flooded with records from thousands of fresh keys (or junk): the view, the cost of a
refresh and the peer tables stay bounded, and honest peers that answered keep their place.

10,000 validly signed records from 10,000 keys go through the fake DHT (hivemind would take minutes
to store them on a 2-core machine); 2,000 go through two real hivemind DHTs on loopback.
"""

from __future__ import annotations

import asyncio
import functools
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from p2pnode import membership as membership_module
from p2pnode.dht import create_dht, visible_maddrs
from p2pnode.identity import Identity, grind_identity, save_identity
from p2pnode.membership import Ed25519RecordValidator, Membership, swarm_key
from protocols.pow import pow_bits_of
from protocols.records import MembershipRecord, pack_record
from tests.integration.test_membership_dht import SWARM, FakeDHT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLOOD = 10_000
MAX_PEERS = 1024


def _record(identity: Identity, now: float) -> bytes:
    rec = MembershipRecord(peer_id=identity.peer_id, swarm=SWARM, maddrs=("/ip4/127.0.0.1/tcp/1",), round=0,
                           mode="gossip", codec="dense", model_fingerprint=b"fp", timestamp=now)
    return pack_record(rec, identity)


@pytest.fixture(scope="module")
def flood() -> dict[str, tuple[bytes, float]]:
    """10,000 validly signed records of 10,000 distinct keys, expiring in 10 minutes."""
    now = get_dht_time()
    keys = [Identity.generate() for _ in range(FLOOD)]
    return {k.peer_id: (_record(k, now), now + 600) for k in keys}


def _membership(table: dict[Any, tuple[Any, float]], me: Identity, seed: int = 1,
                max_peers: int = MAX_PEERS) -> Membership:
    return Membership(FakeDHT(table), me, swarm=SWARM, heartbeat_s=1, ttl_s=5,  # type: ignore[arg-type]
                      unreachable_s=60, dht_timeout=30, rng=random.Random(seed), max_peers=max_peers)


class Parses:
    """Counts the records membership parses and verifies (``unpack_record`` calls)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = membership_module.unpack_record

        def counting(*args: Any, **kwargs: Any) -> MembershipRecord:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(membership_module, "unpack_record", counting)


async def _timed_refresh(m: Membership) -> tuple[float, float]:
    """(seconds the refresh took, longest gap of a 10 ms ticker running meanwhile on the same loop)."""
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    try:
        await m.refresh()
    finally:
        elapsed = time.perf_counter() - start
        task.cancel()
    return elapsed, max(gaps, default=elapsed)


def test_a_flood_of_10000_valid_records_costs_a_bounded_refresh_and_view(
        flood: dict[str, tuple[bytes, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    me = Identity.generate()
    now = get_dht_time()
    honest = [Identity.generate() for _ in range(5)]
    table = dict(flood) | {h.peer_id: (_record(h, now), now + 600) for h in honest}
    small = dict(list(flood.items())[:MAX_PEERS])
    parses = Parses(monkeypatch)

    async def scenario() -> None:
        flooded, baseline = _membership(table, me), _membership(small, me)
        flooded_times, small_times = [], []
        for _ in range(3):  # interleaved, medians: the machine is shared
            flooded_times.append(await _timed_refresh(flooded))
            small_times.append(await _timed_refresh(baseline))
        assert parses.calls == 6 * MAX_PEERS, "never more than max_peers records verified per refresh"
        assert len(flooded.live()) == MAX_PEERS
        assert flooded.unread == len(table) - MAX_PEERS
        assert flooded.rejected == 0
        t_flooded = statistics.median(t for t, _ in flooded_times)
        t_small = statistics.median(t for t, _ in small_times)
        assert t_flooded < 2 * t_small + 0.5, f"{t_flooded:.2f} s with {len(table)} records, " \
                                              f"{t_small:.2f} s with {MAX_PEERS}"
        assert max(gap for _, gap in flooded_times) < 2.0, "the loop kept running during the refresh"

        # honest peers that answered us keep their place in the view and in every sample
        for h in honest:
            flooded.mark_alive(h.peer_id)
        await flooded.refresh()
        ids = {r.peer_id for r in flooded.live()}
        assert {h.peer_id for h in honest} <= ids
        honest_ids = {h.peer_id for h in honest}
        for _ in range(50):
            picked = [r.peer_id for r in flooded.sample(2)]
            assert len(set(picked)) == 2
            assert honest_ids & set(picked), "half of each sample comes from peers that answered"

    asyncio.run(scenario())


def test_the_view_rotates_over_the_flood_and_the_peer_tables_stay_bounded(
        flood: dict[str, tuple[bytes, float]]) -> None:
    me = Identity.generate()

    async def scenario() -> None:
        m = _membership(flood, me, seed=2)
        seen: set[str] = set()
        for _ in range(4):
            seen |= {r.peer_id for r in await m.refresh()}
        assert 3 * MAX_PEERS < len(seen) < FLOOD, "each refresh reads a fresh random subset"

        for peer in list(flood)[:5000]:
            m.mark_unreachable(peer)
            m.mark_alive(peer)
            m.mark_unreachable(peer)
        assert len(m._unreachable) == MAX_PEERS
        assert len(m._answered) == 0, "a peer marked unreachable is no longer counted as answering"
        for peer in list(flood)[:5000]:
            m.mark_alive(peer)
        assert len(m._answered) == MAX_PEERS

    asyncio.run(scenario())


def test_a_junk_flood_is_parsed_within_budget_and_answering_peers_survive_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    me, alice = Identity.generate(), Identity.generate()
    now = get_dht_time()
    table: dict[Any, tuple[Any, float]] = {f"junk-{i}": (b"\x93\x01\x02" + bytes(i % 50), now + 60)
                                           for i in range(FLOOD)}
    table |= {i: (b"junk", now + 60) for i in range(1000)}  # subkeys that are not even strings
    table[alice.peer_id] = (_record(alice, now), now + 60)
    parses = Parses(monkeypatch)

    async def scenario() -> None:
        m = _membership(table, me, max_peers=256)
        m.mark_alive(alice.peer_id)
        live = await m.refresh()
        assert [r.peer_id for r in live] == [alice.peer_id]
        assert parses.calls == 256
        assert 255 <= m.rejected <= 3 * 256, "junk is counted, within the reading budget"

    asyncio.run(scenario())


def test_the_validator_refuses_ids_without_proof_of_work_before_verifying() -> None:
    validator = Ed25519RecordValidator([SWARM], pow_bits=5)
    key = DHTID.generate(source=swarm_key(SWARM)).to_bytes()
    ground, _ = grind_identity(5)
    plain = next(i for i in iter(Identity.generate, None) if pow_bits_of(i.public_bytes) < 5)
    now = get_dht_time()

    def record(identity: Identity) -> DHTRecord:
        return DHTRecord(key, MSGPackSerializer.dumps(identity.peer_id),
                         MSGPackSerializer.dumps(_record(identity, now)), now + 30)

    assert validator.validate(record(ground))
    assert not validator.validate(record(plain))
    assert Ed25519RecordValidator([SWARM]).validate(record(plain)), "0 bits: every valid record passes"
    assert validator.validate(record(ground)), "a remembered verdict"
    assert len(validator._verdicts) == 2


def test_membership_skips_ids_without_proof_of_work_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    me = Identity.generate()
    ground, _ = grind_identity(4)
    plain = next(i for i in iter(Identity.generate, None) if pow_bits_of(i.public_bytes) < 4)
    now = get_dht_time()
    table = {i.peer_id: (_record(i, now), now + 60) for i in (ground, plain)}
    parses = Parses(monkeypatch)
    m = Membership(FakeDHT(table), me, swarm=SWARM, heartbeat_s=1, ttl_s=5,  # type: ignore[arg-type]
                   unreachable_s=5, dht_timeout=5, rng=random.Random(0), pow_bits=4)

    live = asyncio.run(m.refresh())

    assert [r.peer_id for r in live] == [ground.peer_id]
    assert (m.rejected, parses.calls) == (1, 1)


# ---------------------------------------------------------------- real hivemind DHTs on loopback


async def _flood_from_dht(_dht: object, node: Any, n: int) -> int:
    """Runs inside a DHT process: store ``n`` records of ``n`` fresh keys; the number stored."""
    now = get_dht_time()
    keys = [Identity.generate() for _ in range(n)]
    stored = 0
    for start in range(0, n, 500):
        chunk = keys[start:start + 500]
        result = await node.store_many([swarm_key(SWARM)] * len(chunk), [_record(k, now) for k in chunk],
                                       now + 120, subkeys=[k.peer_id for k in chunk])
        stored += sum(bool(ok) for ok in result.values())
    return stored


@pytest.fixture
def dht_pair(tmp_path: Path) -> Iterator[list[tuple[Identity, Any]]]:
    peers: list[tuple[Identity, Any]] = []
    try:
        for name in ("a", "b"):
            identity = Identity.generate()
            path = save_identity(identity, tmp_path / f"{name}.key")
            initial = visible_maddrs(peers[0][1]) if peers else []
            peers.append((identity, create_dht(str(path), swarm=SWARM, initial_peers=initial,
                                               host_maddrs=["/ip4/127.0.0.1/tcp/0"], announce_maddrs=[],
                                               wait_timeout=30.0)))
        yield peers
    finally:
        for _, dht in peers:
            dht.shutdown()


def test_a_real_dht_flooded_with_2000_records_keeps_refresh_bounded(
        dht_pair: list[tuple[Identity, Any]]) -> None:
    (ida, dht_a), (idb, dht_b) = dht_pair
    n = 2000
    stored = dht_a.run_coroutine(functools.partial(_flood_from_dht, n=n))
    assert stored == n

    async def scenario() -> None:
        honest = Membership(dht_b, idb, swarm=SWARM, heartbeat_s=1, ttl_s=30, unreachable_s=60,
                            dht_timeout=60, rng=random.Random(0))
        await honest.publish(round=3, model_fingerprint=b"fp")
        m = Membership(dht_a, ida, swarm=SWARM, heartbeat_s=1, ttl_s=5, unreachable_s=60, dht_timeout=60,
                       rng=random.Random(0), max_peers=256)
        start = time.perf_counter()
        await m.refresh()
        first = time.perf_counter() - start
        assert len(m.live()) == 256
        assert m.unread == n + 1 - 256

        m.mark_alive(idb.peer_id)  # B answered an exchange
        start = time.perf_counter()
        live = await m.refresh()
        second = time.perf_counter() - start
        assert idb.peer_id in {r.peer_id for r in live}
        assert len(live) == 256
        assert max(first, second) < 30.0, f"refreshes took {first:.1f} s and {second:.1f} s"
        assert any(r.peer_id == idb.peer_id for r in m.sample(1))

    asyncio.run(scenario())
