"""numabench vs a bare reference loop: same model, shapes, pinning and threads, in one run.

Both sides run N instances with the same plan: numabench in `throughput` mode (each instance
fed over ZeroMQ with --inflight requests outstanding), the reference as N bare processes
(benchmarks/bare_loop.py) started under the same numactl binding and the same thread variables
(count, binding, OpenMP runtime), released together. Throughput = samples over the common window
on both sides. Rounds alternate which side goes first, so drift hits both; the figure is the
median of the per-round ratios. Goal: numabench / bare >= 0.98.

    .venv/bin/python benchmarks/vs_bare.py --instances 2 --batch 2 --seq 128 --model bert-base-cased
    .venv/bin/python benchmarks/vs_bare.py --instances 1 --cores-per-instance 1 --batch 1 --seq 32 \
        --model bert-tiny --iterations 2000
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
IO_THREADS = {"auto": None, "off": True, "on": False}  # -> LaunchOptions.io_threads_off_cores
HERE = Path(__file__).resolve().parent


def bare_run(plan, binder, threading, args) -> float:
    procs = []
    try:
        for inst in plan.instances:
            env, _, _ = binding.worker_env(dict(os.environ), inst, threading=threading)
            argv = binding.bind_prefix(binder, inst) + [
                sys.executable, str(HERE / "bare_loop.py"), "--model", args.model, "--batch",
                str(inst.batch), "--seq", str(args.seq), "--threads", str(inst.threads),
                "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                "--seed", str(inst.id)]
            # Each in its own session, as numabench starts its workers: with the kernel's
            # autogroup scheduling a session is a scheduling group, so sharing one would give the
            # bare loops less CPU than numabench's workers on a machine busy with other work.
            procs.append(subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, start_new_session=True))
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
    BARE_ITERATION.append([statistics.median(o["latency_ns"]) for o in outs])
    return sum(o["samples"] for o in outs) / window * 1e9


# Where the time went, per round: numabench's compute p50 and busy fraction (compute / window)
# per instance; each bare loop's median iteration. Equal compute and busy < 1: the loss is
# between computes (numabench's per-request work, or the machine taking the CPU away).
DIAGNOSTICS: list[dict] = []
BARE_ITERATION: list[list[float]] = []


def numabench_run(machine, plan, args) -> float:
    workload = Workload(model=args.model, backend="pytorch", seq=args.seq, mode="throughput",
                        iterations=args.iterations, warmup=args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload, LaunchOptions(
            run_dir=Path(tmp), progress=False, inflight=args.inflight, loops=args.loops,
            omp_runtime=args.omp_runtime,
            pin_threads=args.pin_threads, io_threads_off_cores=args.io_threads_off_cores)).to_dict()
    s, raw = doc["summary"], doc["raw"]
    busy = [sum(c for c, i in zip(raw["compute_ns"], raw["instance"]) if i == iid) / s["window_ns"]
            for iid in sorted(set(raw["instance"]))]
    DIAGNOSTICS.append({"compute_p50_ns": [p["compute"]["p50_ns"] for p in s["instances"].values()],
                        "busy": busy, "loops": (doc["environment"].get("loops") or {}).get("per_instance")})
    return s["throughput"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--cores-per-instance", type=int, help="default: the machine's cores split evenly")
    ap.add_argument("--inflight", type=int, default=2, help="numabench: requests outstanding per instance")
    ap.add_argument("--loops", type=lambda v: None if v == "auto" else int(v), default=None,
                    help="numabench: forward passes per request (default auto, numabench's own)")
    ap.add_argument("--omp-runtime", choices=["gnu", "intel"], default="gnu", help="both sides")
    ap.add_argument("--no-pin-threads", dest="pin_threads", action="store_false", help="both sides")
    ap.add_argument("--io-threads", choices=IO_THREADS, default="auto",
                    help="numabench: each worker's ZeroMQ threads on its own CPUs (on), on a CPU the "
                         "plan leaves free (off), or numabench's choice (auto: off only for --loops 1 "
                         "with more than one in flight)")
    ap.add_argument("--batch", type=int, default=2, help="per instance")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--iterations", type=int, default=30, help="requests per instance")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    args.io_threads_off_cores = IO_THREADS[args.io_threads]

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, cores_per_instance=args.cores_per_instance,
                           batch=args.batch * args.instances)
    first = plan.instances[0]
    binder = binding.detect_binder("auto", first.cpus[0], first.memory_nodes[0] if first.memory_nodes else None)
    threading = binding.prepare_threading(args.omp_runtime, args.pin_threads)
    bare, nb = [], []
    for r in range(args.rounds):
        # Alternate who goes first (ABBA...), so a drifting machine does not favour one side.
        if r % 2 == 0:
            bare.append(bare_run(plan, binder, threading, args))
            nb.append(numabench_run(machine, plan, args))
        else:
            nb.append(numabench_run(machine, plan, args))
            bare.append(bare_run(plan, binder, threading, args))
        print(f"round {r + 1}: bare {bare[-1]:.2f} samples/s, numabench {nb[-1]:.2f} samples/s "
              f"(bare iteration p50 {min(BARE_ITERATION[-1]) / 1e3:.0f} us; numabench compute p50 "
              f"{min(DIAGNOSTICS[-1]['compute_p50_ns']) / 1e3:.0f} us, loops {DIAGNOSTICS[-1]['loops']}, busy "
              f"{', '.join(f'{b:.2f}' for b in DIAGNOSTICS[-1]['busy'])})", flush=True)
    ratios = [n / b for n, b in zip(nb, bare)]
    ratio = statistics.median(ratios)
    figures = {"model": args.model, "instances": args.instances, "batch_per_instance": args.batch,
               "cpus_per_instance": len(first.cpus), "seq": args.seq, "iterations": args.iterations,
               "binder": binder.name, "inflight": args.inflight, "loops": args.loops or "auto",
               **threading.record(),
               "io_threads_off_cores": args.io_threads_off_cores,
               "bare": bare, "numabench": nb, "ratios": ratios,
               "ratio_of_medians": statistics.median(nb) / statistics.median(bare),
               "ratio": ratio, "goal": GOAL, "met": ratio >= GOAL,
               "diagnostics": {"numabench": DIAGNOSTICS, "bare_iteration_p50_ns": BARE_ITERATION}}
    print(f"numabench / bare throughput (median of {args.rounds} per-round ratios): {ratio:.3f} "
          f"(goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
