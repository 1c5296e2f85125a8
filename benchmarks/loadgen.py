"""Open-loop load generator for `numabench serve`.

N client threads share one fixed request rate: request k is scheduled at start + k / rate and
sent by client k % N at that time, whether or not earlier requests have been answered (open
loop, so a slow server cannot slow the offered load down). Latency is measured from each
request's *scheduled* send time to its reply, so time spent queued behind a late sender counts
too (no coordinated omission). Bounded by --requests and --duration; replies still missing
--drain seconds after the last send are counted as lost.

Talks only to ipc:// or loopback tcp:// endpoints.

    python benchmarks/loadgen.py --rate 200 --clients 4 --requests 2000 --seqs 16,64,300
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numabench.daemon.client import Client  # noqa: E402
from numabench.daemon.endpoints import discover_endpoint, is_local_endpoint  # noqa: E402
from numabench.results import percentile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", help="daemon endpoint (default: the running daemon's)")
    p.add_argument("--clients", "-n", type=int, default=4, help="concurrent clients (threads)")
    p.add_argument("--rate", "-r", type=float, default=100.0, help="requests per second, all clients")
    p.add_argument("--requests", type=int, default=1000, help="requests in all, at most")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of sending, at most")
    p.add_argument("--seqs", default="16,64,256", help="sequence lengths, used in turn")
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--vocab", type=int, default=1000, help="random token ids are below this")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for late replies")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    endpoint = discover_endpoint(args.endpoint)
    if not is_local_endpoint(endpoint):
        raise SystemExit(f"loadgen talks to ipc:// or loopback endpoints only, not {endpoint}")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    total = min(args.requests, int(args.duration * args.rate))
    period_ns = int(1e9 / args.rate)
    rng = np.random.default_rng(0)
    payloads = {s: rng.integers(0, args.vocab, size=(args.rows, s), dtype=np.int64) for s in seqs}
    ctx = zmq.Context()
    start_ns = time.monotonic_ns() + 200_000_000  # let every thread get ready
    records: list[tuple] = []  # (seq, status, pool, latency_ns, send_lag_ns, received_ns)
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        mine = range(k, total, args.clients)
        pending: dict = {}
        out = []
        with Client(endpoint, context=ctx) as c:
            def take(timeout_s: float) -> None:
                reply = c.recv(timeout_s)
                if reply is not None and reply.id in pending:
                    sched, seq, lag = pending.pop(reply.id)
                    out.append((seq, reply.status, reply.pool, reply.received_ns - sched, lag,
                                reply.received_ns))
            for idx in mine:
                sched = start_ns + idx * period_ns
                while (left := sched - time.monotonic_ns()) > 0:
                    take(left / 1e9)
                seq = seqs[idx % len(seqs)]
                rid = c.send_infer(input_ids=payloads[seq], req_id=idx)
                pending[rid] = (sched, seq, time.monotonic_ns() - sched)
            deadline = time.monotonic() + args.drain
            while pending and time.monotonic() < deadline:
                take(max(deadline - time.monotonic(), 0.001))
            out.extend((seq, "lost", None, None, lag, None) for sched, seq, lag in pending.values())
        with lock:
            records.extend(out)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctx.term()
    return report(records, start_ns, total, args)


def report(records: list[tuple], start_ns: int, total: int, args: argparse.Namespace) -> dict:
    ok_times = [r[5] for r in records if r[1] == "ok"]
    span_s = (max(ok_times) - start_ns) / 1e9 if ok_times else 0.0
    pools: dict = defaultdict(lambda: {"ok": 0, "busy": 0, "error": 0, "lost": 0, "lat": []})
    for seq, status, pool, lat, _, _ in records:
        p = pools[pool or f"seq {seq}"]
        p[status] = p.get(status, 0) + 1
        if status == "ok":
            p["lat"].append(lat)
    lags = sorted(r[4] for r in records)
    out = {
        "offered_rate": args.rate, "clients": args.clients, "requests": total,
        "achieved_rate": round(len(ok_times) / span_s, 2) if span_s > 0 else 0.0,
        "send_lag_p99_ms": round(percentile(lags, 99) / 1e6, 3) if lags else None,
        "pools": {},
    }
    for name, p in sorted(pools.items(), key=lambda kv: str(kv[0])):
        lat = sorted(p.pop("lat"))
        out["pools"][name] = {
            **p,
            "p50_ms": round(percentile(lat, 50) / 1e6, 3) if lat else None,
            "p99_ms": round(percentile(lat, 99) / 1e6, 3) if len(lat) >= 100 else None,
        }
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"offered {doc['offered_rate']:.1f} req/s with {doc['clients']} clients, "
          f"{doc['requests']} requests: achieved {doc['achieved_rate']:.1f} req/s served "
          f"(send lag p99 {doc['send_lag_p99_ms']} ms)")
    print(f"{'pool':<10} {'ok':>7} {'busy':>6} {'error':>6} {'lost':>6} {'p50 ms':>9} {'p99 ms':>9}")
    for name, p in doc["pools"].items():
        p99 = "-" if p["p99_ms"] is None else f"{p['p99_ms']:.2f}"
        p50 = "-" if p["p50_ms"] is None else f"{p['p50_ms']:.2f}"
        print(f"{name:<10} {p['ok']:>7} {p['busy']:>6} {p['error']:>6} {p['lost']:>6} {p50:>9} {p99:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
