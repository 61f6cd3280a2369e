"""Shows the compose smoke test's phase durations in pytest's summary (they also go to junit properties)."""

from __future__ import annotations

import json
import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    module = sys.modules.get("test_compose_smoke")
    timings = getattr(module, "TIMINGS", None)
    if timings:
        terminalreporter.write_line(f"compose smoke test durations (s): {json.dumps(timings)}")
