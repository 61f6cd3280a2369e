"""p2pnode: a peer-to-peer gossip-learning daemon (see README.md and ``p2pnode --help``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("p2pnode")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
