#!/usr/bin/env python
"""Coverage-guided fuzzing of p2pnode's decoders with atheris (libFuzzer); run by hand, not in CI.

atheris is optional (not a dependency of p2pnode)::

    .venv/bin/pip install atheris
    .venv/bin/python scripts/fuzz_atheris.py --list                  # the targets
    .venv/bin/python scripts/fuzz_atheris.py model -max_total_time=60  # one target, libFuzzer flags after it
    .venv/bin/python scripts/fuzz_atheris.py all --seconds 60          # every target in turn, then a table

TARGET is a name from :mod:`p2pnode.bench.fuzz_targets` (the same targets the hypothesis tests fuzz). Its
decoder must return a valid object or raise its documented typed error; anything else stops the run and
libFuzzer saves the input as ``runs/fuzz-atheris/crashes/TARGET-crash-*``. Replay one with
``scripts/fuzz_atheris.py TARGET runs/fuzz-atheris/crashes/FILE``. The corpus starts from the target's
valid samples and is kept in ``runs/fuzz-atheris/corpus/TARGET`` between runs. Only ``protocols`` and
``p2pnode`` are instrumented for coverage.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "fuzz-atheris"
DEFAULT_FLAGS = ["-max_len=16384", "-timeout=10", "-rss_limit_mb=4096"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", name)


def _targets() -> dict:  # type: ignore[type-arg]
    sys.path.insert(0, str(ROOT))
    from p2pnode.bench.fuzz_targets import build_targets

    return build_targets()


def fuzz(name: str, flags: list[str]) -> None:
    """Run libFuzzer on one target (never returns: libFuzzer exits)."""
    import atheris

    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(include=["protocols", "p2pnode"]):
        from p2pnode.bench.fuzz_targets import build_targets
    targets = build_targets()
    if name not in targets:
        sys.exit(f"unknown target {name!r}; --list shows them")
    target = targets[name]
    corpus = OUT / "corpus" / _slug(name)
    corpus.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(target.samples):
        (corpus / f"sample-{i}").write_bytes(sample)
    (OUT / "crashes").mkdir(parents=True, exist_ok=True)

    def one_input(data: bytes) -> None:
        try:
            out = target.decode(data)
        except target.errors:
            return
        target.check(out)

    inputs = [f for f in flags if not f.startswith("-")]
    options = [f for f in flags if f.startswith("-")]
    prefix = f"-artifact_prefix={OUT / 'crashes' / _slug(name)}-"
    atheris.Setup([sys.argv[0], *DEFAULT_FLAGS, prefix, *options, *(inputs or [str(corpus)])], one_input)
    atheris.Fuzz()


def fuzz_all(seconds: int) -> int:
    """Every target for ``seconds`` each, one process per target; print a table; 1 if any crashed."""
    rows, failed = [], False
    for name in _targets():
        proc = subprocess.run([sys.executable, __file__, name, f"-max_total_time={seconds}"],
                              capture_output=True, text=True, cwd=ROOT)
        log = proc.stdout + proc.stderr
        done = re.findall(r"#(\d+)\s+(?:DONE|pulse|NEW|REDUCE).*?cov: (\d+)", log)
        runs, cov = done[-1] if done else ("?", "?")
        crashed = proc.returncode != 0
        failed |= crashed
        first = next((ln for ln in log.splitlines() if "Uncaught Python exception" in ln or "Error" in ln),
                     "")
        rows.append((name, runs, cov, "CRASH " + first[:80] if crashed else "ok"))
        print(f"{name:22} runs {runs:>9} cov {cov:>5}  {rows[-1][3]}", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    if argv[1] == "--list":
        print("\n".join(_targets()))
        return 0
    if argv[1] == "all":
        seconds = int(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 60
        return fuzz_all(seconds)
    fuzz(argv[1], argv[2:])  # imports p2pnode itself, instrumented: nothing of it may be imported before
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
