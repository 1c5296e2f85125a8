"""Shared weights vs private weights: memory, throughput and start-up, in one run.

Four launches per round, PyTorch, `throughput` mode: 1 and N instances, each with the weights
shared (one read-only copy per NUMA node, `--share-weights`, the default) and private
(`--no-share-weights`). Memory is each worker's PSS, sampled by the launcher at the end of
measuring (results: instances.*.got.memory.measured), summed over the workers, plus the part of
the tmpfs copies no worker maps (it is in memory all the same). Throughput is compared at N
instances only. Rounds alternate which side goes first, so drift hits both.

Launches on a busy machine swing by tens of percent between rounds, more than the 2% the
throughput goal resolves, so the speed of shared weights is also measured head to head: one
process, one thread, the private and the shared model of the same weights, forwards alternating
(`--interleaved` blocks), median time per forward; run twice, in fresh processes, with each model
built first once (the order of construction can matter more than sharing).

Goals: total PSS of N shared instances <= 1.35x one instance (N = 2 on a 2-vCPU machine);
throughput shared / private >= 0.98. Start-up: per-instance load time and the time until all N are READY, N vs 1.

    .venv/bin/python benchmarks/shared_weights.py --instances 2 --seq 64 --model bert-base-cased
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

PSS_GOAL = 1.35
THROUGHPUT_GOAL = 0.98


def one(machine, n: int, shared: bool, args) -> dict:
    plan = plan_for_launch(machine, instances=n, batch=args.batch * n)
    # One instance is measured for memory and start-up only: a few requests are enough.
    iterations = args.iterations if n > 1 else min(args.iterations, 5)
    workload = Workload(model=args.model, backend="pytorch", precision=args.precision,
                        seq=args.seq, mode="throughput", iterations=iterations,
                        warmup=args.warmup, share_weights=shared)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload,
                         LaunchOptions(run_dir=Path(tmp), progress=False, start=args.start)).to_dict()
    got = [i["got"] for i in doc["instances"].values()]
    mem = [g["memory"]["measured"] for g in got]
    record = doc["environment"].get("backend", {}).get("shared_weights", {})
    # The tmpfs copy is in memory whole, mapped or not: count the pages no worker has mapped
    # (at least file size - the largest mapping's resident size) on top of the workers' PSS.
    unmapped = 0
    if record.get("placement") == "tmpfs":
        mapped = max(sum(f.get("rss", 0) for f in m.get("shared_files", {}).values()) for m in mem)
        unmapped = max(0, record["file_bytes"] * len(record["copies"]) - mapped)
    # Forked workers share the pages their fork server imported: its share counts too.
    servers = [s["memory"]["measured"] for s in doc["environment"]["start"]["servers"]]
    server_pss = sum(s["pss"] for s in servers)
    return {"instances": n, "shared": shared, "throughput": doc["summary"]["throughput"],
            "pss_mb": (sum(m["pss"] for m in mem) + unmapped + server_pss) / 1e6,
            "fork_server_pss_mb": server_pss / 1e6, "start": doc["environment"]["start"]["method"],
            # per instance: where a throughput difference comes from (compute or between requests)
            "compute_p50_ms": [round(i["compute"]["p50_ns"] / 1e6, 2) for i in doc["summary"]["instances"].values()],
            "unmapped_copy_mb": unmapped / 1e6,
            "anonymous_mb": sum(m.get("anonymous", 0) for m in mem) / 1e6,
            "rss_mb": sum(m["rss"] for m in mem) / 1e6,
            "load_s": [round(g["load_ns"] / 1e9, 3) for g in got],
            # From the first spawn to the last READY: the run's whole start-up.
            "all_ready_s": doc["environment"]["startup"]["all_ready_s"],
            "placement": record.get("placement")}


def interleaved(model: str, seq: int, blocks: int, shared_first: bool) -> dict:
    """In this process (a fresh one): private and shared model, forwards alternating."""
    import time

    import numpy as np

    from numabench.workers.backends import shared_weights as sw
    from numabench.workers.backends.pytorch import PyTorchBackend
    from numabench.workers.models import resolve_model

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    spec = resolve_model(model)
    prep = sw.prepare_shared_weights(spec, 0, [()])
    try:
        models = {}
        for shared in (shared_first, not shared_first):
            models[shared] = PyTorchBackend()
            models[shared].load(spec, "fp32", 1, {"weights_path": prep.paths[()]} if shared else {},
                                seed=0)
        ids = np.random.default_rng(0).integers(0, spec.vocab_size or 1000, size=(1, seq))
        outs = {k: m.run({"input_ids": ids}) for k, m in models.items()}  # also warms up
        same = bool(np.array_equal(outs[True], outs[False]))
        times: dict[bool, list[float]] = {True: [], False: []}
        for b in range(blocks):
            for shared in ((True, False) if b % 2 == 0 else (False, True)):
                t = time.perf_counter()
                models[shared].run({"input_ids": ids})
                times[shared].append(time.perf_counter() - t)
    finally:
        sw.remove_copies(prep.temporary)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shared_first": shared_first, "outputs_identical": same,
            "shared_ms": med[True] * 1e3, "private_ms": med[False] * 1e3,
            # Throughput ratio: time per forward, private / shared.
            "throughput_ratio": med[False] / med[True]}


def _interleaved_in_child(args, shared_first: bool) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from shared_weights import "
            "interleaved; print(json.dumps(interleaved(sys.argv[2], int(sys.argv[3]), "
            "int(sys.argv[4]), sys.argv[5] == '1')))")
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), args.model,
                        str(args.seq), str(args.interleaved), "1" if shared_first else "0"],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"interleaved comparison failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="per instance")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--iterations", type=int, default=40, help="requests per instance")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--start", choices=["fork", "exec"], default="fork",
                    help="how the launcher starts workers (fork: the default, its servers counted)")
    ap.add_argument("--interleaved", type=int, default=30,
                    help="forwards per model in the head-to-head comparison (0: skip it)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    runs: list[dict] = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for shared in order:
            for n in (1, args.instances):
                runs.append(one(machine, n, shared, args))
                x = runs[-1]
                print(f"round {r + 1}: {n} instance(s), {'shared ' if shared else 'private'}: "
                      f"PSS {x['pss_mb']:.0f} MB (anonymous {x['anonymous_mb']:.0f} MB), "
                      f"compute p50 {x['compute_p50_ms']} ms, "
                      f"{x['throughput']:.2f} samples/s, load {x['load_s']} s, all ready {x['all_ready_s']:.1f} s",
                      flush=True)

    def med(n, shared, key):
        return statistics.median(x[key] for x in runs if x["instances"] == n and x["shared"] == shared)

    def load(n, shared):
        return statistics.median(s for x in runs if x["instances"] == n and x["shared"] == shared
                                 for s in x["load_s"])

    head_to_head = [_interleaved_in_child(args, first) for first in (True, False)] \
        if args.interleaved else []
    for h in head_to_head:
        print(f"head to head ({'shared' if h['shared_first'] else 'private'} model built first): "
              f"shared {h['shared_ms']:.1f} ms, private {h['private_ms']:.1f} ms per forward, "
              f"throughput ratio {h['throughput_ratio']:.3f}, outputs identical: "
              f"{h['outputs_identical']}", flush=True)

    n = args.instances
    pss_shared = med(n, True, "pss_mb") / med(1, True, "pss_mb")
    pss_private = med(n, False, "pss_mb") / med(1, False, "pss_mb")
    tput = med(n, True, "throughput") / med(n, False, "throughput")
    figures = {
        "model": args.model, "precision": args.precision, "seq": args.seq,
        "batch_per_instance": args.batch, "instances": n, "iterations": args.iterations,
        "runs": runs,
        "pss_ratio_shared": pss_shared, "pss_ratio_private": pss_private,
        "throughput_ratio": tput,
        "head_to_head": head_to_head,
        "load_s_median": {f"{k}x{'shared' if s else 'private'}": load(k, s)
                          for k in (1, n) for s in (True, False)},
        "all_ready_s_median": {f"{k}x{'shared' if s else 'private'}": med(k, s, "all_ready_s")
                               for k in (1, n) for s in (True, False)},
        "startup_ratio": {"shared": med(n, True, "all_ready_s") / med(1, True, "all_ready_s"),
                          "private": med(n, False, "all_ready_s") / med(1, False, "all_ready_s")},
        "goals": {"pss_ratio_shared": PSS_GOAL, "throughput_ratio": THROUGHPUT_GOAL},
        "met": pss_shared <= PSS_GOAL and tput >= THROUGHPUT_GOAL,
    }
    print(f"total PSS, {n} instances / 1 (medians of {args.rounds} rounds): shared {pss_shared:.2f}x "
          f"(goal <= {PSS_GOAL}: {'met' if pss_shared <= PSS_GOAL else 'NOT met'}), "
          f"private {pss_private:.2f}x")
    print(f"throughput shared / private, {n} instances: {tput:.3f} "
          f"(goal >= {THROUGHPUT_GOAL}: {'met' if tput >= THROUGHPUT_GOAL else 'NOT met'})")
    print("load time per instance (median s): " + ", ".join(
        f"{k}: {v:.2f}" for k, v in figures["load_s_median"].items()))
    print(f"start-up, first spawn to all READY, {n} instances / 1: shared "
          f"{figures['startup_ratio']['shared']:.2f}x, private {figures['startup_ratio']['private']:.2f}x "
          "(" + ", ".join(f"{k}: {v:.2f} s" for k, v in figures["all_ready_s_median"].items()) + ")")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
