"""Is reading one shared weights copy from several processes at once slower than each reading
its own? N processes, one per CPU, each holding the same weights twice: a private model (its
own memory) and a shared one (mapping one tmpfs safetensors file, as `--share-weights` does).
All processes run blocks of forwards together (a barrier before each block), alternating which
model goes first; the figure is each process's median time per forward, shared / private.

    .venv/bin/python benchmarks/shared_weights_concurrent.py --model bert-base-cased --seq 64
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def child(cpu: int, path: str, bar, q, args) -> None:
    os.sched_setaffinity(0, {cpu})
    import numpy as np
    import torch

    from numabench.workers.backends import shared_weights as sw
    from numabench.workers.models import build_pytorch_model, resolve_model

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    spec = resolve_model(args.model)
    models = {"private": build_pytorch_model(spec, 0).eval(), "shared": sw.load_model(spec, path).eval()}
    ids = torch.from_numpy(np.random.default_rng(cpu).integers(0, 1000, size=(1, args.seq)))
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {"private": [], "shared": []}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(input_ids=ids, attention_mask=mask)
        for b in range(args.blocks):
            for name in (("private", "shared") if b % 2 == 0 else ("shared", "private")):
                bar.wait()
                t = time.perf_counter_ns()
                for _ in range(args.forwards):
                    models[name](input_ids=ids, attention_mask=mask)
                times[name].append((time.perf_counter_ns() - t) / args.forwards / 1e6)
    q.put((cpu, times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--forwards", type=int, default=8, help="per block")
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    from numabench.workers.backends import shared_weights as sw
    from numabench.workers.models import build_pytorch_model, resolve_model

    folder = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        path = os.path.join(folder, "weights.safetensors")
        sw.save_model_file(build_pytorch_model(resolve_model(args.model), 0).eval(), Path(path))
        ctx = mp.get_context("spawn")
        bar, q = ctx.Barrier(args.processes), ctx.Queue()
        cpus = sorted(os.sched_getaffinity(0))
        procs = [ctx.Process(target=child, args=(cpus[k % len(cpus)], path, bar, q, args))
                 for k in range(args.processes)]
        for p in procs:
            p.start()
        got = sorted(q.get() for _ in procs)
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = []
    for cpu, times in got:
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["shared"] / med["private"]
        out.append({"cpu": cpu, "ms_per_forward": med, "shared_over_private_time": ratio})
        print(f"CPU {cpu}: private {med['private']:.2f} ms, shared {med['shared']:.2f} ms per forward; "
              f"shared / private time {ratio:.3f}")
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "seq": args.seq, "results": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
