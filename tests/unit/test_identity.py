"""Identity: one Ed25519 key file is both the signing key and the libp2p peer id."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pnode.errors import IdentityError
from p2pnode.identity import Identity, load_identity, load_or_create_identity, save_identity
from protocols.keys import peer_id_from_pubkey, pubkey_from_peer_id, verify


def test_saved_key_has_mode_0600_and_loads_back_to_the_same_peer_id(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = save_identity(ident, tmp_path / "sub" / "id.key")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).peer_id == ident.peer_id


def test_peer_id_is_an_ed25519_libp2p_id_that_carries_the_public_key() -> None:
    ident = Identity.generate()

    assert ident.peer_id.startswith("12D3KooW")
    assert pubkey_from_peer_id(ident.peer_id) == ident.public_bytes
    assert peer_id_from_pubkey(ident.public_bytes) == ident.peer_id


def test_signatures_verify_from_the_peer_id_alone_and_fail_for_another_key() -> None:
    ident, other = Identity.generate(), Identity.generate()
    sig = ident.sign(b"hello")

    assert verify(ident.peer_id, b"hello", sig)
    assert not verify(other.peer_id, b"hello", sig)
    assert not verify(ident.peer_id, b"hellO", sig)


def test_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    path = save_identity(Identity.generate(), tmp_path / "id.key")
    with pytest.raises(IdentityError, match="already exists"):
        save_identity(Identity.generate(), path)


def test_refuses_a_group_readable_key_file(tmp_path: Path) -> None:
    path = save_identity(Identity.generate(), tmp_path / "id.key")
    os.chmod(path, 0o640)
    with pytest.raises(IdentityError, match="too open"):
        load_identity(path)


@pytest.mark.parametrize("content", [
    b"",
    b"\x08\x01\x12\x40" + b"\x00" * 10,  # truncated Ed25519 key
    b"\x08\x00\x12\x40" + b"\x00" * 64,  # key type 0 (RSA) instead of Ed25519
])
def test_malformed_key_files_raise_identity_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError):
        load_identity(path)


def test_public_half_must_match_private_half(tmp_path: Path) -> None:
    a, b = Identity.generate(), Identity.generate()
    data = a.to_libp2p_bytes()[:-32] + b.public_bytes
    with pytest.raises(IdentityError, match="does not match"):
        Identity.from_libp2p_bytes(data)


def test_load_or_create_creates_once_then_reuses(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    first = load_or_create_identity(path)
    second = load_or_create_identity(path)
    assert first.peer_id == second.peer_id


def test_missing_key_file_explains_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="keygen"):
        load_identity(tmp_path / "missing.key")


def test_simulated_identities_are_fixed_by_their_label_and_sign_like_any_other() -> None:
    a, again, b = Identity.simulated("0/3"), Identity.simulated("0/3"), Identity.simulated("0/4")
    assert a.peer_id == again.peer_id
    assert a.peer_id != b.peer_id
    assert a.peer_id != Identity.simulated("1/3").peer_id
    assert verify(a.peer_id, b"m", again.sign(b"m"))
    assert not verify(b.peer_id, b"m", a.sign(b"m"))
