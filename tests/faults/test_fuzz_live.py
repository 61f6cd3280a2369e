"""A live node under fuzzed messages (``p2pnode bench fuzz``, smaller): it refuses every bad one with a typed
rejection that it counts, answers every valid one, never hangs or dies, and keeps training."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pnode.bench.fuzz import FuzzOptions, run_fuzz_bench
from p2pnode.bench.fuzz_messages import CASES

pytestmark = [pytest.mark.integration]

MESSAGES = 2_000


@pytest.mark.timeout(420)
def test_a_live_node_refuses_fuzzed_messages_counts_them_and_keeps_training(tmp_path: Path) -> None:
    opts = FuzzOptions(messages=MESSAGES, out_dir=tmp_path, json_path=tmp_path / "fuzz.json")
    result = run_fuzz_bench(opts)

    f = result["figures"]
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert not failed, (failed, result["mismatches"], result["log_errors"], f)
    assert f["messages"] == MESSAGES
    assert f["crashes"] == f["hangs"] == f["dropped"] == f["bad_replies"] == f["peer_exchanges_cut"] == 0
    assert f["rejected"] == f["expected_reject"] == f["messages_rejected_counted"] > 0.9 * MESSAGES
    assert f["answered"] == f["valid"] > 0
    assert f["rounds_during_fuzzing"] > 0
    assert set(result["by_category"]) == set(CASES), "every kind of message was sent"
