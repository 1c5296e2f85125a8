"""The bare reference loop: one pinned process running the model directly, no numabench, no ZeroMQ.

Started by vs_bare.py under the same numactl binding and thread variables as a numabench
instance. Protocol on stdio: prints "ready" after load and warm-up, waits for "go", runs,
prints one JSON line with its timings. With --go-file (vs_run_cpu.py, where run_cpu owns the
processes' stdio) it creates <go-file>.ready.<pid> instead, waits for the go file to exist and writes its JSON
to <result-file>.<pid>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--iterations", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--go-file", help="wait for this file instead of a line on stdin")
    ap.add_argument("--result-file", help="write the JSON here instead of stdout")
    args = ap.parse_args()

    import numpy as np
    import torch

    from numabench.workers.models import build_pytorch_model, resolve_model

    spec = resolve_model(args.model)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = build_pytorch_model(spec, args.seed).eval()
    rng = np.random.default_rng(args.seed)
    ids = torch.from_numpy(rng.integers(0, spec.vocab_size or 1000, size=(args.batch, args.seq), dtype=np.int64))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(input_ids=ids, attention_mask=mask)
        if args.go_file:
            open(f"{args.go_file}.ready.{os.getpid()}", "w").close()  # run_cpu gives all the same args
            while not os.path.exists(args.go_file):
                time.sleep(0.001)
        else:
            print("ready", flush=True)
            sys.stdin.readline()
        lat = []
        start = time.monotonic_ns()
        for _ in range(args.iterations):
            t0 = time.monotonic_ns()
            model(input_ids=ids, attention_mask=mask)
            lat.append(time.monotonic_ns() - t0)
        end = time.monotonic_ns()
    result = json.dumps({"start_ns": start, "end_ns": end, "samples": args.batch * args.iterations,
                         "latency_ns": lat, "affinity": sorted(os.sched_getaffinity(0)),
                         "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LD_PRELOAD",
                                                                "KMP_AFFINITY", "KMP_BLOCKTIME",
                                                                "OMP_PLACES", "OMP_PROC_BIND")}})
    if args.result_file:
        with open(f"{args.result_file}.{os.getpid()}", "w") as f:
            f.write(result + "\n")
    else:
        print(result, flush=True)


if __name__ == "__main__":
    main()
