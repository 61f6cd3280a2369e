#!/usr/bin/env bash
# Fill compose/wheelhouse/ with every wheel the p2pnode image needs, so that
# `docker build -f compose/Dockerfile .` installs them with --no-index (no network during the build).
#
#   compose/make-wheelhouse.sh            # from the repository's .venv pip (or $PIP)
#
# The wheels are for the machine's Python and platform (CPython 3.11, x86_64 Linux): the same as the
# image's (Debian bookworm's python3 or python:3.11-slim-bookworm). torch is the CPU build (torch==2.13.0
# from pip's configured indexes/find-links, or PyTorch's CPU index: TORCH_INDEX_URL). Dependencies
# published only as source archives are built into wheels here, so the image needs no build tools.
# Idempotent: what is already there is kept; delete the folder to start over.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PIP="${PIP:-.venv/bin/pip}"
DEST=compose/wheelhouse
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$DEST"
# The runtime dependencies of pyproject.toml (the image installs them the same way).
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$reqs"

extra=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    extra+=(--extra-index-url "$TORCH_INDEX_URL")
fi
# `pip wheel` downloads wheels as they are and builds the few sdists (varint, python-baseconv, ...).
"$PIP" wheel -q "${extra[@]}" --wheel-dir "$DEST" -c constraints.txt \
    "torch==$TORCH_VERSION" -r "$reqs" "setuptools>=68" wheel
count="$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)"
printf 'make-wheelhouse: %s wheels, %s in %s\n' "$count" "$(du -sh "$DEST" | cut -f1)" "$DEST" >&2
