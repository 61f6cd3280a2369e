"""Process lifetime helpers shared by the daemon, the simulator's workers and the benchmarks."""

from __future__ import annotations

import contextlib
import signal
import sys


def die_with_parent() -> None:
    """In a child process: die by SIGTERM when the parent dies (a forked hivemind DHT process, a
    simulator's cell worker, a benchmark's node).

    A forked child inherits the parent's SIGTERM handler (the event loop's, which would only poke the
    parent's loop), so it is reset to the default first; then Linux is asked to send SIGTERM when the
    forking thread (the main thread) exits, e.g. when the node is SIGKILLed.
    """
    with contextlib.suppress(ValueError):  # only possible when the fork happened off the main thread
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError, ctypes.ArgumentError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
