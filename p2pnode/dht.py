"""Starting the hivemind DHT a node's membership lives in: its libp2p identity is the node's Ed25519 key.

Every DHT node runs :class:`~p2pnode.membership.Ed25519RecordValidator`, so records under a swarm key are
refused at store time unless signed by the peer their subkey names. A start whose initial peers do not
answer hivemind's bootstrap ping is retried with a fresh DHT until the caller's timeout is spent.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Sequence

import hivemind
from hivemind.p2p import P2PDaemonError

from p2pnode.errors import ConfigError, IdentityError, P2PNodeError, PeerUnreachable
from p2pnode.membership import DEFAULT_MAX_TTL_S, Ed25519RecordValidator

logger = logging.getLogger(__name__)


class DHTStartError(P2PNodeError):
    """The local DHT (libp2p daemon + DHT process) could not be started."""


def create_dht(identity_path: str, *, swarm: str, initial_peers: Sequence[str], host_maddrs: Sequence[str],
               announce_maddrs: Sequence[str], wait_timeout: float = 30.0,
               max_ttl_s: float = DEFAULT_MAX_TTL_S, pow_bits: int = 0) -> hivemind.DHT:
    """Start a hivemind DHT whose libp2p identity is the p2pnode key at ``identity_path``.

    Blocks for up to ``wait_timeout`` seconds (call it through ``asyncio.to_thread`` from a loop). When no
    initial peer answers hivemind's bootstrap ping (one try of a few seconds; on a lossy link a SYN or the
    handshake can be lost), the start is retried with a fresh DHT until ``wait_timeout`` is spent.

    Raises
    ------
    IdentityError
        ``identity_path`` is not an existing file (hivemind would silently write an RSA key there).
    PeerUnreachable
        ``initial_peers`` were given and none of them answered.
    ConfigError
        An address is malformed (e.g. port 0 in ``announce_maddrs``).
    DHTStartError
        The DHT did not start for another reason (daemon failure, timeout).
    """
    if not os.path.isfile(identity_path):
        raise IdentityError(f"{identity_path}: no such key file (create it with save_identity first)")
    deadline, attempt = time.monotonic() + wait_timeout, 0
    while True:
        attempt += 1
        try:
            return _start_dht(identity_path, swarm=swarm, initial_peers=initial_peers,
                              host_maddrs=host_maddrs, announce_maddrs=announce_maddrs,
                              wait_timeout=max(deadline - time.monotonic(), 1.0), max_ttl_s=max_ttl_s,
                              pow_bits=pow_bits)
        except _BootstrapFailed as failed:
            left = deadline - time.monotonic()
            if left < BOOTSTRAP_RETRY_MIN_S:
                raise _start_error(failed.cause, initial_peers, wait_timeout, attempt) from failed.cause
            logger.warning("no initial peer answered (try %d, %.0fs left), starting the DHT again: %s",
                           attempt, left, failed.cause)
            time.sleep(min(BOOTSTRAP_RETRY_PAUSE_S * attempt, left - BOOTSTRAP_RETRY_MIN_S / 2))


BOOTSTRAP_RETRY_MIN_S = 4.0  # one hivemind bootstrap try: its 3 s ping timeout plus the daemon's start
BOOTSTRAP_RETRY_PAUSE_S = 0.5


class _BootstrapFailed(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _start_dht(identity_path: str, *, swarm: str, initial_peers: Sequence[str], host_maddrs: Sequence[str],
               announce_maddrs: Sequence[str], wait_timeout: float, max_ttl_s: float,
               pow_bits: int) -> hivemind.DHT:
    validator = Ed25519RecordValidator([swarm], max_ttl_s=max_ttl_s, pow_bits=pow_bits)
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers) or None, start=True, await_ready=False,
            record_validators=[validator], identity_path=str(identity_path),
            host_maddrs=list(host_maddrs), announce_maddrs=list(announce_maddrs) or None,
            check_if_identity_free=False,  # hivemind's check only parses RSA keys
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError("network.initial_peers", list(initial_peers), f"full multiaddrs ({exc})") from exc
    try:
        dht.wait_until_ready(timeout=wait_timeout)
    except Exception as exc:
        dht.shutdown()
        if initial_peers and "bootstrap" in str(exc):
            raise _BootstrapFailed(exc) from exc
        raise _start_error(exc, initial_peers, wait_timeout) from exc
    except BaseException:
        dht.shutdown()
        raise
    return dht


def _start_error(exc: Exception, initial_peers: Sequence[str], wait_timeout: float,
                 attempts: int = 1) -> P2PNodeError:
    text = str(exc)
    if initial_peers and ("bootstrap" in text or isinstance(exc, concurrent.futures.TimeoutError)):
        tries = f" ({attempts} tries)" if attempts > 1 else ""
        return PeerUnreachable(f"none of the initial peers answered within {wait_timeout:g}s{tries}: "
                               f"{', '.join(initial_peers)} ({text or type(exc).__name__})")
    if isinstance(exc, ValueError) and not isinstance(exc, P2PDaemonError):
        return ConfigError("network.host_maddrs/announce_maddrs", text,
                           "valid multiaddrs with explicit ports")
    return DHTStartError(f"DHT failed to start: {text or type(exc).__name__}")


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Full multiaddrs (``…/p2p/<peer id>``) other machines pass as ``--initial-peers`` (blocking)."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]
