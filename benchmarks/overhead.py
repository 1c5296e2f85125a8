"""numabench's own round-trip overhead: the no-op backend answers a batch 8 x seq 128 int64 shard.

Overhead per request = coordinator end-to-end time - the worker's compute time, both measured by
numabench itself in the same run. Goal: <= 200 us at p50.

Beside it, in the same run, the floor: a bare pyzmq ROUTER/DEALER echo of the same frames
between two processes, the echo pinned to the same CPUs (no JSON, no numabench code). What lies
between the two is numabench's own Python; the floor itself is the machine's (wake-ups in a VM
dominate it).

    .venv/bin/python benchmarks/overhead.py [--iterations 3000] [--instances 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

GOAL_P50_US = 200.0


def _echo(endpoint: str, cpus: list[int]) -> None:
    os.sched_setaffinity(0, cpus)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    while True:
        frames = sock.recv_multipart(copy=False)
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
        shard = np.zeros((batch, seq), dtype=np.int64)
        rtt = []
        for _ in range(iterations):
            t0 = time.monotonic_ns()
            sock.send_multipart([ident, b'{"type":"RUN"}', shard])
            sock.recv_multipart(copy=False)
            rtt.append(time.monotonic_ns() - t0)
        sock.send_multipart([ident, b"stop"])
        proc.join(10)
        sock.close(0)
    return float(np.percentile(rtt, 50)) / 1e3


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
                         LaunchOptions(run_dir=Path(tmp), transport=args.transport, progress=False)).to_dict()
    floor = transport_floor(args.iterations, args.batch, args.seq, list(plan.instances[0].cpus))
    s = doc["summary"]
    ov, e2e = s["overhead"], s["instances"]["0"]["latency"]
    figures = {
        "iterations": args.iterations, "instances": args.instances, "transport": args.transport,
        "shard": f"{args.batch}x{args.seq} int64",
        "overhead_p50_us": ov["p50_ns"] / 1e3, "overhead_p90_us": ov["p90_ns"] / 1e3,
        "overhead_p99_us": (ov["p99_ns"] or 0) / 1e3, "e2e_p50_us": e2e["p50_ns"] / 1e3,
        "to_worker_p50_us": ov["to_worker"]["p50_ns"] / 1e3,
        "bare_zmq_round_trip_p50_us": floor,
        "goal_p50_us": GOAL_P50_US, "met": ov["p50_ns"] / 1e3 <= GOAL_P50_US,
    }
    print(f"no-op round trip, {figures['shard']} shard, {args.iterations} requests over {args.transport}: "
          f"overhead p50 {figures['overhead_p50_us']:.1f} us, p90 {figures['overhead_p90_us']:.1f} us, "
          f"p99 {figures['overhead_p99_us']:.1f} us; of the p50, coordinator to worker "
          f"{figures['to_worker_p50_us']:.1f} us (goal p50 <= {GOAL_P50_US:.0f} us: "
          f"{'met' if figures['met'] else 'NOT met'}); bare pyzmq round trip of the same frames "
          f"in the same run: p50 {floor:.1f} us")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
