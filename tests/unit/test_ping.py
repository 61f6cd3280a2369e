"""The liveness ping of a gossip node: an empty signed request answered with a signed pong carrying the
node's round, no model; a replayed or non-empty ping is rejected and counted like any bad message. And
the node's worker threads run below the event loop's priority, so the loop answers first."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import sys
import threading

import pytest

from p2pnode.errors import MessageRejected
from p2pnode.identity import Identity
from p2pnode.node import KIND_PING, KIND_PONG
from p2pnode.runtime import lower_thread_priority
from p2pnode.transport import MemoryNetwork
from protocols.envelope import open_envelope, seal
from tests.unit.test_join import _node


def test_a_ping_is_answered_with_a_signed_pong_and_bad_pings_are_rejected() -> None:
    async def scenario() -> None:
        node = _node(MemoryNetwork(), 0)
        node.round = 7
        client, seq = Identity.generate(), itertools.count(1)

        def ping(payload: bytes = b"", number: int | None = None) -> bytes:
            return seal(client, kind=KIND_PING, swarm="t", round=0, seq=number or next(seq), payload=payload)

        reply = await node.serve(client.peer_id, ping())
        env = open_envelope(reply, max_bytes=1024, swarm="t", kinds=(KIND_PONG,))
        assert env.sender == node.identity.peer_id
        assert env.round == 7
        assert env.payload == b""
        assert len(reply) < 200  # small: no model in it
        assert node.messages_rejected == 0

        with pytest.raises(MessageRejected, match="not above"):
            await node.serve(client.peer_id, ping(number=1))  # replay of seq 1
        with pytest.raises(MessageRejected, match="payload"):
            await node.serve(client.peer_id, ping(b"x"))
        with pytest.raises(MessageRejected):
            await node.serve(Identity.generate().peer_id, ping())  # signed by someone else
        assert node.messages_rejected == 3
        await node.serve(client.peer_id, ping())  # still answering
        assert node.messages_rejected == 3

    asyncio.run(scenario())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is a Linux feature")
def test_worker_threads_run_at_a_lower_priority_than_the_event_loop() -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            initializer=lower_thread_priority, initargs=(5,)))
        return niceness(), await asyncio.to_thread(niceness)

    loop_nice, worker_nice = asyncio.run(scenario())
    assert worker_nice == min(19, loop_nice + 5)
