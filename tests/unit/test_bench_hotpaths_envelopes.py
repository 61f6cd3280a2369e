"""``p2pnode bench hotpaths``, envelope part: the rows it reports and how the report shows them."""

from __future__ import annotations

import pytest

from p2pnode.bench import hotpaths
from p2pnode.bench.hotpaths import HotpathOptions, envelope_rows, format_report


def test_envelope_rows_time_seal_and_open_and_measure_the_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a 10 kB payload, and a short spinner measurement
    monkeypatch.setattr(hotpaths, "LOCK_SECONDS", 0.2)
    # Execute
    rows = envelope_rows(HotpathOptions(envelope_mb=(0.01,), repeats=3))
    report = format_report({"codecs": [], "merge_rules": [], "envelopes": rows, "checks": {}})
    # Assert: an empty envelope (header and signature only) and the 10 kB one, every figure positive
    empty, small = rows
    assert empty["payload_mb"] == 0.0
    assert empty["envelope_bytes"] < 120
    assert small["envelope_bytes"] == empty["envelope_bytes"] + 10_000
    for key in ("seal_ms", "open_ms", "seal_ms_per_mb", "open_ms_per_mb", "sha512_ms_per_mb",
                "v2_sign_verify_ms_per_mb"):
        assert small[key] > 0, key
    for key in ("python_thread_kept", "python_thread_kept_v2_rule"):
        assert 0.0 < small[key] < 2.0, key  # a share of the spinner's solo rate
    assert "| 0.01 MB |" in report
    assert "version 2's rule" in report
