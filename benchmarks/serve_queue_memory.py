"""How much a full `serve` queue costs the daemon: RSS growth at its peak while N large requests
wait, and their latency.

One daemon (noop backend, 1 instance, --queue-size above N, --max-rows 64), one client that sends
N requests of (64, 512) token ids back to back without reading, then waits for all replies.
Reported: the daemon's RSS before, its peak while the queue drains (sampled every 20 ms), after,
and the latency percentiles the daemon itself recorded. Prints one JSON object.

    python benchmarks/serve_queue_memory.py --requests 800 --dtype int8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from numabench.daemon import endpoints
from numabench.daemon.client import Client


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--dtype", default="int8", choices=["int8", "int32", "int64"])
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="numabench-queue-"))
    env = {**os.environ, endpoints.RUNTIME_ENV: str(tmp / "rt")}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "numabench.cli", "serve", "--backend", "noop", "--model", "bert-tiny",
         "--instances", "1", "--queue-size", str(args.requests + 100), "--max-rows", "64",
         "--run-dir", str(tmp / "run")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            doc = endpoints.read_state(tmp / "rt" / endpoints.STATE_FILE)
            if doc and doc.get("pid") == daemon.pid:
                break
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)
        x = np.ones((64, 512), dtype=args.dtype)
        proc = psutil.Process(daemon.pid)
        with Client(doc["endpoint"], timeout_s=60) as c:
            while c.status()["state"] != "serving":
                time.sleep(0.1)
            for _ in range(5):  # warm up the allocator and the first replies
                r = c.infer(input_ids=x, want="outputs")
                assert r.ok, r.header
            before = proc.memory_info().rss
            t0 = time.monotonic()
            for _ in range(args.requests):
                c.send_infer(input_ids=x, want="outputs")
            peak = proc.memory_info().rss
            got = 0
            while got < args.requests:
                if c.sock.poll(20):
                    c.sock.recv_multipart()
                    got += 1
                peak = max(peak, proc.memory_info().rss)
            wall = time.monotonic() - t0
            after = proc.memory_info().rss
            pool = c.status()["pools"][0]
        print(json.dumps({
            "requests": args.requests, "dtype": args.dtype, "request_bytes": int(x.nbytes),
            "rss_before_mib": before >> 20, "rss_peak_mib": peak >> 20, "rss_after_mib": after >> 20,
            "grown_at_peak_mib": (peak - before) >> 20, "wall_s": round(wall, 2),
            "latency_ms": {k: pool["latency_ms"][k] for k in ("p50", "p90", "p99")}}))
    finally:
        daemon.terminate()
        daemon.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
