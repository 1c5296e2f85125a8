"""Start-up: how long N instances take to be ready, against one instance, in one run.

Each round launches 1 and N instances (C cores each; order alternating) and reads
`environment.startup.all_ready_s` (first spawn to last READY) from the results. Goal: N
instances ready in at most 1.3x the time one takes (median of the per-round ratios).

    .venv/bin/python benchmarks/startup.py --instances 2 --model bert-base-cased --rounds 3
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

GOAL = 1.3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--cores-per-instance", type=int, default=1)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--start", choices=["fork", "exec"], default="fork", help="how workers are started")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    res: dict[int, list[float]] = {1: [], args.instances: []}
    for k in range(args.rounds):
        for n in ((1, args.instances) if k % 2 == 0 else (args.instances, 1)):
            plan = plan_for_launch(machine, instances=n, cores_per_instance=args.cores_per_instance, batch=n)
            w = Workload(model=args.model, seq=32, mode="throughput", iterations=1, warmup=1)
            with tempfile.TemporaryDirectory() as t:
                doc = run_launch(machine, plan, w, LaunchOptions(run_dir=Path(t), progress=False,
                                                                   start=args.start)).to_dict()
            res[n].append(doc["environment"]["startup"]["all_ready_s"])
        print(f"round {k + 1}: 1 instance {res[1][-1]:.2f} s, {args.instances} instances "
              f"{res[args.instances][-1]:.2f} s", flush=True)
    ratio = statistics.median(b / a for a, b in zip(res[1], res[args.instances]))
    print(f"{args.instances} instances / 1 instance, all ready: {ratio:.2f} (goal <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'NOT met'})")
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "all_ready_s": res, "ratio": ratio,
                                           "goal": GOAL, "met": ratio <= GOAL}, indent=1) + "\n")
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
