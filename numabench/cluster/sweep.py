"""`numabench sweep --ray`: the sweep runner's points executed as whole-host Ray tasks.

The runner (experiments/runner.py) keeps everything it does locally (manifest, point files,
resume, Ctrl-C); this module only changes *where a point runs*. All pending points are submitted
at once; Ray starts each on a free host (one `numabench_host` unit each, so one point per host at
a time) and the runner receives them in the order they finish. On the host, the task reads that
host's topology, plans the point there and runs numabench's own launcher, pinning locally; it
returns the results document and the run's logs, which the driver writes into the sweep folder.

A host lost mid-point (its node dies, its worker crashes) marks that attempt failed in the
manifest and resubmits the point once; Ray places it on a host that is still alive.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from numabench.cluster.connect import HOST_RESOURCE, on_this_node
from numabench.cluster.hosts import HostInfo, mixed_types_warning
from numabench.errors import LaunchError, NumabenchError

LOG_LIMIT_BYTES = 1 << 20  # logs carried back per file; the rest stays on the host
CANCEL_GRACE_S = 15.0  # a cancelled point stops its workers (as on Ctrl-C) before we force it


def run_point_on_host(point_dict: dict[str, Any], launch_opts, tracker, key: tuple[int, int]) -> dict[str, Any]:
    """The Ray task body: one sweep point on this host. Never raises for a failed launch (the
    error comes back as data, with the logs); a lost host surfaces as a Ray error instead."""
    import ray

    from numabench.cluster.hosts import this_host
    from numabench.experiments.points import Point
    from numabench.launcher.launch import check_workload, run_launch
    from numabench.topology import read_machine

    t0 = time.monotonic()
    machine = read_machine("/")
    host = this_host(machine)
    if tracker is not None:
        ray.get(tracker.started.remote(key, host.to_dict()))
    point = Point.from_dict(point_dict)
    run_dir = Path(tempfile.gettempdir()) / "numabench-ray" / f"{point.id}-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"host": host.to_dict(), "doc": None, "error": None, "logs": {}}
    try:
        plan = point.make_plan(machine)  # this host's own plan
        check_workload(plan, point.workload())
        out["doc"] = run_launch(machine, plan, point.workload(),
                                replace(point.launch_options(launch_opts), run_dir=run_dir, output=None,
                                        progress=False)).to_dict()
    except NumabenchError as e:
        out["error"] = f"on host {host.short}: {e}"
    finally:
        out["seconds"] = time.monotonic() - t0
        out["logs"] = _read_logs(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)  # its logs travel back with the result
    return out


def _read_logs(run_dir: Path) -> dict[str, str]:
    logs = {}
    for f in sorted(run_dir.rglob("*")) if run_dir.is_dir() else ():
        if f.is_file() and f.name != "results.json":
            with open(f, "rb") as fh:
                logs[str(f.relative_to(run_dir))] = fh.read(LOG_LIMIT_BYTES).decode("utf-8", "replace")
    return logs


class _Tracker:
    """A tiny actor the point tasks report to as they start, so the driver knows where each
    point runs (and so where a lost attempt was) without Ray's state API."""

    def __init__(self):
        self.news: list[tuple[tuple[int, int], dict[str, Any]]] = []

    def started(self, key, host):
        self.news.append((key, host))

    def drain(self):
        news, self.news = self.news, []
        return news


class RayPointExecutor:
    """The runner's hook for where points run (`run_sweep(..., executor=...)`).

    `run(sweep, todo)` submits every pending point and yields each index as its point finishes;
    `result(k)` then returns its document or raises its error, and `seconds(k)` how long it ran
    on its host. `retries` is how often a point lost with its host is resubmitted.
    """

    def __init__(self, ray, hosts: list[HostInfo], launch_opts, retries: int = 1):
        self.ray, self.hosts, self.launch_opts, self.retries = ray, hosts, launch_opts, retries
        self.outcomes: dict[int, dict[str, Any] | NumabenchError] = {}
        self.durations: dict[int, float] = {}
        self.attempts: dict[int, list[dict[str, Any]]] = {}
        self.mixed = mixed_types_warning([h.machine_type for h in hosts])

    def seconds(self, k: int) -> float:
        return self.durations.get(k, 0.0)

    def result(self, k: int) -> dict[str, Any]:
        out = self.outcomes.pop(k)
        if isinstance(out, NumabenchError):
            raise out
        return out

    def run(self, sweep, todo: list[int]):
        self._gen = self._run(sweep, todo)
        return self._gen

    def close(self) -> None:
        """Stop the points still out there. The runner leaves its loop over `run` on Ctrl-C or
        an error while the generator may still hold running tasks: closing it runs its cleanup
        now, while this process is still connected to Ray, not whenever it is collected."""
        gen = getattr(self, "_gen", None)
        if gen is not None:
            gen.close()

    def _run(self, sweep, todo: list[int]):
        ray = self.ray
        task = ray.remote(num_cpus=0, resources={HOST_RESOURCE: 1}, max_retries=0)(run_point_on_host)
        tracker = ray.remote(**on_this_node(ray))(_Tracker).remote()
        running: dict[Any, int] = {}  # object ref -> point index
        where: dict[tuple[int, int], dict[str, Any]] = {}  # (point, attempt) -> host

        def submit(k: int) -> None:
            attempt = len(self.attempts.setdefault(k, []))
            ref = task.remote(sweep.points[k].to_dict(), self.launch_opts, tracker, (k, attempt))
            running[ref] = k

        def news() -> None:
            started = ray.get(tracker.drain.remote())
            for (k, attempt), host in started:
                where[(k, attempt)] = host
                sweep.entry(k, sweep.points[k], "running", host=host, machine_type=host["machine_type"])
                sweep.say(f"  started on {_short(host)}: {sweep.points[k].label}")
            if started:
                sweep.write_manifest("running")

        if self.mixed:
            sweep.say(f"warning: {self.mixed}")
        sweep.say(f"running on {len(self.hosts)} host(s): " + ", ".join(h.short for h in self.hosts))
        for k in todo:
            submit(k)
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                news()
                if not done:
                    continue
                k = running.pop(done[0])
                attempt = len(self.attempts[k])
                host = where.get((k, attempt))
                try:
                    out = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:  # a bug in the task itself, not a lost host
                    self._finish(k, sweep, LaunchError(f"point failed on its host: {e}"), None)
                    yield k
                    continue
                except ray.exceptions.RayError as e:  # the host (node, raylet or worker) is gone
                    what = (f"host {_short(host)} lost mid-point: {type(e).__name__} (the host, its "
                            "Ray node or the point's Ray worker died)")
                    self.attempts[k].append({"host": host, "status": "failed", "error": what})
                    if attempt < self.retries:
                        sweep.say(f"  {sweep.points[k].label}: {what}; rerunning it on another host")
                        sweep.entry(k, sweep.points[k], "pending", attempts=self.attempts[k])
                        submit(k)
                        continue
                    self._finish(k, sweep, LaunchError(f"{what}; given up after {attempt + 1} attempts"), None)
                    yield k
                    continue
                self.attempts[k].append({"host": out["host"], "status": "ok" if out["doc"] else "failed",
                                         **({"error": out["error"]} if out["error"] else {})})
                self._write_logs(sweep, k, out["logs"])
                self.durations[k] = out["seconds"]
                self._finish(k, sweep, out["doc"] if out["doc"] is not None else LaunchError(out["error"]),
                             out["host"])
                yield k
        finally:
            if running:  # Ctrl-C or an error in the driver: stop the points still out there
                refs = list(running)
                for ref in refs:
                    ray.cancel(ref, force=False)  # KeyboardInterrupt on the host: workers stopped
                stopped, _ = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
                for ref in refs:
                    ray.cancel(ref, force=True)
                for ref in stopped:  # keep the interrupted attempts' logs, as a local sweep does
                    try:
                        self._write_logs(sweep, running[ref], ray.get(ref, timeout=5)["logs"])
                    except (ray.exceptions.RayError, OSError):
                        pass
            ray.kill(tracker)

    def _finish(self, k: int, sweep, outcome, host: dict[str, Any] | None) -> None:
        sweep.entry(k, sweep.points[k], "running", attempts=self.attempts[k],
                    **({"host": host, "machine_type": host["machine_type"]} if host else {}))
        if isinstance(outcome, dict):
            outcome["cluster"] = {"host": host, "attempts": self.attempts[k],
                                  "hosts": [h.to_dict() for h in self.hosts]}
            if self.mixed:
                outcome.setdefault("warnings", []).append(self.mixed)
        self.outcomes[k] = outcome

    @staticmethod
    def _write_logs(sweep, k: int, logs: dict[str, str]) -> None:
        """The host's logs under runs/<id>/ as a local sweep has them (earlier attempts set aside)."""
        from numabench.experiments.runner import RUNS_DIR

        pid = sweep.points[k].id
        run_dir = sweep.out_dir / RUNS_DIR / pid
        if run_dir.exists():
            n = 1
            while run_dir.with_name(f"{pid}.attempt-{n}").exists():
                n += 1
            run_dir.rename(run_dir.with_name(f"{pid}.attempt-{n}"))
        for name, text in logs.items():
            path = run_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _short(host: dict[str, Any] | None) -> str:
    return f"{host['hostname']}/{host['node_id'][:8]}" if host else "(not yet known)"


def _reference(ray):
    """(hosts, machine): every host's description, and the topology of the first host of the most
    common machine type, against which the experiment is expanded and validated."""
    from collections import Counter

    from numabench.cluster.hosts import probe_hosts

    probed = probe_hosts(ray)
    common = Counter(h.machine_type for h, _ in probed).most_common(1)[0][0]
    return [h for h, _ in probed], next(m for h, m in probed if h.machine_type == common)


def reference_machine(address: str):
    """The machine a `sweep --ray --dry-run` validates against (see `_reference`)."""
    from numabench.cluster.connect import connect

    with connect(address) as ray:
        return _reference(ray)[1]


def run_cluster_sweep(address: str, experiment_file, out_dir=None, *, resume: bool = False,
                      launch_opts=None, stream=None):
    """`numabench sweep EXP --ray ADDRESS`: points expanded and validated against a host's
    machine (the first host of the most common type), then run across all hosts."""
    from numabench.cluster.connect import connect
    from numabench.experiments.runner import run_sweep
    from numabench.launcher.launch import LaunchOptions

    with connect(address) as ray:
        hosts, reference = _reference(ray)
        executor = RayPointExecutor(ray, hosts, launch_opts or LaunchOptions())
        try:
            return run_sweep(reference, experiment_file, out_dir, resume=resume,
                             launch_opts=launch_opts, stream=stream, executor=executor)
        finally:
            executor.close()
