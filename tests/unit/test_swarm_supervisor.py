"""The swarm supervisor, driven against a fake node script that follows the node process contract."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from p2pnode.errors import ConfigError
from p2pnode.swarm import Swarm, SwarmOptions, SwarmStartError, run_swarm, swarm_name_for

FAKE_NODE = textwrap.dedent('''
    """Fake `p2pnode run`: the contract's flags and files, no learning. Behaviour via --fake-* flags."""
    import argparse, json, os, signal, sys, time

    ap = argparse.ArgumentParser()
    for flag in ("--task", "--partition", "--swarm", "--host-maddrs", "--initial-peers", "--device",
                 "--log-level", "--identity", "--metrics-file", "--ready-file", "--result-file", "--shard"):
        ap.add_argument(flag)
    for flag in ("--rounds", "--seed", "--fanout", "--local-steps", "--threads"):
        ap.add_argument(flag, type=int)
    ap.add_argument("--linger-s", type=float)
    ap.add_argument("--fake-sleep", type=float, default=0.02)      # seconds per round
    ap.add_argument("--fake-fail-node", type=int, default=-1)      # this node exits 1 ...
    ap.add_argument("--fake-fail-round", type=int, default=3)      # ... after this round
    ap.add_argument("--fake-byzantine", type=int, default=-1)      # this node reports role byzantine
    ap.add_argument("--fake-not-ready", type=int, default=-1)      # this node never writes its ready file
    ap.add_argument("--fake-crash-start", type=int, default=-1)    # this node exits 2 before ready
    ap.add_argument("--fake-ignore-term", action="store_true")     # ignore SIGTERM
    args, _unknown = ap.parse_known_args()
    i, n = (int(x) for x in args.shard.split("/"))
    if args.fake_ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    if (i == 0) != (args.initial_peers is None):
        print("bootstrap must have no --initial-peers, the others must", file=sys.stderr)
        sys.exit(3)
    if i == args.fake_crash_start:
        print("boom: cannot load task", file=sys.stderr)
        sys.exit(2)
    fd = os.open(args.identity, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)

    def write_atomic(path, obj):
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f)
        os.replace(path + ".tmp", path)

    peer = f"FakePeer{i}"
    role = "byzantine" if i == args.fake_byzantine else "honest"
    if i != args.fake_not_ready:
        maddr = f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{peer}"
        write_atomic(args.ready_file, {"peer_id": peer, "maddrs": [maddr], "pid": os.getpid()})
    else:
        time.sleep(60)
    acc = lambda r: 0.1 if role == "byzantine" else round(0.5 + 0.01 * r + 0.02 * i, 6)
    sent = 0
    with open(args.metrics_file, "a") as m:
        for r in range(1, args.rounds + 1):
            time.sleep(args.fake_sleep)
            sent += 1000
            ev = {"event": "round", "t": time.time(), "peer_id": peer, "role": role, "round": r,
                  "train_loss": 1.0 / r, "test_accuracy": acc(r) if r % 2 == 0 else None,
                  "test_loss": 1.0 / r if r % 2 == 0 else None, "peers_in_view": n - 1, "exchanged": 1,
                  "bytes_sent": sent, "bytes_received": 2 * sent, "messages_rejected": 0,
                  "round_time_s": 0.01}
            m.write(json.dumps(ev) + "\\n")
            m.flush()
            if i == args.fake_fail_node and r == args.fake_fail_round:
                m.write('{"event": "round", "t": 1.0, "pee')  # killed mid-write
                m.flush()
                sys.exit(1)
        final = {"event": "final", "t": time.time(), "peer_id": peer, "role": role, "rounds": args.rounds,
                 "test_accuracy": acc(args.rounds), "test_loss": 0.25, "bytes_sent": sent,
                 "bytes_received": 2 * sent, "messages_rejected": 7 if role == "byzantine" else 0}
        m.write(json.dumps(final) + "\\n")
    write_atomic(args.result_file, final)
    deadline = time.time() + args.linger_s
    while time.time() < deadline:
        time.sleep(0.02)
''')

NODE_KEYS = {"node": int, "peer_id": str, "role": str, "rounds": int, "test_accuracy": float,
             "test_loss": float, "bytes_sent": int, "bytes_received": int, "messages_rejected": int,
             "finished": bool}


@pytest.fixture
def fake_node(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_node.py"
    script.write_text(FAKE_NODE)
    return [sys.executable, str(script)]


def _opts(tmp_path: Path, **kw: object) -> SwarmOptions:
    base: dict[str, object] = {"nodes": 3, "rounds": 4, "out": tmp_path / "out", "start_timeout_s": 15.0,
                               "round_timeout_s": 15.0, "linger_s": 0.5}
    base.update(kw)
    return SwarmOptions(**base)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_options_defaults_and_validation(tmp_path: Path) -> None:
    opts = SwarmOptions(out=tmp_path / "a")
    assert (opts.nodes, opts.rounds, opts.task, opts.device) == (4, 20, "fashion-mnist", "cpu")
    assert opts.round_timeout_s == 60 + 20 * 30
    assert opts.swarm == swarm_name_for(tmp_path / "a") != SwarmOptions(out=tmp_path / "b").swarm
    assert str(SwarmOptions().out).startswith(os.path.join("runs", "swarm-"))
    json.dumps(opts.to_json())
    for bad in ({"nodes": 0}, {"rounds": 0}, {"partition": "dirichlet:0"}, {"device": "tpu"},
                {"swarm": "has space"}, {"log_level": "loud"}, {"start_timeout_s": 0}, {"fanout": -1}):
        with pytest.raises(ConfigError) as err:
            SwarmOptions(out=tmp_path, **bad)  # type: ignore[arg-type]
        assert err.value.field == f"swarm.{next(iter(bad))}"


@pytest.mark.timeout(60)
def test_summary_contract_and_accuracy_stats(tmp_path: Path, fake_node: list[str]) -> None:
    opts = _opts(tmp_path, extra_args=["--fake-byzantine", "2"])
    with Swarm(opts, node_command=fake_node) as swarm:
        swarm.start()
        assert all(swarm.node_paths(i).ready.exists() for i in range(3))
        assert swarm.wait_finished(timeout=15)
        summary = swarm.summarize()
    assert set(summary) >= {"config", "wall_time_s", "nodes", "honest_accuracy_mean", "honest_accuracy_min"}
    assert summary == json.loads((opts.out / "summary.json").read_text())
    assert summary["config"]["nodes"] == 3
    assert summary["config"]["swarm"] == opts.swarm
    assert isinstance(summary["wall_time_s"], float)
    assert summary["wall_time_s"] > 0
    assert len(summary["nodes"]) == 3
    for i, node in enumerate(summary["nodes"]):
        for key, typ in NODE_KEYS.items():
            assert isinstance(node[key], typ), (key, node)
        assert "exit_code" in node
        assert node["node"] == i
        assert node["finished"]
        assert node["peer_id"] == f"FakePeer{i}"
        assert node["rounds"] == 4
    assert [n["role"] for n in summary["nodes"]] == ["honest", "honest", "byzantine"]
    assert summary["nodes"][2]["messages_rejected"] == 7
    honest = [0.54, 0.56]  # 0.5 + 0.01 * rounds + 0.02 * i
    assert summary["honest_accuracy_min"] == pytest.approx(min(honest))
    assert summary["honest_accuracy_mean"] == pytest.approx(sum(honest) / 2)
    rows = [json.loads(line) for line in (opts.out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (4 + 1)
    assert {r["node"] for r in rows} == {0, 1, 2}
    assert (opts.out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (opts.out / "keys" / "node-0.key").stat().st_mode & 0o777 == 0o600
    assert (opts.out / "logs" / "node-1.log").exists()


@pytest.mark.timeout(60)
def test_node_exiting_mid_run_is_a_failure_counted_in_min(tmp_path: Path, fake_node: list[str]) -> None:
    opts = _opts(tmp_path, rounds=6, extra_args=["--fake-fail-node", "1", "--fake-fail-round", "3"])
    with Swarm(opts, node_command=fake_node) as swarm:
        swarm.start()
        assert not swarm.wait_finished(timeout=15)
        summary = swarm.summarize()
    dead = summary["nodes"][1]
    assert dead["finished"] is False
    assert dead["exit_code"] == 1
    assert dead["rounds"] == 3
    assert dead["test_accuracy"] == pytest.approx(0.5 + 0.02 + 0.02)
    assert dead["bytes_sent"] == 3000
    assert dead["peer_id"] == "FakePeer1"
    assert summary["honest_accuracy_min"] == pytest.approx(0.54)
    assert summary["honest_accuracy_mean"] == pytest.approx((0.56 + 0.54 + 0.60) / 3)
    assert summary["all_finished"] is False
    metrics = (opts.out / "metrics.jsonl").read_text().splitlines()
    assert sum(1 for line in metrics if json.loads(line)["node"] == 1) == 3  # truncated line skipped


@pytest.mark.timeout(60)
def test_sigkill_of_one_node_does_not_hang(tmp_path: Path, fake_node: list[str]) -> None:
    opts = _opts(tmp_path, rounds=40, extra_args=["--fake-sleep", "0.05"])
    with Swarm(opts, node_command=fake_node) as swarm:
        swarm.start()
        deadline = time.monotonic() + 10
        while swarm.poll_progress()[1].round < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(swarm.processes[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert not swarm.wait_finished(timeout=20)
        assert time.monotonic() - t0 < 10
        progress = swarm.poll_progress()
        assert progress[1].failed
        assert progress[1].exit_code == -signal.SIGKILL
        assert progress[0].finished
        assert progress[2].finished
        summary = swarm.summarize()
    assert summary["nodes"][1]["finished"] is False
    assert summary["honest_accuracy_min"] == summary["nodes"][1]["test_accuracy"]


@pytest.mark.timeout(60)
def test_stop_leaves_no_child_alive(tmp_path: Path, fake_node: list[str]) -> None:
    opts = _opts(tmp_path, linger_s=60.0)
    swarm = Swarm(opts, node_command=fake_node)
    try:
        swarm.start()
        assert swarm.wait_finished(timeout=15)
        pids = [p.pid for p in swarm.processes]
        assert all(p.poll() is None for p in swarm.processes)  # still lingering
    finally:
        swarm.stop()
    assert all(p.returncode is not None for p in swarm.processes)
    assert all(_gone(pid) for pid in pids)
    swarm.stop()  # idempotent


@pytest.mark.timeout(60)
def test_stop_escalates_to_sigkill(tmp_path: Path, fake_node: list[str]) -> None:
    opts = _opts(tmp_path, nodes=2, linger_s=60.0, extra_args=["--fake-ignore-term"])
    swarm = Swarm(opts, node_command=fake_node)
    try:
        swarm.start()
        t0 = time.monotonic()
    finally:
        swarm.stop(grace_s=0.5)
    assert time.monotonic() - t0 < 5
    assert [p.returncode for p in swarm.processes] == [-signal.SIGKILL] * 2


@pytest.mark.timeout(60)
def test_start_fails_fast_with_log_tail(tmp_path: Path, fake_node: list[str]) -> None:
    swarm = Swarm(_opts(tmp_path, extra_args=["--fake-crash-start", "1"]), node_command=fake_node)
    with pytest.raises(SwarmStartError, match="node 1 exited with code 2") as err:
        swarm.start()
    assert "boom: cannot load task" in str(err.value)
    assert all(p.returncode is not None for p in swarm.processes)


@pytest.mark.timeout(60)
def test_start_times_out(tmp_path: Path, fake_node: list[str]) -> None:
    swarm = Swarm(_opts(tmp_path, start_timeout_s=1.0, extra_args=["--fake-not-ready", "0"]),
                  node_command=fake_node)
    with pytest.raises(SwarmStartError, match="node 0 not ready"):
        swarm.start()
    assert len(swarm.processes) == 1
    assert swarm.processes[0].returncode is not None


@pytest.mark.timeout(60)
def test_run_swarm_end_to_end(tmp_path: Path, fake_node: list[str]) -> None:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=False)
    summary = run_swarm(_opts(tmp_path, nodes=2), console=console, live=True, node_command=fake_node)
    assert summary["all_finished"]
    assert all(n["exit_code"] is not None for n in summary["nodes"])
    assert not math.isnan(summary["honest_accuracy_mean"])
    text = buf.getvalue()
    assert "honest accuracy" in text
    assert "node 1" in text
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_run_swarm_stops_all_nodes(tmp_path: Path, fake_node: list[str], sig: int) -> None:
    import subprocess

    out = tmp_path / "out"
    # the default SIGINT handler, whatever the driver inherits: an inherited SIG_IGN (possible for a
    # suite started as a background job) would turn this test into a 20 s hang. (The SIGINT case timed
    # out twice in a fresh-clone run started with `nohup … &`; whether that was the cause is not proven.)
    driver = textwrap.dedent(f"""
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from pathlib import Path
        from rich.console import Console
        from p2pnode.swarm import SwarmOptions, run_swarm
        opts = SwarmOptions(nodes=3, rounds=10_000, out=Path({str(out)!r}), linger_s=60.0,
                            extra_args=["--fake-sleep", "0.05"])
        try:
            run_swarm(opts, console=Console(stderr=True), live=False, node_command={fake_node!r})
        except KeyboardInterrupt:
            raise SystemExit(130)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, env=env)
    try:
        ready = [out / "nodes" / f"node-{i}.ready.json" for i in range(3)]
        deadline = time.monotonic() + 20
        while not all(p.exists() for p in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [json.loads(p.read_text())["pid"] for p in ready]
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert all(_gone(pid) for pid in pids)
    assert json.loads((out / "summary.json").read_text())["all_finished"] is False


def test_sybil_identities_share_the_attackers_shard_and_run_the_attack(tmp_path: Path) -> None:
    opts = SwarmOptions(nodes=5, rounds=1, task="digits", out=tmp_path, attack="sybil", sybils=2)
    swarm = Swarm(opts)
    swarm._bootstrap_maddr = "/ip4/127.0.0.1/tcp/1/p2p/x"

    commands = [swarm._command(i) for i in range(5)]

    shards = [cmd[cmd.index("--shard") + 1] for cmd in commands]
    assert shards == ["0/4", "1/4", "2/4", "3/4", "3/4"]
    assert ["--attack" in cmd for cmd in commands] == [False, False, False, True, True]
    assert opts.byzantine == 2


def test_sybils_without_the_sybil_attack_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="swarm.sybils"):
        SwarmOptions(nodes=5, rounds=1, out=tmp_path, attack="sign-flip", sybils=2)
