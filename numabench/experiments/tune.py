"""`numabench tune`: measure the way to the best plan for an objective, within a time budget.

Three layers, one direction (docs/tune.md):

- the space (pure): a TuneSpec and a Machine → candidates (plan request + workload settings),
  each planned and checked before anything runs; what the planner or the backends refuse is
  pruned, with the reason, and never measured;
- the search (pure logic, trials injected): successive halving. Every candidate gets one short
  *screen* run; the better half gets longer *confirm* runs, halving again until two finalists
  remain; the finalists get repeated runs until run-level statistics separate them, the runs
  allowed per candidate are spent, or the budget is. Decisions compare runs, never requests
  (a run's requests are not independent samples);
- the I/O at the edges: real launches written as a sweep folder (manifest + points/, as
  `numabench sweep` writes it, so `numabench report DIR` reads it), `best-plan.yaml`,
  `frontier.csv`, `frontier.png/svg`, `tune.json`.

The run-level comparison lives in `compare_runs`; it keeps issue 13's vocabulary (`better`,
`worse`, `no-difference`, `inconclusive`, B against A) so it can be swapped for
experiments/compare.py's run-level test once that exists.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from numabench import __version__
from numabench.errors import LaunchError, NumabenchError, PlanError
from numabench.plans.model import Plan, PlanSource
from numabench.plans.yamlio import YamlReader, compose, read_yaml_file, type_name
from numabench.results import write_json_atomic
from numabench.topology.model import Machine

TUNE_VERSION = 1
OBJECTIVES = ("throughput", "latency")
MODES = ("split", "throughput")
ALPHA = 0.05
DEFAULT_BUDGET_S = 300.0
DEFAULT_PERCENTILE = 90.0
DEFAULT_BATCH_PER_INSTANCE = (1, 2, 4, 8)  # searched when no batch is given (throughput only)
TUNE_FILE = "tune.yaml"
STATE_FILE = "tune.json"


class TuneError(PlanError):
    """A tune spec (or the options standing for one) is invalid; `where` is 'file:line: field'."""


class TuneInterrupted(LaunchError):
    exit_code = 130


class ObjectiveNotMet(LaunchError):
    """Measured, but no candidate meets the objective (e.g. a latency limit nothing meets)."""


# ==== facts ==========================================================================================


@dataclass(frozen=True)
class Objective:
    """What 'best' means. throughput: highest window throughput, optionally with the step max
    latency at `percentile` at most `max_latency_ms`; latency: lowest step max latency at the
    percentile, for the given batch."""

    kind: str = "throughput"
    max_latency_ms: float | None = None
    percentile: float = DEFAULT_PERCENTILE

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "throughput"

    def metric(self, throughput: float, latency_ms: float) -> float:
        return throughput if self.kind == "throughput" else latency_ms

    def meets(self, latency_ms: float | None) -> bool:
        return self.max_latency_ms is None or (latency_ms is not None and latency_ms <= self.max_latency_ms)

    def describe(self) -> str:
        p = f"p{self.percentile:g}"
        if self.kind == "latency":
            text = f"lowest step max latency {p}"
        else:
            text = "highest throughput"
        if self.max_latency_ms is not None:
            text += f" with step max latency {p} <= {self.max_latency_ms:g} ms"
        return text


@dataclass(frozen=True)
class TuneSpec:
    """A tune as asked: the workload, the objective, the axes of the space and the budget."""

    model: str
    seq: int
    name: str = "tune"
    description: str | None = None
    batches: tuple[int, ...] | None = None  # global batches; None: search batch_per_instance
    batch_per_instance: tuple[int, ...] | None = None
    objective: Objective = Objective()
    budget_s: float = DEFAULT_BUDGET_S
    backends: tuple[str, ...] = ("pytorch",)
    precisions: tuple[str, ...] = ("fp32",)
    allocators: tuple[str, ...] | str = "auto"  # auto: default + every installed one
    smt: tuple[bool, ...] | str = "auto"  # auto: off, and on where the machine has SMT
    instances: tuple[int, ...] | str = "auto"
    cores_per_instance: tuple[int, ...] | None = None
    mode: str = "split"
    warmup: int = 2
    seed: int = 0
    trial_s: float | None = None  # screen trial length; None: from the budget
    version: int = TUNE_VERSION
    source: PlanSource | None = field(default=None, compare=False, repr=False)

    def where(self, path: str = "") -> str:
        return self.source.where(path) if self.source else (path or "tune")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a versioned YAML-able document (what `tune SPEC.yaml` reads back)."""
        d: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            d["description"] = self.description
        d.update(model=self.model, seq=self.seq)
        if self.batches is not None:
            d["batch"] = list(self.batches)
        if self.batch_per_instance is not None:
            d["batch_per_instance"] = list(self.batch_per_instance)
        d["objective"] = self.objective.kind
        if self.objective.max_latency_ms is not None:
            d["max_latency_ms"] = self.objective.max_latency_ms
        d["percentile"] = self.objective.percentile
        d["budget"] = self.budget_s
        d["backend"], d["precision"] = list(self.backends), list(self.precisions)
        d["allocator"] = self.allocators if isinstance(self.allocators, str) else list(self.allocators)
        d["smt"] = self.smt if isinstance(self.smt, str) else list(self.smt)
        d["instances"] = self.instances if isinstance(self.instances, str) else list(self.instances)
        if self.cores_per_instance is not None:
            d["cores_per_instance"] = list(self.cores_per_instance)
        d.update(mode=self.mode, warmup=self.warmup, seed=self.seed)
        d["trial_seconds"] = "auto" if self.trial_s is None else self.trial_s
        return d


@dataclass(frozen=True)
class Candidate:
    """One setup to measure: how the machine is split, the batch, and how each instance runs."""

    model: str
    backend: str
    precision: str
    seq: int
    mode: str
    batch: int  # global batch, split over the instances
    instances: int
    cores: tuple[int, ...]  # physical cores of each instance, as planned
    leftover: str  # the planner's policy for cores equal groups leave over: idle | spread
    smt: bool
    allocator: str
    request_instances: int | None = None  # as asked of the planner (None: derived from the size)
    request_cores_per_instance: int | None = None

    @property
    def shape(self) -> str:
        sizes = sorted(set(self.cores), reverse=True)
        if len(sizes) == 1:
            return f"{self.instances}x{sizes[0]}"
        return f"{self.instances}x({'+'.join(str(c) for c in self.cores)})"

    @property
    def id(self) -> str:
        sizes = sorted(set(self.cores), reverse=True)
        shape = f"n{self.instances}x" + ("-".join(str(c) for c in self.cores) if len(sizes) > 1 else str(sizes[0]))
        parts = [_safe_name(self.model), self.backend, self.precision, f"s{self.seq}", f"b{self.batch}",
                 shape + ("-smt" if self.smt else "")]
        if self.allocator != "default":
            parts.append(self.allocator)
        return "_".join(parts)

    @property
    def label(self) -> str:
        extra = "".join([" +SMT" if self.smt else "",
                         f", {self.allocator}" if self.allocator != "default" else ""])
        return (f"{self.shape} cores, batch {self.batch}, {self.backend} {self.precision}{extra}")

    def plan_request(self):
        from numabench.plans import PlanRequest

        return PlanRequest(instances=self.request_instances,
                           cores_per_instance=self.request_cores_per_instance,
                           batch=self.batch, smt=self.smt, leftover=self.leftover)

    def workload(self, duration_s: float, warmup: int, seed: int):
        from numabench.launcher.launch import Workload

        return Workload(model=self.model, backend=self.backend, precision=self.precision,
                        seq=self.seq, mode=self.mode, duration_s=duration_s, warmup=warmup, seed=seed)


@dataclass(frozen=True)
class Pruned:
    candidate: str  # a label: the candidate may not even have a plan
    reason: str


@dataclass(frozen=True)
class Space:
    candidates: tuple[Candidate, ...]
    plans: dict[str, Plan]  # candidate id → its plan
    pruned: tuple[Pruned, ...]
    duplicates: int = 0  # axis combinations that gave a plan already in the space


@dataclass(frozen=True)
class Trial:
    """One launch of one candidate. Repetition 0 is the short screen run, the others confirm.

    Duck-types experiments.points.Point (id, to_dict) so the sweep runner's `finished` and
    `point_file` apply to trials as they do to points."""

    candidate: Candidate
    repetition: int
    duration_s: float
    warmup: int
    seed: int

    @property
    def stage(self) -> str:
        return "screen" if self.repetition == 0 else "confirm"

    @property
    def id(self) -> str:
        return f"{self.candidate.id}_r{self.repetition}"

    @property
    def label(self) -> str:
        return f"{self.candidate.label} ({self.stage}{'' if self.repetition == 0 else f' {self.repetition}'})"

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        uniform = len(set(c.cores)) == 1
        return {"model": c.model, "backend": c.backend, "precision": c.precision, "seq": c.seq,
                "batch": c.batch, "instances": c.instances,
                "cores_per_instance": c.cores[0] if uniform else None, "cores": list(c.cores),
                "leftover": c.leftover, "smt": c.smt, "allocator": c.allocator,
                "repetition": self.repetition, "stage": self.stage, "mode": c.mode,
                "iterations": None, "duration_s": self.duration_s, "warmup": self.warmup,
                "seed": self.seed, "backend_options": {}, "candidate": c.id}


@dataclass(frozen=True)
class Measurement:
    """What one trial gave: one run-level value per metric."""

    trial: Trial
    ok: bool
    throughput: float = 0.0  # samples/s over the common window
    latency_ms: float | None = None  # step max latency (split) at the objective's percentile
    seconds: float = 0.0  # wall time of the trial, start-up included
    latency_count: int = 0  # steps (or requests) behind latency_ms
    error: str | None = None
    reused: bool = False  # read back from an earlier, interrupted tune (--resume)


@dataclass(frozen=True)
class Strategy:
    """Successive-halving settings. Trial lengths come from the budget unless given."""

    screen_s: float
    confirm_s: float
    eta: int = 2  # keep 1/eta of the candidates at each rung
    finalists: int = 2
    min_runs: int = 3  # confirm runs a finalist needs before finals are compared
    max_runs: int = 8  # confirm runs a candidate gets at most
    startup_guess_s: float = 5.0  # cost of a trial beyond its duration, until one is measured
    reserve_s: float = 0.0  # left for writing outputs


def strategy_for(spec: TuneSpec) -> Strategy:
    """Screen runs of about 1% of the budget (0.5-10 s), confirm runs twice as long."""
    screen = spec.trial_s if spec.trial_s is not None else min(max(spec.budget_s / 100, 0.5), 10.0)
    return Strategy(screen_s=screen, confirm_s=2 * screen, reserve_s=min(3.0, 0.03 * spec.budget_s))


# ==== the space (pure) ===============================================================================


def _divisors_and_powers(n: int) -> tuple[int, ...]:
    out = {d for d in range(1, n + 1) if n % d == 0}
    k = 1
    while k <= n:
        out.add(k)
        k *= 2
    return tuple(sorted(out))


def expand_space(spec: TuneSpec, machine: Machine, installed_allocators: Iterable[str] = ()) -> Space:
    """Every candidate the spec allows on this machine, each planned and checked; the rest pruned.

    Instance counts ("auto"): divisors of the physical core count and powers of two. For each,
    the planner's NUMA-local equal groups (cores left over stay idle) and, where that leaves
    cores idle, the same count with the leftovers spread over the first groups.
    """
    from numabench.experiments.points import no_smt_message, physical_cores
    from numabench.launcher.launch import check_workload
    from numabench.plans import make_plan
    from numabench.workers.backends import check_backend

    ncores = physical_cores(machine)
    installed = tuple(installed_allocators)
    allocators = ("default",) + installed if spec.allocators == "auto" else tuple(spec.allocators)
    smts = ((False, True) if machine.smt else (False,)) if spec.smt == "auto" else tuple(spec.smt)
    if spec.cores_per_instance is not None:
        counts = tuple(spec.instances) if spec.instances != "auto" else (None,)
        shapes = [(n, k, "idle") for n in counts for k in spec.cores_per_instance]
    else:
        counts = _divisors_and_powers(ncores) if spec.instances == "auto" else tuple(spec.instances)
        shapes = [(n, None, leftover) for n in counts for leftover in ("idle", "spread")]

    candidates: list[Candidate] = []
    plans: dict[str, Plan] = {}
    pruned: list[Pruned] = []
    seen: set[tuple] = set()
    duplicates = 0
    for backend, precision, allocator, smt in itertools.product(spec.backends, spec.precisions,
                                                                allocators, smts):
        for n, k, leftover in shapes:
            for batch in _batches(spec, n, k, machine):
                what = (f"{n or 'auto'} instances{f' x {k} cores' if k else ''}"
                        f"{', leftover spread' if leftover == 'spread' else ''}, batch {batch}, "
                        f"{backend} {precision}{' +SMT' if smt else ''}"
                        f"{f', {allocator}' if allocator != 'default' else ''}")
                try:
                    check_backend(backend, precision)
                    if smt and not machine.smt:
                        raise NumabenchError(no_smt_message(machine))
                    if allocator != "default" and allocator not in installed:
                        raise NumabenchError(f"allocator {allocator} is not installed here")
                    probe = Candidate(spec.model, backend, precision, spec.seq, spec.mode, batch,
                                      n or 0, (), leftover, smt, allocator, n, k)
                    plan = make_plan(machine, probe.plan_request())
                    check_workload(plan, probe.workload(1.0, spec.warmup, spec.seed))
                except NumabenchError as e:
                    pruned.append(Pruned(what, str(e).splitlines()[0]))
                    continue
                cores = tuple(len({machine.core_of(c).cpus if machine.core_of(c) else (c,)
                                   for c in inst.cpus}) for inst in plan.instances)
                key = (backend, precision, allocator, smt, plan.batch,
                       tuple((i.cpus, i.batch) for i in plan.instances))
                if key in seen:  # e.g. spread on a count that leaves no core idle
                    duplicates += 1
                    continue
                seen.add(key)
                c = replace(probe, instances=len(plan.instances), cores=cores)
                if c.id in plans:  # same shape, other CPUs (never seen; ids must stay unique)
                    raise NumabenchError(f"two candidates share the id {c.id}; please report this")
                candidates.append(c)
                plans[c.id] = plan
    return Space(tuple(candidates), plans, tuple(pruned), duplicates)


def _batches(spec: TuneSpec, n: int | None, k: int | None, machine: Machine) -> tuple[int, ...]:
    if spec.batches is not None:
        return spec.batches
    if n is None:  # count derived from the cores per instance: ask the (pure) planner
        from numabench.plans import PlanRequest, make_plan

        try:
            n = len(make_plan(machine, PlanRequest(cores_per_instance=k)).instances)
        except PlanError:
            return spec.batch_per_instance or DEFAULT_BATCH_PER_INSTANCE  # pruned, with the reason
    per = spec.batch_per_instance or DEFAULT_BATCH_PER_INSTANCE
    return tuple(b * n for b in per)


# ==== run-level statistics (pure) ====================================================================


@dataclass(frozen=True)
class RunComparison:
    """B against A on run-level values (one value per run): ratio of medians B/A, its bootstrap
    95% confidence interval, an exact permutation p value, and the verdict."""

    metric: str
    runs_a: int
    runs_b: int
    ratio: float | None
    ci: tuple[float, float] | None
    p: float | None
    verdict: str  # better | worse | no-difference | inconclusive
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "ratio": self.ratio, "ci": list(self.ci) if self.ci else None,
                "p": self.p, "runs": [self.runs_a, self.runs_b], "verdict": self.verdict,
                "reason": self.reason}


MIN_RUNS = 3


def compare_runs(a: Sequence[float], b: Sequence[float], *, metric: str = "throughput",
                 higher_is_better: bool = True, alpha: float = ALPHA, resamples: int = 4000,
                 seed: int = 0) -> RunComparison:
    """Compare run-level values of B against A.

    A difference needs both: the bootstrap (1 - alpha) interval of the ratio of medians excludes
    1, and the exact two-sided permutation test of the difference of the mean log values gives
    p < alpha. Both agreeing on no difference is 'no-difference'; when they disagree, more runs
    are needed ('inconclusive'). The permutation test is exact at any run count, so an A/A
    comparison is called different at most alpha of the time; its price is that 3 runs a side
    can never reach p < 0.05 (the smallest p is 0.1), so with 3 the answer is 'inconclusive',
    and 4 a side are needed. (The test's statistic is the mean of logs, not the median: with 4
    runs a median hides which runs sit outside the middle two, so fully separated runs would
    tie with other relabellings and never reach p < 0.05.)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < MIN_RUNS or len(b) < MIN_RUNS:
        ratio = float(np.median(b) / np.median(a)) if len(a) and len(b) and np.median(a) else None
        return RunComparison(metric, len(a), len(b), ratio, None, None, "inconclusive",
                             f"{min(len(a), len(b))} run(s) on a side, {MIN_RUNS} needed")
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("run-level values must be positive (throughputs, latencies)")
    ratio = float(np.median(b) / np.median(a))
    rng = np.random.default_rng(seed)
    ra = np.median(rng.choice(a, size=(resamples, len(a))), axis=1)
    rb = np.median(rng.choice(b, size=(resamples, len(b))), axis=1)
    low, high = np.quantile(rb / ra, [alpha / 2, 1 - alpha / 2])
    p, floor = _permutation_p(np.log(a), np.log(b), rng)
    if floor >= alpha:
        return RunComparison(metric, len(a), len(b), ratio, (float(low), float(high)), p,
                             "inconclusive", f"{len(a)} vs {len(b)} runs cannot reach p < {alpha:g} "
                             f"(smallest possible p {floor:.2f}); one more run a side is needed")
    excludes_one = low > 1 or high < 1
    reason = ""
    if p < alpha and excludes_one:
        verdict = "better" if (low > 1) == higher_is_better else "worse"
    elif p >= alpha and not excludes_one:
        verdict = "no-difference"
    else:
        verdict = "inconclusive"
        reason = (f"the interval and the test disagree (p {p:.3f}, interval "
                  f"{'excludes' if excludes_one else 'includes'} 1); more runs are needed")
    return RunComparison(metric, len(a), len(b), ratio, (float(low), float(high)), p, verdict, reason)


def _permutation_p(la: np.ndarray, lb: np.ndarray, rng, limit: int = 20000) -> tuple[float, float]:
    """(p, smallest p possible) of |mean(B) - mean(A)| over relabellings of the runs."""
    pooled = np.concatenate([la, lb])
    n, na = len(pooled), len(la)
    observed = abs(lb.mean() - la.mean())
    total = math.comb(n, na)
    if total <= limit:
        splits = itertools.combinations(range(n), na)
        stats, count = [], total
        for idx in splits:
            mask = np.zeros(n, dtype=bool)
            mask[list(idx)] = True
            stats.append(abs(pooled[~mask].mean() - pooled[mask].mean()))
        stats = np.asarray(stats)
        p = float(np.count_nonzero(stats >= observed - 1e-12) / count)
        return p, 2 / total  # a relabelling and its mirror always tie with the observed split
    perms = np.argsort(rng.random((limit, n)), axis=1)
    s = pooled[perms]
    stats = np.abs(s[:, na:].mean(axis=1) - s[:, :na].mean(axis=1))
    return float((np.count_nonzero(stats >= observed - 1e-12) + 1) / (limit + 1)), 1 / (limit + 1)


# ==== the search (pure logic; trials and the clock are injected) ======================================


@dataclass(frozen=True)
class SearchLog:
    measurements: tuple[Measurement, ...]
    stopped: str  # clear | budget | max-runs | done
    elapsed_s: float
    unmeasured: tuple[str, ...] = ()  # candidate ids the budget left out of screening
    finalists: tuple[str, ...] = ()  # candidate ids that reached the finals, best first


@dataclass(frozen=True)
class Progress:
    """What the terminal shows before each trial."""

    k: int  # this trial's number
    planned: int  # trials the schedule plans now (the budget may cut it short)
    trial: Trial
    left_s: float


def planned_trials(n: int, s: Strategy) -> int:
    """Trials successive halving plans for n candidates, before any finals extension."""
    total, alive, runs = n, n, 0
    while alive > s.finalists:
        alive = max(s.finalists, math.ceil(alive / s.eta))
        if alive <= s.finalists:
            break
        runs += 1
        total += alive
    return total + min(alive, s.finalists) * max(0, s.min_runs - runs)


class _Budget:
    def __init__(self, budget_s: float, clock: Callable[[], float], strategy: Strategy):
        self.budget_s, self.clock, self.s = budget_s, clock, strategy
        self.t0 = clock()
        self.reused_s = 0.0
        self.overheads: list[float] = []  # trial cost beyond its duration, measured here

    def elapsed(self) -> float:
        return self.clock() - self.t0 + self.reused_s

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def cost(self, duration: float) -> float:
        # the upper quartile, not the mean: start-up time varies a lot on a busy machine, and
        # the budget is a promise
        over = float(np.percentile(self.overheads, 75)) if self.overheads else self.s.startup_guess_s
        return duration + over

    def affords(self, duration: float, first: bool) -> bool:
        return first or self.cost(duration) <= self.left() - self.s.reserve_s

    def record(self, m: Measurement) -> None:
        if m.reused:
            self.reused_s += m.seconds
        elif m.ok:
            self.overheads.append(max(m.seconds - m.trial.duration_s, 0.0))


def _rank_key(objective: Objective, runs: Sequence[Measurement]):
    """Sort key, best first: feasible by the objective's metric, then the closest infeasible."""
    tput = float(np.median([m.throughput for m in runs]))
    lats = [m.latency_ms for m in runs if m.latency_ms is not None]
    lat = float(np.median(lats)) if lats else math.inf
    if not objective.meets(lat):
        return (1, lat)
    return (0, -tput if objective.higher_is_better else lat)


def search(candidates: Sequence[Candidate], objective: Objective, strategy: Strategy,
           budget_s: float, run_trial: Callable[[Trial], Measurement],
           clock: Callable[[], float] = time.monotonic, warmup: int = 2, seed: int = 0,
           on_progress: Callable[[Progress], None] | None = None) -> SearchLog:
    """Successive halving over `candidates`; `run_trial` measures (or replays) one trial."""
    s = strategy
    budget = _Budget(budget_s, clock, s)
    log: list[Measurement] = []
    runs: dict[str, list[Measurement]] = {c.id: [] for c in candidates}
    stopped = "done"

    def confirm(c: Candidate) -> list[Measurement]:
        return [m for m in runs[c.id] if m.ok and m.trial.repetition > 0]

    def values(c: Candidate) -> list[Measurement]:
        ok = [m for m in runs[c.id] if m.ok]
        return confirm(c) or ok

    def ranked(cs: Iterable[Candidate]) -> list[Candidate]:
        """Best first; a candidate with a failed run drops out (a setup that crashes is no choice)."""
        return sorted((c for c in cs if values(c) and all(m.ok for m in runs[c.id])),
                      key=lambda c: _rank_key(objective, values(c)))

    def planned() -> int:
        return len(log) + planned_left[0]

    def ids(cs: Iterable[Candidate]) -> tuple[str, ...]:
        return tuple(c.id for c in cs)

    planned_left = [planned_trials(len(candidates), s)]

    def run(c: Candidate) -> bool:
        """One more run of c; False when the budget cannot pay for it (the search stops)."""
        rep = len(runs[c.id]) + (1 if skip_screen else 0)
        trial = Trial(c, rep, s.screen_s if rep == 0 else s.confirm_s, warmup, seed)
        if not budget.affords(trial.duration_s, first=not log):
            return False
        if on_progress:
            on_progress(Progress(len(log) + 1, max(planned(), len(log) + 1), trial, budget.left()))
        m = run_trial(trial)
        budget.record(m)
        log.append(m)
        runs[c.id].append(m)
        planned_left[0] = max(planned_left[0] - 1, 0)
        return True

    # rung 0: screen everything the budget allows, in a seeded random order: when start-up turns
    # out slower than guessed and the budget cannot pay for all, the measured subset is not biased
    # by enumeration order (all of one backend first). When every candidate is a finalist anyway,
    # screening decides nothing: the first runs are confirm runs.
    skip_screen = len(candidates) <= s.finalists
    if skip_screen:
        planned_left[0] = len(candidates) * s.min_runs
    order = list(candidates)
    np.random.default_rng(seed).shuffle(order)
    unmeasured: list[str] = []
    for k, c in enumerate(order):
        if not run(c):
            unmeasured = [x.id for x in order[k:]]
            stopped = "budget"
            break
    alive = ranked(candidates)
    if stopped == "budget" or not alive:
        return SearchLog(tuple(log), stopped, budget.elapsed(), tuple(unmeasured))

    # halving rungs: one more (longer) run each for the better 1/eta, until the finalists remain
    while len(alive) > s.finalists:
        alive = ranked(alive)[:max(s.finalists, math.ceil(len(alive) / s.eta))]
        if len(alive) <= s.finalists:
            break
        for c in alive:
            if not run(c):
                return SearchLog(tuple(log), "budget", budget.elapsed(), tuple(unmeasured))
        alive = ranked(alive)
    finals = ranked(alive)[:s.finalists]
    planned_left[0] = sum(max(0, s.min_runs - len(confirm(c))) for c in finals)

    # finals: bring each to min_runs, then one more each (alternating) until separated
    while True:
        short = [c for c in finals if len(confirm(c)) < s.min_runs]
        if short:
            for c in sorted(short, key=lambda c: len(confirm(c))):
                if not run(c):
                    return SearchLog(tuple(log), "budget", budget.elapsed(), tuple(unmeasured), ids(ranked(finals)))
            finals = ranked(finals)
            continue
        if len(finals) < 2:
            break
        a, b = finals[0], finals[1]
        cmp = compare_runs([objective.metric(m.throughput, m.latency_ms or math.inf) for m in confirm(a)],
                           [objective.metric(m.throughput, m.latency_ms or math.inf) for m in confirm(b)],
                           higher_is_better=objective.higher_is_better, seed=seed)
        feasible_b = objective.meets(_median_latency(confirm(b)))
        if cmp.verdict in ("better", "worse") or not feasible_b:
            stopped = "clear"
            break
        if all(len(confirm(c)) >= s.max_runs for c in finals):
            stopped = "max-runs"
            break
        planned_left[0] = 2
        for c in finals:
            if len(confirm(c)) < s.max_runs and not run(c):
                return SearchLog(tuple(log), "budget", budget.elapsed(), tuple(unmeasured), ids(ranked(finals)))
        finals = ranked(finals)
    return SearchLog(tuple(log), stopped, budget.elapsed(), tuple(unmeasured), ids(ranked(finals)))


def _median_latency(runs: Sequence[Measurement]) -> float | None:
    lats = [m.latency_ms for m in runs if m.latency_ms is not None]
    return float(np.median(lats)) if lats else None


# ==== the decision (pure) ============================================================================


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    runs: tuple[Measurement, ...]  # the runs its figures come from (confirm runs, else the screen)
    screen: Measurement | None
    throughput: float  # median over `runs`
    latency_ms: float | None
    feasible: bool
    on_frontier: bool = False

    @property
    def confirm_runs(self) -> int:
        return sum(1 for m in self.runs if m.trial.repetition > 0)


@dataclass(frozen=True)
class Decision:
    objective: Objective
    results: tuple[CandidateResult, ...]  # ranked, best first; measured candidates only
    chosen: CandidateResult | None  # None: the objective cannot be met
    runner_up: CandidateResult | None
    closest: CandidateResult | None  # when nothing meets the objective: the nearest
    comparisons: tuple[tuple[str, RunComparison], ...]  # (candidate id, it against the choice)
    within_noise: tuple[str, ...]
    confidence: str  # clear | within-noise | low | impossible
    statement: str
    failed: tuple[Measurement, ...] = ()


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of (throughput, latency) points no other point beats on both (>=, <=, one strictly)."""
    out = []
    for i, (t, lat) in enumerate(points):
        dominated = any(t2 >= t and l2 <= lat and (t2 > t or l2 < lat)
                        for j, (t2, l2) in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return out


def decide(candidates: Sequence[Candidate], log: SearchLog, objective: Objective, seed: int = 0) -> Decision:
    by_id: dict[str, list[Measurement]] = {}
    for m in log.measurements:
        by_id.setdefault(m.trial.candidate.id, []).append(m)
    results = []
    for c in candidates:
        ok = [m for m in by_id.get(c.id, []) if m.ok]
        if not ok:
            continue
        crashed = len(ok) < len(by_id[c.id])  # shown, never chosen
        confirm = [m for m in ok if m.trial.repetition > 0]
        use = confirm or ok
        lat = _median_latency(use)
        results.append(CandidateResult(c, tuple(use), next((m for m in ok if m.trial.repetition == 0), None),
                                       float(np.median([m.throughput for m in use])), lat,
                                       objective.meets(lat) and not crashed))
    failed = tuple(m for m in log.measurements if not m.ok)
    if not results:
        return Decision(objective, (), None, None, None, (), (), "impossible",
                        "no trial finished: " + (failed[0].error if failed else "nothing was measured"),
                        failed)
    # Rank by evidence first: the finalists (repeated runs), then candidates with confirm runs,
    # then screen-only ones; a lucky single short run must not outrank repeated longer ones.
    finalists = set(log.finalists)
    results.sort(key=lambda r: (0 if r.candidate.id in finalists else 1 if r.confirm_runs else 2,
                                _rank_key(objective, r.runs)))
    front = set(pareto_frontier([(r.throughput, r.latency_ms if r.latency_ms is not None else math.inf)
                                 for r in results]))
    results = [replace(r, on_frontier=k in front) for k, r in enumerate(results)]
    feasible = [r for r in results if r.feasible]
    if not feasible:
        closest = min(results, key=lambda r: r.latency_ms if r.latency_ms is not None else math.inf)
        return Decision(objective, tuple(results), None, None, closest, (), (), "impossible",
                        _impossible(objective, closest), failed)
    chosen = feasible[0]
    others = [r for r in results if r is not chosen]
    runner_up = next((r for r in others if r.feasible), others[0] if others else None)

    def metric_values(r: CandidateResult) -> list[float]:
        return [objective.metric(m.throughput, m.latency_ms or math.inf) for m in r.runs
                if m.trial.repetition > 0]

    comparisons = []
    for r in others:
        comparisons.append((r.candidate.id, compare_runs(
            metric_values(chosen), metric_values(r), metric=objective.kind,
            higher_is_better=objective.higher_is_better, seed=seed)))
    verdicts = dict(comparisons)
    within = tuple(cid for cid, c in comparisons
                   if c.verdict in ("no-difference", "better")
                   or (c.verdict == "inconclusive" and c.runs_b >= MIN_RUNS))
    within = tuple(cid for cid in within if next(r for r in results if r.candidate.id == cid).feasible)
    confidence, statement = _confidence(objective, chosen, runner_up,
                                        verdicts.get(runner_up.candidate.id) if runner_up else None,
                                        within, log)
    return Decision(objective, tuple(results), chosen, runner_up, None, tuple(comparisons), within,
                    confidence, statement, failed)


def _fmt_value(objective: Objective, r: CandidateResult) -> str:
    lat = f"{r.latency_ms:.2f} ms" if r.latency_ms is not None else "-"
    return f"{r.throughput:.1f} samples/s, step max latency p{objective.percentile:g} {lat}"


def _impossible(objective: Objective, closest: CandidateResult) -> str:
    return (f"no candidate meets the objective ({objective.describe()}): the closest is "
            f"{closest.candidate.label} at {closest.latency_ms:.2f} ms "
            f"({closest.throughput:.1f} samples/s, {len(closest.runs)} run(s)); raise "
            f"--max-latency-ms to at least {math.ceil(closest.latency_ms * 100) / 100:g}, lower "
            f"the batch or the sequence length, or allow more setups (backends, precisions)")


def _confidence(objective: Objective, chosen: CandidateResult, runner_up: CandidateResult | None,
                cmp: RunComparison | None, within: tuple[str, ...], log: SearchLog) -> tuple[str, str]:
    if runner_up is None:
        return "clear", "the only setup that could run here"
    if not runner_up.feasible:
        return "clear", (f"the runner-up {runner_up.candidate.label} misses the latency limit "
                         f"({runner_up.latency_ms:.2f} ms)")
    ci = (f"runner-up/choice {cmp.ratio:.3f}, 95% CI [{cmp.ci[0]:.3f}, {cmp.ci[1]:.3f}], "
          f"p {cmp.p:.3f}" if cmp is not None and cmp.ci else "")
    if cmp is None or cmp.verdict == "inconclusive":
        why = ("the budget ran out before the finalists were separated" if log.stopped == "budget"
               else "too few runs")
        runs = f"{chosen.confirm_runs} vs {runner_up.confirm_runs} confirm runs"
        detail = "; ".join(x for x in (ci, cmp.reason if cmp else "") if x)
        return "low", (f"{why}: {runs}{f' ({detail})' if detail else ''}; give a larger --budget "
                       "for a confident choice")
    if cmp.verdict == "worse":
        return "clear", (f"the runner-up is worse over {cmp.runs_a} vs {cmp.runs_b} runs ({ci})")
    more = ("; a larger --budget (more runs) may still separate them" if log.stopped == "budget"
            else "; either is a good choice")
    return "within-noise", (f"the runner-up is within noise over {cmp.runs_a} vs {cmp.runs_b} runs "
                            f"({ci}): the runs cannot tell them apart{more}")


def render_decision(decision: Decision, log: SearchLog, space: Space) -> str:
    """The end of the terminal output: the choice, its figures, the runner-up, the confidence."""
    o = decision.objective
    lines = [f"measured {len({m.trial.candidate.id for m in log.measurements})} of "
             f"{len(space.candidates)} candidates in {len(log.measurements)} trials "
             f"({log.elapsed_s:.0f} s; stopped: {_STOPPED[log.stopped]}); "
             f"{len(space.pruned)} pruned before measuring"]
    if log.unmeasured:
        lines.append(f"not measured (budget): {len(log.unmeasured)} candidates")
    if decision.chosen is None:
        lines.append(f"no choice: {decision.statement}")
        return "\n".join(lines)
    c, r = decision.chosen, decision.runner_up
    lines.append(f"choice: {c.candidate.label}: {_fmt_value(o, c)} "
                 f"(median of {len(c.runs)} run{'s' if len(c.runs) > 1 else ''})")
    if r is not None:
        lines.append(f"runner-up: {r.candidate.label}: {_fmt_value(o, r)} "
                     f"(median of {len(r.runs)} run{'s' if len(r.runs) > 1 else ''})")
    lines.append(f"confidence: {decision.confidence}: {decision.statement}")
    if decision.within_noise:
        labels = [next(x for x in decision.results if x.candidate.id == cid).candidate.label
                  for cid in decision.within_noise]
        lines.append(f"within noise of the choice: {'; '.join(labels)}")
    return "\n".join(lines)


_STOPPED = {"clear": "the winner is clear", "budget": "budget spent",
            "max-runs": "finalists reached the most runs allowed", "done": "nothing left to compare"}


# ==== the spec: YAML and options =====================================================================

SPEC_KEYS = ("version", "name", "description", "model", "seq", "batch", "batch_per_instance",
             "objective", "max_latency_ms", "percentile", "budget", "backend", "precision",
             "allocator", "smt", "instances", "cores_per_instance", "mode", "warmup", "seed",
             "trial_seconds")


class _TuneReader(YamlReader):
    """The plans' YAML node walker: every error names file, line and field."""

    error = TuneError

    def axis(self, node, path: str, read, auto: bool = False):
        return super().axis(node, path, read, auto=auto,
                            empty="an empty list leaves nothing to search; give at least one value")

    def number(self, node, path: str, *, low: float = 0.0, high: float | None = None) -> float:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number, got {value!r} ({type_name(value)})")
        if value <= low or (high is not None and value > high):
            raise self.fail(path, f"must be above {low:g}" + (f" and at most {high:g}" if high else "")
                            + f", not {value}")
        return float(value)

    def spec(self, root, default_name: str) -> TuneSpec:
        from numabench.launcher.binding import ALLOCATORS
        from numabench.workers.backends import BACKENDS, PRECISIONS
        from numabench.workers.models import resolve_model

        doc = self.document(root, SPEC_KEYS, TUNE_VERSION, "tune spec")
        for key in ("model", "seq"):
            if key not in doc:
                raise self.fail("", f"missing {key!r} (the workload to tune for)")
        model = self.string(doc["model"], "model")
        try:
            resolve_model(str(model))
        except NumabenchError as e:
            raise self.fail("model", str(e)) from None
        kw: dict[str, Any] = {"model": model, "seq": self.integer(doc["seq"], "seq", minimum=1),
                              "name": self.string(doc["name"], "name") if "name" in doc else default_name}
        if "description" in doc:
            kw["description"] = self.string(doc["description"], "description")
        positive = lambda n, p: self.integer(n, p, minimum=1)  # noqa: E731
        if "batch" in doc:
            kw["batches"] = self.axis(doc["batch"], "batch", positive)
        if "batch_per_instance" in doc:
            if "batch" in doc:
                raise self.fail("batch_per_instance", "give batch (global) or batch_per_instance, not both")
            kw["batch_per_instance"] = self.axis(doc["batch_per_instance"], "batch_per_instance", positive)
        kind = self.choice(doc["objective"], "objective", OBJECTIVES, "objective") \
            if "objective" in doc else "throughput"
        limit = self.number(doc["max_latency_ms"], "max_latency_ms") if "max_latency_ms" in doc else None
        pct = self.number(doc["percentile"], "percentile", high=100) if "percentile" in doc \
            else DEFAULT_PERCENTILE
        kw["objective"] = Objective(kind, limit, pct)
        if "budget" in doc:
            kw["budget_s"] = self.number(doc["budget"], "budget")
        if "backend" in doc:
            kw["backends"] = self.axis(doc["backend"], "backend",
                                       lambda n, p: self.choice(n, p, sorted(BACKENDS), "backend"))
        if "precision" in doc:
            kw["precisions"] = self.axis(doc["precision"], "precision",
                                         lambda n, p: self.choice(n, p, PRECISIONS, "precision"))
        if "allocator" in doc:
            kw["allocators"] = self.axis(doc["allocator"], "allocator",
                                         lambda n, p: self.choice(n, p, ALLOCATORS, "allocator"), auto=True)
        if "smt" in doc:
            kw["smt"] = self.axis(doc["smt"], "smt", self.boolean, auto=True)
        if "instances" in doc:
            kw["instances"] = self.axis(doc["instances"], "instances", positive, auto=True)
        if "cores_per_instance" in doc:
            kw["cores_per_instance"] = self.axis(doc["cores_per_instance"], "cores_per_instance", positive)
        if "mode" in doc:
            kw["mode"] = self.choice(doc["mode"], "mode", MODES, "mode")
        if "warmup" in doc:
            kw["warmup"] = self.integer(doc["warmup"], "warmup", minimum=0)
        if "seed" in doc:
            kw["seed"] = self.integer(doc["seed"], "seed", minimum=0)
        if "trial_seconds" in doc and not (isinstance(doc["trial_seconds"], yaml.ScalarNode)
                                           and doc["trial_seconds"].value == "auto"):
            kw["trial_s"] = self.number(doc["trial_seconds"], "trial_seconds")
        spec = TuneSpec(**kw, source=PlanSource(self.name, tuple(self.lines.items())))
        check_spec(spec)
        return spec


def load_tune_spec(path: str | os.PathLike) -> TuneSpec:
    path = Path(path)
    text = read_yaml_file(path, "tune spec", TuneError)
    return parse_tune_spec(text, name=str(path), default_name=path.stem)


def parse_tune_spec(text: str, *, name: str = "<string>", default_name: str = "tune") -> TuneSpec:
    return _TuneReader(name).spec(compose(text, name, TuneError), default_name)


def check_spec(spec: TuneSpec) -> None:
    """Contradictions a spec (or the options) can hold, named by field."""
    o = spec.objective
    if o.kind == "latency" and spec.batches is None:
        raise TuneError("the latency objective is the lowest step max latency for a given batch: "
                        "give the batch (--batch / batch:)", where=spec.where("objective"))
    if o.kind == "latency" and o.max_latency_ms is not None:
        raise TuneError("max_latency_ms limits the throughput objective; the latency objective "
                        "already minimises latency: drop one", where=spec.where("max_latency_ms"))
    if o.percentile not in (50.0, 90.0, 99.0):
        raise TuneError(f"percentile {o.percentile:g}: use 50, 90 or 99 (the percentiles results "
                        "report)", where=spec.where("percentile"))
    if spec.mode == "throughput" and o.kind == "latency":
        raise TuneError("the latency objective is the step max latency of split mode: use mode "
                        "split", where=spec.where("mode"))


def _default_name(model: str, seq: int, objective: str) -> str:
    return f"tune-{_safe_name(model)}-s{seq}-{objective}"


def _safe_name(text: str) -> str:
    """A model name (maybe a path or hub id) as a file-name part, as sweep point ids write it."""
    import re

    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "model"


# ==== trials as launches (I/O) =======================================================================


def run_latency_ms(doc: dict[str, Any], percentile: float) -> tuple[float | None, int]:
    """(step max latency at the percentile in ms, how many steps) from a results document's raw
    timings; throughput mode: the slowest instance's request latency at the percentile."""
    raw = doc.get("raw") or {}
    if not raw.get("sent_ns"):
        return None, 0
    sent = np.asarray(raw["sent_ns"], dtype=np.int64)
    recv = np.asarray(raw["received_ns"], dtype=np.int64)
    if doc["workload"]["mode"] == "split":
        step = np.asarray(raw["step"], dtype=np.int64)
        ids = np.unique(step)
        lat = np.array([recv[step == s].max() - sent[step == s].min() for s in ids]) / 1e6
        return float(np.percentile(lat, percentile)), len(lat)
    inst = np.asarray(raw["instance"], dtype=np.int64)
    worst = max(float(np.percentile((recv - sent)[inst == i], percentile)) for i in np.unique(inst)) / 1e6
    return worst, len(sent)


def measurement_from_doc(trial: Trial, doc: dict[str, Any], seconds: float, objective: Objective,
                         reused: bool = False) -> Measurement:
    if doc.get("status") != "ok":
        return Measurement(trial, False, seconds=seconds, error=doc.get("error") or doc.get("status"),
                           reused=reused)
    lat, count = run_latency_ms(doc, objective.percentile)
    tput = float(doc["summary"]["throughput"])
    if tput <= 0 or not count:  # nothing finished inside the trial: no value to compare
        return Measurement(trial, False, seconds=seconds, reused=reused,
                           error="no request finished during the trial; give --trial-seconds more")
    return Measurement(trial, True, tput, lat, seconds, count, reused=reused)


class LaunchTrials:
    """Runs trials as real launches into a sweep-style folder; replays finished ones on resume."""

    def __init__(self, machine: Machine, spec: TuneSpec, space: Space, out_dir: Path,
                 launch_opts, resume: bool, clock: Callable[[], float] = time.monotonic):
        from numabench.experiments.runner import MANIFEST

        self.machine, self.spec, self.space, self.out = machine, spec, space, out_dir
        self.launch_opts, self.resume, self.clock = launch_opts, resume, clock
        self.entries: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.created = _now()
        self.status = "running"
        self.previous: dict[str, dict[str, Any]] = {}
        if resume:
            try:
                old = json.loads((out_dir / MANIFEST).read_text())
                self.created = old.get("created", self.created)
                self.previous = {e.get("id"): e for e in old.get("points", [])}
            except (OSError, ValueError):
                pass

    def __call__(self, trial: Trial) -> Measurement:
        from numabench.experiments.runner import finished, point_file
        from numabench.launcher.launch import RunInterrupted, run_launch
        from numabench.results import load_results, write_json_atomic

        k = len(self.order)
        self.order.append(trial.id)
        prev = self.previous.get(trial.id, {})
        if self.resume and finished(self.out, trial):
            doc = load_results(point_file(self.out, trial))
            m = measurement_from_doc(trial, doc, float(prev.get("seconds") or 0.0), self.spec.objective,
                                     reused=True)
            self._entry(k, trial, "ok", seconds=prev.get("seconds"), throughput=m.throughput,
                        latency_ms=m.latency_ms, reused=True)
            self.write_manifest()
            return m
        run_dir = self.out / "runs" / trial.id
        if run_dir.exists():  # an earlier interrupted attempt: keep its logs aside
            n = 1
            while run_dir.with_name(f"{trial.id}.attempt-{n}").exists():
                n += 1
            run_dir.rename(run_dir.with_name(f"{trial.id}.attempt-{n}"))
        self._entry(k, trial, "running", started=_now())
        self.write_manifest()
        c = trial.candidate
        opts = replace(self.launch_opts, run_dir=run_dir, output=None, allocator=c.allocator,
                       progress=False)
        t0 = self.clock()
        try:
            doc = run_launch(self.machine, self.space.plans[c.id],
                             c.workload(trial.duration_s, trial.warmup, trial.seed), opts).to_dict()
        except (KeyboardInterrupt, RunInterrupted):
            self._entry(k, trial, "interrupted", error="interrupted by the user")
            raise KeyboardInterrupt from None
        except NumabenchError as e:
            seconds = self.clock() - t0
            self._entry(k, trial, "failed", error=str(e), seconds=round(seconds, 3))
            self.write_manifest()
            return Measurement(trial, False, seconds=seconds, error=str(e).splitlines()[0])
        seconds = self.clock() - t0
        doc["experiment"] = {"name": self.spec.name, "kind": "tune", "point_id": trial.id,
                             "index": k, "total": None, "point": trial.to_dict()}
        write_json_atomic(point_file(self.out, trial), doc)
        m = measurement_from_doc(trial, doc, seconds, self.spec.objective)
        self._entry(k, trial, "ok" if m.ok else "failed", seconds=round(seconds, 3),
                    throughput=m.throughput, latency_ms=m.latency_ms, error=m.error, finished=_now())
        self.write_manifest()
        return m

    def _entry(self, k: int, trial: Trial, status: str, **extra) -> None:
        from numabench.experiments.runner import POINTS_DIR, RUNS_DIR

        e = self.entries.get(trial.id, {})
        e.update({"id": trial.id, "index": k, "label": trial.label, "status": status,
                  "file": f"{POINTS_DIR}/{trial.id}.json", "run_dir": f"{RUNS_DIR}/{trial.id}",
                  "params": trial.to_dict()})
        e.update({key: v for key, v in extra.items() if v is not None})
        self.entries[trial.id] = e

    def write_manifest(self, status: str | None = None) -> None:
        """The sweep runner's manifest (schema numabench.sweep), so report and resume read it."""
        from numabench.experiments.runner import write_sweep_manifest

        if status:
            self.status = status
        write_sweep_manifest(self.out, status=self.status, name=self.spec.name, kind="tune",
                             description=self.spec.description, experiment_file=TUNE_FILE,
                             created=self.created, machine=self.machine,
                             points=[self.entries[i] for i in self.order if i in self.entries])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ==== outputs (I/O) ==================================================================================

FRONTIER_COLUMNS = ("rank", "candidate", "label", "instances", "cores", "batch", "backend", "precision",
                    "smt", "allocator", "runs", "throughput", "latency_ms", "feasible", "on_frontier",
                    "chosen", "runner_up")


def frontier_rows(decision: Decision) -> list[dict[str, Any]]:
    chosen = decision.chosen.candidate.id if decision.chosen else None
    runner = decision.runner_up.candidate.id if decision.runner_up else None
    rows = []
    for k, r in enumerate(decision.results):
        c = r.candidate
        rows.append({"rank": k + 1, "candidate": c.id, "label": c.label, "instances": c.instances,
                     "cores": "+".join(map(str, c.cores)), "batch": c.batch, "backend": c.backend,
                     "precision": c.precision, "smt": c.smt, "allocator": c.allocator,
                     "runs": len(r.runs), "throughput": round(r.throughput, 4),
                     "latency_ms": None if r.latency_ms is None else round(r.latency_ms, 4),
                     "feasible": r.feasible, "on_frontier": r.on_frontier,
                     "chosen": c.id == chosen, "runner_up": c.id == runner})
    return rows


def write_frontier_csv(decision: Decision, path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
        w.writeheader()
        for row in frontier_rows(decision):
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_figure(decision: Decision, folder: Path, caption: str) -> list[Path]:
    """Latency vs throughput: every run faint, each candidate's median, the Pareto frontier as a
    line, the choice starred and the runner-up ringed, the latency limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = decision.objective
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    results = [r for r in decision.results if r.latency_ms is not None]
    for k, r in enumerate(results):
        ax.scatter([m.latency_ms for m in r.runs if m.latency_ms is not None],
                   [m.throughput for m in r.runs if m.latency_ms is not None],
                   s=10, color="0.75", zorder=1, label="one run" if k == 0 else None)
    ax.scatter([r.latency_ms for r in results], [r.throughput for r in results], s=30,
               color="tab:blue", zorder=2, label="candidate (median of its runs)")
    front = sorted((r for r in results if r.on_frontier), key=lambda r: r.latency_ms)
    if front:
        ax.plot([r.latency_ms for r in front], [r.throughput for r in front], color="tab:orange",
                drawstyle="steps-post", marker="o", zorder=3, label="Pareto frontier")
    if decision.runner_up is not None and decision.runner_up.latency_ms is not None:
        r = decision.runner_up
        ax.scatter([r.latency_ms], [r.throughput], s=160, facecolors="none", edgecolors="tab:green",
                   linewidths=1.5, zorder=4, label=f"runner-up: {r.candidate.label}")
    best = decision.chosen or decision.closest
    if best is not None and best.latency_ms is not None:
        ax.scatter([best.latency_ms], [best.throughput], s=260, marker="*", color="tab:red", zorder=5,
                   label=("choice: " if decision.chosen else "closest (limit not met): ")
                   + best.candidate.label)
    for r in results:
        ax.annotate(r.candidate.shape, (r.latency_ms, r.throughput), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    if o.max_latency_ms is not None:
        ax.axvline(o.max_latency_ms, color="tab:red", linestyle="--", linewidth=1,
                   label=f"limit {o.max_latency_ms:g} ms")
    ax.set_xlabel(f"step max latency p{o.percentile:g} (ms)")
    ax.set_ylabel("throughput (samples/s, common window)")
    ax.set_title(f"numabench tune: {o.describe()}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(0.01, 0.01, caption, fontsize=6.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = []
    for ext in ("png", "svg"):
        path = folder / f"frontier.{ext}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        out.append(path)
    plt.close(fig)
    return out


def best_plan_text(decision: Decision, plan: Plan, spec: TuneSpec, plan_name: str = "best-plan.yaml") -> str:
    """The chosen plan as `plans` dumps it, with what it was tuned for in its description and in
    comments (the plan loader accepts both; neither changes the plan)."""
    from numabench.plans import dump_plan

    c = decision.chosen
    cand, o = c.candidate, decision.objective
    lat = f"{c.latency_ms:.2f} ms" if c.latency_ms is not None else "-"
    plan = replace(plan, name=f"tuned-{spec.name}", description=(
        f"numabench tune, {o.describe()}: {cand.model} {cand.backend} {cand.precision}, seq "
        f"{cand.seq}, {cand.mode} mode, allocator {cand.allocator}: {c.throughput:.1f} samples/s, "
        f"step max latency p{o.percentile:g} {lat} (median of {len(c.runs)} runs)"))
    flags = (f"--model {cand.model} --seq {cand.seq} --backend {cand.backend} "
             f"--precision {cand.precision} --allocator {cand.allocator}")
    runner = decision.runner_up
    head = [
        f"# Tuned by numabench {__version__} tune on {_dt.date.today().isoformat()}",
        f"# workload: model {cand.model}, backend {cand.backend}, precision {cand.precision}, "
        f"seq {cand.seq}, batch {cand.batch}, mode {cand.mode}, allocator {cand.allocator}",
        f"# objective: {o.describe()}",
        f"# measured: {_fmt_value(o, c)} (median of {len(c.runs)} runs)",
        f"# confidence: {decision.confidence}: {decision.statement}",
    ]
    if runner is not None:
        head.append(f"# runner-up: {runner.candidate.label}: {_fmt_value(o, runner)}")
    head += [f"# run it: numabench launch --plan {plan_name} {flags} --mode {cand.mode}",
             f"#         numabench serve --plan {plan_name} --model {cand.model} "
             f"--backend {cand.backend} --precision {cand.precision} --allocator {cand.allocator}"]
    return "\n".join(head) + "\n" + dump_plan(plan)


def decision_to_dict(decision: Decision, log: SearchLog, space: Space, spec: TuneSpec) -> dict[str, Any]:
    def cid(r):
        return r.candidate.id if r else None

    return {
        "schema": "numabench.tune", "version": TUNE_VERSION, "spec": spec.to_dict(),
        "objective": decision.objective.describe(), "stopped": log.stopped,
        "elapsed_s": round(log.elapsed_s, 3), "budget_s": spec.budget_s,
        "candidates": len(space.candidates), "pruned": [{"candidate": p.candidate, "reason": p.reason}
                                                        for p in space.pruned],
        "duplicates": space.duplicates, "trials": len(log.measurements),
        "unmeasured": list(log.unmeasured),
        "chosen": cid(decision.chosen), "runner_up": cid(decision.runner_up),
        "closest": cid(decision.closest), "confidence": decision.confidence,
        "statement": decision.statement, "within_noise": list(decision.within_noise),
        "comparisons": {k: v.to_dict() for k, v in decision.comparisons},
        "results": frontier_rows(decision),
        "failed": [{"trial": m.trial.id, "error": m.error} for m in decision.failed],
    }


# ==== the command (I/O edge) =========================================================================


@dataclass(frozen=True)
class TuneOutcome:
    out_dir: Path
    space: Space
    log: SearchLog
    decision: Decision
    files: tuple[Path, ...]
    summary: str


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def installed_allocators() -> tuple[str, ...]:
    from numabench.launcher.binding import ALLOCATORS, find_allocator

    return tuple(a for a in ALLOCATORS if a != "default" and find_allocator(a))


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def run_tune(machine: Machine, spec: TuneSpec, out_dir: str | Path, *, resume: bool = False,
             launch_opts=None, stream: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic) -> TuneOutcome:
    """Prune, search, decide and write DIR. Raises TuneInterrupted (130) on Ctrl-C, SIGTERM or
    SIGHUP (finished trials kept: --resume replays them), ObjectiveNotMet when nothing meets it."""
    import threading

    from numabench.experiments.runner import MANIFEST
    from numabench.launcher.launch import LaunchOptions

    out = Path(out_dir)
    stream = stream or sys.stderr
    if out.exists() and not out.is_dir():
        raise TuneError(f"{out} exists and is not a folder")
    if (out / MANIFEST).exists() and not resume:
        raise TuneError(f"{out} already holds a tune or sweep; add --resume to finish it, or "
                        "choose another folder with -o")
    if resume and (out / TUNE_FILE).exists():
        before = yaml.safe_load((out / TUNE_FILE).read_text())
        if before != spec.to_dict():
            changed = sorted(k for k in set(before) | set(spec.to_dict())
                             if before.get(k) != spec.to_dict().get(k))
            stream.write(f"note: the spec differs from the one in {out / TUNE_FILE} "
                         f"({', '.join(changed)}); only trials with the same parameters are reused\n")
    space = expand_space(spec, machine, installed_allocators())
    if not space.candidates:
        reasons = "\n  ".join(f"{p.candidate}: {p.reason}" for p in space.pruned[:10])
        raise TuneError(f"nothing in the search space can run on this machine "
                        f"({len(space.pruned)} pruned):\n  {reasons}", where=spec.where())
    strategy = strategy_for(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / TUNE_FILE).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    say = lambda text: (stream.write(text + "\n"), stream.flush())  # noqa: E731
    say(f"tune {spec.name}: {spec.objective.describe()}; {spec.model} seq {spec.seq}, {spec.mode} mode")
    say(f"search space: {len(space.candidates)} candidates; {len(space.pruned)} pruned before "
        f"measuring (the planner or backend refused them)"
        + (f", {space.duplicates} duplicate plans dropped" if space.duplicates else "")
        + f"; budget {_fmt_s(spec.budget_s)}; screen {strategy.screen_s:g} s, confirm "
        f"{strategy.confirm_s:g} s per trial")
    for p in space.pruned[:5]:
        say(f"  pruned: {p.candidate}: {p.reason}")
    if len(space.pruned) > 5:
        say(f"  ... and {len(space.pruned) - 5} more (listed in {STATE_FILE})")

    trials = LaunchTrials(machine, spec, space, out, launch_opts or LaunchOptions(), resume, clock)

    def progress(p: Progress) -> None:
        say(f"[trial {p.k} of ~{p.planned}, {_fmt_s(max(p.left_s, 0))} left] {p.trial.label}")

    def measured(trial: Trial) -> Measurement:
        m = trials(trial)
        if m.reused:
            say(f"  reused from the earlier run: {m.throughput:.1f} samples/s")
        elif m.ok:
            lat = f", step p{spec.objective.percentile:g} {m.latency_ms:.2f} ms" if m.latency_ms else ""
            say(f"  {m.throughput:.1f} samples/s{lat} ({_fmt_s(m.seconds)})")
        else:
            say(f"  failed: {m.error}")
        return m

    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)} \
        if main else {}
    try:
        log = search(space.candidates, spec.objective, strategy, spec.budget_s, measured, clock,
                     spec.warmup, spec.seed, progress)
    except KeyboardInterrupt:
        trials.write_manifest("interrupted")
        raise TuneInterrupted(f"interrupted: {sum(1 for e in trials.entries.values() if e['status'] == 'ok')} "
                              f"finished trials are saved in {out}; run the same command with "
                              "--resume to continue") from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    trials.write_manifest("ok" if all(m.ok for m in log.measurements) else "failed")

    decision = decide(space.candidates, log, spec.objective, spec.seed)
    files = [out / STATE_FILE, out / "frontier.csv"]
    write_json_atomic(out / STATE_FILE, decision_to_dict(decision, log, space, spec))
    if decision.results:
        write_frontier_csv(decision, out / "frontier.csv")
        try:
            files += write_figure(decision, out, _caption(machine, spec))
        except ImportError:
            say("note: frontier figure skipped: matplotlib is not installed "
                "(pip install 'numabench[plots]')")
    if decision.chosen is not None:
        text = best_plan_text(decision, space.plans[decision.chosen.candidate.id], spec)
        (out / "best-plan.yaml").write_text(text)
        files.insert(0, out / "best-plan.yaml")
    elif (out / "best-plan.yaml").exists():
        (out / "best-plan.yaml").unlink()  # a resumed tune that no longer meets the objective
    summary = render_decision(decision, log, space)
    if decision.chosen is None:
        raise ObjectiveNotMet(f"{decision.statement}\nall trials, frontier.csv and frontier.png are in "
                              f"{out}")
    return TuneOutcome(out, space, log, decision, tuple(files), summary)


def _caption(machine: Machine, spec: TuneSpec) -> str:
    import socket

    from numabench.experiments.points import physical_cores

    nodes = len([n for n in machine.nodes if n.cpus])
    return (f"{machine.model_name or 'unknown CPU'} ({physical_cores(machine)} cores, {nodes} NUMA "
            f"node{'s' if nodes != 1 else ''}, {socket.gethostname()}) · {spec.model} seq {spec.seq} "
            f"· {spec.mode} mode · numabench {__version__}")


def spec_from_options(*, model: str, seq: int, batch: Sequence[int] | None,
                      batch_per_instance: Sequence[int] | None, objective: str,
                      max_latency_ms: float | None, percentile: float, budget_s: float,
                      backends: Sequence[str], precisions: Sequence[str], allocators,
                      smt: str, instances, mode: str, warmup: int, seed: int,
                      trial_s: float | None, name: str | None = None) -> TuneSpec:
    """The spec the command-line options stand for, checked like a YAML spec (by option name)."""
    from numabench.launcher.binding import ALLOCATORS
    from numabench.workers.backends import BACKENDS, PRECISIONS
    from numabench.workers.models import resolve_model

    def bad(option: str, message: str) -> TuneError:
        return TuneError(f"{option}: {message}")

    try:
        resolve_model(model)
    except NumabenchError as e:
        raise bad("--model", str(e)) from None
    for option, values, known in (("--backend", backends, sorted(BACKENDS)),
                                  ("--precision", precisions, PRECISIONS)):
        for v in values:
            if v not in known:
                raise bad(option, f"unknown value {v!r}; choose from {', '.join(known)}")
    if allocators != "auto":
        for v in allocators:
            if v not in ALLOCATORS:
                raise bad("--allocator", f"unknown allocator {v!r}; choose auto or from {', '.join(ALLOCATORS)}")
    if batch and batch_per_instance:
        raise bad("--batch-per-instance", "give --batch (global) or --batch-per-instance, not both")
    for option, value in (("--seq", seq), ("--budget", budget_s)):
        if value <= 0:
            raise bad(option, f"must be positive, not {value:g}")
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise bad("--max-latency-ms", f"must be positive, not {max_latency_ms:g}")
    if trial_s is not None and trial_s <= 0:
        raise bad("--trial-seconds", f"must be positive, not {trial_s:g}")
    smts = {"auto": "auto", "on": (True,), "off": (False,), "both": (False, True)}[smt]
    spec = TuneSpec(model=model, seq=seq, name=name or _default_name(model, seq, objective),
                    batches=tuple(batch) if batch else None,
                    batch_per_instance=tuple(batch_per_instance) if batch_per_instance else None,
                    objective=Objective(objective, max_latency_ms, float(percentile)),
                    budget_s=float(budget_s), backends=tuple(backends), precisions=tuple(precisions),
                    allocators=allocators if allocators == "auto" else tuple(allocators),
                    smt=smts, instances=instances if instances == "auto" else tuple(instances),
                    mode=mode, warmup=warmup, seed=seed, trial_s=trial_s)
    try:
        check_spec(spec)
    except TuneError as e:
        option = {"objective": "--objective", "max_latency_ms": "--max-latency-ms",
                  "percentile": "--percentile", "mode": "--mode"}
        raise TuneError(str(e).replace(e.where + ": ", "") if e.where else str(e),
                        where=option.get(e.where or "", e.where)) from None
    return spec
