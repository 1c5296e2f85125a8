"""OpenMP runtime and thread binding inside an instance, compared in one run.

One instance on the given cores runs the same workload (`throughput` mode) under each of
gnu/intel x bound/unbound (`--omp-runtime`, `--pin-threads`), rounds alternating the order; the
figures are each setting's median ratio to gnu unbound (the framework's defaults). What wins
here is what `launch` keeps as its default (see README.md).

    .venv/bin/python benchmarks/thread_settings.py --model bert-base-cased --seq 128 --batch 1 \\
        --iterations 6 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

SETTINGS = [("gnu", False), ("gnu", True), ("intel", False), ("intel", True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cores", type=int, help="cores of the one instance (default: all)")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=1, cores_per_instance=args.cores, batch=args.batch)
    name = {s: f"{s[0]}-{'bound' if s[1] else 'unbound'}" for s in SETTINGS}
    res: dict[str, list[float]] = {n: [] for n in name.values()}
    for k in range(args.rounds):
        for runtime, pin in (SETTINGS if k % 2 == 0 else SETTINGS[::-1]):
            w = Workload(model=args.model, seq=args.seq, mode="throughput", iterations=args.iterations, warmup=5)
            with tempfile.TemporaryDirectory() as t:
                doc = run_launch(machine, plan, w, LaunchOptions(run_dir=Path(t), progress=False,
                                                                 omp_runtime=runtime, pin_threads=pin)).to_dict()
            res[name[runtime, pin]].append(doc["summary"]["throughput"])
        print(f"round {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in res.items()) + " samples/s", flush=True)
    base = res["gnu-unbound"]
    ratios = {n: statistics.median(a / b for a, b in zip(v, base)) for n, v in res.items()}
    print("median ratio to gnu-unbound: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()))
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "seq": args.seq, "batch": args.batch,
                                           "threads": plan.instances[0].threads, "iterations": args.iterations,
                                           "throughput": res, "median_ratio_to_gnu_unbound": ratios},
                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
