"""``p2pnode bench codecs``: :func:`protocols.codecs.bench.bench_codecs` on ResNet-50's layout and on the
fashion-mnist CNN's (built here, since :mod:`protocols` never imports the tasks), written to JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_codec_bench(*, specs: Sequence[str] | None = None, repeats: int = 5, threads: int | None = 1,
                    json_path: Path = Path("runs/bench-codecs.json")) -> dict[str, Any]:
    """Bench every codec on both layouts; print the markdown table; write ``json_path``."""
    from p2pnode.tasks import make_task
    from protocols.codecs import Layout
    from protocols.codecs.bench import bench_codecs, format_table
    from protocols.codecs.layouts import resnet50_layout

    cnn = Layout.of(make_task("fashion-mnist").build_model(0))
    result = bench_codecs(specs, layouts={"resnet50": resnet50_layout(), "fashion-cnn": cnn}, repeats=repeats,
                          threads=threads, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"results: {json_path}")
    return result
