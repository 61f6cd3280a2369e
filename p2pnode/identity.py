"""Node identity: one Ed25519 key that is both the signing key and the libp2p identity.

The key file is a libp2p ``PrivateKey`` protobuf (``key_type = Ed25519``, ``data`` = 32-byte raw
private key followed by the 32-byte raw public key), which the go-libp2p daemon that hivemind runs
accepts as ``identity_path``. The libp2p peer id of an Ed25519 key is the *identity* multihash of
the protobuf-encoded public key, so a peer id carries its public key: any signature can be checked
from the sender's peer id alone, with no key exchange and no binding record.

Files are created with mode 0600; a group/world-readable key file is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from p2pnode.errors import IdentityError
from protocols.keys import peer_id_from_pubkey
from protocols.pow import has_pow, pow_bits_of

logger = logging.getLogger(__name__)

# libp2p crypto.proto: message PrivateKey { required KeyType Type = 1; required bytes Data = 2; }
# KeyType Ed25519 = 1. Protobuf wire bytes: field 1 varint (0x08 0x01), field 2 len-delimited (0x12 len).
_PRIVATE_PREFIX = bytes([0x08, 0x01, 0x12, 0x40])


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 key pair and the libp2p peer id derived from it."""

    private_key: Ed25519PrivateKey
    path: Path | None = None
    # derived once: every sealed message names its sender, so these are on the hot path
    _public: bytes = field(init=False, repr=False, compare=False)
    _peer_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        public = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        object.__setattr__(self, "_public", public)
        object.__setattr__(self, "_peer_id", peer_id_from_pubkey(public))

    @property
    def public_bytes(self) -> bytes:
        return self._public

    @property
    def peer_id(self) -> str:
        """Base58 libp2p peer id (``12D3KooW…``) of this key."""
        return self._peer_id

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def to_libp2p_bytes(self) -> bytes:
        """Serialise as a libp2p ``PrivateKey`` protobuf (the daemon's ``-id`` file format)."""
        raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return _PRIVATE_PREFIX + raw + self.public_bytes

    @classmethod
    def generate(cls) -> Identity:
        return cls(private_key=Ed25519PrivateKey.generate())

    @classmethod
    def simulated(cls, label: str) -> Identity:
        """A key derived from ``label`` (SHA-256), for the virtual nodes of in-process and simulated swarms,
        so that a seed fixes their peer ids and everything seeded by them. Anyone who knows the label
        has the key: never for a node on a network."""
        seed = hashlib.sha256(b"p2pnode simulated identity/" + label.encode()).digest()
        return cls(private_key=Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_libp2p_bytes(cls, data: bytes, path: Path | None = None) -> Identity:
        if len(data) != len(_PRIVATE_PREFIX) + 64 or not data.startswith(_PRIVATE_PREFIX):
            raise IdentityError(f"{path or 'key'}: not an Ed25519 libp2p private key ({len(data)} bytes)")
        body = data[len(_PRIVATE_PREFIX) :]
        key = Ed25519PrivateKey.from_private_bytes(body[:32])
        ident = cls(private_key=key, path=path)
        if ident.public_bytes != body[32:]:
            raise IdentityError(f"{path or 'key'}: public half does not match the private key")
        return ident


def save_identity(identity: Identity, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``identity`` to ``path`` with mode 0600 (atomically: temp file, fsync, rename)."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} already exists (refusing to overwrite a key)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, identity.to_libp2p_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_identity(path: Path) -> Identity:
    """Read a key file; refuse files readable by group or others."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{path}: no such key file (create one with `p2pnode keygen`)") from exc
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read key file: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{path}: permissions {oct(mode & 0o777)} are too open; run chmod 600 {path}")
    return Identity.from_libp2p_bytes(data, path)


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at ``path``, creating a new one (mode 0600) if the file does not exist."""
    path = Path(path).expanduser()
    if not path.exists():
        try:
            save_identity(Identity.generate(), path)
            logger.info("created new identity at %s", path)
        except IdentityError:
            pass  # another process created it between exists() and save; load theirs
    return load_identity(path)


def grind_identity(bits: int, *, progress: Callable[[int], None] | None = None,
                   every: int = 4096) -> tuple[Identity, int]:
    """Generate keys until one carries ``bits`` bits of identity proof of work (:mod:`protocols.pow`).

    Returns the identity and the number of keys tried (geometric, mean ``2**bits``). ``progress`` is
    called with the count so far every ``every`` tries.
    """
    tries = 0
    while True:
        tries += 1
        key = Ed25519PrivateKey.from_private_bytes(os.urandom(32))
        if has_pow(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), bits):
            return Identity(private_key=key), tries
        if progress is not None and tries % every == 0:
            progress(tries)


def require_identity_pow(identity: Identity, bits: int) -> None:
    """Raise :class:`IdentityError` if ``identity`` lacks ``bits`` bits of proof of work (peers would
    ignore this node)."""
    if not has_pow(identity.public_bytes, bits):
        where = identity.path or "the key"
        raise IdentityError(f"{where} has {pow_bits_of(identity.public_bytes)} bits of identity proof of "
                            f"work, the swarm asks for {bits} (--identity-pow-bits): grind a key with "
                            f"`p2pnode keygen --pow-bits {bits} --identity PATH`")
