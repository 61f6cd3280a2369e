"""``python -m p2pnode``: the same command line as the ``p2pnode`` console script."""

from __future__ import annotations

import sys

from p2pnode.cli import main

if __name__ == "__main__":
    sys.exit(main())
