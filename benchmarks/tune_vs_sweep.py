"""`numabench tune` vs an exhaustive sweep of the same space: the tuned plan's throughput against
the sweep's best point, and the wall time of each.

1. tune: `run_tune` with the budget given (successive halving, run-level finals);
2. sweep: every candidate of the same space (the same `expand_space`), `--repetitions` runs each
   at the tune's confirm length; its best point is the highest median throughput;
3. head to head: the tuned plan and the sweep's best, `--rounds` runs each, alternating which
   goes first, compared on run-level throughput (`compare_runs`: ratio of medians, bootstrap CI,
   permutation p). Skipped when both chose the same plan.

    .venv/bin/python benchmarks/tune_vs_sweep.py --model bert-tiny --seq 32 \\
        --batch-per-instance 1,2,4,8 --budget 60 -o /tmp/tune-vs-sweep
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from numabench.experiments.tune import (
    Objective,
    TuneSpec,
    compare_runs,
    expand_space,
    installed_allocators,
    run_tune,
    strategy_for,
)
from numabench.launcher.launch import LaunchOptions, run_launch
from numabench.topology import read_machine


def ints(text: str | None):
    return tuple(int(x) for x in text.split(",")) if text else None


def launch(machine, plan, cand, seconds, spec, run_dir: Path) -> float:
    doc = run_launch(machine, plan, cand.workload(seconds, spec.warmup, spec.seed),
                     LaunchOptions(run_dir=run_dir, allocator=cand.allocator, progress=False))
    return float(doc.to_dict()["summary"]["throughput"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-tiny")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", help="global batch(es), e.g. 8")
    ap.add_argument("--batch-per-instance", help="per-instance batches searched, e.g. 1,2,4,8")
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--repetitions", type=int, default=3, help="sweep runs per point")
    ap.add_argument("--rounds", type=int, default=4, help="head-to-head runs per side")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    machine = read_machine("/")
    spec = TuneSpec(model=args.model, seq=args.seq, name="tune-vs-sweep", batches=ints(args.batch),
                    batch_per_instance=ints(args.batch_per_instance), objective=Objective("throughput"),
                    budget_s=args.budget)
    confirm_s = strategy_for(spec).confirm_s

    t0 = time.monotonic()
    tuned = run_tune(machine, spec, out / "tune", resume=(out / "tune" / "manifest.json").exists())
    tune_wall = time.monotonic() - t0
    print(tuned.summary, flush=True)
    chosen = tuned.decision.chosen.candidate

    space = expand_space(spec, machine, installed_allocators())
    t0 = time.monotonic()
    sweep: dict[str, list[float]] = {}
    for rep in range(args.repetitions):  # repetitions outermost, as sweeps run them
        for c in space.candidates:
            tput = launch(machine, space.plans[c.id], c, confirm_s, spec,
                          out / "sweep" / f"{c.id}_r{rep}")
            sweep.setdefault(c.id, []).append(tput)
            print(f"sweep r{rep} {c.label}: {tput:.1f} samples/s", file=sys.stderr, flush=True)
    sweep_wall = time.monotonic() - t0
    best_id = max(sweep, key=lambda k: statistics.median(sweep[k]))
    best = next(c for c in space.candidates if c.id == best_id)

    head = None
    if best.id != chosen.id:
        a_runs, b_runs = [], []
        for r in range(args.rounds):
            pair = [(chosen, b_runs), (best, a_runs)]
            for cand, sink in (pair if r % 2 == 0 else pair[::-1]):
                sink.append(launch(machine, space.plans[cand.id], cand, confirm_s, spec,
                                   out / "head" / f"{cand.id}_h{r}"))
        cmp = compare_runs(a_runs, b_runs, metric="throughput")
        head = {"sweep_best_runs": a_runs, "tuned_runs": b_runs, **cmp.to_dict()}

    result = {
        "machine": machine.model_name, "cores": len(machine.usable_cores()), "model": args.model,
        "seq": args.seq, "budget_s": args.budget, "candidates": len(space.candidates),
        "pruned": len(space.pruned),
        "tune": {"wall_s": round(tune_wall, 1), "trials": len(tuned.log.measurements),
                 "chosen": chosen.id, "throughput": tuned.decision.chosen.throughput,
                 "confidence": tuned.decision.confidence, "stopped": tuned.log.stopped},
        "sweep": {"wall_s": round(sweep_wall, 1), "runs": sum(len(v) for v in sweep.values()),
                  "repetitions": args.repetitions, "best": best.id,
                  "best_throughput": statistics.median(sweep[best.id]),
                  "tuned_in_sweep": statistics.median(sweep[chosen.id]),
                  "medians": {k: statistics.median(v) for k, v in sweep.items()}},
        "head_to_head": head or "same plan",
    }
    (out / "tune_vs_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    ratio = result["sweep"]["tuned_in_sweep"] / result["sweep"]["best_throughput"]
    print(f"\ntune: {chosen.label} in {tune_wall:.0f} s ({len(tuned.log.measurements)} trials); "
          f"sweep best: {best.label} in {sweep_wall:.0f} s ({result['sweep']['runs']} runs); "
          f"tuned / best in the sweep's own runs: {ratio:.3f}; time ratio {tune_wall / sweep_wall:.2f}")
    if head:
        print(f"head to head ({args.rounds} runs a side): tuned / sweep best = {head['ratio']:.3f}, "
              f"95% CI {head['ci']}, p {head['p']}, verdict for tuned: {head['verdict']}")
    else:
        print("head to head: the tune and the sweep chose the same plan")
    return 0


if __name__ == "__main__":
    sys.exit(main())
