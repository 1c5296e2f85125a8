"""numabench's own round-trip overhead: the no-op backend answers a batch 8 x seq 128 int64 shard.

Overhead per request = coordinator end-to-end time - the worker's compute time, both measured by
numabench itself, one request in flight and one pass per request (--inflight 1 --loops 1: a
round trip per pass, the cost that pipelining and loops hide in throughput mode, and that every
`serve` request pays). Goal: <= 200 us at p50.

Beside it, in the same run, the floor: a bare pyzmq ROUTER/DEALER echo of the same frames
between two processes, the echo pinned to the worker's CPUs and the ROUTER side where numabench
put its coordinator (no JSON, no numabench code). Rounds alternate which goes first; the ratio
(numabench round trip p50 / bare round trip p50) is the median of the per-round ratios.
Goal: <= 1.3. What lies between the two is numabench's own Python; the floor itself is the
machine's (wake-ups in a VM dominate it).

    .venv/bin/python benchmarks/overhead.py [--iterations 3000] [--instances 1] [--cores-per-instance 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.launcher.placement import coordinator_placement, pin_threads
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_bare import IO_THREADS  # noqa: E402  (--io-threads: the same choices as vs_bare.py)

GOAL_P50_US = 200.0
GOAL_RATIO = 1.3


def _echo(endpoint: str, cpus: list[int]) -> None:
    os.sched_setaffinity(0, cpus)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    while True:
        # Frames as bytes: for small messages cheaper than zero-copy Frame objects.
        frames = sock.recv_multipart()
        if len(frames) == 1:
            return
        sock.send(b'{"type":"RESULT"}')


def transport_floor(iterations: int, batch: int, seq: int, cpus: list[int]) -> float:
    """p50 round trip in us of a bare ROUTER/DEALER echo carrying a (batch, seq) int64 frame."""
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/echo"
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(endpoint)
        proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(endpoint, cpus))
        proc.start()
        ident, _ = sock.recv_multipart()
        # The cheapest pyzmq can do: the shard as bytes (sending a numpy array costs its buffer
        # export, microseconds per send), replies received as bytes.
        shard = np.zeros((batch, seq), dtype=np.int64).tobytes()
        rtt = []
        for _ in range(iterations):
            t0 = time.monotonic_ns()
            sock.send_multipart([ident, b'{"type":"RUN"}', shard])
            sock.recv_multipart()
            rtt.append(time.monotonic_ns() - t0)
        sock.send_multipart([ident, b"stop"])
        proc.join(10)
        sock.close(0)
    return float(np.percentile(rtt, 50)) / 1e3


def numabench_round(machine, plan, args) -> dict:
    workload = Workload(model="bert-tiny", backend="noop", seq=args.seq, mode="throughput",
                        iterations=args.iterations, warmup=50)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload, LaunchOptions(
            run_dir=Path(tmp), transport=args.transport, progress=False, inflight=1, loops=1,
            io_threads_off_cores=args.io_threads_off_cores)).to_dict()
    return doc["summary"]


def floor_round(machine, plan, args) -> float:
    where = coordinator_placement(machine, plan.cpus)
    restore = pin_threads(where.cpus) if not where.shares_cpus_with_workers else (lambda: None)
    try:
        return transport_floor(args.iterations, args.batch, args.seq, list(plan.instances[0].cpus))
    finally:
        restore()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--cores-per-instance", type=int)
    ap.add_argument("--batch", type=int, default=8, help="per instance")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", default="ipc", choices=["ipc", "tcp"])
    ap.add_argument("--io-threads", choices=list(IO_THREADS), default="auto",
                    help="each worker's ZeroMQ threads on its own CPUs (on, as the bare echo has them), "
                         "on a CPU the plan leaves free (off), or numabench's choice (auto: here on)")
    ap.add_argument("-o", "--output", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    args.io_threads_off_cores = IO_THREADS[args.io_threads]

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, cores_per_instance=args.cores_per_instance,
                           batch=args.batch * args.instances)
    rounds = []
    for r in range(args.rounds):
        if r % 2 == 0:
            s, floor = numabench_round(machine, plan, args), floor_round(machine, plan, args)
        else:
            floor, s = floor_round(machine, plan, args), numabench_round(machine, plan, args)
        ov, e2e = s["overhead"], s["instances"]["0"]["latency"]
        rounds.append({
            "overhead_p50_us": ov["p50_ns"] / 1e3, "overhead_p90_us": ov["p90_ns"] / 1e3,
            "overhead_p99_us": (ov["p99_ns"] or 0) / 1e3, "e2e_p50_us": e2e["p50_ns"] / 1e3,
            "to_worker_p50_us": ov["to_worker"]["p50_ns"] / 1e3, "bare_zmq_round_trip_p50_us": floor,
            "ratio": e2e["p50_ns"] / 1e3 / floor})
        print(f"round {r + 1}: numabench no-op round trip p50 {rounds[-1]['e2e_p50_us']:.1f} us "
              f"(overhead {rounds[-1]['overhead_p50_us']:.1f} us), bare pyzmq {floor:.1f} us, "
              f"ratio {rounds[-1]['ratio']:.2f}", flush=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    figures = {
        "iterations": args.iterations, "instances": args.instances, "transport": args.transport,
        "cpus_per_instance": len(plan.instances[0].cpus), "shard": f"{args.batch}x{args.seq} int64",
        "rounds": rounds, **{f"median_{k}": v for k, v in med.items()},
        "goal_p50_us": GOAL_P50_US, "goal_ratio": GOAL_RATIO,
        "met": med["overhead_p50_us"] <= GOAL_P50_US and med["ratio"] <= GOAL_RATIO,
    }
    print(f"no-op round trip, {figures['shard']} shard, {args.iterations} requests over {args.transport}, "
          f"medians of {args.rounds} rounds: overhead p50 {med['overhead_p50_us']:.1f} us (goal <= "
          f"{GOAL_P50_US:.0f}), numabench / bare pyzmq round trip {med['ratio']:.2f} (goal <= "
          f"{GOAL_RATIO}): {'met' if figures['met'] else 'NOT met'}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
