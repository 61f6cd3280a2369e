#!/usr/bin/env bash
# The simulator's measurements in docs/sim/*.json (see docs/sim/README.md). Heavy: run alone, e.g.
#   flock /tmp/p2pnode-heavy.lock docs/sim/measure.sh [scale1000|scale10000|simreal ...]
# Full outputs (metrics, report) go to runs/sim-measure/; the trimmed summaries to docs/sim/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
OUT=runs/sim-measure
mkdir -p "$OUT"
what=("${@:-scale1000 simreal scale10000}")
trim() {  # summary.json -> docs/sim/NAME.json without the per-node list (its statistics instead)
    $PY - "$1" "$2" <<'PY'
import json, statistics, sys
s = json.load(open(sys.argv[1]))
nodes = s.pop("nodes")
honest = [n["test_accuracy"] for n in nodes if n["role"] != "byzantine"]
s["node_accuracy"] = {"count": len(honest), "min": min(honest), "max": max(honest),
                      "median": statistics.median(honest),
                      "quartiles": statistics.quantiles(honest, n=4) if len(honest) > 1 else honest}
s["bytes_sent_mean"] = statistics.fmean(n["bytes_sent"] for n in nodes)
s["node_rounds"] = sorted({n["rounds"] for n in nodes})
json.dump(s, open(sys.argv[2], "w"), indent=2)
print(sys.argv[2], "honest mean %.4f min %.4f, wall %.1f s, peak %s MiB" % (
    s["honest_accuracy_mean"], s["honest_accuracy_min"], s["wall_time_s"], s.get("peak_rss_mib")))
PY
}
for w in ${what[@]}; do
    case "$w" in
    scale1000)
        /usr/bin/time -v $PY -m p2pnode simulate --nodes 1000 --rounds 50 --task digits --eval-every 10 \
            --eval-samples 360 --out "$OUT/scale-1000" 2> "$OUT/scale-1000.err"
        grep -E "Maximum resident|Elapsed" "$OUT/scale-1000.err" || true
        trim "$OUT/scale-1000/summary.json" docs/sim/scale-1000.json ;;
    scale10000)
        R="${ROUNDS_10K:-20}"
        /usr/bin/time -v $PY -m p2pnode simulate --nodes 10000 --rounds "$R" --task digits --eval-every 5 \
            --eval-samples 360 --plot-nodes 100 --out "$OUT/scale-10000" 2> "$OUT/scale-10000.err"
        grep -E "Maximum resident|Elapsed" "$OUT/scale-10000.err" || true
        trim "$OUT/scale-10000/summary.json" docs/sim/scale-10000.json ;;
    simreal|simreal-seed*)  # simreal: seed 0; simreal-seedS: seed S (files get the suffix -seedS)
        seed=0; tag=""
        if [[ "$w" == simreal-seed* ]]; then seed="${w#simreal-seed}"; tag="-seed$seed"; fi
        $PY -m p2pnode simulate --nodes 8 --task fashion-mnist --rounds 20 --seed "$seed" \
            --out "$OUT/simreal-sim$tag" --no-progress 2> "$OUT/simreal-sim$tag.err"
        trim "$OUT/simreal-sim$tag/summary.json" "docs/sim/simreal-sim$tag.json"
        $PY -m p2pnode swarm --nodes 8 --task fashion-mnist --rounds 20 --seed "$seed" \
            --out "$OUT/simreal-swarm$tag" --no-live > "$OUT/simreal-swarm$tag.log" 2>&1
        trim "$OUT/simreal-swarm$tag/summary.json" "docs/sim/simreal-swarm$tag.json" ;;
    swarm-repeat)  # the real swarm again at seed 0: how much two real runs differ
        $PY -m p2pnode swarm --nodes 8 --task fashion-mnist --rounds 20 --seed 0 \
            --out "$OUT/simreal-swarm-repeat" --no-live > "$OUT/simreal-swarm-repeat.log" 2>&1
        trim "$OUT/simreal-swarm-repeat/summary.json" docs/sim/simreal-swarm-repeat.json ;;
    *) echo "unknown measurement $w" >&2; exit 2 ;;
    esac
done
