#!/usr/bin/env bash
# The benchmark suite behind benchmarks/README.md, in one run (about 5 minutes on 16 cores).
#   bash benchmarks/suite.sh OUT_DIR        (python3 with numabench importable, numactl on PATH)
set -uo pipefail
out=$(realpath -m "${1:-bench-out}")
mkdir -p "$out"
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
run() { echo "== $*"; "$@"; echo "(exit $?)"; }
run $py -m numabench.cli topology | tee "$out/topology.txt"
run $py benchmarks/overhead.py --iterations 5000 -o "$out/overhead.json"
run $py benchmarks/vs_bare.py --instances 4 --batch 4 --seq 128 --iterations 20 --rounds 2 -o "$out/vs_bare.json"
run $py -m numabench.cli sweep benchmarks/batch-scaling-bert-base.yaml -o "$out/sweep"
run $py -m numabench.cli report "$out/sweep"
rm -rf "$out/sweep/runs"  # logs and second copies of each point's results
tar czf "$out/sweep.tar.gz" -C "$out" sweep && rm -rf "$out/sweep"
run $py benchmarks/ort_vs_pytorch.py --instances 4 --batch 4 --seq 128 --model bert-base-cased --rounds 2 --iterations 10 \
    -o "$out/ort.json"
