"""`launch`: start one pinned worker per plan instance, drive a timed workload, record results.

Flow: check everything that can be checked before a process starts → bind and spawn → wait
for every READY (the clock starts only then) → run the workload in `split` or `throughput`
mode → stop the workers → write the results document. Any failure stops all instances and
still writes what was measured, marked as failed.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from numabench import __version__
from numabench.errors import LaunchError, NumabenchError
from numabench.fileio import check_output_dir, check_output_file, read_text, write_json_atomic
from numabench.launcher import binding, placement, spawn
from numabench.launcher.coordinator import Coordinator, WorkerFailed
from numabench.launcher.measure import Limits, Measurement, calibrate, make_payloads, measure
from numabench.launcher.options import (  # noqa: F401  (re-exported: launch's public names)
    DEFAULT_ITERATIONS,
    LOOPS_TARGET_NS,
    LOOPS_TARGET_SHARED_NS,
    MAX_DURATION_S,
    MAX_ITERATIONS,
    MAX_REPEAT,
    MODES,
    RESULTS_FILE,
    STOP_SIGNALS,
    TRANSPORTS,
    LaunchOptions,
    Workload,
)
from numabench.launcher.procs import ProcessGroup
from numabench.launcher.progress import Progress
from numabench.plans.model import Plan
from numabench.results import RunResult, Sample, requests_of, summarize
from numabench.system.noise import NoiseRecorder
from numabench.topology.model import Machine
from numabench.workers import protocol
from numabench.workers.backends import release_preparation


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
    if workload.iterations is not None and not 1 <= workload.iterations <= MAX_ITERATIONS:
        raise NumabenchError(f"--iterations must be 1 to {MAX_ITERATIONS} (got {workload.iterations})")
    if workload.duration_s is not None and not (
            math.isfinite(workload.duration_s) and 0 < workload.duration_s <= MAX_DURATION_S):
        raise NumabenchError(f"--duration must be a number of seconds above 0 and at most "
                             f"{MAX_DURATION_S:.0f} (a week), not {workload.duration_s}")
    if workload.seed < 0:
        raise NumabenchError(f"--seed cannot be negative (got {workload.seed})")
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


def dry_run_text(machine: Machine, plan: Plan, what: str = "launch") -> str:
    """What `launch|serve --dry-run` prints: the validated plan's instances on this machine (or a
    captured tree's), with a flag when its cores leave some usable physical cores idle."""
    from numabench.plans.render import render_plan

    text = render_plan(plan, machine)
    flag = placement.core_use(machine, plan.cpus).flag()
    if flag:
        text += f"idle cores: the plan {flag}\n"
    return text + f"{what} --dry-run: plan valid for {machine.model_name or 'this machine'}; nothing was run\n"


def refuse_foreign_root(root: str, dry_run: bool, command: str) -> None:
    """A captured tree describes another machine: plan against it, never run on it."""
    if not dry_run and os.path.realpath(root) != "/":
        raise NumabenchError(f"{command} --root {root}: a captured tree is another machine's, and "
                             f"nothing can run on it from here; add --dry-run to plan and check "
                             f"against it, or drop --root to run on this machine")


def read_texts(path: str) -> list[str]:
    text = read_text(path, "--text file")
    return [line.strip() for line in text.splitlines() if line.strip()]


def check_options(opts: LaunchOptions) -> None:
    """Refuse, before any process starts, options that would fail only after the benchmark:
    an output that cannot be written, a run folder already holding results, bad timeouts."""
    for name, value in (("--ready-timeout", opts.ready_timeout_s),
                        ("--request-timeout", opts.request_timeout_s), ("grace", opts.grace_s)):
        if not (math.isfinite(value) and value > 0):
            raise NumabenchError(f"{name} must be a positive number of seconds, not {value}")
    spawn.check_start(opts.start)
    if opts.loops is not None and not 1 <= opts.loops <= protocol.MAX_LOOPS:
        raise NumabenchError(f"--loops must be auto or 1 to {protocol.MAX_LOOPS} (got {opts.loops})")
    if not 1 <= opts.repeat <= MAX_REPEAT:
        raise NumabenchError(f"--repeat must be 1 to {MAX_REPEAT} (got {opts.repeat})")
    if opts.output is not None:
        if opts.repeat > 1:
            raise NumabenchError("-o writes one results document; with --repeat each repetition "
                                 "writes RUN_DIR/rep-<k>/results.json (give --run-dir instead)")
        check_output_file(opts.output, "-o")
    if opts.run_dir is not None:
        run_dir = check_output_dir(opts.run_dir, "--run-dir")
        held = sorted(p.relative_to(run_dir) for p in [run_dir / RESULTS_FILE,
                                                       *run_dir.glob(f"rep-*/{RESULTS_FILE}")]
                      if p.exists())
        if held:
            raise NumabenchError(f"--run-dir {run_dir} already holds results ({held[0]}); "
                                 "choose a new folder (or move those results away)")
    else:
        check_output_dir(Path.cwd(), "the default run folder (runs/ here)")


def default_run_dir() -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{os.getpid()}"


class _Run:
    """Mutable state of one launch; the public API is `run_launch`."""

    def __init__(self, machine: Machine, plan: Plan, workload: Workload, opts: LaunchOptions):
        self.machine, self.plan, self.workload, self.opts = machine, plan, workload, opts
        # Where the coordinator runs, for the spawn (workers' ZeroMQ threads), its own pinning
        # and the loops target: one pure decision from the machine and the plan.
        self.where = placement.coordinator_placement(machine, plan.cpus)
        self.run_dir = Path(opts.run_dir or default_run_dir())
        self.progress = Progress(opts.progress)
        self.startup: dict[int, dict[str, int]] = {}  # instance -> spawned/hello/ready (monotonic ns)
        self.measured = Measurement()  # filled as replies arrive: a failed run keeps its part
        self.ready: dict[int, dict[str, Any]] = {}
        self.warnings: list[str] = []
        self.env_info: dict[str, Any] = {}
        self.prepared: Any = None  # backends.Preparation, when the backend prepares (onnxruntime)
        self.noise = NoiseRecorder(plan.cpus)  # other processes on the plan's CPUs during the window
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.repetition: dict[str, Any] | None = None
        self.text_lengths: dict[int, list[int]] = {}  # --text: each instance's rows, real tokens
        self.start_record: dict[str, Any] = {"method": None, "why_exec": None}
        self._servers: dict[tuple, Any] = {}  # the process group's fork servers

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
        o = self.opts
        self.binder, self.preload = binding.prepare_binding(
            self.plan, "none" if o.framework_defaults else o.binder, o.allocator, o.path)
        self.warnings.extend(self.binder.warnings)
        # Unbound instances get no thread placement either: OMP_PLACES naming CPUs would pin
        # the threads after all.
        self.threading = binding.prepare_threading(o.omp_runtime, o.pin_threads and self.binder.binds_cpus)
        self.governors = binding.cpu_governors(self.plan.cpus)
        slow = sorted({g for g in self.governors.values() if g != "performance"})
        if slow:
            self.warnings.append(f"CPU frequency governor is {', '.join(slow)}, not performance: "
                                 "timings may vary with frequency scaling")

    def prepare_backend(self, group: ProcessGroup | None = None) -> None:
        """Once per run, before any worker starts: the ONNX export (or cache check) and its
        agreement with PyTorch, or the weights file and its per-node copies. Done here so 16
        instances share one export and none times it."""
        from numabench.workers.backends import prepare_backend
        from numabench.workers.models import resolve_model

        w = self.workload
        self.progress.update(f"preparing the {w.backend} backend", force=True)
        self.prepared = prepare_backend(
            w.backend, resolve_model(w.model), w.precision, w.backend_options, seed=w.seed,
            log=self.log, share_weights=w.share_weights,
            node_sets=tuple({tuple(sorted(i.memory_nodes)) for i in self.plan.instances}),
            weights_dir=self.opts.weights_dir, keep_weights=self.opts.keep_weights,
            weights_cache_dir=self.opts.weights_cache_dir,
            weights_builder=self._weights_builder(group))
        if self.prepared is not None:
            self.warnings.extend(self.prepared.warnings)

    def _weights_builder(self, group: ProcessGroup | None) -> Callable[[Any, int, Path], str | None] | None:
        """On a weights cache miss, the first instance's fork server (started now rather than at
        spawn, which then reuses it) writes the file; None where workers are exec'd (the
        launcher builds it, as before)."""
        fork, _ = self.start_method()
        if group is None or fork is None or self.workload.backend != "pytorch":
            return None
        return spawn.weights_builder(group, self.binder, self.plan.instances[0], fork, self.preload,
                                     self.threading, set_threads=not self.opts.framework_defaults)

    def spawn(self, group: ProcessGroup, coord: Coordinator) -> None:
        binder, preload, governors = self.binder, self.preload, self.governors
        w = self.workload
        applied_env: dict[int, dict[str, str]] = {}
        io_moved: dict[str, list[int]] = {}
        where = self.where
        fork, why_exec = self.start_method()
        self._servers = group.servers
        self.start_record = {"method": "fork" if fork else "exec", "why_exec": why_exec}
        io_off = self.opts.io_threads_off_cores
        if io_off is None:  # options.py: off only where messages would preempt a worker's compute
            io_off = w.mode == "throughput" and self.opts.inflight > 1 and self.opts.loops == 1
        for inst in self.plan.instances:
            # unbound instances (--binder none, the oob baseline) get no placement at all
            io_cpus = (placement.io_thread_cpus(self.machine, where, inst.cpus)
                       if io_off and binder.binds_cpus else None)
            if io_cpus is not None:
                io_moved[str(inst.id)] = list(io_cpus)
            cfg = spawn.worker_config(
                inst, endpoint=coord.endpoint, model=w.model, backend=w.backend,
                precision=w.precision, seed=w.seed, pin_self=binder.name == "self",
                set_threads=not self.opts.framework_defaults,
                timeout_s=self.opts.ready_timeout_s + self.opts.request_timeout_s,
                warmup_shapes=[(inst.batch, w.seq)], warmup_iterations=w.warmup,
                options={**w.backend_options,
                         **(self.prepared.options_for(inst.memory_nodes) if self.prepared else {}),
                         **({"pin_threads": True} if w.backend == "onnxruntime" and self.threading.pin else {})},
                io_cpus=io_cpus, tokenizer=bool(w.text_file))
            self.startup[inst.id] = {"spawned_ns": time.monotonic_ns()}
            started = spawn.start_instance(group, binder, inst, cfg, preload, threading=self.threading,
                                           set_threads=not self.opts.framework_defaults, fork=fork)
            if started.fork_error is not None:  # the rest are exec'd too (warned once)
                fork = None
                self.warnings.append(f"{started.fork_error}; workers are started as fresh processes instead")
                self.start_record.update(method="fork+exec" if group.servers else "exec",
                                         why_exec=started.fork_error)
            self.warnings.extend(started.warnings)
            applied_env[inst.id] = dict(started.variables_set)
            threads = ("framework default threads" if self.opts.framework_defaults
                       else f"{inst.threads} threads")
            how = f", forked by fork server {started.forked_by}" if started.forked_by else ""
            self.log(f"instance {inst.id}: pid {started.pid}, {binder.describe(inst)}, {threads}, "
                     f"binder {binder.name}{how}")
        self.env_info = {
            "binder": binder.name, "binds_memory": binder.binds_memory, "binds_cpus": binder.binds_cpus,
            "framework_defaults": self.opts.framework_defaults,
            "allocator": self.opts.allocator, "preload": preload,
            "variables_set": {str(k): v for k, v in applied_env.items()},
            "transport": self.opts.transport, "governors": governors,
            "inflight": self.opts.inflight if w.mode == "throughput" else 1,
            # instance -> the CPUs its ZeroMQ threads were sent to (absent: its own CPUs)
            "worker_io_cpus": io_moved,
            **self.threading.record(),
            "start": {**self.start_record, "servers": [s.info for s in group.servers.values()]},
            "python": platform.python_version(), "numabench": __version__,
            "hostname": socket.gethostname(), "kernel": platform.release(),
        }

    def start_method(self) -> tuple[spawn.ForkPlan | None, str | None]:
        """Fork workers from fork servers unless asked not to or it would change what they get."""
        o, w = self.opts, self.workload
        why = spawn.why_exec(o.start, os.environ, o.framework_defaults)
        if why is not None:
            return None, why
        return spawn.ForkPlan.for_instances(self.plan.instances, w.backend, w.model,
                                            timeout_s=o.ready_timeout_s), None

    def place_coordinator(self) -> Callable[[], None]:
        """Pin the coordinator off the workers' CPUs (after they started: numactl refuses CPUs
        outside its parent's affinity); returns the undo."""
        where = self.where
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
            if not self.binder.binds_cpus:  # unbound by design: the affinity is recorded, not judged
                self.log(f"instance {inst.id} unbound: may run on CPUs {got}")
            elif got is not None and sorted(got) != sorted(inst.cpus):
                self.warnings.append(f"instance {inst.id} runs on CPUs {got}, the plan asked for "
                                     f"{list(inst.cpus)}")
            io_error = (self.ready[inst.id].get("io_threads") or {}).get("error")
            if io_error:
                self.warnings.append(f"instance {inst.id}: {io_error}; they share its CPUs")
            if not self.opts.framework_defaults and self.ready[inst.id].get("threads") not in (None, inst.threads):
                self.warnings.append(f"instance {inst.id} runs {self.ready[inst.id]['threads']} "
                                     f"threads, the plan asked for {inst.threads}")

    def sample_memory(self, stage: str) -> None:
        """Each instance's RSS/PSS/private memory and its shared weights mapping, into its
        results' "got" (got.memory.<stage>), with its start-up time (got.startup_s)."""
        from numabench.launcher import memory

        for ready in self.ready.values():
            path = (ready.get("backend_info") or {}).get("weights_path")
            ready.setdefault("memory", {})[stage] = memory.sample(ready["pid"], [path] if path else [])
            ready["startup_s"] = round((ready.get("load_ns", 0) + ready.get("warmup_ns", 0)) / 1e9, 3)
        for server in self._servers.values():  # their share of the pages the workers share
            server.info.setdefault("memory", {})[stage] = memory.sample(server.pid, [])

    # --- measure -------------------------------------------------------------------------

    def measure(self, coord: Coordinator) -> None:
        w, inflight = self.workload, self.opts.inflight
        vocab = {i: int(r.get("model_info", {}).get("vocab_size") or 1000) for i, r in self.ready.items()}
        texts = read_texts(w.text_file) if w.text_file else None
        payloads = make_payloads(self.plan.instances, w.seq, w.seed, vocab, texts)
        if texts:
            self.text_lengths = text_lengths(w, payloads)
        loops: dict[int, int] = {}
        if w.mode == "throughput":
            # Longer requests when replies wake the coordinator on a worker's CPU (options.py).
            target = LOOPS_TARGET_SHARED_NS if self.where.shares_cpus_with_workers else LOOPS_TARGET_NS
            if self.opts.loops is None:
                loops = calibrate(coord, payloads, self.opts.request_timeout_s, target)
            else:
                loops = dict.fromkeys(payloads, self.opts.loops)
            self.env_info["loops"] = {"per_instance": {str(i): n for i, n in sorted(loops.items())},
                                      "calibrated": self.opts.loops is None,
                                      "target_ms": target / 1e6 if self.opts.loops is None else None}
            shown = sorted(set(loops.values()))
            self.log(f"measuring ({w.mode} mode, {inflight} in flight per instance, "
                     f"{'/'.join(map(str, shown))} forward pass{'es' if shown != [1] else ''} per request"
                     f"{' (calibrated)' if self.opts.loops is None else ''})")
        else:
            self.log(f"measuring ({w.mode} mode)")
        self.noise.start()
        try:
            measure(coord, {i.id: i.batch for i in self.plan.instances}, payloads, w.mode,
                    Limits(w.iterations, w.duration_s, inflight, self.opts.request_timeout_s, loops),
                    self.measured, self.progress.update if self.progress.enabled else None)
        finally:
            self.noise.stop()
            self.progress.done()

    def stalled(self) -> str:
        """Which instances a measuring timeout waited on: those with the fewest replies (in
        split mode exactly the ones that did not answer the current step)."""
        counts = {i.id: 0 for i in self.plan.instances}
        for request in requests_of(self.samples):  # replies, not passes (loops)
            counts[request[0].instance] += 1
        low = min(counts.values())
        late = [i for i, c in counts.items() if c == low]
        return (f"no reply from instance{'s' if len(late) > 1 else ''} "
                f"{', '.join(map(str, late))} ({low} replies so far"
                + (f"; the others {max(counts.values())}" if len(late) < len(counts) else "")
                + f"); a hung worker? see {self.run_dir}/instance-{late[0]}.log; "
                "--request-timeout sets this wait")

    # --- record --------------------------------------------------------------------------

    @property
    def samples(self) -> list[Sample]:
        return self.measured.samples

    def document(self, status: str, error: str | None = None,
                 failed_instance: int | None = None) -> RunResult:
        import yaml

        from numabench.plans import dump_plan
        from numabench.topology import machine_to_dict

        samples = self.samples
        if self.text_lengths:  # every request of an instance sends the same rows
            samples = [replace(s, tokens=sum(self.text_lengths[s.instance])) for s in samples]
        summary = summarize(samples, self.workload.mode, self.window_start_ns,
                            seq=self.workload.seq if self.text_lengths else None)
        versions = next((r.get("versions") for r in self.ready.values() if r.get("versions")), {})
        return RunResult(
            status=status, error=error, failed_instance=failed_instance,
            created=self.started.isoformat(timespec="seconds"), command=tuple(sys.argv),
            run_dir=str(self.run_dir), machine=machine_to_dict(self.machine),
            plan=yaml.safe_load(dump_plan(self.plan)), workload=asdict(self.workload),
            environment={**self.env_info, "versions": versions, "noise": self.noise.record(),
                         "startup": _startup_record(self.startup),
                         **({"backend": self.prepared.record} if self.prepared else {})},
            instances={
                str(i.id): {"asked": {"cpus": list(i.cpus), "memory_nodes": list(i.memory_nodes),
                                      "threads": None if self.opts.framework_defaults else i.threads,
                                      "batch": i.batch},
                            # what numabench really bound ([]: not bound; got.affinity and
                            # got.mempolicy say what the worker then ran with)
                            "bound": self.binder.bound(i),
                            **({"text": {"token_lengths": self.text_lengths[i.id], "padded_to": self.workload.seq}}
                               if i.id in self.text_lengths else {}),
                            "got": {k: v for k, v in self.ready.get(i.id, {}).items()
                                    if k not in ("type", "v", "arrays")}}
                for i in self.plan.instances},
            window_start_ns=self.window_start_ns, samples=tuple(samples), summary=summary,
            warnings=tuple(self.warnings) + summary.warnings + tuple(self.noise.warnings()),
            repetition=self.repetition,
            # requests sent and never answered (a failed or interrupted run); a request of
            # `loops` passes stood for steps step .. step + loops - 1
            unanswered={k: [getattr(p, k) for p in self.measured.unanswered()]
                        for k in ("instance", "step", "batch", "sent_ns", "loops")})

    def save(self, result: RunResult) -> list[Path]:
        paths = [self.run_dir / RESULTS_FILE] + ([Path(self.opts.output)] if self.opts.output else [])
        doc = result.to_dict()
        for p in paths:
            write_json_atomic(p, doc)
        return paths


def text_lengths(workload: Workload, payloads: dict[int, Any]) -> dict[int, list[int]]:
    """Each instance's rows' real token counts, tokenized here exactly as its worker does
    (same tokenizer, truncated at seq), so the results can say how much of the work was padding."""
    from numabench.workers import requests
    from numabench.workers.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(workload.model))
    if tokenizer is None:
        return {}
    return {iid: requests.token_lengths(tokenizer, head["texts"], max_length=workload.seq)
            for iid, (head, _) in payloads.items() if head.get("texts")}


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


class _StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled exactly like Ctrl-C, but named in the results."""


def _raise_stop(signum, frame):
    raise _StopSignal(signal.Signals(signum).name)


class _StopSignals:
    """While a run is measuring: SIGTERM and SIGHUP raise like Ctrl-C. While it cleans up and
    saves (`hold()`): every stop signal, Ctrl-C too, is held off, so a second press within
    milliseconds cannot cut the save short; the run then exits 130 as for the first press."""

    def __init__(self):
        import threading

        self.active = threading.current_thread() is threading.main_thread()
        self.saved: dict[int, Any] = {}

    def __enter__(self):
        if self.active:
            for sig in STOP_SIGNALS:
                self.saved[sig] = signal.signal(sig, _raise_stop)
            self.saved.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
        return self

    def hold(self) -> None:
        if self.active:
            for sig in (*STOP_SIGNALS, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.active:
            for sig, handler in self.saved.items():
                signal.signal(sig, handler)


def run_launch(machine: Machine, plan: Plan, workload: Workload,
               opts: LaunchOptions | None = None,
               on_saved: Callable[[list[Path]], None] | None = None) -> RunResult:
    """Run the workload on the plan's instances; returns the results (the last repetition's).

    Inputs and destinations are checked before any process starts. With `opts.repeat` K > 1,
    K runs with fresh workers each write RUN_DIR/rep-<k>/results.json. On failure or interrupt
    the partial document is still written (status failed/interrupted) and the error is raised
    after every worker has been reaped.
    """
    opts = opts or LaunchOptions()
    check_workload(plan, workload)
    if opts.inflight < 1:
        raise NumabenchError(f"--inflight must be at least 1 (got {opts.inflight})")
    if opts.loops not in (None, 1) and workload.mode != "throughput":
        raise NumabenchError("--loops is for --mode throughput: a split step is one pass of each shard")
    check_options(opts)
    if opts.transport not in TRANSPORTS:
        raise NumabenchError(f"unknown transport {opts.transport!r}; use {' or '.join(TRANSPORTS)}")
    if opts.repeat == 1:
        return _run_once(machine, plan, workload, opts, on_saved)
    base = Path(opts.run_dir or default_run_dir())
    result = None
    for k in range(1, opts.repeat + 1):
        rep_opts = replace(opts, run_dir=base / f"rep-{k}")
        result = _run_once(machine, plan, workload, rep_opts, on_saved,
                           repetition={"index": k, "of": opts.repeat, "fresh_workers": True,
                                       # read once for all repetitions; workers never reused
                                       "reused": ["machine", "plan"]})
    return result


def _run_once(machine: Machine, plan: Plan, workload: Workload, opts: LaunchOptions,
              on_saved: Callable[[list[Path]], None] | None,
              repetition: dict[str, Any] | None = None) -> RunResult:
    run = _Run(machine, plan, workload, opts)
    run.repetition = repetition
    run.prepare()
    # The status starts as a failure and becomes "ok" only on the try's last line: whatever
    # is raised, by whom, the results document cannot claim success.
    status, error, failed = "failed", "the run stopped before it finished", None
    unpin: Callable[[], None] = lambda: None  # noqa: E731
    with _StopSignals() as stops:
        try:
            with ProcessGroup(run.run_dir) as group, Coordinator(group, opts.transport) as coord:
                try:
                    run.prepare_backend(group)
                    run.spawn(group, coord)
                    unpin = run.place_coordinator()
                    run.wait_ready(coord)
                    run.sample_memory("ready")
                    if opts.before_measure is not None:
                        opts.before_measure()
                    run.measure(coord)
                    run.sample_memory("measured")
                    coord.stop_workers([i.id for i in plan.instances], timeout_s=opts.grace_s)
                    group.wait_all(opts.grace_s)
                    status, error = "ok", None
                except WorkerFailed as e:
                    error, failed = str(e), e.instance
                    raise
                except NumabenchError as e:
                    error = str(e)
                    if run.window_start_ns is not None and "timed out" in error:
                        error = f"{error}\n{run.stalled()}"
                        raise LaunchError(error) from None
                    raise
                except KeyboardInterrupt as e:
                    stops.hold()
                    how = f"by {e.args[0]}" if isinstance(e, _StopSignal) else "by the user"
                    status, error = "interrupted", f"interrupted {how}"
                    raise RunInterrupted(f"interrupted {how}: all instances stopped; partial "
                                         f"results saved in {run.run_dir}") from None
                except Exception as e:  # a bug: saved as a failure, the traceback in launch.log
                    error = f"unexpected error: {type(e).__name__}: {e}"
                    run.log(traceback.format_exc().rstrip())
                    raise LaunchError(f"{error}\n(a numabench bug; the traceback is in "
                                      f"{run.run_dir / 'launch.log'}; partial results saved)") from e
                finally:
                    stops.hold()
                    unpin()
                    run.progress.done()
                    group.stop(opts.grace_s)
                    release_preparation(run.prepared)
        finally:
            stops.hold()
            result = run.document(status, error, failed)
            saved = run.save(result)
            run.log(f"{status}: {len(run.samples)} requests measured; results in "
                    f"{', '.join(str(p) for p in saved)}" + (f"; {error.splitlines()[0]}" if error else ""))
            if on_saved:
                on_saved(saved)
    return result


