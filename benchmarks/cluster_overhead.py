"""What running a sweep on Ray costs: the same sweep of no-op points locally and on a Ray test cluster.

Each point is a real numabench launch of one no-op instance (worker start, READY, a few
requests, stop), so a point costs what a launch costs without a model. The sweep runs:

  local     `run_sweep` here, points one after the other
  ray x1    `sweep --ray` on a test cluster (ray.cluster_utils.Cluster) with one simulated host:
            the same work plus Ray's share (task dispatch, the host probe, logs carried back)
  ray x2    the same cluster with a second simulated host: points in parallel

Simulated hosts share this machine's CPUs, so "ray x2" shows the parallel scheduling, not the
speed-up of two real hosts. Cluster start-up is timed apart (paid once per cluster, not per sweep).
Rounds alternate which side goes first.

    .venv/bin/python benchmarks/cluster_overhead.py [--points 8] [--rounds 2] [-o out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

EXPERIMENT = """\
version: 1
kind: grid
name: noop-overhead
model: bert-tiny
backend: noop
seq: 8
batch: 1
instances: 1
repetitions: {points}
iterations: 3
warmup: 1
"""


def timed_sweep(run, exp: Path, out: Path) -> float:
    t0 = time.perf_counter()
    outcome = run(exp, out)
    seconds = time.perf_counter() - t0
    assert not outcome.failed and len(outcome.ran) == outcome.total, outcome
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from numabench.cluster import HOST_RESOURCE
    from numabench.cluster.sweep import run_cluster_sweep
    from numabench.experiments.runner import run_sweep
    from numabench.launcher.launch import LaunchOptions
    from numabench.topology import read_machine

    opts = LaunchOptions(binder="taskset", progress=False)
    node = dict(num_cpus=1, object_store_memory=80 << 20)
    work = Path(tempfile.mkdtemp(prefix="numabench-cluster-overhead-"))
    exp = work / "exp.yaml"
    exp.write_text(EXPERIMENT.format(points=args.points))
    runs = iter(range(10_000))

    def local(e, o):
        return run_sweep(read_machine("/"), e, o, launch_opts=opts, stream=io.StringIO())

    def on_ray(e, o):
        return run_cluster_sweep(cluster.address, e, o, launch_opts=opts, stream=io.StringIO())

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node, resources={HOST_RESOURCE: 1})
    cluster.wait_for_nodes()
    startup = time.perf_counter() - t0
    times: dict[str, list[float]] = {"local": [], "ray x1": [], "ray x2": []}
    try:
        for side in ("ray x1", "ray x2"):
            if side == "ray x2":
                cluster.add_node(**node, resources={HOST_RESOURCE: 1})
                cluster.wait_for_nodes()
            for r in range(args.rounds):
                order = [("local", local), (side, on_ray)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    times[name].append(timed_sweep(fn, exp, work / f"run{next(runs)}"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    per_point = {k: statistics.median(v) / args.points for k, v in times.items()}
    doc = {"points": args.points, "rounds": args.rounds, "cluster_startup_s": startup,
           "sweep_s": times, "per_point_s": per_point,
           "ray_overhead_per_point_s": per_point["ray x1"] - per_point["local"]}
    print(f"{args.points} no-op points, {args.rounds} rounds per side; cluster start-up {startup:.1f} s")
    for k, v in times.items():
        print(f"  {k:<7} sweep {', '.join(f'{s:.2f}' for s in v)} s; median per point {per_point[k]:.3f} s")
    print(f"Ray's cost per point (ray x1 - local): {doc['ray_overhead_per_point_s'] * 1e3:+.0f} ms")
    if args.output:
        args.output.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
