"""`launch`: start one pinned worker per plan instance, drive a timed workload, record results.

Flow: check everything that can be checked before a process starts → bind and spawn → wait
for every READY (the clock starts only then) → run the workload in `split` or `throughput`
mode → stop the workers → write the results document. Any failure stops all instances and
still writes what was measured, marked as failed.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from numabench import __version__
from numabench.errors import LaunchError, NumabenchError
from numabench.launcher import binding, placement, spawn
from numabench.launcher.coordinator import Coordinator, WorkerFailed
from numabench.launcher.measure import DEFAULT_INFLIGHT, Limits, Measurement, make_payloads, measure
from numabench.launcher.procs import ProcessGroup
from numabench.launcher.progress import Progress
from numabench.plans.model import Plan
from numabench.results import (
    RESULTS_SCHEMA,
    RESULTS_VERSION,
    Sample,
    samples_to_columns,
    summarize,
    summary_to_dict,
    write_json_atomic,
)
from numabench.topology.model import Machine
from numabench.workers import protocol

MODES = ("split", "throughput")


@dataclass(frozen=True)
class Workload:
    """What each instance runs, and for how long."""

    model: str = "bert-base-cased"
    backend: str = "pytorch"
    precision: str = "fp32"
    seq: int = 128
    mode: str = "split"
    iterations: int | None = None  # split: steps; throughput: requests per instance
    duration_s: float | None = None
    warmup: int = 3
    seed: int = 0
    text_file: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchOptions:
    """How instances are started and where results go."""

    binder: str = "auto"
    allocator: str = "default"
    transport: str = "ipc"
    run_dir: Path | None = None
    output: Path | None = None
    ready_timeout_s: float = 600.0
    request_timeout_s: float = 300.0
    grace_s: float = 5.0
    progress: bool | None = None  # None: only when stderr is a terminal
    path: str | None = None  # PATH used to find numactl/taskset (tests hide numactl with it)
    inflight: int = DEFAULT_INFLIGHT  # throughput mode: requests outstanding per instance
    omp_runtime: str = "gnu"  # gnu (the framework's own) or intel (libiomp5 preloaded)
    pin_threads: bool = True  # each OpenMP / ONNX Runtime thread bound to its own CPU


class RunInterrupted(LaunchError):
    exit_code = 130


def check_workload(plan: Plan, workload: Workload) -> None:
    """Refuse bad arguments before anything starts."""
    from numabench.workers.backends import check_backend
    from numabench.workers.models import resolve_model

    check_backend(workload.backend, workload.precision, workload.backend_options)
    spec = resolve_model(workload.model)
    if workload.mode not in MODES:
        raise NumabenchError(f"unknown mode {workload.mode!r}; choose one of {', '.join(MODES)}")
    if workload.seq < 1:
        raise NumabenchError(f"--seq must be at least 1 (got {workload.seq})")
    if spec.max_positions and workload.seq > spec.max_positions:
        raise NumabenchError(f"--seq {workload.seq} exceeds {workload.model}'s maximum of "
                             f"{spec.max_positions} positions")
    if workload.iterations is not None and workload.iterations < 1:
        raise NumabenchError(f"--iterations must be at least 1 (got {workload.iterations})")
    if workload.duration_s is not None and workload.duration_s <= 0:
        raise NumabenchError(f"--duration must be positive (got {workload.duration_s})")
    if workload.iterations is not None and workload.duration_s is not None:
        raise NumabenchError("give --iterations or --duration, not both")
    if workload.warmup < 0:
        raise NumabenchError(f"--warmup cannot be negative (got {workload.warmup})")
    starved = [i.id for i in plan.instances if i.batch < 1]
    if starved:
        raise NumabenchError(
            f"batch {plan.batch} leaves instance(s) {starved} without samples: in {workload.mode} "
            f"mode every instance needs at least one; use --batch >= {len(plan.instances)} "
            f"or fewer instances")
    if workload.text_file:
        if not spec.has_tokenizer:
            raise NumabenchError(f"--text needs a model with a tokenizer; {workload.model} has none "
                                 "(use minilm, a local folder or a hub id)")
        if not read_texts(workload.text_file):
            raise NumabenchError(f"--text {workload.text_file}: no non-empty lines")


def read_texts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise NumabenchError(f"--text {path}: {e.strerror}") from None


def default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{os.getpid()}"


class _Run:
    """Mutable state of one launch; the public API is `run_launch`."""

    def __init__(self, machine: Machine, plan: Plan, workload: Workload, opts: LaunchOptions):
        self.machine, self.plan, self.workload, self.opts = machine, plan, workload, opts
        self.run_dir = Path(opts.run_dir or default_run_dir())
        self.progress = Progress(opts.progress)
        self.startup: dict[int, dict[str, int]] = {}  # instance -> spawned/hello/ready (monotonic ns)
        self.measured = Measurement()  # filled as replies arrive: a failed run keeps its part
        self.samples: list[Sample] = self.measured.samples
        self.ready: dict[int, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.env_info: dict[str, Any] = {}
        self.prepared: Any = None  # backends.Preparation, when the backend prepares (onnxruntime)
        self.started = _dt.datetime.now(_dt.timezone.utc)

    @property
    def window_start_ns(self) -> int | None:
        return self.measured.window_start_ns

    def log(self, message: str) -> None:
        """Append an event to run_dir/launch.log: the run's own story, for users and tests."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "launch.log", "a") as f:
            f.write(f"{_dt.datetime.now().isoformat(timespec='milliseconds')} {message}\n")

    # --- start ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Probe binding, allocator and governors: refusals come before any process starts."""
        self.binder, self.preload = binding.prepare_binding(
            self.plan, self.opts.binder, self.opts.allocator, self.opts.path)
        self.warnings.extend(self.binder.warnings)
        self.threading = binding.prepare_threading(self.opts.omp_runtime, self.opts.pin_threads)
        self.governors = binding.cpu_governors(self.plan.cpus)
        slow = sorted({g for g in self.governors.values() if g != "performance"})
        if slow:
            self.warnings.append(f"CPU frequency governor is {', '.join(slow)}, not performance: "
                                 "timings may vary with frequency scaling")

    def prepare_backend(self) -> None:
        """Once per run, before any worker starts: the ONNX export (or cache check) and its
        agreement with PyTorch. Done here so 16 instances share one export and none times it."""
        from numabench.workers.backends import prepare_backend
        from numabench.workers.models import resolve_model

        w = self.workload
        self.progress.update(f"preparing the {w.backend} backend", force=True)
        self.prepared = prepare_backend(w.backend, resolve_model(w.model), w.precision,
                                        w.backend_options, seed=w.seed, log=self.log)
        if self.prepared is not None:
            self.warnings.extend(self.prepared.warnings)

    def spawn(self, group: ProcessGroup, coord: Coordinator) -> None:
        binder, preload, governors = self.binder, self.preload, self.governors
        w = self.workload
        applied_env: dict[int, dict[str, str]] = {}
        for inst in self.plan.instances:
            cfg = spawn.worker_config(
                inst, endpoint=coord.endpoint, model=w.model, backend=w.backend,
                precision=w.precision, seed=w.seed, pin_self=binder.name == "self",
                timeout_s=self.opts.ready_timeout_s + self.opts.request_timeout_s,
                warmup_shapes=[(inst.batch, w.seq)], warmup_iterations=w.warmup,
                options={**w.backend_options, **(self.prepared.options if self.prepared else {}),
                         **({"pin_threads": True} if w.backend == "onnxruntime" and self.threading.pin else {})})
            self.startup[inst.id] = {"spawned_ns": time.monotonic_ns()}
            started = spawn.start_instance(group, binder, inst, cfg, preload, threading=self.threading)
            self.warnings.extend(started.warnings)
            applied_env[inst.id] = dict(started.variables_set)
            self.log(f"instance {inst.id}: pid {started.pid}, cpus {list(inst.cpus)}, "
                     f"memory nodes {list(inst.memory_nodes)}, {inst.threads} threads, binder {binder.name}")
        self.env_info = {
            "binder": binder.name, "binds_memory": binder.binds_memory,
            "allocator": self.opts.allocator, "preload": preload,
            "variables_set": {str(k): v for k, v in applied_env.items()},
            "transport": self.opts.transport, "governors": governors,
            "inflight": self.opts.inflight if w.mode == "throughput" else 1,
            **self.threading.record(),
            "python": platform.python_version(), "numabench": __version__,
            "hostname": socket.gethostname(), "kernel": platform.release(),
        }

    def place_coordinator(self) -> Callable[[], None]:
        """Pin the coordinator off the workers' CPUs (after they started: numactl refuses CPUs
        outside its parent's affinity); returns the undo."""
        where = placement.coordinator_placement(self.machine, self.plan.cpus)
        if where.warning:
            self.warnings.append(where.warning)
        self.env_info["coordinator"] = where.record()
        if where.shares_cpus_with_workers:
            return lambda: None
        self.log(f"coordinator pinned to CPUs {list(where.cpus)}")
        return placement.pin_threads(where.cpus)

    def wait_ready(self, coord: Coordinator) -> None:
        ids = {i.id for i in self.plan.instances}
        hello: set[int] = set()
        n = len(ids)

        def show(inst: int, header: dict[str, Any]) -> None:
            if header["type"] in (protocol.HELLO, protocol.READY):  # start-up as the coordinator saw it
                self.startup.setdefault(inst, {})[f"{header['type'].lower()}_ns"] = time.monotonic_ns()
            if header["type"] == protocol.HELLO:
                hello.add(inst)
            self.progress.update(f"loading model: {len(hello)}/{n} started, "
                                 f"{len(self.ready) + (header['type'] == protocol.READY)}/{n} ready",
                                 force=True)

        self.ready = coord.wait_for(protocol.READY, ids, self.opts.ready_timeout_s, on_message=show)
        spawned = min((t["spawned_ns"] for t in self.startup.values() if "spawned_ns" in t), default=None)
        ready = [t["ready_ns"] for t in self.startup.values() if "ready_ns" in t]
        if spawned is not None and ready:
            self.log(f"all {n} instances ready in {(max(ready) - spawned) / 1e9:.2f} s")
        else:
            self.log(f"all {n} instances ready")
        for inst in self.plan.instances:
            got = self.ready[inst.id].get("affinity")
            if got is not None and sorted(got) != sorted(inst.cpus):
                self.warnings.append(f"instance {inst.id} runs on CPUs {got}, the plan asked for "
                                     f"{list(inst.cpus)}")
            if self.ready[inst.id].get("threads") not in (None, inst.threads):
                self.warnings.append(f"instance {inst.id} runs {self.ready[inst.id]['threads']} "
                                     f"threads, the plan asked for {inst.threads}")

    # --- measure -------------------------------------------------------------------------

    def measure(self, coord: Coordinator) -> None:
        w, inflight = self.workload, self.opts.inflight
        vocab = {i: int(r.get("model_info", {}).get("vocab_size") or 1000) for i, r in self.ready.items()}
        payloads = make_payloads(self.plan.instances, w.seq, w.seed, vocab,
                                 read_texts(w.text_file) if w.text_file else None)
        self.log(f"measuring ({w.mode} mode, {inflight} in flight per instance)"
                 if w.mode == "throughput" else f"measuring ({w.mode} mode)")
        try:
            measure(coord, {i.id: i.batch for i in self.plan.instances}, payloads, w.mode,
                    Limits(w.iterations, w.duration_s, inflight, self.opts.request_timeout_s),
                    self.measured, self.progress.update if self.progress.enabled else None)
        finally:
            self.progress.done()

    # --- record --------------------------------------------------------------------------

    def document(self, status: str, error: str | None = None,
                 failed_instance: int | None = None) -> dict[str, Any]:
        import yaml

        from numabench.plans import dump_plan
        from numabench.topology import machine_to_dict

        summary = summarize(self.samples, self.workload.mode, self.window_start_ns)
        versions = next((r.get("versions") for r in self.ready.values() if r.get("versions")), {})
        return {
            "schema": RESULTS_SCHEMA,
            "version": RESULTS_VERSION,
            "status": status,
            "error": error,
            "failed_instance": failed_instance,
            "created": self.started.isoformat(timespec="seconds"),
            "command": sys.argv,
            "run_dir": str(self.run_dir),
            "machine": machine_to_dict(self.machine),
            "plan": yaml.safe_load(dump_plan(self.plan)),
            "workload": asdict(self.workload),
            "environment": {**self.env_info, "versions": versions, "startup": _startup_record(self.startup),
                            **({"backend": self.prepared.record} if self.prepared else {})},
            "instances": {
                str(i.id): {"asked": {"cpus": list(i.cpus), "memory_nodes": list(i.memory_nodes),
                                      "threads": i.threads, "batch": i.batch},
                            "got": {k: v for k, v in self.ready.get(i.id, {}).items()
                                    if k not in ("type", "v", "arrays")}}
                for i in self.plan.instances},
            "raw": {"window_start_ns": self.window_start_ns, **samples_to_columns(self.samples),
                    # requests sent and never answered (a failed or interrupted run)
                    "unanswered": {k: [getattr(p, k) for p in self.measured.unanswered()]
                                   for k in ("instance", "step", "batch", "sent_ns")}},
            "summary": summary_to_dict(summary),
            "warnings": self.warnings + list(summary.warnings),
        }

    def save(self, doc: dict[str, Any]) -> list[Path]:
        paths = [self.run_dir / "results.json"] + ([Path(self.opts.output)] if self.opts.output else [])
        for p in paths:
            write_json_atomic(p, doc)
        return paths


def _startup_record(startup: dict[int, dict[str, int]]) -> dict[str, Any]:
    """Per instance: seconds from its spawn to HELLO (interpreter up) and to READY (model loaded,
    warmed up); and the time from the first spawn to the last READY, the whole start-up."""
    first = min((t["spawned_ns"] for t in startup.values() if "spawned_ns" in t), default=None)
    per = {str(i): {k.removesuffix("_ns") + "_s": (t[k] - t["spawned_ns"]) / 1e9
                    for k in ("hello_ns", "ready_ns") if k in t}
           for i, t in sorted(startup.items()) if "spawned_ns" in t}
    ready = [t["ready_ns"] for t in startup.values() if "ready_ns" in t]
    return {"instances": per,
            "all_ready_s": (max(ready) - first) / 1e9 if ready and first is not None and len(ready) == len(startup)
            else None}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_launch(machine: Machine, plan: Plan, workload: Workload,
               opts: LaunchOptions = LaunchOptions(),
               on_saved: Callable[[list[Path]], None] | None = None) -> dict[str, Any]:
    """Run the workload on the plan's instances; returns the results document.

    On failure or interrupt the partial document is still written (status failed/interrupted)
    and the error is raised after every worker has been reaped.
    """
    check_workload(plan, workload)
    if opts.inflight < 1:
        raise NumabenchError(f"--inflight must be at least 1 (got {opts.inflight})")
    run = _Run(machine, plan, workload, opts)
    run.prepare()
    # SIGTERM to the coordinator stops the run as cleanly as Ctrl-C does.
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    status, error, failed = "ok", None, None
    unpin: Callable[[], None] = lambda: None  # noqa: E731
    try:
        with ProcessGroup(run.run_dir) as group, Coordinator(group, opts.transport) as coord:
            try:
                run.prepare_backend()
                run.spawn(group, coord)
                unpin = run.place_coordinator()
                run.wait_ready(coord)
                run.measure(coord)
                coord.stop_workers([i.id for i in plan.instances], timeout_s=opts.grace_s)
                group.wait_all(opts.grace_s)
            except WorkerFailed as e:
                status, error, failed = "failed", str(e), e.instance
                raise
            except NumabenchError as e:
                status, error = "failed", str(e)
                raise
            except KeyboardInterrupt:
                status, error = "interrupted", "interrupted by the user"
                raise RunInterrupted("interrupted: all instances stopped; partial results saved "
                                     f"in {run.run_dir}") from None
            finally:
                unpin()
                run.progress.done()
                group.stop(opts.grace_s)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        doc = run.document(status, error, failed)
        saved = run.save(doc)
        run.log(f"{status}: {len(run.samples)} requests measured; results in "
                f"{', '.join(str(p) for p in saved)}" + (f"; {error.splitlines()[0]}" if error else ""))
        if on_saved:
            on_saved(saved)
    return doc


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


DEFAULT_BATCH = 8


def plan_for_launch(machine: Machine, plan_file: str | None = None, instances: int | None = None,
                    cores_per_instance: int | None = None, batch: int | None = None,
                    smt: bool = False, preset: str | None = None, nodes: tuple[int, ...] | None = None,
                    cpus: tuple[int, ...] | None = None, core_kind: str | None = None,
                    leftover: str | None = None) -> Plan:
    """The plan a launch runs: a validated YAML plan, or one made by the planner.

    Without a batch, each instance gets an equal share of at least DEFAULT_BATCH in all:
    DEFAULT_BATCH rounded up to a multiple of the instance count.
    """
    import dataclasses
    import math

    from numabench.plans import PlanRequest, load_plan, load_preset, make_plan, validate_plan

    shape = {"instances": instances, "cores_per_instance": cores_per_instance, "smt": smt or None,
             "nodes": nodes, "cpus": cpus, "core_kind": core_kind, "leftover": leftover}
    shape = {k: v for k, v in shape.items() if v is not None}
    if plan_file:
        clash = ["--" + k.replace("_", "-") for k in shape] + (["--preset"] if preset else [])
        if clash:
            raise NumabenchError(f"{', '.join(clash)} cannot be combined with --plan: the plan "
                                 f"{plan_file} already fixes the instances")
        plan = load_plan(Path(plan_file))
        validate_plan(plan, machine)
        if batch is not None and batch != plan.batch:
            raise NumabenchError(f"--batch {batch} differs from the plan's batch {plan.batch} in "
                                 f"{plan_file}; edit the plan's batch shares or drop --batch")
        return plan
    request = dataclasses.replace(load_preset(preset) if preset else PlanRequest(), **shape)
    if not (request.instances or request.cores_per_instance or request.group_by or request.tiers):
        request = dataclasses.replace(request, instances=1)  # the baseline: one instance, all cores
    if batch is not None or request.batch is not None:
        return make_plan(machine, dataclasses.replace(request, batch=batch if batch is not None else request.batch))
    n = len(make_plan(machine, request).instances)
    return make_plan(machine, dataclasses.replace(request, batch=n * math.ceil(DEFAULT_BATCH / n)))
