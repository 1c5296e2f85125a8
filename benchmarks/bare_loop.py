"""The bare reference loop: one pinned process running the model directly, no numabench, no ZeroMQ.

Started by vs_bare.py under the same numactl binding and thread variables as a numabench
instance. Protocol on stdio: prints "ready" after load and warm-up, waits for "go", runs,
prints one JSON line with its timings.
"""
from __future__ import annotations

import argparse
import json
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
        print("ready", flush=True)
        sys.stdin.readline()
        lat = []
        start = time.monotonic_ns()
        for _ in range(args.iterations):
            t0 = time.monotonic_ns()
            model(input_ids=ids, attention_mask=mask)
            lat.append(time.monotonic_ns() - t0)
        end = time.monotonic_ns()
    print(json.dumps({"start_ns": start, "end_ns": end, "samples": args.batch * args.iterations,
                      "latency_ns": lat}), flush=True)


if __name__ == "__main__":
    main()
