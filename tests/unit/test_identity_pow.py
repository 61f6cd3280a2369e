"""Identity proof of work: the puzzle, grinding a key, the node's own check and `keygen --pow-bits`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from p2pnode import cli
from p2pnode.errors import IdentityError
from p2pnode.identity import Identity, grind_identity, load_identity, require_identity_pow
from protocols.pow import DOMAIN, has_pow, leading_zero_bits, peer_id_has_pow, pow_bits_of


def test_leading_zero_bits() -> None:
    assert leading_zero_bits(b"\x80") == 0
    assert leading_zero_bits(b"\x01") == 7
    assert leading_zero_bits(b"\x00\x00\x10") == 19
    assert leading_zero_bits(bytes(4)) == 32


def test_the_puzzle_hashes_the_domain_and_the_raw_public_key() -> None:
    key = Identity.generate().public_bytes
    digest = hashlib.sha256(DOMAIN + key).digest()

    assert pow_bits_of(key) == leading_zero_bits(digest)
    assert has_pow(key, pow_bits_of(key))
    assert not has_pow(key, pow_bits_of(key) + 1)
    assert has_pow(key, 0)
    with pytest.raises(ValueError, match="bits"):
        has_pow(key, 65)


def test_grinding_finds_a_key_with_the_bits_and_its_peer_id_passes() -> None:
    calls: list[int] = []

    identity, tries = grind_identity(8, progress=calls.append, every=16)

    assert pow_bits_of(identity.public_bytes) >= 8
    assert peer_id_has_pow(identity.peer_id, 8)
    assert tries >= 1
    assert calls == list(range(16, tries, 16)), "progress is reported every 16 tries"


def test_peer_ids_that_are_not_ed25519_never_pass() -> None:
    assert not peer_id_has_pow("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", 1)  # an RSA-style id
    assert not peer_id_has_pow("junk", 1)
    assert peer_id_has_pow("junk", 0), "0 bits: the check is off"


def test_a_node_whose_own_key_lacks_the_bits_refuses_to_start() -> None:
    plain = next(i for i in iter(Identity.generate, None) if pow_bits_of(i.public_bytes) < 4)
    ground, _ = grind_identity(4)

    with pytest.raises(IdentityError, match="keygen --pow-bits 4"):
        require_identity_pow(plain, 4)
    require_identity_pow(ground, 4)
    require_identity_pow(plain, 0)


def test_keygen_grinds_with_pow_bits_and_reports_it(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ground.key"

    assert cli.main(["keygen", "--identity", str(path), "--pow-bits", "6"]) == 0

    out, err = capsys.readouterr()
    identity = load_identity(path)
    assert out.strip() == identity.peer_id
    assert pow_bits_of(identity.public_bytes) >= 6
    assert "64 tries expected" in err
    assert "found one after" in err


def test_keygen_refuses_an_existing_key_before_grinding_and_a_bad_bit_count(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k.key"
    assert cli.main(["keygen", "--identity", str(path)]) == 0
    capsys.readouterr()

    assert cli.main(["keygen", "--identity", str(path), "--pow-bits", "30"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["keygen", "--identity", str(tmp_path / "x.key"), "--pow-bits", "33"]) == 2
    assert "--pow-bits" in capsys.readouterr().err
