"""The command line: flags map onto the config tree, errors are one line, init/keygen/peer-id, swarm."""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pnode import cli
from p2pnode.config import NodeConfig, load_config
from p2pnode.errors import TaskError
from p2pnode.identity import load_identity
from p2pnode.swarm import Swarm, SwarmOptions, SwarmStartError

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWSsfMzkoBXsEbidvkvPk4U7tkabYWmPjsF1Wm67DP9HqW"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if h.get_name() == "p2pnode-cli"]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> list[NodeConfig]:
    """Stand in for ``p2pnode.runtime`` (imported lazily by ``run``); records the configs it is given."""
    seen: list[NodeConfig] = []
    module = types.ModuleType("p2pnode.runtime")

    def run_node(config: NodeConfig) -> int:
        seen.append(config)
        return 0

    module.run_node = run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "p2pnode.runtime", module)
    return seen


def run_config(argv: list[str], fake_node: list[NodeConfig]) -> NodeConfig:
    assert cli.main(["run", *argv]) == 0
    return fake_node[-1]


def get(config: NodeConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# -- run: flags -> config ---------------------------------------------------------------------------
def test_every_config_field_has_exactly_one_flag() -> None:
    # Prepare
    parser: Any = cli.build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    dests = [a.dest for a in run_parser._actions]
    # Execute
    paths = [f.path for f in cli.node_fields()]
    # Assert
    assert sorted(paths) == sorted(d for d in dests if d not in ("help", "config"))
    assert "gossip.fanout" in paths
    assert "timeouts.connect" in paths


@pytest.mark.parametrize(
    ("argv", "dotted", "expected"),
    [
        (["--fanout", "5"], "gossip.fanout", 5),
        (["--rounds", "7"], "gossip.rounds", 7),
        (["--linger-s", "1.5"], "gossip.linger_s", 1.5),
        (["--task", "fashion-mnist"], "task.name", "fashion-mnist"),
        (["--data-dir", "/data/fm"], "task.data_dir", "/data/fm"),
        (["--partition", "dirichlet:0.5"], "task.partition", "dirichlet:0.5"),
        (["--local-steps", "3"], "task.local_steps", 3),
        (["--lr", "1"], "task.lr", 1.0),
        (["--identity", "/k/id.key"], "network.identity", "/k/id.key"),
        (["--swarm", "lab-1"], "network.swarm", "lab-1"),
        (["--host-maddrs", "/ip4/0.0.0.0/tcp/31337", "/ip6/::/tcp/31337"], "network.host_maddrs",
         ["/ip4/0.0.0.0/tcp/31337", "/ip6/::/tcp/31337"]),
        (["--announce-maddrs", "/ip4/1.2.3.4/tcp/1"], "network.announce_maddrs", ["/ip4/1.2.3.4/tcp/1"]),
        (["--initial-peers", PEER], "network.initial_peers", [PEER]),
        (["--timeout-connect", "2"], "timeouts.connect", 2.0),
        (["--metrics-file", "m.jsonl"], "output.metrics_file", "m.jsonl"),
        (["--log-level", "debug"], "output.log_level", "debug"),
        (["--device", "cuda:1"], "device", "cuda:1"),
        (["--seed", "42"], "seed", 42),
        (["--threads", "3"], "threads", 3),
        (["--shard", "2/5"], "task.shard", 2),
        (["--shard", "2/5"], "task.num_shards", 5),
        (["--num-shards", "4", "--shard", "3"], "task.shard", 3),
    ],
)
def test_run_flag_sets_its_config_field(argv: list[str], dotted: str, expected: object,
                                        fake_node: list[NodeConfig]) -> None:
    config = run_config(argv, fake_node)
    assert get(config, dotted) == expected
    assert type(get(config, dotted)) is type(expected)


def test_no_flags_gives_the_defaults(fake_node: list[NodeConfig]) -> None:
    assert run_config([], fake_node) == NodeConfig()


def test_only_given_flags_override_the_config_file(tmp_path: Path, fake_node: list[NodeConfig]) -> None:
    # Prepare
    path = tmp_path / "node.toml"
    path.write_text('seed = 9\n[gossip]\nfanout = 5\nrounds = 100\n[task]\nname = "fashion-mnist"\n')
    # Execute
    config = run_config(["--config", str(path), "--rounds", "3"], fake_node)
    # Assert
    assert (config.gossip.rounds, config.gossip.fanout, config.seed) == (3, 5, 9)
    assert config.task.name == "fashion-mnist"
    assert config.network == NodeConfig().network


def test_run_returns_the_node_exit_code(monkeypatch: pytest.MonkeyPatch, fake_node: list[NodeConfig]) -> None:
    monkeypatch.setattr(sys.modules["p2pnode.runtime"], "run_node", lambda config: 3)
    assert cli.main(["run"]) == 3


def test_run_configures_logging_from_config(fake_node: list[NodeConfig]) -> None:
    cli.main(["run", "--log-level", "debug"])
    assert logging.getLogger().level == logging.DEBUG
    assert [h for h in logging.getLogger().handlers if h.get_name() == "p2pnode-cli"]


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--fanout", "two"], "gossip.fanout"),
        (["--fanout", "-1"], "gossip.fanout"),
        (["--lr", "fast"], "task.lr"),
        (["--log-level", "loud"], "output.log_level"),
        (["--partition", "dirichlet:0"], "task.partition"),
        (["--shard", "a/b"], "task.shard"),
        (["--shard", "4/4"], "task.shard"),
        (["--num-shards", "3", "--shard", "1/4"], "task.num_shards"),
        (["--device", "tpu"], "device"),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/1"], "network.initial_peers"),
        (["--timeout-dht", "0"], "timeouts.dht"),
    ],
)
def test_bad_value_is_one_line_naming_the_field_and_exit_2(argv: list[str], field: str,
                                                           fake_node: list[NodeConfig],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("p2pnode: error: ")
    assert field in err
    assert "allowed" in err
    assert fake_node == []


def test_bad_value_in_config_file_names_the_field(tmp_path: Path, fake_node: list[NodeConfig],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[gossip]\nfanout = \"many\"\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "gossip.fanout" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["run", "--fanout"], ["launch"], ["run", "--fan", "2"]])
def test_usage_error_is_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "error:" in err


def test_node_errors_are_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, fake_node: list[NodeConfig],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def broken(config: NodeConfig) -> int:
        raise TaskError("fashion-mnist: no IDX files in /nowhere")

    monkeypatch.setattr(sys.modules["p2pnode.runtime"], "run_node", broken)
    assert cli.main(["run"]) == 1
    assert capsys.readouterr().err == "p2pnode: error: fashion-mnist: no IDX files in /nowhere\n"


def test_supervisor_command_line_parses(tmp_path: Path, fake_node: list[NodeConfig]) -> None:
    """Every flag that `p2pnode swarm` passes to its `p2pnode run` children maps onto the config."""
    # Prepare
    opts = SwarmOptions(nodes=3, rounds=4, task="digits", partition="dirichlet:0.3", seed=7, fanout=1,
                        local_steps=5, device="cpu", out=tmp_path / "run", linger_s=2.5, log_level="info",
                        extra_args=["--batch-size", "8", "--defense", "mean"])
    swarm = Swarm(opts, node_command=[])
    swarm._bootstrap_maddr = PEER
    paths = swarm.node_paths(1)
    # Execute
    config = run_config(swarm._command(1), fake_node)
    # Assert
    assert (config.task.name, config.task.shard, config.task.num_shards) == ("digits", 1, 3)
    assert (config.task.partition, config.seed, config.task.local_steps) == ("dirichlet:0.3", 7, 5)
    assert (config.gossip.rounds, config.gossip.fanout, config.gossip.linger_s) == (4, 1, 2.5)
    assert (config.device, config.threads, config.output.log_level) == ("cpu", 1, "info")
    assert config.network.identity == str(paths.key)
    assert config.network.swarm == opts.swarm
    assert config.network.host_maddrs == ["/ip4/127.0.0.1/tcp/0"]
    assert config.network.initial_peers == [PEER]
    assert config.output.metrics_file == str(paths.metrics)
    assert config.output.ready_file == str(paths.ready)
    assert config.output.result_file == str(paths.result)
    assert (config.task.batch_size, config.gossip.defense) == (8, "mean")


def test_bootstrap_command_line_parses(tmp_path: Path, fake_node: list[NodeConfig]) -> None:
    swarm = Swarm(SwarmOptions(nodes=2, out=tmp_path / "run"), node_command=[])
    config = run_config(swarm._command(0), fake_node)
    assert config.network.initial_peers == []
    assert (config.task.shard, config.task.num_shards) == (0, 2)


# -- swarm ----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_swarm(monkeypatch: pytest.MonkeyPatch) -> list[tuple[SwarmOptions, bool]]:
    calls: list[tuple[SwarmOptions, bool]] = []

    def run_swarm(opts: SwarmOptions, *, live: bool = True) -> dict[str, Any]:
        calls.append((opts, live))
        return {"all_finished": True}

    monkeypatch.setattr(cli, "run_swarm", run_swarm)
    return calls


def test_swarm_flags_build_options(tmp_path: Path, fake_swarm: list[tuple[SwarmOptions, bool]]) -> None:
    # Execute
    code = cli.main(["swarm", "--nodes", "8", "--rounds", "30", "--task", "fashion-mnist",
                     "--partition", "iid", "--seed", "3", "--fanout", "3", "--local-steps", "10",
                     "--device", "auto", "--out", str(tmp_path / "o"), "--linger-s", "4",
                     "--log-level", "info", "--round-timeout-s", "900", "--no-live",
                     "--", "--batch-size", "64"])
    # Assert
    assert code == 0
    opts, live = fake_swarm[-1]
    assert (opts.nodes, opts.rounds, opts.task) == (8, 30, "fashion-mnist")
    assert (opts.partition, opts.seed) == ("iid", 3)
    assert (opts.fanout, opts.local_steps, opts.device, opts.linger_s) == (3, 10, "auto", 4.0)
    assert (opts.out, opts.log_level, opts.round_timeout_s) == (tmp_path / "o", "info", 900.0)
    assert opts.extra_args == ["--batch-size", "64"]
    assert live is False


def test_swarm_without_options_runs_the_demo_default(fake_swarm: list[tuple[SwarmOptions, bool]]) -> None:
    assert cli.main(["swarm"]) == 0
    opts, live = fake_swarm[-1]
    defaults = SwarmOptions(out=opts.out)
    assert opts == defaults
    assert live is True
    assert opts.out.parent == Path("runs")


def test_swarm_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def unfinished(opts: SwarmOptions, *, live: bool = True) -> dict[str, Any]:
        return {"all_finished": False}

    def cannot_start(opts: SwarmOptions, *, live: bool = True) -> dict[str, Any]:
        raise SwarmStartError("node 0 exited with code 2 before it was ready")

    def interrupted(opts: SwarmOptions, *, live: bool = True) -> dict[str, Any]:
        raise KeyboardInterrupt

    for fake, code in ((unfinished, 1), (cannot_start, 1), (interrupted, 130)):
        monkeypatch.setattr(cli, "run_swarm", fake)
        assert cli.main(["swarm", "--nodes", "2"]) == code
    assert "node 0 exited" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "field"), [(["--nodes", "0"], "swarm.nodes"),
                                             (["--nodes", "x"], "swarm.nodes"),
                                             (["--device", "gpu"], "swarm.device")])
def test_swarm_bad_value_exit_2(argv: list[str], field: str, fake_swarm: list[tuple[SwarmOptions, bool]],
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["swarm", *argv]) == 2
    assert field in capsys.readouterr().err
    assert fake_swarm == []


def test_swarm_positional_without_double_dash_is_refused(fake_swarm: list[tuple[SwarmOptions, bool]]) -> None:
    assert cli.main(["swarm", "--batch-size"]) == 2
    assert cli.main(["swarm", "stray"]) == 2
    assert fake_swarm == []


# -- init, keygen, peer-id ------------------------------------------------------------------------------
def test_init_writes_a_config_that_parses_back_to_the_defaults(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p2pnode.toml"
    assert cli.main(["init", str(path)]) == 0
    assert load_config(path) == NodeConfig()
    assert "# " in path.read_text()  # commented


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "p2pnode.toml"
    path.write_text("mine\n")
    assert cli.main(["init", str(path)]) == 1
    assert path.read_text() == "mine\n"
    assert cli.main(["init", str(path), "--force"]) == 0
    assert load_config(path) == NodeConfig()


def test_init_default_path_is_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init"]) == 0
    assert (tmp_path / "p2pnode.toml").is_file()


def test_keygen_writes_0600_key_and_prints_its_peer_id(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    path = tmp_path / "keys" / "id.key"
    # Execute
    code = cli.main(["keygen", "--identity", str(path)])
    out = capsys.readouterr().out
    # Assert
    assert code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert out == load_identity(path).peer_id + "\n"
    assert out.startswith("12D3KooW")
    assert cli.main(["peer-id", "--identity", str(path)]) == 0
    assert capsys.readouterr().out == out


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "id.key"
    assert cli.main(["keygen", "--identity", str(path)]) == 0
    before = path.read_bytes()
    capsys.readouterr()
    assert cli.main(["keygen", "--identity", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert cli.main(["keygen", "--identity", str(path), "--force"]) == 0
    assert path.read_bytes() != before


def test_peer_id_of_missing_key_is_one_line_exit_1(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["peer-id", "--identity", str(tmp_path / "none.key")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


# -- top level ----------------------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from p2pnode import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"p2pnode {__version__}"


def test_no_command_prints_help_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "swarm" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "p2pnode", "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0
    assert "--initial-peers" in proc.stdout
    assert "p2pnode swarm" in proc.stdout


def test_readme_cli_reference_lists_every_flag() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    flds = cli.node_fields()
    names = cli.flag_names(flds)
    missing = [f"--{names[f.path]}" for f in flds if f"`--{names[f.path]}`" not in readme]
    missing += [f"--{f.key.replace('_', '-')}" for f in cli.swarm_fields()
                if f"`--{f.key.replace('_', '-')}`" not in readme]
    assert missing == [], "README's CLI reference misses these flags (regenerate its tables)"
