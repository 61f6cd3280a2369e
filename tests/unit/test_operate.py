"""Operations on an in-memory node: commands act (pause holds rounds, checkpoint + resume restores the
model and round), rejected ones are counted by reason, and the telemetry snapshot tracks the node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from p2pnode.checkpoint import CheckpointError, load_checkpoint
from p2pnode.control import sign_command
from p2pnode.identity import Identity
from p2pnode.operate import Operations
from p2pnode.outputs import MetricsWriter
from p2pnode.runtime import resume_from_checkpoint
from p2pnode.telemetry import TELEMETRY_KEYS
from p2pnode.transport import MemoryNetwork
from tests.unit.test_node import _node, _pair

OPERATOR = Identity.generate()


def _ops(node, tmp: Path, stops: list[int]) -> Operations:  # type: ignore[no-untyped-def]
    node.config.ops.operator_keys = [OPERATOR.peer_id]
    node.config.ops.checkpoint_dir = str(tmp / "ckpt")
    return Operations(node.config, node, request_stop=lambda: stops.append(1))


def test_pause_holds_rounds_until_resume_and_the_snapshot_says_so(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, b = await _pair()
        stops: list[int] = []
        ops = _ops(a, tmp_path, stops)
        a.config.gossip.rounds = 3
        metrics = MetricsWriter(None, listeners=[ops.on_row])
        ops.on_control(sign_command(OPERATOR, "pause", swarm="t"))
        snap = ops.snapshot()
        assert set(TELEMETRY_KEYS) <= set(snap)
        assert snap["paused"] is True
        run = asyncio.ensure_future(a.run_rounds(metrics))
        await asyncio.sleep(0.5)
        assert a.round == 0  # held before its first round
        ops.on_control(sign_command(OPERATOR, "resume", swarm="t"))
        final = await asyncio.wait_for(run, 60)
        assert a.round == 3
        assert final["event"] == "final"
        snap = ops.snapshot()
        assert snap["round"] == 3
        assert snap["paused"] is False
        assert snap["test_accuracy"] == final["test_accuracy"]
        assert snap["train_loss"] is not None  # kept from the last round row (a final row has none)
        assert ops.executed == {"pause": 1, "resume": 1}
        assert stops == []

    asyncio.run(scenario())


def test_rejected_commands_are_counted_by_reason_and_change_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, _ = await _pair()
        stops: list[int] = []
        ops = _ops(a, tmp_path, stops)
        shutdown = sign_command(OPERATOR, "shutdown", swarm="t")
        ops.on_control(sign_command(Identity.generate(), "shutdown", swarm="t"))
        ops.on_control(b'{"cmd": "shutdown"}')
        ops.on_control(sign_command(OPERATOR, "shutdown", swarm="other"))
        ops.on_control(sign_command(OPERATOR, "crash", swarm="t"))  # not in test mode
        assert stops == []
        ops.on_control(shutdown)
        ops.on_control(shutdown)  # replay
        assert stops == [1]
        assert ops.control_rejected == 5
        assert ops.rejected_by_reason == {"untrusted": 1, "unsigned": 1, "swarm": 1, "forbidden": 1,
                                          "replay": 1}
        assert ops.snapshot()["control_rejected"] == 5

    asyncio.run(scenario())


def test_checkpoint_command_then_a_restart_resumes_model_and_round(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, _ = await _pair()
        ops = _ops(a, tmp_path, [])
        a.config.gossip.rounds = 2
        await a.run_rounds(MetricsWriter(None))
        path = await ops.checkpoint()
        assert path is not None
        assert ops.checkpoints == 1
        saved = a.trainer.get_flat()
        state = load_checkpoint(tmp_path / "ckpt")
        assert state is not None
        assert state["round"] == 2

        stranger, _ = await _pair()  # another peer must not take over a's checkpoint (a shared directory)
        stranger.config.ops.checkpoint_dir = str(tmp_path / "ckpt")
        with pytest.raises(CheckpointError, match="belongs to peer"):
            resume_from_checkpoint(stranger.config, stranger)
        assert stranger.round == 0

        # a restarted a: same key, same task and seed, so it starts from the initial weights
        fresh = _node(MemoryNetwork(), 0, identity=a.identity)
        assert not torch.equal(fresh.trainer.get_flat(), saved)
        fresh.config.ops.checkpoint_dir = str(tmp_path / "ckpt")
        assert resume_from_checkpoint(fresh.config, fresh)
        assert fresh.round == 2
        assert torch.equal(fresh.trainer.get_flat(), saved)
        fresh.config.gossip.rounds = 3
        await fresh.transport.start(fresh.serve)
        await fresh.run_rounds(MetricsWriter(None))
        assert fresh.round == 3  # one more round, not three (alone: no peers to pull from)

        fresh.config.gossip.mode = "spsa"  # other modes keep more state: not resumed, and it says so
        assert not resume_from_checkpoint(fresh.config, fresh)

    asyncio.run(scenario())


def test_a_node_with_metrics_port_serves_its_round_to_prometheus(tmp_path: Path) -> None:
    import urllib.request

    from p2pnode.bench.mqtt import free_port

    async def scenario() -> None:
        a, _ = await _pair()
        ops = _ops(a, tmp_path, [])
        port = free_port()
        a.config.ops.metrics_port = port
        a.config.ops.telemetry_interval = 0.1
        a.config.gossip.rounds = 2
        task = asyncio.ensure_future(ops.run())
        await a.run_rounds(MetricsWriter(None, listeners=[ops.on_row]))
        await asyncio.sleep(0.3)  # one refresh of the scraped copy

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        text = await asyncio.to_thread(scrape)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ops.close()
        assert "p2pnode_round 2.0" in text
        assert f'peer_id="{a.identity.peer_id}"' in text

    asyncio.run(scenario())


def test_a_checkpoint_command_during_the_periodic_checkpoint_writes_both(tmp_path: Path) -> None:
    # the CI failure this guards: both writes used one temp file name, the first rename took it and the
    # second raised FileNotFoundError out of the round hook, which ended the node with exit code 1
    async def scenario() -> None:
        a, _ = await _pair()
        ops = _ops(a, tmp_path, [])
        paths = await asyncio.gather(*(ops.checkpoint() for _ in range(4)))
        assert all(p == tmp_path / "ckpt" / "checkpoint.pt" for p in paths)
        assert ops.checkpoints == 4
        assert ops.checkpoint_errors == 0
        assert list((tmp_path / "ckpt").iterdir()) == [tmp_path / "ckpt" / "checkpoint.pt"]  # no temp left
        assert load_checkpoint(tmp_path / "ckpt") is not None

    asyncio.run(scenario())


def test_concurrent_writers_to_one_directory_never_share_a_temp_file(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from p2pnode.checkpoint import save_checkpoint

    state = {"round": 1, "blob": torch.zeros(200_000)}
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: save_checkpoint(tmp_path, state), range(16)))
    assert set(paths) == {tmp_path / "checkpoint.pt"}
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert torch.equal(loaded["blob"], state["blob"])


def test_a_failed_checkpoint_write_is_logged_and_counted_and_the_node_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        a, _ = await _pair()
        ops = _ops(a, tmp_path, [])
        (tmp_path / "ckpt").write_text("a file where the directory should be")
        assert await ops.checkpoint() is None
        assert ops.checkpoint_errors == 1
        a.config.gossip.rounds = 1
        await a.run_rounds(MetricsWriter(None))
        assert a.round == 1

    asyncio.run(scenario())
