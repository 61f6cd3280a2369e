"""The hivemind baseline node of ``p2pnode bench e2e``: local SGD + hivemind's DecentralizedAverager.

Run as ``python -m p2pnode.bench.e2e_hivemind`` by :class:`p2pnode.swarm.Swarm` in place of
``p2pnode run``: it accepts the same node flags (those it does not use are ignored) and writes the
same ready, metrics and result files, so the supervisor, the progress tracking and the summary are
those of a p2pnode swarm. What it trains is p2pnode's own: the task's model from the swarm seed, the
node's :class:`~p2pnode.tasks.ShardSpec` shard, :class:`~p2pnode.trainer.LocalTrainer` with the
node defaults (lr, momentum, batch size) and the trainer seed a p2pnode node uses. Each round: H local
SGD steps, then one ``averager.step()`` (all-reduce of the flat model vector, the same vector p2pnode
gossips) in a group of ``--group-size`` peers (default: ``--wait-peers`` + 1, i.e. all nodes), then
the evaluation on the first ``--eval-samples`` test samples.

Bytes are counted where the averager hands them to its libp2p streams: every protobuf message
written by ``P2P.send_protobuf`` in the averager's process (matchmaking, all-reduce parts, both as
caller and as handler), with its 1-byte marker and 8-byte length prefix. That is the same layer at
which p2pnode counts (frames written to its libp2p streams, headers included); the DHT (its own
process, unary RPCs) is left out on both sides, and so is libp2p's own framing and encryption.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from p2pnode.proc import die_with_parent

logger = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The node flags this worker reads; any other ``p2pnode run`` flag is accepted and ignored."""
    from p2pnode.config import TaskConfig

    d = TaskConfig()
    p = argparse.ArgumentParser(prog="python -m p2pnode.bench.e2e_hivemind", allow_abbrev=False)
    p.add_argument("--task", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--shard", required=True, help="INDEX/COUNT")
    p.add_argument("--partition", default=d.partition)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--identity", type=Path, required=True)
    p.add_argument("--swarm", required=True)
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"])
    p.add_argument("--initial-peers", nargs="+", default=[])
    p.add_argument("--metrics-file", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--result-file", type=Path, required=True)
    p.add_argument("--local-steps", type=int, default=d.local_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wait-peers", type=int, default=0)
    p.add_argument("--group-size", type=int, default=0, help="all-reduce group size (0: --wait-peers + 1)")
    p.add_argument("--compression", choices=("none", "fp16"), default="none")
    p.add_argument("--matchmaking-s", type=float, default=2.0,
                   help="averager min_matchmaking_time (a full group starts at once)")
    p.add_argument("--step-timeout-s", type=float, default=60.0,
                   help="give up looking for a group after this long, and the whole averaging step after "
                        "twice this long (the round then keeps its own model)")
    p.add_argument("--log-level", default="warning")
    ns, _unused = p.parse_known_args(argv)
    return ns


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def install_byte_counters() -> tuple[Any, Any]:
    """Count the bytes hivemind's P2P writes to and reads from its streams, in shared counters.

    Patched on the ``P2P`` class before the averager process is forked, so the averager's streams are
    counted and the DHT (forked earlier, unary RPCs) is not. Returns ``(sent, received)``
    ``multiprocessing.Value`` counters.
    """
    from hivemind.p2p import P2P

    sent = mp.Value("Q", 0, lock=True)
    received = mp.Value("Q", 0, lock=True)
    original_send, original_receive = P2P.send_protobuf, P2P.receive_raw_data
    overhead = len(P2P.MESSAGE_MARKER) + P2P.HEADER_LEN

    async def send_protobuf(protobuf: Any, writer: Any) -> None:
        size = overhead + protobuf.ByteSize()
        await original_send(protobuf, writer)
        with sent.get_lock():
            sent.value += size

    async def receive_raw_data(reader: Any) -> bytes:
        data: bytes = await original_receive(reader)
        with received.get_lock():
            received.value += overhead + len(data)
        return data

    P2P.send_protobuf = staticmethod(send_protobuf)  # type: ignore[method-assign,assignment]
    P2P.receive_raw_data = staticmethod(receive_raw_data)  # type: ignore[method-assign,assignment]
    return sent, received


def _wait_until_still(counter: Any, *, quiet_s: float, limit_s: float) -> None:
    """Wait until ``counter.value`` has not changed for ``quiet_s`` seconds, at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    last, since = counter.value, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        if counter.value != last:
            last, since = counter.value, time.monotonic()


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    die_with_parent()  # no orphans after a killed supervisor
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the finally below shuts the averager and DHT down
    import hivemind
    import torch
    from hivemind.compression import Float16Compression, NoCompression

    from p2pnode.identity import load_or_create_identity
    from p2pnode.outputs import MetricsWriter, write_json_atomic
    from p2pnode.tasks import ShardSpec, make_task
    from p2pnode.trainer import LocalTrainer, limit_threads

    limit_threads(ns.threads)
    index, _, count = ns.shard.partition("/")
    shard, shards = int(index), int(count or 1)
    group = ns.group_size or ns.wait_peers + 1
    task = make_task(ns.task, ns.data_dir)
    data = task.load(ShardSpec(index=shard, count=shards, partition=ns.partition, seed=ns.seed))
    # the same model, data and sampler seed as a p2pnode node (p2pnode.runtime.build_trainer)
    trainer = LocalTrainer(task.build_model(ns.seed), data, lr=ns.lr, momentum=ns.momentum,
                           batch_size=ns.batch_size, device=torch.device("cpu"),
                           seed=ns.seed * 100_003 + shard)
    identity = load_or_create_identity(ns.identity)
    dht = hivemind.DHT(initial_peers=list(ns.initial_peers) or None, host_maddrs=list(ns.host_maddrs),
                       identity_path=str(ns.identity), check_if_identity_free=False, start=True)
    sent, received = install_byte_counters()
    averager = hivemind.averaging.DecentralizedAverager(
        [torch.zeros(trainer.num_params)], dht, start=True, prefix=f"{ns.swarm}-averager",
        target_group_size=group, min_group_size=group, min_matchmaking_time=ns.matchmaking_s,
        request_timeout=min(1.0, ns.matchmaking_s / 2),
        compression=Float16Compression() if ns.compression == "fp16" else NoCompression(),
        allow_state_sharing=False)
    metrics = MetricsWriter(str(ns.metrics_file))
    write_json_atomic(ns.ready_file, {"peer_id": identity.peer_id,
                                      "maddrs": [str(m) for m in dht.get_visible_maddrs()]})
    try:
        for rnd in range(1, ns.rounds + 1):
            loss = trainer.train_steps(ns.local_steps)
            with averager.get_tensors() as tensors:
                tensors[0].copy_(trainer.get_flat())
            began = time.monotonic()
            # hivemind's timeout bounds only the search for a group, not the all-reduce after it: once
            # (1 run in 10) seven nodes never returned from step(). Wait on the future with a hard bound.
            control = averager.step(timeout=ns.step_timeout_s, wait=False)
            try:
                gathered = control.result(timeout=2 * ns.step_timeout_s)
            except Exception as exc:  # noqa: BLE001 - a failed all-reduce: this round keeps its own model
                logger.warning("round %d: averaging failed: %r", rnd, exc)
                with contextlib.suppress(Exception):
                    control.cancel()
                gathered = None
            waited = time.monotonic() - began
            if gathered:
                with averager.get_tensors() as tensors:
                    trainer.set_flat_(tensors[0].clone())
            acc = test_loss = None
            if rnd % ns.eval_every == 0:
                acc, test_loss = trainer.evaluate(ns.eval_samples)
            metrics.write("round", peer_id=identity.peer_id, role="honest", round=rnd, train_loss=loss,
                          test_accuracy=acc, test_loss=test_loss, bytes_sent=int(sent.value),
                          bytes_received=int(received.value), peers_in_view=len(gathered or {}) - 1,
                          group_size=len(gathered or {}), exchange_s=round(waited, 4))
        acc, test_loss = trainer.evaluate(None)
        # step() returns once this node holds the average; its last parts to the peers may still be in
        # flight in the averager process (counted when written). Measured: a 2-node run's final row once
        # missed a node's whole last round (39,004 B instead of ~58,200 B).
        _wait_until_still(sent, quiet_s=0.5, limit_s=10.0)
        final = metrics.write("final", peer_id=identity.peer_id, role="honest", rounds=ns.rounds,
                              round=ns.rounds, test_accuracy=acc, test_loss=test_loss,
                              bytes_sent=int(sent.value), bytes_received=int(received.value))
        write_json_atomic(ns.result_file, final)
    finally:
        metrics.close()
        with contextlib.suppress(Exception):
            averager.shutdown()
        with contextlib.suppress(Exception):
            dht.shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover - run by the swarm supervisor
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
