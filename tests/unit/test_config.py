"""The typed config tree: defaults, TOML, dotted overrides, and one-line errors naming the field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from p2pnode.config import NodeConfig, config_from_dict, default_toml, load_config
from p2pnode.errors import ConfigError


def test_default_toml_parses_back_to_the_defaults() -> None:
    parsed = config_from_dict(tomllib.loads(default_toml()))
    assert parsed == NodeConfig()


def test_toml_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('seed = 7\n[gossip]\nfanout = 3\nrounds = 5\n[task]\nname = "fashion-mnist"\n')

    cfg = load_config(path, {"gossip.fanout": 4, "task.lr": 0.1})

    assert cfg.seed == 7
    assert cfg.gossip.rounds == 5
    assert cfg.gossip.fanout == 4
    assert cfg.task.name == "fashion-mnist"
    assert cfg.task.lr == 0.1


def test_int_widens_to_float_but_str_is_refused() -> None:
    assert config_from_dict({"task": {"lr": 1}}).task.lr == 1.0
    with pytest.raises(ConfigError, match="task.lr"):
        config_from_dict({"task": {"lr": "fast"}})


@pytest.mark.parametrize(("data", "field"), [
    ({"gossip": {"fanout": -1}}, "gossip.fanout"),
    ({"task": {"partition": "dirichlet:0"}}, "task.partition"),
    ({"task": {"partition": "zipf"}}, "task.partition"),
    ({"task": {"shard": 3, "num_shards": 2}}, "task.shard"),
    ({"device": "tpu"}, "device"),
    ({"network": {"heartbeat_s": 5.0, "record_ttl_s": 4.0}}, "network.record_ttl_s"),
    ({"network": {"initial_peers": ["/ip4/1.2.3.4/tcp/1"]}}, "network.initial_peers"),
    ({"network": {"swarm": "has space"}}, "network.swarm"),
    ({"gossip": {"no_such": 1}}, "gossip.no_such"),
    ({"nosection": {}}, "nosection"),
    ({"gossip": {"consensus_step": 1.5}}, "gossip.consensus_step"),
    ({"output": {"log_level": "loud"}}, "output.log_level"),
])
def test_bad_values_name_the_field_and_the_allowed_values(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.field == field
    message = str(info.value)
    assert "\n" not in message
    assert field in message
    assert "allowed" in message


def test_missing_and_invalid_toml_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="p2pnode init"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gossip\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad)


@pytest.mark.parametrize(("codec", "step", "expected"), [
    ("dense", 0.0, 1.0), ("fp16", 0.0, 1.0), ("int8", 0.0, 1.0),
    ("topk:0.01", 0.0, 0.5), ("powersgd:2", 0.0, 0.5), ("terngrad", 0.0, 0.5),
    ("topk:0.01", 0.8, 0.8), ("dense", 0.25, 0.25),
])
def test_consensus_step_is_auto_by_codec_unless_set(codec: str, step: float, expected: float) -> None:
    cfg = config_from_dict({"gossip": {"codec": codec, "consensus_step": step}})
    assert cfg.gossip.merge_step() == expected
