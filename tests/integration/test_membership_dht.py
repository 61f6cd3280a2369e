"""DHT membership on real hivemind DHTs over loopback: identity, discovery, validator, expiry."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import pickle
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from p2pnode.dht import create_dht, visible_maddrs
from p2pnode.errors import IdentityError, PeerUnreachable
from p2pnode.identity import Identity, save_identity
from p2pnode.membership import Ed25519RecordValidator, Membership, swarm_key
from protocols.records import MembershipRecord, pack_record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SWARM = "itest"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclasses.dataclass
class Peer:
    identity: Identity
    dht: object

    def membership(self, **overrides: object) -> Membership:
        kwargs: dict = {"swarm": SWARM, "heartbeat_s": 0.5, "ttl_s": 5.0, "unreachable_s": 30.0,
                        "dht_timeout": 10.0, "rng": random.Random(0)}
        kwargs.update(overrides)
        return Membership(self.dht, self.identity, **kwargs)


class Impostor:
    """Claims ``victim``'s peer id but signs with its own key."""

    def __init__(self, victim: str) -> None:
        self.peer_id, self._key = victim, Identity.generate()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _start(tmp_path: Path, name: str, initial_peers: list[str]) -> Peer:
    identity = Identity.generate()
    path = save_identity(identity, tmp_path / f"{name}.key")
    dht = create_dht(str(path), swarm=SWARM, initial_peers=initial_peers, host_maddrs=LOOPBACK,
                     announce_maddrs=[], wait_timeout=30.0)
    return Peer(identity, dht)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Peer, Peer]]:
    peers: list[Peer] = []
    try:
        peers.append(_start(tmp_path, "a", []))
        peers.append(_start(tmp_path, "b", visible_maddrs(peers[0].dht)))
        yield peers[0], peers[1]
    finally:
        for peer in peers:
            peer.dht.shutdown()  # type: ignore[attr-defined]


def _record(identity_peer_id: str, *, round: int, timestamp: float | None = None) -> MembershipRecord:
    return MembershipRecord(peer_id=identity_peer_id, swarm=SWARM, maddrs=("/ip4/127.0.0.1/tcp/1",),
                            round=round, mode="gossip", codec="dense", model_fingerprint=b"fp",
                            timestamp=get_dht_time() if timestamp is None else timestamp)


def _raw_members(peer: Peer) -> dict:
    found = peer.dht.get(swarm_key(SWARM), latest=True)  # type: ignore[attr-defined]
    return {} if found is None else {owner: item.value for owner, item in found.value.items()}


def _store(peer: Peer, value: object, *, subkey: str | None, ttl: float = 30.0) -> bool:
    return peer.dht.store(swarm_key(SWARM), value, expiration_time=get_dht_time() + ttl,  # type: ignore
                          subkey=subkey)


# ---------------------------------------------------------------- identity and discovery


def test_dht_peer_id_is_the_identity_peer_id(pair: tuple[Peer, Peer]) -> None:
    for peer in pair:
        assert str(peer.dht.peer_id) == peer.identity.peer_id  # type: ignore[attr-defined]
        maddrs = visible_maddrs(peer.dht)  # type: ignore[arg-type]
        assert maddrs
        assert all(m.endswith(f"/p2p/{peer.identity.peer_id}") for m in maddrs)


def test_members_discover_each_other(pair: tuple[Peer, Peer]) -> None:
    a, b = pair

    async def scenario() -> None:
        ma, mb = a.membership(), b.membership()
        await ma.publish(round=1, model_fingerprint=b"fp")
        await mb.publish(round=2, model_fingerprint=b"fp")

        seen_by_a, seen_by_b = await ma.refresh(), await mb.refresh()

        assert [r.peer_id for r in seen_by_a] == [b.identity.peer_id]
        assert [r.peer_id for r in seen_by_b] == [a.identity.peer_id]
        assert seen_by_a[0].round == 2
        assert seen_by_a[0].maddrs == tuple(visible_maddrs(b.dht))
        assert [r.peer_id for r in ma.sample(5)] == [b.identity.peer_id]
        assert ma.sample(0) == []
        assert ma.rejected == mb.rejected == 0

    asyncio.run(scenario())


def test_run_heartbeats_and_sets_ready(pair: tuple[Peer, Peer]) -> None:
    a, b = pair

    async def scenario() -> None:
        ma, mb = a.membership(), b.membership()
        ready_a, ready_b = asyncio.Event(), asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            task_a = tg.create_task(ma.run(lambda: (7, b"fp"), ready_a))
            task_b = tg.create_task(mb.run(lambda: (8, b"fp"), ready_b))
            await asyncio.wait_for(asyncio.gather(ready_a.wait(), ready_b.wait()), 20)
            deadline = time.monotonic() + 20
            while not (ma.live() and mb.live()) and time.monotonic() < deadline:  # noqa: ASYNC110 (polling a view)
                await asyncio.sleep(0.1)
            task_a.cancel()
            task_b.cancel()
        assert [r.round for r in ma.live()] == [8]
        assert [r.round for r in mb.live()] == [7]

    asyncio.run(scenario())


def test_unreachable_peers_leave_the_live_view_for_a_while(pair: tuple[Peer, Peer]) -> None:
    a, b = pair

    async def scenario() -> None:
        ma = a.membership(unreachable_s=1.0)
        await b.membership().publish(round=1, model_fingerprint=b"fp")
        await ma.refresh()

        ma.mark_unreachable(b.identity.peer_id)
        assert ma.live() == []
        assert ma.sample(3) == []
        assert await ma.refresh() == []
        ma.mark_alive(b.identity.peer_id)
        assert [r.peer_id for r in ma.live()] == [b.identity.peer_id]

        ma.mark_unreachable(b.identity.peer_id)
        await asyncio.sleep(1.2)
        assert [r.peer_id for r in await ma.refresh()] == [b.identity.peer_id]

    asyncio.run(scenario())


# ---------------------------------------------------------------- the validator


def test_forged_and_non_owner_records_are_refused(pair: tuple[Peer, Peer]) -> None:
    a, b = pair
    asyncio.run(a.membership().publish(round=1, model_fingerprint=b"fp"))
    original = _raw_members(b)[a.identity.peer_id]

    # forged: A's peer id and subkey, signed by another key, with a later expiration
    forged = pack_record(_record(a.identity.peer_id, round=99), Impostor(a.identity.peer_id))
    assert _store(b, forged, subkey=a.identity.peer_id) is False
    # forged under a fresh subkey: nothing to overwrite, still refused
    ghost = Impostor(Identity.generate().peer_id)
    assert _store(b, pack_record(_record(ghost.peer_id, round=1), ghost), subkey=ghost.peer_id) is False
    # non-owner overwrite: B's genuine record under A's subkey
    bs_record = pack_record(_record(b.identity.peer_id, round=99), b.identity)
    assert _store(b, bs_record, subkey=a.identity.peer_id) is False
    # plain value over the whole member table, and a genuine record replayed with a far-off expiration
    assert _store(b, original, subkey=None) is False
    assert _store(b, original, subkey=a.identity.peer_id, ttl=10_000.0) is False

    for peer in pair:
        members = _raw_members(peer)
        assert members == {a.identity.peer_id: original}, "raw DHT get must show only A's original record"

    async def check_views() -> None:
        mb = b.membership()
        assert [(r.peer_id, r.round) for r in await mb.refresh()] == [(a.identity.peer_id, 1)]
        assert mb.rejected == 0  # nothing invalid even reached the reader

    asyncio.run(check_views())


def test_short_ttl_record_drops_out_after_expiry(pair: tuple[Peer, Peer]) -> None:
    a, b = pair
    c = Identity.generate()
    assert _store(b, pack_record(_record(c.peer_id, round=3), c), subkey=c.peer_id, ttl=2.0) is True

    async def scenario() -> None:
        ma = a.membership()
        assert [r.peer_id for r in await ma.refresh()] == [c.peer_id]
        await asyncio.sleep(2.5)
        assert await ma.refresh() == []
        assert ma.live() == []

    asyncio.run(scenario())


# ---------------------------------------------------------------- local re-verification (fake DHT)


class FakeDHT:
    """Answers like a DHT that skipped validation; ``store`` fails its first ``failures`` calls."""

    def __init__(self, table: dict, failures: int = 0) -> None:
        self.table, self.failures, self.stores = table, failures, 0

    def _done(self, result: object = None, exc: BaseException | None = None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def get(self, key: str, latest: bool, return_future: bool) -> asyncio.Future:
        items = {k: SimpleNamespace(value=v, expiration_time=exp) for k, (v, exp) in self.table.items()}
        return self._done(SimpleNamespace(value=items, expiration_time=get_dht_time() + 10))

    def store(self, key: str, value: bytes, expiration_time: float, subkey: str,
              return_future: bool) -> asyncio.Future:
        self.stores += 1
        if self.stores <= self.failures:
            return self._done(exc=RuntimeError("replica down"))
        return self._done(True)

    def run_coroutine(self, coro: object, return_future: bool) -> asyncio.Future:
        return self._done(["/ip4/127.0.0.1/tcp/1"])


def _fake_membership(dht: FakeDHT, me: Identity) -> Membership:
    return Membership(dht, me, swarm=SWARM, heartbeat_s=0.05, ttl_s=5, unreachable_s=5,  # type: ignore[arg-type]
                      dht_timeout=1, rng=random.Random(0))


def test_refresh_never_trusts_the_dht() -> None:
    me, alice, bob, carol = (Identity.generate() for _ in range(4))
    now = get_dht_time()
    alices = pack_record(_record(alice.peer_id, round=1, timestamp=now), alice)
    table = {
        alice.peer_id: (alices, now + 5),
        bob.peer_id: (alices, now + 5),  # alice's genuine record under bob's subkey
        "forged": (pack_record(_record(bob.peer_id, round=1), Impostor(bob.peer_id)), now + 5),
        "garbage": (b"\x93\x01\x02", now + 5),
        "not-bytes": (7, now + 5),
        "other-swarm": (pack_record(dataclasses.replace(_record(bob.peer_id, round=1), swarm="x"), bob),
                        now + 5),
        carol.peer_id: (pack_record(_record(carol.peer_id, round=1, timestamp=now - 10), carol), now - 1),
        me.peer_id: (pack_record(_record(me.peer_id, round=1, timestamp=now), me), now + 5),
    }

    async def scenario() -> list[MembershipRecord]:
        return await membership.refresh()

    membership = _fake_membership(FakeDHT(table), me)
    live = asyncio.run(scenario())

    assert [r.peer_id for r in live] == [alice.peer_id]  # carol expired, own record skipped
    assert membership.rejected == 5


def test_peers_of_another_mode_are_left_out_of_the_view() -> None:
    me, alice, bob = (Identity.generate() for _ in range(3))
    now = get_dht_time()
    spsa = dataclasses.replace(_record(bob.peer_id, round=1, timestamp=now), mode="spsa")
    table = {alice.peer_id: (pack_record(_record(alice.peer_id, round=1, timestamp=now), alice), now + 5),
             bob.peer_id: (pack_record(spsa, bob), now + 5)}
    gossip = _fake_membership(FakeDHT(table), me)
    spsa_view = Membership(FakeDHT(table), me, swarm=SWARM, heartbeat_s=0.05, ttl_s=5,  # type: ignore[arg-type]
                           unreachable_s=5, dht_timeout=1, rng=random.Random(0), mode="spsa")

    assert [r.peer_id for r in asyncio.run(gossip.refresh())] == [alice.peer_id]
    assert [r.peer_id for r in asyncio.run(spsa_view.refresh())] == [bob.peer_id]
    assert (gossip.other_mode, spsa_view.other_mode, gossip.rejected) == (1, 1, 0)


def test_run_survives_dht_failures_and_sets_ready_once_published() -> None:
    me = Identity.generate()
    dht = FakeDHT({}, failures=2)
    membership = _fake_membership(dht, me)

    async def scenario() -> None:
        ready = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(membership.run(lambda: (1, b"fp"), ready))
            await asyncio.sleep(0.08)
            assert not ready.is_set()  # the first store failed
            await asyncio.wait_for(ready.wait(), 5)
            task.cancel()
        assert dht.stores >= 3
        assert task.cancelled()

    asyncio.run(scenario())


def test_validator_checks_owner_signature_and_lifetime_and_pickles() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    validator = pickle.loads(pickle.dumps(Ed25519RecordValidator([SWARM], max_ttl_s=60.0)))
    key = DHTID.generate(source=swarm_key(SWARM)).to_bytes()
    rec = _record(alice.peer_id, round=1)
    value = MSGPackSerializer.dumps(pack_record(rec, alice))

    def ok(subkey: object, value: bytes, *, key: bytes = key, expires: float = rec.timestamp + 30) -> bool:
        return validator.validate(DHTRecord(key, MSGPackSerializer.dumps(subkey), value, expires))

    assert ok(alice.peer_id, value)
    assert not ok(bob.peer_id, value)  # someone else's subkey
    assert not ok(None, value)  # plain value over the member table
    assert not ok(alice.peer_id, value, expires=rec.timestamp + 61)  # lifetime beyond the signed bound
    assert not ok(alice.peer_id, MSGPackSerializer.dumps(b"junk"))
    assert not ok(alice.peer_id, MSGPackSerializer.dumps(pack_record(rec, Impostor(alice.peer_id))))
    assert ok("anything", b"anything", key=DHTID.generate(source="other key").to_bytes())  # not guarded

    other = Ed25519RecordValidator(["other"])
    assert validator.merge_with(other)
    assert not validator.merge_with(RSASignatureValidator.__new__(RSASignatureValidator))
    assert set(validator.guarded.values()) == {SWARM, "other"}


# ---------------------------------------------------------------- start-up errors


def test_unreachable_initial_peer_is_peer_unreachable(tmp_path: Path) -> None:
    path = save_identity(Identity.generate(), tmp_path / "lonely.key")
    nobody = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"

    started = time.monotonic()
    with pytest.raises(PeerUnreachable, match=r"initial peers answered within 12s \(\d+ tries\)"):
        create_dht(str(path), swarm=SWARM, initial_peers=[nobody], host_maddrs=LOOPBACK, announce_maddrs=[],
                   wait_timeout=12.0)
    # it tried again until the deadline, and gave up by then (one try lasts a few seconds)
    assert 8.0 <= time.monotonic() - started <= 12.0 + 8.0


def test_a_node_whose_initial_peer_comes_up_late_retries_until_it_answers(tmp_path: Path) -> None:
    # the bootstrap peer's address is fixed in advance; it starts 6 s after the joiner, whose first try
    # (hivemind's one bootstrap ping) fails: a lost SYN on a lossy link looks the same to the joiner
    late = Identity.generate()
    late_path = save_identity(late, tmp_path / "late.key")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{late.peer_id}"
    joiner_path = save_identity(Identity.generate(), tmp_path / "joiner.key")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        joining = pool.submit(create_dht, str(joiner_path), swarm=SWARM, initial_peers=[address],
                              host_maddrs=LOOPBACK, announce_maddrs=[], wait_timeout=40.0)
        time.sleep(6.0)
        assert not joining.done()
        bootstrap = create_dht(str(late_path), swarm=SWARM, initial_peers=[],
                               host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], announce_maddrs=[])
        try:
            joiner = joining.result(timeout=40.0)
            try:
                assert late.peer_id in {str(p) for p in joiner.run_coroutine(_routing_peers)}
            finally:
                joiner.shutdown()
        finally:
            bootstrap.shutdown()


async def _routing_peers(dht: object, node: object) -> list[object]:
    return list(node.protocol.routing_table.peer_id_to_uid)  # type: ignore[attr-defined]


def test_missing_identity_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IdentityError):
        create_dht(str(tmp_path / "missing.key"), swarm=SWARM, initial_peers=[], host_maddrs=LOOPBACK,
                   announce_maddrs=[])
