"""numabench vs a bare reference loop: same model, shapes, pinning and threads, in one run.

Both sides run N instances with the same plan: numabench in `throughput` mode (each instance
closed-loop over ZeroMQ), the reference as N bare processes (benchmarks/bare_loop.py) started
under the same numactl binding, released together. Throughput = samples over the common window
on both sides. Rounds alternate which side goes first, so drift hits both.
Goal: numabench / bare >= 0.98.

    .venv/bin/python benchmarks/vs_bare.py --instances 2 --batch 2 --seq 128 --model bert-base-cased
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from numabench.launcher import binding
from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

GOAL = 0.98
HERE = Path(__file__).resolve().parent


def bare_run(plan, binder, args) -> float:
    procs = []
    try:
        for inst in plan.instances:
            env, _, _ = binding.worker_env(dict(os.environ), inst)
            argv = binding.bind_prefix(binder, inst) + [
                sys.executable, str(HERE / "bare_loop.py"), "--model", args.model, "--batch",
                str(inst.batch), "--seq", str(args.seq), "--threads", str(inst.threads),
                "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                "--seed", str(inst.id)]
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True))
        for p in procs:  # all loaded and warmed up before anyone starts: the common window
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a bare loop failed to start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:  # each exits after printing; one that hangs is killed
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    window = max(o["end_ns"] for o in outs) - min(o["start_ns"] for o in outs)
    return sum(o["samples"] for o in outs) / window * 1e9


def numabench_run(machine, plan, args) -> float:
    workload = Workload(model=args.model, backend="pytorch", seq=args.seq, mode="throughput",
                        iterations=args.iterations, warmup=args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload, LaunchOptions(run_dir=Path(tmp), progress=False)).to_dict()
    return doc["summary"]["throughput"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="per instance")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--iterations", type=int, default=30, help="requests per instance")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, batch=args.batch * args.instances)
    first = plan.instances[0]
    binder = binding.detect_binder("auto", first.cpus[0], first.memory_nodes[0] if first.memory_nodes else None)
    bare, nb = [], []
    for r in range(args.rounds):
        # Alternate who goes first (ABBA...), so a drifting machine does not favour one side.
        if r % 2 == 0:
            bare.append(bare_run(plan, binder, args))
            nb.append(numabench_run(machine, plan, args))
        else:
            nb.append(numabench_run(machine, plan, args))
            bare.append(bare_run(plan, binder, args))
        print(f"round {r + 1}: bare {bare[-1]:.2f} samples/s, numabench {nb[-1]:.2f} samples/s", flush=True)
    ratio = statistics.median(nb) / statistics.median(bare)
    figures = {"model": args.model, "instances": args.instances, "batch_per_instance": args.batch,
               "seq": args.seq, "iterations": args.iterations, "binder": binder.name,
               "bare": bare, "numabench": nb, "ratio": ratio, "goal": GOAL, "met": ratio >= GOAL}
    print(f"numabench / bare throughput (medians of {args.rounds} rounds): {ratio:.3f} "
          f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
