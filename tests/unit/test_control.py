"""Operator commands: only fresh, untampered commands signed by a trusted key for this swarm and node pass."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.control import (
    DOMAIN,
    MAGIC,
    MAX_BODY,
    MAX_COMMAND_BYTES,
    VERSION,
    CommandVerifier,
    ControlError,
    sign_command,
)
from p2pnode.identity import Identity

OPERATOR = Identity.generate()
STRANGER = Identity.generate()
NODE = "12D3KooWNodeNodeNodeNodeNodeNodeNodeNodeNodeNode"
NOW = 1_800_000_000.0


def _verifier(*, test_mode: bool = False, max_nonces: int = 4096, window_s: float = 60.0) -> CommandVerifier:
    return CommandVerifier([OPERATOR.peer_id], swarm="s1", peer_id=NODE, test_mode=test_mode,
                           window_s=window_s, max_nonces=max_nonces, clock=lambda: NOW)


def _reason(verifier: CommandVerifier, data: bytes) -> str:
    with pytest.raises(ControlError) as info:
        verifier.open(data)
    return info.value.reason


def test_a_signed_command_passes_with_its_fields() -> None:
    v = _verifier()
    cmd = v.open(sign_command(OPERATOR, "pause", swarm="s1", ts=NOW - 3))
    assert (cmd.cmd, cmd.operator, cmd.target, cmd.ts) == ("pause", OPERATOR.peer_id, "*", NOW - 3)
    targeted = v.open(sign_command(OPERATOR, "checkpoint", swarm="s1", target=NODE, ts=NOW))
    assert targeted.target == NODE


def test_replaying_the_same_bytes_is_rejected() -> None:
    v = _verifier()
    data = sign_command(OPERATOR, "resume", swarm="s1", ts=NOW)
    v.open(data)
    assert _reason(v, data) == "replay"


def test_unsigned_forged_tampered_and_untrusted_commands_are_rejected() -> None:
    v = _verifier()
    assert _reason(v, json.dumps({"cmd": "pause", "swarm": "s1"}).encode()) == "unsigned"
    assert _reason(v, b"") == "unsigned"
    assert _reason(v, sign_command(STRANGER, "pause", swarm="s1", ts=NOW)) == "untrusted"
    # the trusted key's bytes with a signature made by another key
    good = sign_command(OPERATOR, "pause", swarm="s1", ts=NOW)
    body = good[len(MAGIC) + 1 + 32 + 64:]
    forged = good[:len(MAGIC) + 1 + 32] + STRANGER.sign(DOMAIN + body) + body
    assert _reason(v, forged) == "signature"
    tampered = good.replace(b'"target":"*"', ('"target":"' + NODE + '"').encode())
    assert tampered != good
    assert _reason(v, tampered) == "signature"
    other_version = good[:len(MAGIC)] + bytes([VERSION + 1]) + good[len(MAGIC) + 1:]
    assert _reason(v, other_version) == "version"
    # none of these was executed or remembered: the genuine command still passes once
    assert v.open(good).cmd == "pause"


def test_other_swarm_other_node_and_stale_or_future_commands_are_rejected() -> None:
    v = _verifier()
    assert _reason(v, sign_command(OPERATOR, "pause", swarm="s2", ts=NOW)) == "swarm"
    assert _reason(v, sign_command(OPERATOR, "pause", swarm="s1", target="12D3KooWOther", ts=NOW)) == "target"
    assert _reason(v, sign_command(OPERATOR, "pause", swarm="s1", ts=NOW - 61)) == "stale"
    assert _reason(v, sign_command(OPERATOR, "pause", swarm="s1", ts=NOW + 61)) == "stale"


def test_fault_commands_need_test_mode_and_valid_arguments() -> None:
    assert _reason(_verifier(), sign_command(OPERATOR, "crash", swarm="s1", ts=NOW)) == "forbidden"
    v = _verifier(test_mode=True)
    assert v.open(sign_command(OPERATOR, "crash", swarm="s1", ts=NOW)).cmd == "crash"
    stall = v.open(sign_command(OPERATOR, "stall", swarm="s1", args={"seconds": 2}, ts=NOW))
    assert stall.args == {"seconds": 2}
    for bad in ({}, {"seconds": 0}, {"seconds": 10_000}, {"seconds": "5"}, {"seconds": True}):
        assert _reason(v, sign_command(OPERATOR, "stall", swarm="s1", args=bad, ts=NOW)) == "malformed"
    assert _reason(v, sign_command(OPERATOR, "format-disk", swarm="s1", ts=NOW)) == "unknown"


def test_oversized_input_is_rejected_before_anything_else() -> None:
    v = _verifier()
    assert _reason(v, MAGIC + b"\x00" * MAX_COMMAND_BYTES) == "size"
    with pytest.raises(ValueError, match="limit"):
        sign_command(OPERATOR, "pause", swarm="s1", args={"pad": "x" * MAX_BODY})


def test_signed_but_malformed_bodies_are_rejected() -> None:
    v = _verifier()

    def signed(body: bytes) -> bytes:
        from protocols.keys import pubkey_from_peer_id

        key = pubkey_from_peer_id(OPERATOR.peer_id)
        return MAGIC + bytes([VERSION]) + key + OPERATOR.sign(DOMAIN + body) + body

    assert _reason(v, signed(b"not json")) == "malformed"
    assert _reason(v, signed(b"[1, 2]")) == "malformed"
    assert _reason(v, signed(json.dumps({"cmd": "pause", "swarm": "s1"}).encode())) == "malformed"
    base = {"cmd": "pause", "swarm": "s1", "target": "*", "ts": NOW, "nonce": "ab" * 8, "args": {}}
    for key, value in (("ts", float("nan")), ("ts", True), ("nonce", "x"), ("args", []), ("cmd", 1)):
        body = json.dumps({**base, key: value}).encode()
        assert _reason(v, signed(body)) == "malformed", key


def _signed(body: bytes) -> bytes:
    from protocols.keys import pubkey_from_peer_id

    key = pubkey_from_peer_id(OPERATOR.peer_id)
    return MAGIC + bytes([VERSION]) + key + OPERATOR.sign(DOMAIN + body) + body


@pytest.mark.parametrize("body", [
    b'{"cmd":"pause","swarm":"s1","target":"*","ts":' + b"9" * 400 + b',"nonce":"abababab","args":{}}',
    b'{"cmd":"pause","swarm":"s1","target":"*","ts":-' + b"9" * 400 + b',"nonce":"abababab","args":{}}',
    b"[" * 1000,  # nested deeper than the JSON decoder's recursion limit
    b'{"a":' * 300 + b"1" + b"}" * 300,
])
def test_signed_bodies_that_broke_the_json_checks_are_malformed(body: bytes) -> None:
    # an integer timestamp too large for a float raised OverflowError, deep nesting RecursionError
    assert _reason(_verifier(), _signed(body[:MAX_BODY])) == "malformed"


@pytest.mark.parametrize("data", [None, 5, "P2PC", 1.5])
def test_input_that_is_not_bytes_is_a_control_error(data: object) -> None:
    # len() of an int raised TypeError while the size error was being built
    assert _reason(_verifier(), data) == "malformed"  # type: ignore[arg-type]


def test_the_nonce_memory_is_bounded_and_forgets_old_commands() -> None:
    clock = [NOW]
    v = CommandVerifier([OPERATOR.peer_id], swarm="s1", peer_id=NODE, window_s=10.0, max_nonces=3,
                        clock=lambda: clock[0])
    for _ in range(3):
        v.open(sign_command(OPERATOR, "pause", swarm="s1", ts=clock[0]))
    assert _reason(v, sign_command(OPERATOR, "pause", swarm="s1", ts=clock[0])) == "flood"
    clock[0] += 25.0  # the three are now older than 2 windows: forgotten, and a replay of them is stale
    v.open(sign_command(OPERATOR, "pause", swarm="s1", ts=clock[0]))


def test_an_untrusted_key_list_entry_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not an Ed25519 peer id"):
        CommandVerifier(["QmNotAnEd25519Key"], swarm="s1", peer_id=NODE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=MAX_COMMAND_BYTES + 16))
def test_fuzz_random_bytes_only_ever_raise_control_error(data: bytes) -> None:
    with pytest.raises(ControlError):
        _verifier().open(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=400))
def test_fuzz_mutating_a_signed_command_never_passes(patch: bytes, at: int) -> None:
    good = sign_command(OPERATOR, "pause", swarm="s1", ts=NOW)
    at = at % len(good)
    mutated = good[:at] + patch + good[at + len(patch):]
    if mutated == good:
        return
    with pytest.raises(ControlError):
        _verifier().open(mutated)
