"""The resumable sweep runner: validate every point, then launch them one by one.

Output folder (docs/experiments.md):

    OUT/experiment.yaml      the experiment as it was run
    OUT/manifest.json        schema numabench.sweep v1: every point, its status and its file
    OUT/points/<id>.json     one results document per finished point (numabench.results v1,
                             plus an "experiment" key naming the point)
    OUT/runs/<id>/           the launch's own folder: launch.log, worker logs, results.json

Each point file is written atomically as soon as the point finishes, so an interrupted sweep
loses nothing finished; `--resume` treats a point as done when its file exists, is complete
(status ok) and was made by the same point parameters, and runs everything else again.
"""
from __future__ import annotations

import datetime as _dt
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from numabench import __version__
from numabench.errors import LaunchError, NumabenchError
from numabench.experiments.points import Point, expand, physical_cores, validate_points
from numabench.experiments.spec import Experiment, ExperimentError, load_experiment
from numabench.fileio import check_output_dir, write_json_atomic, write_text_atomic
from numabench.launcher.launch import STOP_SIGNALS, LaunchOptions, RunInterrupted, run_launch
from numabench.plans.yamlio import read_yaml_file
from numabench.topology.model import Machine

MANIFEST_SCHEMA = "numabench.sweep"
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"
POINTS_DIR = "points"
RUNS_DIR = "runs"


class SweepInterrupted(LaunchError):
    exit_code = 130


@dataclass(frozen=True)
class SweepOutcome:
    out_dir: Path
    total: int
    ran: tuple[str, ...]  # point ids run now
    skipped: tuple[str, ...]  # finished earlier (resume)
    failed: tuple[str, ...]


def point_file(out_dir: Path, point: Point) -> Path:
    return out_dir / POINTS_DIR / f"{point.id}.json"


def finished(out_dir: Path, point: Point) -> bool:
    """A complete results file made by exactly this point (a changed experiment reruns it)."""
    import json

    path = point_file(out_dir, point)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (doc.get("status") == "ok"
            and (doc.get("experiment") or {}).get("point") == point.to_dict())


def plan_sweep(experiment_file: str | Path, machine: Machine):
    """Read, expand and validate: (experiment, points, plans). Nothing runs."""
    exp = load_experiment(experiment_file)
    if exp.kind == "dispatch":  # plans x pads x rates, served by the daemon (experiments/dispatch.py)
        from numabench.experiments.dispatch import plan_dispatch

        return (exp, *plan_dispatch(exp, machine))
    points = expand(exp, machine)
    plans = validate_points(points, machine, where=exp.where())
    return exp, points, plans


def dry_run_text(exp: Experiment, points, plans, machine: Machine) -> str:
    """`sweep --dry-run`: every point with its plan's shape, points that leave usable physical
    cores idle flagged with '!' (pure)."""
    from numabench.launcher.placement import core_use

    where = machine.model_name or "this machine"
    lines = [f"{exp.name} ({exp.kind}): {len(points)} points, all valid on {where}"]
    flagged = 0
    for k, (p, plan) in enumerate(zip(points, plans)):
        flag = core_use(machine, plan.cpus).flag()
        flagged += flag is not None
        shape = getattr(p, "shape", None) or f"{len(plan.instances)} x {len(plan.instances[0].cpus)} CPUs"
        lines.append(f"{k + 1:>4}{' !' if flag else '  '} {p.id}  ({shape}"
                     + (f"; {flag}" if flag else "") + ")")
    if flagged:
        lines.append(f"! {flagged} of {len(points)} points leave usable physical cores idle")
    return "\n".join(lines)


def _fmt_s(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _machine_summary(machine: Machine) -> dict[str, Any]:
    return {"model_name": machine.model_name, "physical_cores": physical_cores(machine),
            "cpus_usable": len(machine.cpus_usable), "threads_per_core": machine.threads_per_core,
            "nodes": [n.id for n in machine.nodes if n.cpus]}


def write_sweep_manifest(out_dir: Path, *, status: str, name: str, kind: str, description: str | None,
                         experiment_file: str, created: str, machine: Machine,
                         points: list[dict[str, Any]]) -> None:
    """The manifest (schema numabench.sweep) that report and --resume read: written by sweeps and
    by `tune`, whose trials are points of the same folder layout."""
    doc = {
        "schema": MANIFEST_SCHEMA, "version": MANIFEST_VERSION, "status": status,
        "name": name, "kind": kind, "description": description,
        "experiment_file": experiment_file, "created": created,
        "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "numabench": __version__, "machine": _machine_summary(machine), "points": points,
    }
    write_json_atomic(out_dir / MANIFEST, doc)


def _stop_signal(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _hold_signals() -> None:
    """While the manifest is written after an interrupt: later signals wait (ignored)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (*STOP_SIGNALS, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


class _Sweep:
    def __init__(self, machine: Machine, exp: Experiment, experiment_text: str, points, plans,
                 out_dir: Path, launch_opts, stream: TextIO, clock: Callable[[], float],
                 executor=None):
        self.machine, self.exp, self.points, self.plans = machine, exp, points, plans
        self.out_dir, self.launch_opts, self.stream, self.clock = out_dir, launch_opts, stream, clock
        self.experiment_text = experiment_text
        # Where points run: None = here, one after the other; else an object that runs them
        # elsewhere (numabench.cluster.sweep.RayPointExecutor) and yields each as it finishes.
        self.executor = executor
        self.entries: dict[str, dict[str, Any]] = {}
        self.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def load_previous(self) -> None:
        """Keep what an earlier run of this folder recorded (errors of failed points, times)."""
        import json

        try:
            old = json.loads((self.out_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return
        self.created = old.get("created", self.created)
        by_id = {e.get("id"): e for e in old.get("points", [])}
        for p in self.points:
            if p.id in by_id and by_id[p.id].get("params") == p.to_dict():
                self.entries[p.id] = by_id[p.id]

    def write_manifest(self, status: str) -> None:
        write_sweep_manifest(self.out_dir, status=status, name=self.exp.name, kind=self.exp.kind,
                             description=self.exp.description, experiment_file="experiment.yaml",
                             created=self.created, machine=self.machine,
                             points=[self.entries[p.id] for p in self.points])

    def entry(self, k: int, p: Point, status: str, **extra) -> None:
        e = self.entries.get(p.id, {})
        e.update({"id": p.id, "index": k, "label": p.label, "status": status,
                  "file": f"{POINTS_DIR}/{p.id}.json", "run_dir": f"{RUNS_DIR}/{p.id}",
                  "params": p.to_dict()})
        e.update(extra)
        self.entries[p.id] = e

    def run_point(self, k: int, p: Point, plan) -> dict[str, Any]:
        """Launch one point (here, or through the executor) and save its results file; raises
        what the launch raised."""
        if self.executor is not None:  # it ran elsewhere: its document (or error) is back
            return self._record(k, p, self.executor.result(k))
        run_dir = self.out_dir / RUNS_DIR / p.id
        if run_dir.exists():  # an earlier failed or interrupted attempt: keep its logs aside
            attempt = 1
            while run_dir.with_name(f"{p.id}.attempt-{attempt}").exists():
                attempt += 1
            run_dir.rename(run_dir.with_name(f"{p.id}.attempt-{attempt}"))
        opts = replace(p.launch_options(self.launch_opts), run_dir=run_dir, output=None)
        return self._record(k, p, run_launch(self.machine, plan, p.workload(), opts).to_dict())

    def _record(self, k: int, p: Point, doc: dict[str, Any]) -> dict[str, Any]:
        doc["experiment"] = {"name": self.exp.name, "kind": self.exp.kind, "point_id": p.id,
                             "index": k, "total": len(self.points), "point": p.to_dict()}
        write_json_atomic(point_file(self.out_dir, p), doc)
        return doc

    def run(self, resume: bool) -> SweepOutcome:
        try:
            return self._run(resume)
        except KeyboardInterrupt:  # between points: everything finished is already saved
            _hold_signals()
            for p in self.points:
                if self.entries.get(p.id, {}).get("status") == "running":
                    self.entries[p.id]["status"] = "interrupted"
            if self.entries:
                self.write_manifest("interrupted")
            raise SweepInterrupted(f"interrupted; finished points are saved in {self.out_dir}; run "
                                   "the same command with --resume to finish") from None

    def _run(self, resume: bool) -> SweepOutcome:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out_dir / "experiment.yaml", self.experiment_text)
        if resume:
            self.load_previous()
        todo = []
        for k, p in enumerate(self.points):
            if resume and finished(self.out_dir, p):
                self.entry(k, p, "ok")
            else:
                todo.append(k)
                prior = self.entries.get(p.id, {}).get("status")
                self.entry(k, p, "pending", **({"previous_status": prior} if prior else {}))
        skipped = tuple(p.id for k, p in enumerate(self.points) if k not in set(todo))
        total = len(self.points)
        self.say(f"sweep {self.exp.name} ({self.exp.kind}): {total} points"
                 + (f", {len(skipped)} already finished (skipped)" if skipped else "")
                 + f"; results in {self.out_dir}")
        self.write_manifest("running")
        try:
            return self._points(todo, skipped, total)
        except BaseException as exc:
            # whatever stopped the loop, the manifest must not stay "running"
            _hold_signals()
            stopped = isinstance(exc, (KeyboardInterrupt, SweepInterrupted))
            for e in self.entries.values():
                if e.get("status") == "running":
                    e["status"] = "interrupted" if stopped else "failed"
                    e.setdefault("error", f"the sweep stopped: {type(exc).__name__}: {exc}"[:500])
            self.write_manifest("interrupted" if stopped else "failed")
            raise

    def _points(self, todo: list[int], skipped: tuple[str, ...], total: int) -> SweepOutcome:
        ran, failed, durations = [], [], []
        done = len(skipped)
        for k in todo if self.executor is None else self.executor.run(self, todo):
            p = self.points[k]
            self.say(f"[{done + 1}/{total}] {p.label}")
            self.entry(k, p, "running", started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            self.write_manifest("running")
            t0 = self.clock() - (self.executor.seconds(k) if self.executor is not None else 0.0)
            try:
                doc = self.run_point(k, p, self.plans[k])
            except (KeyboardInterrupt, RunInterrupted) as e:
                _hold_signals()  # a second Ctrl-C must not cut the manifest short
                how = str(e).split(":")[0] if isinstance(e, RunInterrupted) else "interrupted"
                self.entry(k, p, "interrupted", error=how)
                self.write_manifest("interrupted")
                raise SweepInterrupted(
                    f"interrupted: {done} of {total} points finished and saved in {self.out_dir}; "
                    "run the same command with --resume to finish") from None
            except Exception as e:  # noqa: BLE001 - one point's failure, even a bug, is that point's
                seconds = self.clock() - t0
                error = str(e) if isinstance(e, NumabenchError) else f"{type(e).__name__}: {e}"
                self.entry(k, p, "failed", error=error, seconds=round(seconds, 3))
                self.write_manifest("running")
                failed.append(p.id)
                self.say(f"  failed after {_fmt_s(seconds)}: {(error.splitlines() or [''])[0]}")
                continue
            seconds = self.clock() - t0
            durations.append(seconds)
            done += 1
            ran.append(p.id)
            s = doc["summary"]
            step = (s.get("step_latency") or {}).get("p50_ns")
            self.entry(k, p, "ok", error=None, seconds=round(seconds, 3),
                       finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       throughput=s["throughput"])
            self.write_manifest("running")
            left = len(todo) - len(ran) - len(failed)
            eta = f", about {_fmt_s(sum(durations) / len(durations) * left)} left" if left else ""
            self.say(f"  done {done}/{total} in {_fmt_s(seconds)}: {s['throughput']:.2f} samples/s"
                     + (f", step p50 {step / 1e6:.1f} ms" if step else "") + eta)
        self.write_manifest("failed" if failed else "ok")
        return SweepOutcome(self.out_dir, total, tuple(ran), skipped, tuple(failed))


def run_sweep(machine: Machine, experiment_file: str | Path, out_dir: str | Path | None = None,
              *, resume: bool = False, launch_opts=None, stream: TextIO | None = None,
              clock: Callable[[], float] = time.monotonic, executor=None) -> SweepOutcome:
    """Run (or resume) a sweep; raises SweepInterrupted on Ctrl-C / SIGTERM, LaunchError when
    points failed (after running all the others). `executor` runs the points elsewhere (see
    _Sweep.executor); by default they run here."""
    experiment_file = Path(experiment_file)
    experiment_text = read_yaml_file(experiment_file, "experiment", ExperimentError)
    exp, points, plans = plan_sweep(experiment_file, machine)
    out = Path(out_dir) if out_dir is not None else Path("results") / exp.name
    check_output_dir(out, "sweep folder")
    if (out / MANIFEST).exists() and not resume:
        raise ExperimentError(f"{out} already holds a sweep; add --resume to finish it, or choose "
                              "another folder with -o")
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"{out} exists and is not a folder")
    opts = launch_opts or LaunchOptions()
    if exp.kind == "dispatch":  # each point runs the daemon and its request stream here
        if executor is not None:
            raise ExperimentError("a dispatch experiment runs on this machine (the daemon and the "
                                  "request stream together); drop --ray", where=exp.where("kind"))
        from numabench.experiments.dispatch import DispatchExecutor

        executor = DispatchExecutor()
    sweep = _Sweep(machine, exp, experiment_text, points, plans, out, opts,
                   stream or sys.stderr, clock, executor)
    # SIGTERM or SIGHUP between points stops the sweep as cleanly as Ctrl-C (run_launch handles
    # them inside a point).
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, _stop_signal) for sig in STOP_SIGNALS} if main else {}
    if main:
        saved[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        outcome = sweep.run(resume)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if outcome.failed:
        raise LaunchError(f"{len(outcome.failed)} of {outcome.total} points failed "
                          f"({', '.join(outcome.failed[:5])}{', ...' if len(outcome.failed) > 5 else ''}); "
                          f"see {out / MANIFEST} and the logs under {out / RUNS_DIR}; "
                          "rerun with --resume to retry only those")
    return outcome
