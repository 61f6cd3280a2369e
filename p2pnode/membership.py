"""DHT membership: signed records under one swarm key, a heartbeat, and random peer sampling.

Each peer stores a :class:`~protocols.records.MembershipRecord`, signed with its Ed25519 identity,
under the DHT key :func:`swarm_key` with *subkey* = its peer id, and re-publishes it every
heartbeat with a short expiration. hivemind hashes DHT keys, so an owner marker only protects a
record when it sits in the subkey (DESIGN §3): :class:`Ed25519RecordValidator` runs inside every
DHT node and refuses, for guarded keys, any record that is not signed by the peer its subkey names.
Readers never trust the DHT anyway: :meth:`Membership.refresh` verifies every record again.

hivemind findings that shape this module:

- ``DHTRecord.key`` is ``DHTID.generate(source=key).to_bytes()`` (a hash), ``subkey`` is the
  msgpack of the subkey object and ``value`` the msgpack of the value object (here: ``bin``).
- One bad subkey makes hivemind drop the *whole* dictionary that a remote node returns, so
  refusing bad records at store time (validator on every honest node) matters.
- ``P2P.create`` checks "is this identity already taken?" with ``PeerID.from_identity``, which
  only understands RSA keys; with an Ed25519 key file and initial peers it raises. We pass
  ``check_if_identity_free=False``.
- A replayed, genuinely signed old record cannot be given a longer life: the validator bounds the
  expiration by the record's signed timestamp plus ``max_ttl_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar

import hivemind
import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from p2pnode.errors import P2PNodeError
from p2pnode.identity import Identity
from p2pnode.rejoin import Rejoiner, ping_in_dht
from protocols.errors import ProtocolError
from protocols.pow import peer_id_has_pow
from protocols.records import MAX_NAME_CHARS, MAX_RECORD_BYTES, MembershipRecord, pack_record, unpack_record

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_MAX_TTL_S = 600.0


class MembershipError(P2PNodeError):
    """A DHT store or get failed or timed out (the DHT, not one peer, is at fault)."""


def swarm_key(swarm: str) -> str:
    """The DHT key under which the members of ``swarm`` publish their records."""
    return f"p2pnode.members.{swarm}"


def _key_id(swarm: str) -> bytes:
    return DHTID.generate(source=swarm_key(swarm)).to_bytes()


def _subkey_bytes(peer_id: str) -> bytes:
    return MSGPackSerializer.dumps(peer_id)


# ------------------------------------------------------------------------------------ validator


class Ed25519RecordValidator(RecordValidatorBase):
    """Only a peer itself may write the subkey named after it under a guarded swarm key.

    For a record under a guarded key it requires: the subkey is the canonical msgpack of a peer id
    string; the value is a msgpack ``bin`` holding a record that :func:`unpack_record` accepts
    (signature by that record's peer id); the record's peer id equals the subkey and its swarm the
    guarded swarm; the DHT expiration is at most ``timestamp + max_ttl_s``. Plain values (no
    subkey) under a guarded key are refused, so nobody can overwrite the whole member table.
    With ``pow_bits`` > 0 the subkey's peer id must also carry the identity proof of work
    (:mod:`protocols.pow`), checked before the signature, so honest DHT nodes neither store nor
    return records of unpriced ids. Records under other keys pass untouched. Plain attributes
    only: it is pickled into the DHT process.

    hivemind validates every record of every remote answer again, so each ``get`` of a member table
    flooded with N records would cost N signature checks in the DHT process: verdicts are remembered
    (a digest of key, subkey, value and expiration -> bool) for the last ``cache_size`` records.
    """

    cache_size = 16_384

    def __init__(self, swarms: Iterable[str], *, max_ttl_s: float = DEFAULT_MAX_TTL_S,
                 max_record_bytes: int = MAX_RECORD_BYTES, pow_bits: int = 0) -> None:
        self.guarded: dict[bytes, str] = {_key_id(swarm): swarm for swarm in swarms}
        self.max_ttl_s = max_ttl_s
        self.max_record_bytes = max_record_bytes
        self.pow_bits = pow_bits
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()

    def validate(self, record: DHTRecord) -> bool:
        swarm = self.guarded.get(record.key)
        if swarm is None:
            return True
        digest = hashlib.blake2b(b"".join((record.key, len(record.subkey).to_bytes(4, "big"), record.subkey,
                                           repr(record.expiration_time).encode(), record.value)),
                                 digest_size=16).digest()
        verdict = self._verdicts.get(digest)
        if verdict is None:
            verdict = self._verify(record, swarm)
            self._verdicts[digest] = verdict
            if len(self._verdicts) > self.cache_size:
                self._verdicts.popitem(last=False)
        return verdict

    def _verify(self, record: DHTRecord, swarm: str) -> bool:
        try:
            verify_dht_record(record.subkey, record.value, record.expiration_time, swarm=swarm,
                              max_ttl_s=self.max_ttl_s, max_record_bytes=self.max_record_bytes,
                              pow_bits=self.pow_bits)
        except ProtocolError as exc:
            logger.debug("refused DHT record for swarm %s: %s", swarm, exc)
            return False
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value  # the application signs the record itself (pack_record)

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value

    @property
    def priority(self) -> int:
        # Validation runs in decreasing priority: stay below signature validators that strip their
        # suffix first (RSASignatureValidator uses 10), so we see the value exactly as stored.
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, Ed25519RecordValidator):
            return False
        self.guarded.update(other.guarded)
        self.max_ttl_s = min(self.max_ttl_s, other.max_ttl_s)
        self.max_record_bytes = min(self.max_record_bytes, other.max_record_bytes)
        self.pow_bits = max(self.pow_bits, other.pow_bits)
        self._verdicts.clear()
        return True


def verify_dht_record(subkey: bytes, value: bytes, expiration_time: float, *, swarm: str,
                      max_ttl_s: float, max_record_bytes: int = MAX_RECORD_BYTES,
                      pow_bits: int = 0) -> MembershipRecord:
    """Check one serialized (subkey, value) pair of the swarm key; ProtocolError if it is invalid."""
    try:
        owner = msgpack.unpackb(subkey, raw=False, max_str_len=MAX_NAME_CHARS, max_bin_len=0,
                                max_array_len=0, max_map_len=0, max_ext_len=0)
        inner = msgpack.unpackb(value, raw=False, max_bin_len=max_record_bytes, max_str_len=0,
                                max_array_len=0, max_map_len=0, max_ext_len=0)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"malformed subkey or value: {exc}") from exc
    if not isinstance(owner, str) or subkey != _subkey_bytes(owner):
        raise ProtocolError("subkey is not a canonical peer id string")
    if not peer_id_has_pow(owner, pow_bits):
        raise ProtocolError(f"peer id {owner} lacks the identity proof of work ({pow_bits} bits)")
    if not isinstance(inner, bytes):
        raise ProtocolError("value is not a signed record")
    return check_record(unpack_record(inner, max_bytes=max_record_bytes), owner, expiration_time,
                        swarm=swarm, max_ttl_s=max_ttl_s)


def check_record(rec: MembershipRecord, owner: str, expiration_time: float, *, swarm: str,
                 max_ttl_s: float) -> MembershipRecord:
    """The checks beyond the signature: owner, swarm and a lifetime bound by the signed timestamp."""
    if rec.peer_id != owner:
        raise ProtocolError(f"record of {rec.peer_id} stored under subkey {owner}")
    if rec.swarm != swarm:
        raise ProtocolError(f"record for swarm {rec.swarm!r} under swarm {swarm!r}")
    if not expiration_time <= rec.timestamp + max_ttl_s:
        raise ProtocolError(f"expiration {expiration_time} beyond timestamp {rec.timestamp} + {max_ttl_s}s")
    return rec


async def _await_mp(future: Any, limit_s: float, what: str) -> Any:
    """Await a hivemind MPFuture with a deadline, cancelling it on timeout or cancellation.

    ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11 ``wait_for`` loses a
    cancellation that arrives just as the awaited future completes, and the heartbeat never stops.
    """
    try:
        async with asyncio.timeout(limit_s):
            return await future
    except TimeoutError as exc:
        future.cancel()
        raise MembershipError(f"DHT {what} timed out after {limit_s:g}s") from exc
    except asyncio.CancelledError:
        future.cancel()
        raise
    except (MembershipError, ProtocolError):
        raise
    except Exception as exc:  # hivemind raises assorted errors from its process; translate here only
        raise MembershipError(f"DHT {what} failed: {exc!r}") from exc


async def _get_visible(dht: hivemind.DHT, limit_s: float) -> list[str]:
    future = dht.run_coroutine(partial(hivemind.DHT._get_visible_maddrs, latest=False), return_future=True)
    return [str(m) for m in await _await_mp(future, limit_s, "get_visible_maddrs")]


# ------------------------------------------------------------------------------------ membership


class Membership:
    """This node's record on the DHT and its view of the other live members.

    Parameters
    ----------
    dht:
        A started DHT (see :func:`create_dht`).
    identity:
        Signs this node's record; its peer id is the subkey.
    swarm:
        Only records of this swarm are read or written.
    heartbeat_s, ttl_s:
        Re-publish period and record lifetime (``ttl_s > heartbeat_s``).
    unreachable_s:
        A peer marked unreachable is left out of the live view this long.
    dht_timeout:
        Deadline of one DHT store or get.
    rng:
        Peer sampling randomness (seeded by the node).
    max_peers:
        Most records read (parsed and verified) per refresh, hence the largest view; also the size
        of the unreachable and answered tables. See :meth:`refresh` for which records are read when
        the DHT holds more.
    pow_bits:
        Identity proof of work required of every member (:mod:`protocols.pow`); records of ids
        without it are counted in ``rejected`` and never parsed.
    exclude:
        Peers for which it returns True are left out of the view (the node's banned peers).
    mode, codec:
        What this node runs (``gossip.mode``, ``gossip.codec``), advertised in its record; peers whose
        record names another mode are left out of the live view (they could not understand each other),
        counted in ``other_mode`` at each refresh.
    """

    def __init__(self, dht: hivemind.DHT, identity: Identity, *, swarm: str, heartbeat_s: float, ttl_s: float,
                 unreachable_s: float, dht_timeout: float, rng: random.Random, max_peers: int = 1024,
                 max_ttl_s: float = DEFAULT_MAX_TTL_S, mode: str = "gossip", codec: str = "dense",
                 pow_bits: int = 0, exclude: Callable[[str], bool] | None = None) -> None:
        if not 0 < heartbeat_s < ttl_s <= max_ttl_s:
            raise ValueError(f"need 0 < heartbeat_s ({heartbeat_s}) < ttl_s ({ttl_s}) <= {max_ttl_s}")
        self.dht, self.identity, self.swarm = dht, identity, swarm
        self.key = swarm_key(swarm)
        self.heartbeat_s, self.ttl_s, self.unreachable_s = heartbeat_s, ttl_s, unreachable_s
        self.dht_timeout, self.rng, self.max_peers, self.max_ttl_s = dht_timeout, rng, max_peers, max_ttl_s
        self.mode, self.codec = mode, codec
        self.pow_bits, self.exclude = pow_bits, exclude
        self.unread = 0  # records left unread at the last refresh (the DHT held more than max_peers)
        self.rejected = 0  # records that failed local verification, over this object's life
        self.other_mode = 0  # valid records of peers running another mode, at the last refresh
        self._live: list[MembershipRecord] = []
        self._unreachable: OrderedDict[str, float] = OrderedDict()  # peer id -> monotonic mark time
        self._answered: OrderedDict[str, None] = OrderedDict()  # peers that answered us, LRU
        self._maddrs: tuple[str, ...] | None = None
        self.rejoiner = Rejoiner(max_peers=max_peers, rng=random.Random(f"rejoin/{identity.peer_id}"))

    async def publish(self, *, round: int, model_fingerprint: bytes) -> None:
        """Store this node's signed record with expiration ``now + ttl_s``; MembershipError on failure."""
        if self._maddrs is None:
            self._maddrs = tuple(await _get_visible(self.dht, self.dht_timeout))[:16]
        now = get_dht_time()
        rec = MembershipRecord(peer_id=self.identity.peer_id, swarm=self.swarm, maddrs=self._maddrs,
                               round=round, mode=self.mode, codec=self.codec,
                               model_fingerprint=model_fingerprint, timestamp=now)
        future = self.dht.store(self.key, pack_record(rec, self.identity), expiration_time=now + self.ttl_s,
                                subkey=rec.peer_id, return_future=True)
        if not await _await_mp(future, self.dht_timeout, "store"):
            raise MembershipError("DHT store of the membership record was refused by every replica")

    async def refresh(self) -> list[MembershipRecord]:
        """Fetch the member table, verify a bounded part of it locally, replace the view, return :meth:`live`.

        At most ``max_peers`` records are parsed and verified, whatever the DHT holds, so a flood of
        records (valid ones from many fresh keys, or junk) costs a bounded time per refresh and leaves
        a view of at most ``max_peers``. When there are more, the records read are, first, those of
        peers that answered us lately (:meth:`mark_alive`; up to half the budget), then a uniformly
        random sample of the rest, drawn anew each refresh: a flooder dilutes the view in proportion
        to its records but cannot keep an honest peer out of it for long, and cannot displace peers
        that proved they answer. Records that fail verification (or lack the proof of work) are
        counted in ``rejected``; expired ones, our own and excluded peers' are skipped unparsed;
        peers marked unreachable are kept in the view but filtered out by :meth:`live`.
        """
        future = self.dht.get(self.key, latest=True, return_future=True)
        found = await _await_mp(future, self.dht_timeout, "get")
        entries = found.value if found is not None else {}
        if not isinstance(entries, dict):
            self.rejected += 1
            entries = {}
        self._expire_unreachable()
        valid, parsed, now = [], 0, get_dht_time()
        for owner in self._reading_order(entries):
            if parsed >= self.max_peers:
                break
            item = entries[owner]
            if not self._worth_parsing(owner, item, now):
                continue
            parsed += 1
            if (rec := self._accept(owner, item)) is not None:
                valid.append(rec)
            if parsed % 64 == 0:
                await asyncio.sleep(0)  # ~64 signature checks at a time: the loop keeps serving peers
        self.unread = max(0, len(entries) - parsed)
        live = [rec for rec in valid if rec.mode == self.mode]
        if len(live) < len(valid) and not self.other_mode:
            logger.warning("%d peers of swarm %s run another --mode than %s: left out of the view",
                           len(valid) - len(live), self.swarm, self.mode)
        self.other_mode = len(valid) - len(live)
        self._live = sorted(live, key=lambda rec: rec.peer_id)
        return self.live()

    def _reading_order(self, entries: dict[Any, Any]) -> list[Any]:
        """The subkeys to read, in order: all of them if they fit the budget; else see :meth:`refresh`.

        Costs O(len(entries)) to list the keys (hivemind already paid that to deliver them) plus
        O(max_peers) to choose; twice the budget is drawn at random so that skipped entries (expired,
        own, excluded) do not leave it unused.
        """
        if len(entries) <= self.max_peers:
            return list(entries)
        pinned = [peer for peer in reversed(self._answered) if peer in entries][: self.max_peers // 2]
        chosen = set(pinned)
        owners = list(entries)
        drawn = self.rng.sample(owners, min(len(owners), 2 * self.max_peers))
        return pinned + [owner for owner in drawn if owner not in chosen]

    def _worth_parsing(self, owner: object, item: Any, now: float) -> bool:
        """Cheap checks before any parsing: False for our own, expired or excluded records (not counted)
        and for ids without the proof of work or entries of the wrong shape (counted in ``rejected``)."""
        expiration = getattr(item, "expiration_time", None)
        if not isinstance(owner, str) or not isinstance(expiration, float | int):
            self.rejected += 1
            return False
        if expiration <= now or owner == self.identity.peer_id or self._excluded(owner):
            return False
        if not peer_id_has_pow(owner, self.pow_bits):
            self.rejected += 1
            logger.debug("dropped membership record of %s: no identity proof of work", owner)
            return False
        return True

    def _accept(self, owner: str, item: Any) -> MembershipRecord | None:
        try:
            value = item.value
            if not isinstance(value, bytes):
                raise ProtocolError("value of the wrong type")
            return check_record(unpack_record(value), owner, item.expiration_time, swarm=self.swarm,
                                max_ttl_s=self.max_ttl_s)
        except (ProtocolError, AttributeError) as exc:
            self.rejected += 1
            logger.debug("dropped membership record under %r: %s", owner, exc)
            return None

    def _excluded(self, peer_id: str) -> bool:
        return self.exclude is not None and self.exclude(peer_id)

    def _is_unreachable(self, peer_id: str) -> bool:
        marked = self._unreachable.get(peer_id)
        return marked is not None and time.monotonic() - marked < self.unreachable_s

    def _expire_unreachable(self) -> None:
        cutoff = time.monotonic() - self.unreachable_s
        while self._unreachable and next(iter(self._unreachable.values())) <= cutoff:
            self._unreachable.popitem(last=False)

    def live(self) -> list[MembershipRecord]:
        """The verified records of other peers from the last refresh, minus those marked unreachable
        and those ``exclude`` names."""
        return [rec for rec in self._live
                if not self._is_unreachable(rec.peer_id) and not self._excluded(rec.peer_id)]

    def sample(self, k: int) -> list[MembershipRecord]:
        """Up to ``k`` distinct live peers chosen uniformly at random.

        When the last refresh left records unread (the member table holds more than ``max_peers``,
        e.g. a flood of records from fresh keys), half the sample (rounded up) is drawn from the
        peers that answered us lately and the rest from the others: records of silent or dead
        identities can waste at most half of a round's exchanges.
        """
        live = self.live()
        k = min(max(k, 0), len(live))
        if not self.unread:
            return self.rng.sample(live, k)
        answered = [rec for rec in live if rec.peer_id in self._answered]
        others = [rec for rec in live if rec.peer_id not in self._answered]
        first = min(len(answered), max((k + 1) // 2, k - len(others)))
        return self.rng.sample(answered, first) + self.rng.sample(others, k - first)

    def mark_unreachable(self, peer_id: str) -> None:
        """Leave ``peer_id`` out of the live view for ``unreachable_s`` seconds."""
        self._answered.pop(peer_id, None)
        self._unreachable.pop(peer_id, None)
        self._unreachable[peer_id] = time.monotonic()
        while len(self._unreachable) > self.max_peers:
            self._unreachable.popitem(last=False)

    def mark_alive(self, peer_id: str) -> None:
        """Undo :meth:`mark_unreachable` (the peer answered after all); it keeps a place in the view
        when the DHT holds more records than ``max_peers`` (see :meth:`refresh`)."""
        self._unreachable.pop(peer_id, None)
        self._answered.pop(peer_id, None)
        self._answered[peer_id] = None
        while len(self._answered) > self.max_peers:
            self._answered.popitem(last=False)

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        """Heartbeat until cancelled: publish ``state()``, refresh, and :meth:`rejoin`, every ``heartbeat_s``.

        DHT failures are logged and retried on the next beat; ``ready`` is set after the first
        successful publish.
        """
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            round_, fingerprint = state()
            publish = self.publish(round=round_, model_fingerprint=fingerprint)
            published = await self._logged(publish, "publish")
            if published and ready is not None:
                ready.set()
            await self._logged(self.refresh(), "refresh")
            await self._logged(self.rejoin(), "rejoin")
            next_beat = max(next_beat + self.heartbeat_s, loop.time())
            await asyncio.sleep(next_beat - loop.time())

    async def rejoin(self) -> list[str]:
        """Ping, through the DHT, peers that left the view lately (see :mod:`p2pnode.rejoin`; banned ones
        excepted): after a healed partition this merges the sides' routing tables again. Returns the peers
        that answered."""
        peers = [p for p in self.rejoiner.due(rec.peer_id for rec in self._live) if not self._excluded(p)]
        if not peers:
            return []
        future = self.dht.run_coroutine(partial(ping_in_dht, peers=peers), return_future=True)
        # a ping across a live link takes milliseconds; never hold the next heartbeat past the record's ttl
        limit_s = min(self.dht_timeout, max(1.0, self.ttl_s - 2 * self.heartbeat_s))
        answered: list[str] = await _await_mp(future, limit_s, "ping")
        self.rejoiner.note_answered(answered, len(peers))
        return answered

    @staticmethod
    async def _logged(step: Awaitable[T], what: str) -> bool:
        try:
            await step
        except (MembershipError, ProtocolError) as exc:
            logger.warning("membership %s failed: %s", what, exc)
            return False
        return True
