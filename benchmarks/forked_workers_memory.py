"""What sharing the runtime too would save: PyTorch workers forked from one process that has
imported torch and transformers, vs workers started as fresh interpreters (what `launch` does).

Not numabench's launcher: a measurement for deciding on a fork server. Both sides map the same
shared weights copy on tmpfs (`shared_weights.load_model`), run the same forwards on one thread,
then hold still while every involved process is sampled at once. Total PSS counts the workers,
the parent that forked them (forked side: it holds the imported runtime), and the part of the
copy no worker has mapped. Rounds alternate which side goes first.

    .venv/bin/python benchmarks/forked_workers_memory.py --instances 2 --model bert-base-cased
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from numabench.launcher import memory
from numabench.workers.backends import shared_weights as sw
from numabench.workers.models import resolve_model


def child(model: str, path: str, cpu: int, seq: int, forwards: int) -> None:
    """One worker: pin, map the weights, run forwards, say so, wait until told to exit."""
    os.sched_setaffinity(0, {cpu})
    import numpy as np

    from numabench.workers.backends.pytorch import PyTorchBackend

    backend = PyTorchBackend()
    backend.load(resolve_model(model), "fp32", 1, {"weights_path": path})
    ids = np.random.default_rng(cpu).integers(0, 1000, size=(1, seq), dtype=np.int64)
    for _ in range(forwards):
        backend.run({"input_ids": ids})
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes it


def spawned(args, path: str, n: int) -> tuple[list[subprocess.Popen], list[int]]:
    code = ("import sys; from benchmarks.forked_workers_memory import child; "
            "child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))")
    procs = []
    for k in range(n):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, args.model, path, str(CPUS[k % len(CPUS)]), str(args.seq),
             str(args.forwards)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent))
    return procs, [p.pid for p in procs]


def forked(args, path: str, n: int, outq: Path) -> None:
    """A parent (itself a fresh process) imports the runtime once, then forks the workers."""
    code = ("import sys; from benchmarks.forked_workers_memory import zygote; "
            "zygote(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "
            "sys.argv[6])")
    r = subprocess.run([sys.executable, "-c", code, args.model, path, str(n), str(args.seq),
                        str(args.forwards), str(outq)], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise SystemExit(f"forked side failed: {r.stderr[-2000:]}")


def zygote(model: str, path: str, n: int, seq: int, forwards: int, out: str) -> None:
    import numpy  # noqa: F401
    import torch
    import zmq  # noqa: F401

    from numabench.workers import models

    with torch.device("meta"):  # imports the model's classes, allocates nothing
        models.build_pytorch_model(resolve_model(model), 0, weights=False)
    gc.collect()
    gc.freeze()  # the collector then leaves the inherited objects' pages alone
    kids = []
    for k in range(n):
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.dup2(r_in, 0)
            os.dup2(w_out, 1)
            for fd in (r_in, w_in, r_out, w_out):
                os.close(fd)
            for _, w, f in kids:  # an earlier worker's stdin held open here would never see EOF
                os.close(w)
                f.close()
            sys.stdin = os.fdopen(0, "r")
            sys.stdout = os.fdopen(1, "w")
            try:
                child(model, path, CPUS[k % len(CPUS)], seq, forwards)
            finally:
                os._exit(0)
        os.close(r_in)
        os.close(w_out)
        kids.append((pid, w_in, os.fdopen(r_out)))
    for _, _, f in kids:
        assert f.readline().strip() == "ready"
    pids = [pid for pid, _, _ in kids]
    Path(out).write_text(json.dumps(sample(pids + [os.getpid()], path)))
    for pid, w, _ in kids:
        os.close(w)
        os.waitpid(pid, 0)


def sample(pids: list[int], path: str) -> dict:
    got = [memory.sample(p, [path]) for p in pids]
    return {"pss": sum(g["pss"] for g in got), "anonymous": sum(g["anonymous"] for g in got),
            "mapped": max(g["shared_files"][path].get("rss", 0) for g in got),
            "copied": sum(g["shared_files"][path].get("copied", 0) for g in got)}


def one(args, path: str, size: int, n: int, fork: bool) -> dict:
    if fork:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sample.json"
            forked(args, path, n, out)
            s = json.loads(out.read_text())
    else:
        procs, pids = spawned(args, path, n)
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            s = sample(pids, path)
        finally:
            for p in procs:
                p.stdin.close()
            for p in procs:
                p.wait(60)
    total = s["pss"] + max(0, size - s["mapped"])
    return {"instances": n, "forked": fork, "pss_mb": total / 1e6,
            "anonymous_mb": s["anonymous"] / 1e6, "copied": s["copied"]}


CPUS = sorted(os.sched_getaffinity(0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--forwards", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    # A timeout's SIGTERM still removes the 0.4 GB copy from tmpfs (the with-blocks unwind).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        entry = sw.prepare_cache_entry(resolve_model(args.model), 0, cache)
        path = str(Path(shm) / "weights.safetensors")
        shutil.copyfile(entry.path, path)
        runs = []
        for r in range(args.rounds):
            for fork in ((True, False) if r % 2 == 0 else (False, True)):
                for n in (1, args.instances):
                    runs.append(one(args, path, entry.bytes, n, fork))
                    x = runs[-1]
                    print(f"round {r + 1}: {n} {'forked ' if fork else 'spawned'}: total PSS "
                          f"{x['pss_mb']:.0f} MB (anonymous {x['anonymous_mb']:.0f} MB, copied "
                          f"{x['copied']} B)", flush=True)

    def med(n, fork):
        return statistics.median(x["pss_mb"] for x in runs if x["instances"] == n and x["forked"] == fork)

    n = args.instances
    ratios = {side: med(n, fork) / med(1, fork) for side, fork in (("forked", True), ("spawned", False))}
    print(f"total PSS, {n} instances / 1 (medians): forked {ratios['forked']:.2f}x, "
          f"spawned {ratios['spawned']:.2f}x")
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "seq": args.seq, "instances": n,
                                           "runs": runs, "pss_ratio": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
