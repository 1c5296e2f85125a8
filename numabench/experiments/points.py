"""An experiment expanded to points, and every point checked against the machine before any runs.

A Point is one launch: a plan request (instances, cores per instance, batch, smt) and a workload.
`expand` is pure (Experiment + Machine → points); `validate_points` makes each point's plan and
checks its workload, naming the point in any error.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from numabench.errors import NumabenchError
from numabench.experiments.spec import AUTO, MAX_POINTS, Experiment, ExperimentError
from numabench.plans.model import Plan
from numabench.topology.model import Machine

# Parameters that name a point: its file name is made of these (stable across runs).
ID_FIELDS = ("model", "backend", "precision", "seq", "batch", "instances", "cores_per_instance",
             "smt", "repetition", "setup")
# How a point's instances run: pinned (the plan's binding), unpinned (the same split started with
# --binder none), oob (the out-of-the-box single process: no binding, no thread settings).
SETUPS = ("pinned", "unpinned", "oob")


@dataclass(frozen=True)
class Point:
    """One launch of a sweep. Machine-dependent values ("auto") are already resolved."""

    model: str
    backend: str
    precision: str
    seq: int
    batch: int  # the global batch, split over the instances
    instances: int
    cores_per_instance: int | None  # None: the planner divides the usable cores
    smt: bool
    repetition: int
    mode: str
    iterations: int | None
    duration_s: float | None
    warmup: int
    seed: int
    backend_options: tuple[tuple[str, Any], ...] = ()
    setup: str = "pinned"  # one of SETUPS
    binder: str | None = None  # the experiment's `binder:` for its own points (None: --binder)

    @property
    def id(self) -> str:
        """Stable file-name stem: bert-base-cased_pytorch_fp32_s128_b16_n4x4_r0 (pinned),
        ..._n4x4-unpinned_r0, ..._oob_r0."""
        shape = f"n{self.instances}" + (f"x{self.cores_per_instance}" if self.cores_per_instance else "")
        shape += ("-smt" if self.smt else "") + ("-unpinned" if self.setup == "unpinned" else "")
        parts = [_safe(self.model), self.backend, self.precision, f"s{self.seq}", f"b{self.batch}",
                 "oob" if self.setup == "oob" else shape, f"r{self.repetition}"]
        return "_".join(parts)

    @property
    def label(self) -> str:
        rep = f", repetition {self.repetition + 1}" if self.repetition else ""
        head = f"{self.model} {self.precision} seq {self.seq} batch {self.batch}, "
        if self.setup == "oob":
            return head + f"out of the box (1 process, framework defaults){rep}"
        c = self.cores_per_instance
        cores = f" x {c} core{'s' if c > 1 else ''}" if c else ""
        smt = " +SMT" if self.smt else ""
        unpinned = ", unpinned" if self.setup == "unpinned" else ""
        return head + f"{self.instances} instance{'s' if self.instances > 1 else ''}{cores}{smt}{unpinned}{rep}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backend_options"] = dict(self.backend_options)
        if self.setup == "pinned":  # as before baselines existed: older sweeps resume unchanged
            del d["setup"]
        if self.binder is None:
            del d["binder"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["backend_options"] = tuple(sorted(dict(kw.get("backend_options") or {}).items()))
        return cls(**kw)

    def workload(self):
        from numabench.launcher.launch import Workload

        return Workload(model=self.model, backend=self.backend, precision=self.precision, seq=self.seq,
                        mode=self.mode, iterations=self.iterations, duration_s=self.duration_s,
                        warmup=self.warmup, seed=self.seed, backend_options=dict(self.backend_options))

    def plan_request(self):
        from numabench.plans import PlanRequest

        return PlanRequest(instances=self.instances, cores_per_instance=self.cores_per_instance,
                           batch=self.batch, smt=self.smt)

    def make_plan(self, machine: Machine) -> Plan:
        """This point's plan on `machine` (pure): the planner's, or for oob one process on every
        usable CPU."""
        if self.setup == "oob":
            return oob_plan(machine, self.batch)
        from numabench.plans import make_plan

        return make_plan(machine, self.plan_request())

    def launch_options(self, opts):
        """The sweep's LaunchOptions as this point runs them: unpinned points bind nothing, the
        oob point also leaves threads to the framework."""
        from dataclasses import replace

        if self.setup == "unpinned":
            return replace(opts, binder="none")
        if self.setup == "oob":
            return replace(opts, binder="none", framework_defaults=True)
        return replace(opts, binder=self.binder) if self.binder else opts


def oob_plan(machine: Machine, batch: int) -> Plan:
    """The out-of-the-box process as a plan: one instance, every usable CPU (SMT siblings too),
    no memory node, the whole batch. `threads` is what the plan records (one per usable
    physical core); the process is started without any thread setting and records the count
    its framework chose."""
    from numabench.plans.model import InstancePlan

    cpus = tuple(sorted(machine.cpus_usable))
    inst = InstancePlan(id=0, cpus=cpus, memory_nodes=(), threads=max(len(machine.usable_cores()), 1),
                        batch=batch)
    return Plan(instances=(inst,), batch=batch, smt=machine.smt, name="out-of-the-box",
                description="one process, framework defaults: no binding, no thread settings")


def _safe(text: str) -> str:
    """A model name (maybe a path or hub id) as a file-name part."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "model"


def powers_of_two(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to limit."""
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return tuple(out)


def core_series(total: int, node_cores: int | None = None) -> tuple[int, ...]:
    """1, 2, 4, ... up to one NUMA node, that node's size, then whole nodes up to `total`.

    12 cores on one node → 1, 2, 4, 8, 12; 2 nodes of 24 → 1, 2, 4, 8, 16, 24, 48 (an instance
    larger than a node takes whole nodes, so 32 would not plan).
    """
    node = min(node_cores or total, total)
    series = list(powers_of_two(node))
    if series[-1] != node:
        series.append(node)
    k = 2
    while k * node <= total:
        series.append(k * node)
        k += 1
    if series[-1] != total and total % node == 0:
        series.append(total)
    return tuple(series)


def largest_node_cores(machine: Machine) -> int:
    per_node: dict[int | None, int] = {}
    for core in machine.usable_cores():
        per_node[core.node] = per_node.get(core.node, 0) + 1
    return max(per_node.values(), default=0)


def physical_cores(machine: Machine) -> int:
    return len(machine.usable_cores())


def no_smt_message(machine: Machine) -> str:
    return (f"this machine has {machine.threads_per_core} thread per core (SMT is off or absent), so "
            "there are no sibling CPUs to add: an SMT comparison cannot run here. Turn SMT on "
            "(firmware, or /sys/devices/system/cpu/smt/control) or run the experiment elsewhere")


def expand(exp: Experiment, machine: Machine) -> tuple[Point, ...]:
    """Every point of the experiment on this machine, in run order.

    Repetitions are the outer loop, so a drift over time spreads over all points instead of
    biasing the last ones.
    """
    ncores = physical_cores(machine)
    shapes: list[tuple[int, int, int | None, bool]] = []  # (batch, instances, cores/instance, smt)
    if exp.kind == "core-scaling":
        cores = (core_series(ncores, largest_node_cores(machine)) if exp.cores in (None, AUTO)
                 else exp.cores)
        shapes = [(b, 1, c, s) for b in exp.batches for c in cores for s in exp.smt]
    elif exp.kind == "batch-scaling":
        auto = exp.cores in (None, AUTO)
        totals = (_plannable_cores(machine),) if auto else exp.cores
        for b in exp.batches:
            for total in totals:
                counts = (powers_of_two(min(total, b)) if exp.instances in (None, AUTO)
                          else exp.instances)
                # cores/instance 0 (more instances than cores) is refused by validation, by name
                shapes += [(b, n, _auto_split(machine, n, total, s) if auto else total // n, s)
                           for n in counts for s in exp.smt]
    elif exp.kind == "smt":
        if not machine.smt:
            raise ExperimentError(no_smt_message(machine), where=exp.where("kind"))
        shapes = [(b, n, c, s) for b in exp.batches for n, c in _instance_shapes(exp, machine)
                  for s in (False, True)]
    else:  # grid
        shapes = [(b, n, c, s) for b in exp.batches for n, c in _instance_shapes(exp, machine) for s in exp.smt]
    total = exp.repetitions * len(shapes) * math.prod(
        len(axis) for axis in (exp.models, exp.backends, exp.precisions, exp.seqs))
    if total > MAX_POINTS:  # counted before any point is made: a typo must not fill memory
        raise ExperimentError(f"{total} points is more than {MAX_POINTS}: shorten an axis or "
                              "lower repetitions", where=exp.where("repetitions"))
    baselines = getattr(exp, "baselines", ())
    total += exp.repetitions * math.prod(len(axis) for axis in (exp.models, exp.backends, exp.precisions,
                                                                exp.seqs)) * (
        len(shapes) * ("unpinned" in baselines) + len({b for b, *_ in shapes}) * ("oob" in baselines))
    if total > MAX_POINTS:
        raise ExperimentError(f"{total} points (baselines included) is more than {MAX_POINTS}: "
                              "shorten an axis or lower repetitions", where=exp.where("baseline"))
    points = []
    for rep in range(exp.repetitions):
        for model, backend, precision, seq in itertools.product(exp.models, exp.backends,
                                                                exp.precisions, exp.seqs):
            oob_done: set[int] = set()
            for batch, n, c, smt in shapes:
                common = dict(model=model, backend=backend, precision=precision, seq=seq, batch=batch,
                              repetition=rep, mode=exp.mode, iterations=exp.iterations,
                              duration_s=exp.duration_s, warmup=exp.warmup, seed=exp.seed,
                              backend_options=exp.backend_options)
                if "oob" in baselines and batch not in oob_done:  # once per batch, before its splits
                    oob_done.add(batch)
                    points.append(Point(instances=1, cores_per_instance=None, smt=False, setup="oob",
                                        **common))
                points.append(Point(instances=n, cores_per_instance=c, smt=smt, binder=exp.binder,
                                    **common))
                if "unpinned" in baselines:  # right after its pinned twin: drift hits both alike
                    points.append(Point(instances=n, cores_per_instance=c, smt=smt, setup="unpinned",
                                        **common))
    seen: dict[str, Point] = {}
    for p in points:
        if p.id in seen:
            raise ExperimentError(f"two points share the file name {p.id!r} ({seen[p.id].model!r} and "
                                  f"{p.model!r}); rename a model", where=exp.where("model"))
        seen[p.id] = p
    return tuple(points)


def _instance_shapes(exp: Experiment, machine: Machine) -> list[tuple[int, int | None]]:
    if exp.cores_per_instance is None:
        return [(n, None) for n in (exp.instances or (1,))]
    if exp.instances is None:
        return [(_planned_instances(machine, c), c) for c in exp.cores_per_instance]
    return [(n, c) for n in exp.instances for c in exp.cores_per_instance]


def _plannable_cores(machine: Machine) -> int:
    from numabench.errors import PlanError
    from numabench.plans import plannable_cores

    try:
        return plannable_cores(machine)
    except PlanError:  # no usable cores at all: validation names it per point
        return physical_cores(machine)


def _auto_split(machine: Machine, n: int, total: int, smt: bool) -> int | None:
    """`cores: auto`: total // n cores each where the planner can place that (equal nodes: the
    stable, explicit shape); else None, so the planner divides unequal nodes (a cgroup that
    allows 4 + 2 cores, a hybrid machine's P-cores) itself instead of the point failing."""
    from numabench.errors import PlanError
    from numabench.plans import PlanRequest, make_plan

    if total // n == 0:
        return 0  # refused by validation, by name
    try:
        make_plan(machine, PlanRequest(instances=n, cores_per_instance=total // n, smt=smt))
        return total // n
    except PlanError:
        return None


def _planned_instances(machine: Machine, cores_per_instance: int) -> int:
    """How many instances of that size the planner makes here (it is pure, so asking is free)."""
    from numabench.errors import PlanError
    from numabench.plans import PlanRequest, make_plan

    try:
        return len(make_plan(machine, PlanRequest(cores_per_instance=cores_per_instance)).instances)
    except PlanError:  # validation reports it, naming the point
        return max(physical_cores(machine) // cores_per_instance, 1)


def validate_points(points: tuple[Point, ...], machine: Machine, where: str) -> tuple[Plan, ...]:
    """Each point's plan, made and checked before anything runs; all bad points named at once."""
    from numabench.launcher.launch import check_workload
    from numabench.workers.backends import check_backend

    plans, errors = [], []
    made: dict = {}  # plan request -> plan: repetitions and workload axes share plans
    for k, p in enumerate(points):
        try:
            if p.cores_per_instance == 0:
                raise NumabenchError(f"{p.instances} instances cannot share fewer cores than that; "
                                     "drop this instance count or give more cores")
            if p.smt and not machine.smt:
                raise NumabenchError(no_smt_message(machine))
            request = p.plan_request() if p.setup != "oob" else ("oob", p.batch)
            if request not in made:
                made[request] = p.make_plan(machine)
            plan = made[request]
            check_workload(plan, p.workload())
            check_backend(p.backend, p.precision, dict(p.backend_options))
            plans.append(plan)
        except NumabenchError as e:
            errors.append(f"point {k + 1}/{len(points)} ({p.label}): {e}")
    if errors:
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ExperimentError(f"{len(errors)} of {len(points)} points cannot run on this machine:\n  "
                              + "\n  ".join(errors[:10]) + more, where=where)
    return tuple(plans)
