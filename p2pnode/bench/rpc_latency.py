"""Small-RPC latency of a node that trains flat out: the ping part of ``p2pnode bench hotpaths``.

Two ``p2pnode run`` processes (a target and one peer, so the target also exchanges models every round)
train without pause. This process is a libp2p host of its own that sends the target a signed ``ping``
at a fixed rate over the node's own stream protocol and times each round trip to the signed ``pong``:
first while the target idles, waiting for its peer (the floor of transport and daemons), then while
both train. The target's event loop answers while its training thread runs, so the second figure adds
how long the loop waits for the interpreter (GIL), the CPU and the exchange work of the round.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pnode.bench.fuzz import NodeProcess, _ready_file, _training_with_peer, _wait, start_pair_node
from p2pnode.errors import MessageRejected, PeerUnreachable


def _start(name: str, out: Path, swarm: str, task: str, *, shard: int, initial_peer: str | None,
           worker_nice: int | None) -> NodeProcess:
    extra = [] if worker_nice is None else ["--worker-nice", str(worker_nice)]
    return start_pair_node(name, out, swarm, task, shard=shard, initial_peer=initial_peer, extra=extra)


async def ping_loop(peer_id: str, maddrs: list[str], *, swarm: str, seconds: float, rate: float,
                    key_dir: Path, timeout_s: float = 10.0) -> dict[str, Any]:
    """Ping ``peer_id`` every ``1 / rate`` s for ``seconds``; round-trip times of the answered pings."""
    from hivemind.p2p import P2P

    from p2pnode.identity import Identity, save_identity
    from p2pnode.node import KIND_PING, KIND_PONG
    from p2pnode.transport.p2p import P2PTransport
    from protocols.envelope import open_envelope, seal

    identity = Identity.generate()
    path = save_identity(identity, key_dir / "pinger.key", overwrite=True)
    p2p = await P2P.create(identity_path=str(path), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    transport = P2PTransport(p2p, max_message_bytes=1 << 16, connect_timeout=timeout_s)
    seq = itertools.count(time.time_ns() // 1000)
    times: list[float] = []
    failures: dict[str, int] = {}
    sent = 0
    loop = asyncio.get_running_loop()
    try:
        # one ping first so the connection is open before the timed ones (dialling is not the RPC)
        await transport.exchange(peer_id, seal(identity, kind=KIND_PING, swarm=swarm, round=0, seq=next(seq),
                                               payload=b""), timeout=timeout_s, maddrs=maddrs)
        start = loop.time()
        for i in itertools.count():
            due = start + i / rate
            if due > start + seconds:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            request = seal(identity, kind=KIND_PING, swarm=swarm, round=0, seq=next(seq), payload=b"")
            sent += 1
            t0 = time.perf_counter()
            try:
                reply = await transport.exchange(peer_id, request, timeout=timeout_s, maddrs=maddrs)
                open_envelope(reply, max_bytes=1 << 16, swarm=swarm, kinds=(KIND_PONG,))
            except (PeerUnreachable, MessageRejected, TimeoutError) as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                continue
            times.append(time.perf_counter() - t0)
    finally:
        await transport.close()
        await p2p.shutdown()
    return {"sent": sent, "answered": len(times), "failures": failures, "times_s": times}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_rpc_latency(*, seconds: float = 30.0, rate: float = 20.0, task: str = "fashion-mnist",
                    out_dir: Path = Path("runs/bench-hotpaths"), start_timeout_s: float = 180.0,
                    worker_nice: int | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Start the target and its peer, ping the target while both train, stop them; the latency figures."""
    out = out_dir / time.strftime("rpc-%Y%m%d-%H%M%S")
    swarm = f"rpc-{os.getpid()}-{time.time_ns() % 10**9}"
    nodes: list[NodeProcess] = []
    try:
        deadline = time.monotonic() + start_timeout_s
        nodes.append(_start("target", out, swarm, task, shard=0, initial_peer=None, worker_nice=worker_nice))
        info = _wait("ready", nodes[0], deadline, lambda: _ready_file(nodes[0]))
        # first the floor: the same pings while the target idles, waiting for its peer (--wait-peers 1)
        idle_s = min(10.0, seconds / 3)
        progress(f"pinging the idle target for {idle_s:g} s (the transport's own latency)")
        idle = asyncio.run(ping_loop(info["peer_id"], info["maddrs"], swarm=swarm, seconds=idle_s, rate=rate,
                                     key_dir=out))
        nodes.append(_start("peer", out, swarm, task, shard=1, initial_peer=info["maddrs"][0],
                            worker_nice=worker_nice))
        _wait("training with its peer", nodes[0], deadline, lambda: _training_with_peer(nodes[0]))
        progress(f"pinging {info['peer_id']} at {rate:g}/s for {seconds:g} s while it trains ({task})")
        before = len(nodes[0].rows())
        pings = asyncio.run(ping_loop(info["peer_id"], info["maddrs"], swarm=swarm, seconds=seconds,
                                      rate=rate, key_dir=out))
        rounds = [r for r in nodes[0].rows()[before:] if r.get("event") == "round"]
    finally:
        for node in nodes:
            node.stop()
    times = pings.pop("times_s")
    ms = [1e3 * t for t in times]
    idle_ms = [1e3 * t for t in idle.pop("times_s")]
    return {**pings, "idle": {**idle, **_stats(idle_ms)}, "task": task, "worker_nice": worker_nice,
            "seconds": seconds, "rate": rate, "out": str(out),
            "rounds_during": len(rounds),
            "round_s_median": statistics.median([b["t"] - a["t"] for a, b in zip(rounds, rounds[1:])])
            if len(rounds) > 2 else None,
            **_stats(ms)}


def _stats(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": statistics.median(ms), "p99_ms": _quantile(ms, 0.99), "max_ms": max(ms)}
