"""numabench vs PyTorch's own launcher, `python -m torch.backends.xeon.run_cpu`, in one run.

Both sides run N instances of C cores on the same CPUs (run_cpu gets numabench's plan as its
--core-list), the same model, batch and sequence length: numabench in `throughput` mode (its
defaults: --inflight 2, threads bound one per CPU), run_cpu running the bare loop
(benchmarks/bare_loop.py) in each instance with run_cpu's own settings (numactl -C/-m,
OMP_NUM_THREADS; with --omp-runtime intel its libiomp5 preload, KMP_AFFINITY compact and
KMP_BLOCKTIME=1; with gnu, --disable-iomp). The bare loops are released together once all are
warm, so both sides are timed over a common window. Rounds alternate which side goes first; the
figure is the median of the per-round ratios. Goal: numabench ahead or equal (ratio >= 1.0).

    .venv/bin/python benchmarks/vs_run_cpu.py --instances 2 --cores-per-instance 1 --batch 1 \\
        --seq 32 --model bert-tiny --iterations 1000
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_bare import numabench_run  # noqa: E402

from numabench.launcher import binding  # noqa: E402
from numabench.plans import plan_for_launch  # noqa: E402
from numabench.topology import read_machine  # noqa: E402

GOAL = 1.0


def run_cpu_round(plan, args) -> tuple[float, dict]:
    """Throughput (samples/s over the common window) of run_cpu running N bare loops."""
    cpus = [c for inst in plan.instances for c in inst.cpus]
    with tempfile.TemporaryDirectory() as tmp:
        go, result = os.path.join(tmp, "go"), os.path.join(tmp, "result")
        argv = [sys.executable, "-m", "torch.backends.xeon.run_cpu",
                "--ninstances", str(len(plan.instances)),
                "--ncores-per-instance", str(len(plan.instances[0].cpus)),
                "--core-list", ",".join(str(c) for c in cpus), "--use-default-allocator"]
        if args.omp_runtime == "gnu":
            argv.append("--disable-iomp")
        argv += [str(HERE / "bare_loop.py"), "--model", args.model, "--batch", str(args.batch),
                 "--seq", str(args.seq), "--threads", str(len(plan.instances[0].cpus)),
                 "--iterations", str(args.iterations), "--warmup", str(args.warmup),
                 "--go-file", go, "--result-file", result]
        # run_cpu looks for libiomp5.so in $VIRTUAL_ENV/lib (where the intel-openmp wheel puts it).
        env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
        # Its own session, like each numabench worker; run_cpu's instances then share that one
        # session (its own way of starting them): under autogroup scheduling on a busy machine
        # that gives them less CPU than N sessions would. Read ratios from a quiet machine.
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while len(glob.glob(go + ".ready.*")) < len(plan.instances):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"run_cpu failed before its instances were ready:\n{proc.stderr.read()}")
                time.sleep(0.01)
            open(go, "w").close()  # release every instance at once
            _, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"run_cpu exited with {proc.returncode}:\n{err}")
        outs = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(result + ".*"))]
    if len(outs) != len(plan.instances):
        raise SystemExit(f"expected {len(plan.instances)} results from run_cpu, got {len(outs)}")
    window = max(o["end_ns"] for o in outs) - min(o["start_ns"] for o in outs)
    seen = {"affinity": [o["affinity"] for o in outs], "env": outs[0]["env"]}
    return sum(o["samples"] for o in outs) / window * 1e9, seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--cores-per-instance", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="per instance")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--model", default="bert-tiny")
    ap.add_argument("--iterations", type=int, default=1000, help="requests per instance")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--inflight", type=int, default=2)
    ap.add_argument("--loops", type=lambda v: None if v == "auto" else int(v), default=None,
                    help="numabench: forward passes per request (default auto, numabench's own)")
    ap.add_argument("--omp-runtime", choices=["gnu", "intel"], default="gnu", help="both sides")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    args.pin_threads = True  # numabench's default; run_cpu keeps its own
    args.io_threads_off_cores = None  # numabench's default

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, cores_per_instance=args.cores_per_instance,
                           batch=args.batch * args.instances)
    binding.prepare_threading(args.omp_runtime)  # refuse a missing libiomp5 before anything runs
    rc, nb, seen = [], [], {}
    for r in range(args.rounds):
        if r % 2 == 0:
            t, seen = run_cpu_round(plan, args)
            rc.append(t)
            nb.append(numabench_run(machine, plan, args))
        else:
            nb.append(numabench_run(machine, plan, args))
            t, seen = run_cpu_round(plan, args)
            rc.append(t)
        print(f"round {r + 1}: run_cpu {rc[-1]:.2f} samples/s, numabench {nb[-1]:.2f} samples/s "
              f"(ratio {nb[-1] / rc[-1]:.3f})", flush=True)
    ratios = [n / b for n, b in zip(nb, rc)]
    ratio = statistics.median(ratios)
    figures = {"model": args.model, "instances": args.instances, "cores_per_instance": args.cores_per_instance,
               "batch_per_instance": args.batch, "seq": args.seq, "iterations": args.iterations,
               "omp_runtime": args.omp_runtime, "inflight": args.inflight, "run_cpu_saw": seen,
               "run_cpu": rc, "numabench": nb, "ratios": ratios, "ratio": ratio, "goal": GOAL,
               "met": ratio >= GOAL}
    print(f"numabench / run_cpu throughput (median of {args.rounds} per-round ratios): {ratio:.3f} "
          f"(goal >= {GOAL}: {'met' if figures['met'] else 'NOT met'})")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
