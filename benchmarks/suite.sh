#!/usr/bin/env bash
# The benchmark suite behind benchmarks/README.md, in one run (about 4 minutes on 16 cores).
#   bash benchmarks/suite.sh OUT_DIR        (python3 with numabench importable, numactl on PATH)
set -uo pipefail
out=${1:-bench-out}
mkdir -p "$out"
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
run() { echo "== $*"; "$@"; echo "(exit $?)"; }
run $py -m numabench.cli topology | tee "$out/topology.txt"
run $py benchmarks/overhead.py --iterations 5000 -o "$out/overhead.json"
run $py benchmarks/vs_bare.py --instances 4 --batch 4 --seq 128 --iterations 20 --rounds 2 -o "$out/vs_bare.json"
run $py benchmarks/scaling.py --batch 16 --seq 128 --iterations 10 -o "$out/scaling_split.json"
run $py benchmarks/scaling.py --batch 16 --seq 128 --iterations 10 --mode throughput --instances 1,16 \
    -o "$out/scaling_throughput.json"
