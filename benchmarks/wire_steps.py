"""Where a no-op round trip goes: one ROUTER loop, three echo bodies, rounds alternating.

- `bare`: the worker side is recv_multipart + a constant reply (the transport floor, as in
  overhead.py), the ROUTER side parses nothing.
- `worker`: numabench's own worker code (`Worker.handle`: decode, input check, no-op backend,
  RESULT) answering the same shard every time, as a benchmark sends it; the ROUTER side reads
  the RESULT with `protocol.ResultDecoder`, as the coordinator does.
- `worker-new-shard`: the same, but two shards alternate, so nothing is reused: the worker
  decodes and checks every request in full (what a resent shard saves).

p50 round trip per variant (one request in flight, 8 x 128 int64 shard, ipc), the echo pinned to
the last usable CPU and this loop to the first. No goal: it explains overhead.py's ratio.

    .venv/bin/python benchmarks/wire_steps.py [--iterations 3000] [--rounds 4]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np
import zmq

VARIANTS = ("bare", "worker", "worker-new-shard")


def _echo(endpoint: str, cpu: int, variant: str) -> None:
    os.sched_setaffinity(0, [cpu])
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    if variant == "bare":
        while len(sock.recv_multipart(copy=False)) > 1:
            sock.send(b'{"type":"RESULT"}')
        return
    from numabench.workers.config import WorkerConfig
    from numabench.workers.worker import Worker

    w = Worker(WorkerConfig(instance=0, endpoint=endpoint, model="bert-tiny", backend="noop"), os.getppid())
    w.load_and_warm_up()
    more, RCVMORE = sock.get, zmq.RCVMORE
    while True:  # as Worker._loop receives: every frame as bytes
        frames = [sock.recv()]
        while more(RCVMORE):
            frames.append(sock.recv())
        if len(frames) == 1:
            return
        sock.send(w.handle(frames)[0][0])


def round_trip(variant: str, iterations: int, batch: int, seq: int, cpus: list[int]) -> float:
    from numabench.workers import protocol

    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/echo"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)
        proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(endpoint, cpus[-1], variant))
        proc.start()
        ident, _ = sock.recv_multipart()
        rng = np.random.default_rng(0)
        shards = [protocol.RequestTemplate(protocol.RUN, {"want": "shape"}, protocol.prepare_arrays(
            {"input_ids": rng.integers(0, 1000, size=(batch, seq), dtype=np.int64)})) for _ in range(2)]
        decoder = protocol.ResultDecoder()
        rtt = []
        for i in range(iterations):
            frames = shards[i % 2 if variant == "worker-new-shard" else 0].encode(i)
            t0 = time.monotonic_ns()
            sock.send(ident, zmq.SNDMORE)
            for f in frames[:-1]:
                sock.send(f, zmq.SNDMORE)
            sock.send(frames[-1])
            sock.recv()
            reply = sock.recv()
            if variant != "bare":
                head, _ = decoder.decode([reply])
                assert head["type"] == protocol.RESULT, head
            rtt.append(time.monotonic_ns() - t0)
        sock.send_multipart([ident, b"stop"])
        proc.join(10)
        sock.close(0)
        ctx.term()
    return float(np.percentile(rtt, 50)) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, [cpus[0]])
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            results[v].append(round_trip(v, args.iterations, args.batch, args.seq, cpus))
    floor = statistics.median(results["bare"])
    for v in VARIANTS:
        med = statistics.median(results[v])
        print(f"{v:17s} p50 round trip {med:6.1f} us (rounds {', '.join(f'{x:.0f}' for x in results[v])})"
              f"  {med / floor:.2f}x bare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
