"""TrainerProcess: the LocalTrainer interface served by a child process (``--train-process``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from p2pnode.config import NodeConfig, OutputConfig, TaskConfig, config_from_dict
from p2pnode.errors import ConfigError, TaskError, TrainProcessError
from p2pnode.runtime import build_trainer
from p2pnode.tasks import make_task
from p2pnode.train_process import TrainerProcess, _config_layout, main

CFG = NodeConfig(device="cpu", threads=1, seed=3, task=TaskConfig(name="digits", shard=1, num_shards=4))


def _start(cfg: NodeConfig = CFG) -> TrainerProcess:
    return TrainerProcess(cfg, make_task(cfg.task.name, None).build_model(cfg.seed))


@pytest.fixture(scope="module")
def child() -> Iterator[TrainerProcess]:
    trainer = _start()
    trainer.wait_ready()
    yield trainer
    trainer.close()


def test_the_child_trains_exactly_as_the_in_thread_trainer_does(child: TrainerProcess) -> None:
    torch.set_num_threads(1)
    local = build_trainer(CFG)
    child.load_state_dict(local.state_dict())  # the module's child may have trained in another test
    assert child.num_params == local.num_params
    assert child.num_classes == local.num_classes == 10
    assert torch.equal(child.class_counts, local.class_counts)
    assert torch.equal(child.get_flat(), local.get_flat())

    assert child.train_steps(15) == local.train_steps(15)
    delta = torch.randn(local.num_params, generator=torch.Generator().manual_seed(1)) * 0.01
    child.add_flat_(delta)
    local.add_flat_(delta)
    assert torch.equal(child.get_flat(), local.get_flat())
    assert child.evaluate(300) == local.evaluate(300)
    assert child.steps_done == local.steps_done == 15

    snapshot = child.state_dict()
    child.train_steps(7)  # moves the model, the momentum, the sampler
    child.load_state_dict(snapshot)
    assert child.train_steps(5) == local.train_steps(5)
    assert torch.equal(child.get_flat(), local.get_flat())

    child.reset_momentum()
    local.reset_momentum()
    flat = local.get_flat() * 0.5
    child.set_flat_(flat)
    local.set_flat_(flat)
    assert child.train_steps(3) == local.train_steps(3)
    assert torch.equal(child.get_flat(), local.get_flat())


def test_a_failed_request_raises_its_error_here_and_the_child_keeps_serving(child: TrainerProcess) -> None:
    with pytest.raises(ValueError, match="model needs"):
        child.set_flat_(torch.zeros(3))
    with pytest.raises(ValueError, match="n must be >= 1"):
        child.train_steps(0)
    with pytest.raises(ValueError, match="between-steps"):
        child.train_steps(1, between=lambda: None)
    with pytest.raises(ValueError, match="validation split"):
        child.class_f1(child.get_flat())  # built without val_fraction: Bristle is not configured
    for op in ("train_steps", "__init__", "bogus"):  # training has its own pipe; nothing else is served
        with pytest.raises(ValueError, match="unknown request"):
            child._call(op, 1)
    assert child.get_flat().shape == (child.num_params,)


def test_requests_are_answered_between_training_steps() -> None:
    trainer = _start()
    trainer.wait_ready()
    try:
        before = trainer.get_flat()
        done = threading.Event()
        raised: list[BaseException] = []

        def train() -> None:
            try:
                trainer.train_steps(200_000)
                done.set()
            except TrainProcessError as exc:
                raised.append(exc)

        worker = threading.Thread(target=train, daemon=True)
        worker.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        during = trainer.get_flat()
        trainer.add_flat_(torch.zeros(trainer.num_params))
        accuracy, loss = trainer.evaluate(None)  # in a thread of the child, beside the training
        assert 0.0 <= accuracy <= 1.0
        assert loss > 0
        answered_s = time.monotonic() - t0
        assert not done.is_set(), "200,000 steps cannot be over yet"
        assert answered_s < 5.0, f"requests waited {answered_s:.1f} s for a training call to end"
        assert not torch.equal(before, during), "the model read mid-call shows the steps done so far"
    finally:
        trainer.close()  # mid-call: the child stops between two steps and exits
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert not done.is_set(), "the interrupted call raises instead of returning a loss"
    assert len(raised) == 1
    assert trainer._process.returncode == 0


def test_closing_ends_the_child() -> None:
    trainer = _start()
    trainer.wait_ready()
    pid = trainer.pid
    assert pid is not None
    assert os.path.exists(f"/proc/{pid}")
    trainer.close()
    assert trainer._process.returncode == 0
    assert not os.path.exists(f"/proc/{pid}")


def test_a_dead_child_is_an_error_not_a_hang() -> None:
    trainer = _start()
    trainer.wait_ready()
    assert trainer.pid is not None
    os.kill(trainer.pid, signal.SIGKILL)  # the child this test started, by its pid
    trainer._process.wait(timeout=10)
    try:
        with pytest.raises(TrainProcessError, match="died|closed its pipe"):
            trainer.get_flat()
        with pytest.raises(TrainProcessError, match="died|closed its pipe"):
            trainer.train_steps(1)
    finally:
        trainer.close()


def test_a_trainer_that_cannot_be_built_raises_its_error_at_wait_ready() -> None:
    # 2,000 shards of digits' 1,437 training images: shard 1,999 is empty
    cfg = NodeConfig(device="cpu", threads=1, task=TaskConfig(name="digits", shard=1999, num_shards=2000))
    with pytest.raises(TaskError, match="empty"):
        build_trainer(cfg)
    trainer = _start(cfg)
    try:
        with pytest.raises(TaskError, match="empty"):
            trainer.wait_ready()
    finally:
        trainer.close()
    assert trainer._process.returncode == 0


def test_the_config_reaches_the_child_unchanged() -> None:
    cfg = NodeConfig(device="cpu", seed=7, threads=2, train_process=True,
                     task=TaskConfig(name="digits", partition="dirichlet:0.5", shard=2, num_shards=5,
                                     lr=0.01),
                     output=OutputConfig(metrics_file="/tmp/m.jsonl"))
    assert config_from_dict(_config_layout(cfg)) == cfg


def test_train_process_is_refused_where_the_node_reaches_into_the_trainer() -> None:
    from p2pnode.config import AttackConfig, GossipConfig

    for kwargs in ({"gossip": GossipConfig(mode="spsa")}, {"gossip": GossipConfig(mode="increments")},
                   {"attack": AttackConfig(name="sign-flip")}):
        with pytest.raises(ConfigError, match="train_process"):
            NodeConfig(train_process=True, **kwargs)  # type: ignore[arg-type]
    assert NodeConfig(train_process=True).train_process


def test_the_child_entry_point_refuses_to_be_run_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["x", "y"]) == 2
    assert "started by the node" in capsys.readouterr().err


def test_a_node_trains_merges_checkpoints_and_resumes_through_a_training_process(tmp_path: Path) -> None:
    """The gossip Node's own round logic with a TrainerProcess: exchange, merge, checkpoint, resume."""
    import asyncio

    from defenses import make_aggregator
    from p2pnode.checkpoint import load_checkpoint
    from p2pnode.identity import Identity
    from p2pnode.node import Node
    from p2pnode.operate import Operations
    from p2pnode.outputs import MetricsWriter
    from p2pnode.runtime import resume_from_checkpoint
    from p2pnode.transport import MemoryNetwork, MemoryTransport
    from tests.unit.test_node import StaticView, _node, _record

    cfg = NodeConfig(device="cpu", threads=1, train_process=True,
                     task=TaskConfig(name="digits", shard=0, num_shards=2, local_steps=5))
    cfg.network.swarm = "t"
    cfg.gossip.fanout, cfg.gossip.overlap, cfg.gossip.rounds = 1, True, 4
    cfg.ops.checkpoint_dir = str(tmp_path / "ckpt")
    identity = Identity.generate()

    def build(network: MemoryNetwork) -> tuple[Node, TrainerProcess]:
        trainer = _start(cfg)
        trainer.wait_ready()
        node = Node(cfg, identity, trainer, MemoryTransport(network, identity.peer_id), StaticView([]),
                    make_aggregator("mean"))
        return node, trainer

    async def scenario() -> None:
        network = MemoryNetwork()
        a, trainer = build(network)
        b = _node(network, 1)
        a.membership.peers.append(_record(b.identity.peer_id))  # type: ignore[attr-defined]
        b.membership.peers.append(_record(a.identity.peer_id))  # type: ignore[attr-defined]
        try:
            for n in (a, b):
                await n.transport.start(n.serve)
            initial = trainer.get_flat()
            rows: list[dict] = []  # type: ignore[type-arg]
            await a.run_rounds(MetricsWriter(None, listeners=[rows.append]))
            rounds = [r for r in rows if r["event"] == "round"]
            assert [r["round"] for r in rounds] == [1, 2, 3, 4]
            assert sum(r["pulled"] for r in rounds) == 4, "one pull from b every round"
            assert a.messages_rejected == 0
            assert trainer.steps_done == 4 * 5
            assert rows[-1]["test_accuracy"] > 0.3, "4 x 5 steps and 4 merges: above chance (0.1)"
            assert not torch.equal(trainer.get_flat(), initial)
            assert await Operations(cfg, a, request_stop=lambda: None).checkpoint() is not None
            saved = trainer.get_flat()
        finally:
            trainer.close()
        state = load_checkpoint(tmp_path / "ckpt")
        assert state is not None
        assert state["round"] == 4

        fresh, again = build(MemoryNetwork())  # a restart: same key, a new training process
        try:
            assert not torch.equal(again.get_flat(), saved)
            assert resume_from_checkpoint(cfg, fresh)
            assert fresh.round == 4
            assert torch.equal(again.get_flat(), saved)
            assert again.steps_done == 4 * 5
        finally:
            again.close()

    asyncio.run(scenario())
