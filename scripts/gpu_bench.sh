#!/usr/bin/env bash
# Run `p2pnode bench gpu` on a GPU machine from a copy of this repository, with .gpu-bench/ (made here
# by scripts/gpu_prepare.sh) carried along. Extra arguments go to the bench, e.g. `--nodes 8`.
#
#   bash scripts/gpu_bench.sh [BENCH FLAGS]
#
# 1. prints diagnostics (GPU, Python interpreters and their torch, packages);
# 2. picks the first Python whose torch sees CUDA: $PYTHON, python3, /opt/torch/.venv/bin/python3,
#    .venv/bin/python (a CPU-only torch, like this repository's .venv, is skipped);
# 3. installs the wheels in .gpu-bench/wheels for the modules that Python cannot import (and protobuf
#    when the image's is older than hivemind's generated code needs) into /tmp/p2pnode-site with
#    `pip install --no-index --no-deps --target` (nothing goes into the machine's own environment;
#    pip keeps the libp2p daemon's executable bit);
# 4. runs the bench with --data-dir .gpu-bench/fashion-mnist, writing $OUT/bench-gpu.json and
#    $OUT/bench-gpu.log when OUT is set, else runs/bench-gpu.json and runs/bench-gpu.log.
# P2PNODE_GPU_BENCH=hotpaths runs `p2pnode bench hotpaths --rpc-seconds 0` instead (its CPU parts).
# P2PNODE_GPU_BENCH=simulate runs `p2pnode simulate --out $DEST/simulate [FLAGS]` instead (e.g.
# --device cuda --task fashion-mnist --nodes 1000 --rounds 20), writing $DEST/simulate.log too.
# P2PNODE_GPU_BENCH_ALLOW_CPU=1 accepts a CPU torch too (to check this script where there is no GPU;
# then pass small sizes, e.g. --device cpu --numel 200000 --rounds 6 --warmup-rounds 1).
# Exit codes: the bench's (0 all sections ran, 1 a section failed: see "errors" in the JSON); 3 no
# Python with a CUDA torch; 4 the project does not import (both after the diagnostics).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PREP="$REPO/.gpu-bench"
DEST="${OUT:-$REPO/runs}"
SITE=/tmp/p2pnode-site
rm -rf "$SITE"
mkdir -p "$DEST" "$SITE"
export PYTHONUNBUFFERED=1 P2PNODE_CACHE=/tmp/p2pnode-cache

say() { printf 'gpu_bench: %s\n' "$*" >&2; }

say "diagnostics"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 \
    || say "nvidia-smi failed"
printf 'kernel %s, %s CPUs, %s\n' "$(uname -r)" "$(nproc)" "$(free -g | awk '/Mem:/ {print $2 " GiB"}')" >&2
[ -d "$PREP" ] && ls -R "$PREP" | head -20 >&2 || say "no .gpu-bench/ (run scripts/gpu_prepare.sh and carry it)"

PY=""
for candidate in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3 "$REPO/.venv/bin/python"; do
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    line=$("$candidate" -c 'import sys, torch
print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())' 2>&1 | tail -1)
    say "$candidate: $line"
    if [[ "$line" == *" available True" || ( -n "${P2PNODE_GPU_BENCH_ALLOW_CPU:-}" && "$line" == *" available "* ) ]]
    then
        PY=$(command -v "$candidate" || echo "$candidate")
        break
    fi
done
if [ -z "$PY" ]; then
    say "no Python with a CUDA torch found (see above); nothing run"
    exit 3
fi
say "using $PY"
"$PY" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|msgpack|cryptography|cffi|base58|hivemind) ' >&2

# module to import : wheel name prefix in .gpu-bench/wheels
MODULES="cffi:cffi pycparser:pycparser cryptography:cryptography base58:base58 msgpack:msgpack
    hivemind:hivemind configargparse:configargparse netaddr:netaddr multihash:py_multihash morphys:morphys
    cid:py_cid multibase:py_multibase multicodec:py_multicodec blake3:blake3 mmh3:mmh3
    baseconv:python_baseconv pydantic:pydantic pydantic_core:pydantic_core annotated_types:annotated_types
    typing_inspection:typing_inspection prefetch_generator:prefetch_generator varint:varint
    aiomqtt:aiomqtt paho.mqtt:paho_mqtt"
wheels=()
for pair in $MODULES; do
    module=${pair%%:*}
    wheel=${pair##*:}
    "$PY" -c "import $module" >/dev/null 2>&1 && continue
    found=$(ls "$PREP"/wheels/"$wheel"-*.whl 2>/dev/null | head -1)
    if [ -z "$found" ]; then
        say "$module is missing and there is no wheel for it in $PREP/wheels"
        continue
    fi
    wheels+=("$found")
done
# hivemind's generated protobuf code checks the runtime's version (5.27 or newer)
if ! "$PY" -c 'import sys, google.protobuf as p
sys.exit(tuple(int(x) for x in p.__version__.split(".")[:2]) < (5, 27))' >/dev/null 2>&1; then
    found=$(ls "$PREP"/wheels/protobuf-*.whl 2>/dev/null | head -1)
    [ -n "$found" ] && wheels+=("$found") || say "protobuf is missing or too old and there is no wheel for it"
fi
if [ ${#wheels[@]} -gt 0 ]; then
    say "installing into $SITE: $(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}" \
        || say "pip install --target $SITE failed"
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import p2pnode.bench.gpu, p2pnode.inproc, protocols.codecs.bench, cryptography, base58, msgpack'
then
    say "the project does not import with $PY (see the error above); nothing run"
    exit 4
fi
"$PY" -c 'from hivemind.p2p import P2P' || say "hivemind does not import: the processes section will fail"

data=()
if [ -d "$PREP/fashion-mnist" ]; then
    data=(--data-dir "$PREP/fashion-mnist")
elif [ ! -d /usr/share/datasets/fashion-mnist ]; then
    say "no Fashion-MNIST here: the throughput section will fail (codecs and rules still run)"
fi

if [ "${P2PNODE_GPU_BENCH:-gpu}" = hotpaths ]; then
    # the in-process parts of `bench hotpaths` on this machine's (quiet) CPU; no hivemind here, so no ping part
    say "running: p2pnode bench hotpaths --rpc-seconds 0 $*"
    "$PY" -m p2pnode bench hotpaths --rpc-seconds 0 --json "$DEST/bench-hotpaths.json" "$@" 2>&1 \
        | tee "$DEST/bench-hotpaths.log"
    status=${PIPESTATUS[0]}
    say "exit status $status; results: $DEST/bench-hotpaths.json"
    exit "$status"
fi
if [ "${P2PNODE_GPU_BENCH:-gpu}" = simulate ]; then
    say "running: p2pnode simulate ${data[*]} $*"
    "$PY" -m p2pnode simulate --out "$DEST/simulate" --no-progress "${data[@]}" "$@" 2>&1 \
        | tee "$DEST/simulate.log"
    status=${PIPESTATUS[0]}
    say "exit status $status; results: $DEST/simulate/summary.json"
    exit "$status"
fi
say "running: p2pnode bench gpu ${data[*]} $*"
"$PY" -m p2pnode bench gpu --json "$DEST/bench-gpu.json" "${data[@]}" "$@" 2>&1 | tee "$DEST/bench-gpu.log"
status=${PIPESTATUS[0]}
say "exit status $status; results: $DEST/bench-gpu.json"
exit "$status"
