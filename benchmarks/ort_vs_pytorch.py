"""ONNX Runtime vs PyTorch on the same plan, in one run.

Both sides run `numabench launch` in `throughput` mode on the same plan (instances, CPUs,
threads, batch per instance), model, sequence length and precision; only --backend differs.
Throughput = samples over the common window. Rounds alternate which backend goes first, so
drift hits both. The ONNX export (or cache check) happens before the workers start and is not
timed; its cache status and its agreement with PyTorch are recorded beside the figures.

    .venv/bin/python benchmarks/ort_vs_pytorch.py --instances 4 --batch 4 --seq 128 \
        --model bert-base-cased -o ort_vs_pytorch.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine

BACKENDS = ("pytorch", "onnxruntime")


def one_run(machine, plan, backend: str, args) -> dict:
    options = {}
    if backend == "onnxruntime":
        options["opt_level"] = args.ort_opt_level
        if args.cache_dir:
            options["cache_dir"] = str(Path(args.cache_dir).resolve())
    workload = Workload(model=args.model, backend=backend, precision=args.precision, seq=args.seq,
                        mode="throughput", iterations=args.iterations, warmup=args.warmup,
                        backend_options=options)
    with tempfile.TemporaryDirectory() as tmp:
        doc = run_launch(machine, plan, workload, LaunchOptions(run_dir=Path(tmp), progress=False)).to_dict()
    s = doc["summary"]
    return {"throughput": s["throughput"], "sum_of_instances": s["throughput_sum"],
            "prepared": doc["environment"].get("backend"),
            "versions": doc["environment"].get("versions", {}),
            "binder": doc["environment"].get("binder")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="per instance")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="bert-base-cased")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--iterations", type=int, default=20, help="requests per instance")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ort-opt-level", default="all", choices=["disable", "basic", "extended", "all"])
    ap.add_argument("--cache-dir", help="ONNX cache folder (default: the user's cache)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=args.instances, batch=args.batch * args.instances)
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for r in range(args.rounds):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]  # ABBA: drift favours neither side
        for backend in order:
            runs[backend].append(one_run(machine, plan, backend, args))
        print(f"round {r + 1}: " + ", ".join(f"{b} {runs[b][-1]['throughput']:.2f} samples/s"
                                            for b in BACKENDS), flush=True)
    med = {b: statistics.median(x["throughput"] for x in runs[b]) for b in BACKENDS}
    ratio = med["onnxruntime"] / med["pytorch"]
    prepared = [x["prepared"] for x in runs["onnxruntime"]]
    agreement = prepared[0]["agreement"] if prepared and prepared[0] else None
    figures = {
        "model": args.model, "precision": args.precision, "seq": args.seq,
        "instances": len(plan.instances), "threads_per_instance": [i.threads for i in plan.instances],
        "batch_per_instance": [i.batch for i in plan.instances], "iterations": args.iterations,
        "rounds": args.rounds, "ort_opt_level": args.ort_opt_level,
        "binder": runs["pytorch"][0]["binder"], "cpu": platform.processor() or platform.machine(),
        "versions": {**runs["pytorch"][0]["versions"], **runs["onnxruntime"][0]["versions"]},
        "pytorch": [x["throughput"] for x in runs["pytorch"]],
        "onnxruntime": [x["throughput"] for x in runs["onnxruntime"]],
        "median": med, "ratio_ort_over_pytorch": ratio,
        "onnx_cache": [p["cache"] if p else None for p in prepared],
        "onnx_exports": sum(p["exports"] for p in prepared if p),
        "agreement": agreement,
    }
    print(f"median throughput: pytorch {med['pytorch']:.2f}, onnxruntime {med['onnxruntime']:.2f} "
          f"samples/s; onnxruntime / pytorch = {ratio:.3f} ({args.rounds} rounds)")
    if agreement:
        print(f"agreement on the check batch: max abs diff {agreement['max_abs_diff']:.3g}, "
              f"correlation {agreement['correlation']:.6f}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
