"""numabench's own round-trip overhead: the no-op backend answers a batch 8 x seq 128 int64 shard.

Overhead per request = coordinator end-to-end time - the worker's compute time, both measured by
numabench itself in the same run. Goal: <= 200 us at p50.

    .venv/bin/python benchmarks/overhead.py [--iterations 3000] [--instances 1]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from numabench.launcher.launch import LaunchOptions, Workload, plan_for_launch, run_launch
from numabench.topology import read_machine

GOAL_P50_US = 200.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="per instance")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    ap.add_argument("-o", "--output", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, batch=args.batch * args.instances)
    workload = Workload(model="bert-tiny", backend="noop", seq=args.seq, mode="throughput",
                        iterations=args.iterations, warmup=50)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload,
                         LaunchOptions(run_dir=Path(tmp), transport=args.transport, progress=False))
    s = doc["summary"]
    ov, e2e = s["overhead"], s["instances"]["0"]["latency"]
    figures = {
        "iterations": args.iterations, "instances": args.instances, "transport": args.transport,
        "shard": f"{args.batch}x{args.seq} int64",
        "overhead_p50_us": ov["p50_ns"] / 1e3, "overhead_p90_us": ov["p90_ns"] / 1e3,
        "overhead_p99_us": (ov["p99_ns"] or 0) / 1e3, "e2e_p50_us": e2e["p50_ns"] / 1e3,
        "goal_p50_us": GOAL_P50_US, "met": ov["p50_ns"] / 1e3 <= GOAL_P50_US,
    }
    print(f"no-op round trip, {figures['shard']} shard, {args.iterations} requests over {args.transport}: "
          f"overhead p50 {figures['overhead_p50_us']:.1f} us, p90 {figures['overhead_p90_us']:.1f} us, "
          f"p99 {figures['overhead_p99_us']:.1f} us (goal p50 <= {GOAL_P50_US:.0f} us: "
          f"{'met' if figures['met'] else 'NOT met'})")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
