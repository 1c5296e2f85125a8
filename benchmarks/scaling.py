"""Batch-size scaling (the article's Figures 7-9) on this machine, in one run.

A total batch B is split over N instances of C/N physical cores each (N = 1, 2, 4, ... up to
the core count), `split` mode: each step sends every instance its shard together and ends when
the last one returns. Prints one row per N: step max latency and throughput over the common
window.

    .venv/bin/python benchmarks/scaling.py --batch 16 --seq 128 --model bert-base-cased
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from numabench.launcher.launch import LaunchOptions, Workload, plan_for_launch, run_launch
from numabench.topology import read_machine


def ms(ns: float | None) -> float | None:
    return None if ns is None else ns / 1e6


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16, help="total batch per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--mode", default="split", choices=["split", "throughput"])
    ap.add_argument("--instances", default=None, help="comma-separated instance counts (default 1,2,4,...)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    cores = len(machine.usable_cores())
    counts = ([int(x) for x in args.instances.split(",")] if args.instances else
              [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= min(cores, args.batch)])
    rows = []
    print(f"{machine.model_name or 'unknown CPU'}: {cores} usable physical cores; model {args.model} "
          f"{args.precision}, batch {args.batch}, seq {args.seq}, {args.mode} mode")
    print(f"{'instances':>9} {'cores/inst':>10} {'step p50 ms':>11} {'step p90 ms':>11} {'samples/s':>10} "
          f"{'sum/inst':>9}")
    for n in counts:
        plan = plan_for_launch(machine, instances=n, batch=args.batch)
        workload = Workload(model=args.model, precision=args.precision, seq=args.seq, mode=args.mode,
                            iterations=args.iterations, warmup=2)
        with tempfile.TemporaryDirectory() as tmp:
            doc = run_launch(machine, plan, workload, LaunchOptions(run_dir=Path(tmp), progress=False))
        s = doc["summary"]
        step = s["step_latency"] or {}
        row = {"instances": n, "cores_per_instance": len(plan.instances[0].cpus),
               "step_p50_ms": ms(step.get("p50_ns")), "step_p90_ms": ms(step.get("p90_ns")),
               "throughput": s["throughput"], "throughput_sum": s["throughput_sum"],
               "binder": doc["environment"]["binder"], "warnings": doc["warnings"]}
        rows.append(row)
        print(f"{n:>9} {row['cores_per_instance']:>10} {fmt(row['step_p50_ms']):>11} {fmt(row['step_p90_ms']):>11} "
              f"{row['throughput']:>10.2f} {row['throughput_sum']:>9.2f}", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"machine": machine.model_name, "cores": cores, "args": vars(args),
                                           "rows": rows}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
