"""`numabench launch --ray ADDRESS --hosts N`: one plan measured on N hosts at once.

Each host plans the same request against its own topology and launches its pinned instances with
numabench's launcher. The clock starts together: every host reports when all of its instances are
READY (the launcher's `before_measure` hook), a barrier actor then fixes one start time on the
wall clock a moment ahead, and every host sleeps until it and starts measuring. Wall clocks must
agree across hosts (NTP keeps them within milliseconds, small against a measurement of seconds;
the skew each host saw is recorded).

Fleet throughput is all hosts' samples over the common window, shared start to the last
completion on any host; per-host throughput and max latency come from each host's own document,
which is kept whole in the fleet document.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from numabench import __version__
from numabench.cluster.connect import HOST_RESOURCE, on_this_node
from numabench.cluster.hosts import mixed_types_warning
from numabench.errors import LaunchError, NumabenchError

FLEET_SCHEMA = "numabench.fleet"
FLEET_VERSION = 1
START_LEAD_S = 0.25  # the shared start lies this far after the last READY: every host hears of it
POLL_S = 0.01
CANCEL_GRACE_S = 15.0


@dataclass(frozen=True)
class HostRun:
    """What one host measured, placed on the common (wall-clock) timeline."""

    host: dict[str, Any]
    status: str
    error: str | None
    start_wall: float | None  # when this host's clock started (seconds since the epoch)
    end_wall: float | None  # its last completion
    samples: int
    throughput: float  # over its own window
    max_latency_ms: float | None  # its slowest request
    step_latency_p50_ms: float | None  # split mode: the step's max latency, median


def host_run(out: dict[str, Any]) -> HostRun:
    """Pure: a member task's return value → HostRun."""
    doc = out.get("doc") or {}
    raw, summary = doc.get("raw") or {}, doc.get("summary") or {}
    sent, received = raw.get("sent_ns") or [], raw.get("received_ns") or []
    start_wall, start_mono = out.get("start_wall"), out.get("start_mono_ns")
    end_wall = (start_wall + (max(received) - start_mono) / 1e9
                if received and start_wall is not None else None)
    step = (summary.get("step_latency") or {}).get("p50_ns")
    return HostRun(
        host=out["host"], status=doc.get("status", "failed") if not out.get("error") else "failed",
        error=out.get("error"), start_wall=start_wall, end_wall=end_wall,
        samples=int(summary.get("samples") or 0), throughput=float(summary.get("throughput") or 0.0),
        max_latency_ms=(max(r - s for s, r in zip(sent, received)) / 1e6) if sent else None,
        step_latency_p50_ms=step / 1e6 if step else None)


def fleet_summary(runs: list[HostRun]) -> dict[str, Any]:
    """Pure: the fleet over the common window (first start to the last completion on any host)."""
    timed = [r for r in runs if r.start_wall is not None and r.end_wall is not None]
    if not timed:
        return {"hosts": len(runs), "samples": 0, "window_s": 0.0, "throughput": 0.0,
                "throughput_sum": 0.0, "start_skew_ms": None, "max_latency_ms": None}
    start = min(r.start_wall for r in timed)
    window = max(max(r.end_wall for r in timed) - start, 1e-9)
    samples = sum(r.samples for r in timed)
    lat = [r.max_latency_ms for r in timed if r.max_latency_ms is not None]
    return {"hosts": len(runs), "samples": samples, "window_s": window, "throughput": samples / window,
            "throughput_sum": sum(r.throughput for r in timed),
            "start_skew_ms": (max(r.start_wall for r in timed) - start) * 1e3,
            "max_latency_ms": max(lat) if lat else None}


def render_fleet(doc: dict[str, Any]) -> str:
    f = doc["fleet"]
    lines = [f"{'host':<28} {'status':<7} {'samples':>8} {'samples/s':>10} {'max lat ms':>10} "
             f"{'step p50 ms':>11}"]
    for h in doc["hosts"]:
        name = f"{h['host']['hostname']}/{h['host']['node_id'][:8]}"
        step = f"{h['step_latency_p50_ms']:.2f}" if h["step_latency_p50_ms"] else "-"
        lat = f"{h['max_latency_ms']:.2f}" if h["max_latency_ms"] is not None else "-"
        lines.append(f"{name:<28} {h['status']:<7} {h['samples']:>8} {h['throughput']:>10.2f} "
                     f"{lat:>10} {step:>11}")
    lines.append(f"fleet: {f['hosts']} hosts, {f['samples']} samples in {f['window_s']:.3f} s: "
                 f"{f['throughput']:.2f} samples/s over the common window (sum of hosts "
                 f"{f['throughput_sum']:.2f}); start skew {f['start_skew_ms'] or 0:.1f} ms")
    lines += [f"warning: {w}" for w in doc["warnings"]]
    return "\n".join(lines)


class _Barrier:
    """The common start: READY from every host, then one wall-clock start time for all."""

    def __init__(self, hosts: int):
        self.hosts, self.ready, self.start, self.aborted = hosts, set(), None, None

    def arrive(self, node_id: str) -> None:
        self.ready.add(node_id)
        if len(self.ready) == self.hosts and self.start is None:
            self.start = time.time() + START_LEAD_S

    def start_at(self):
        return ("abort", self.aborted) if self.aborted else ("start", self.start)

    def abort(self, why: str) -> None:
        self.aborted = self.aborted or why


def fleet_member(plan_args: dict[str, Any], plan_text: str | None, workload, launch_opts,
                 barrier, timeout_s: float) -> dict[str, Any]:
    """The Ray task body on one host: plan here, launch, wait at the barrier, measure."""
    import ray

    from numabench.cluster.hosts import this_host
    from numabench.cluster.sweep import _read_logs
    from numabench.launcher.launch import run_launch
    from numabench.plans import plan_for_launch
    from numabench.topology import read_machine

    machine = read_machine("/")
    host = this_host(machine)
    run_dir = Path(tempfile.gettempdir()) / "numabench-ray" / f"fleet-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"host": host.to_dict(), "doc": None, "error": None}

    def start_together() -> None:
        ray.get(barrier.arrive.remote(host.node_id))
        deadline = time.monotonic() + timeout_s
        while True:
            what, value = ray.get(barrier.start_at.remote())
            if what == "abort":
                raise LaunchError(f"fleet stopped before the start: {value}")
            if value is not None:
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"not every host was ready within {timeout_s:.0f} s")
            time.sleep(POLL_S)
        time.sleep(max(value - time.time(), 0.0))
        out["start_wall"], out["start_mono_ns"] = time.time(), time.monotonic_ns()
        out["start_asked"] = value

    try:
        if plan_text is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "plan.yaml").write_text(plan_text)
            plan_args = {**plan_args, "plan_file": str(run_dir / "plan.yaml")}
        plan = plan_for_launch(machine, **plan_args)
        out["doc"] = run_launch(machine, plan, workload, replace(
            launch_opts, run_dir=run_dir, output=None, progress=False, before_measure=start_together)).to_dict()
    except NumabenchError as e:
        out["error"] = f"on host {host.short}: {e}"
        if out["doc"] is None:
            barrier.abort.remote(out["error"])
    finally:
        out["logs"] = _read_logs(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def run_fleet(address: str, hosts: int | None, plan_args: dict[str, Any], workload, launch_opts,
              output: Path | None = None, stream=None) -> dict[str, Any]:
    """Launch the plan on `hosts` hosts (default: all) with a common start; returns the fleet
    document (written to `output` too); raises LaunchError, after writing it, when a host failed."""
    import sys

    from numabench.cluster.connect import connect, host_count
    from numabench.launcher.launch import default_run_dir

    stream = stream or sys.stderr
    if workload.text_file:
        raise NumabenchError("--text cannot be combined with --ray: the hosts do not see this "
                             "host's files; use random token ids")
    plan_file = plan_args.get("plan_file")
    plan_text = Path(plan_file).read_text() if plan_file else None
    with connect(address) as ray:
        have = host_count(ray)
        n = have if hosts is None else hosts
        if n < 1 or n > have:
            raise NumabenchError(f"--hosts {n}: the cluster has {have} host(s) advertising "
                                 f"{HOST_RESOURCE!r}; choose 1 to {have}, or add hosts (docs/cluster.md)")
        barrier = ray.remote(**on_this_node(ray))(_Barrier).remote(n)
        member = ray.remote(num_cpus=0, resources={HOST_RESOURCE: 1}, max_retries=0)(fleet_member)
        refs = [member.remote(plan_args, plan_text, workload, launch_opts, barrier,
                              launch_opts.ready_timeout_s) for _ in range(n)]
        stream.write(f"fleet launch on {n} host(s)\n")
        outs, lost = {}, []
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in done:
                    try:
                        outs[ref] = ray.get(ref)
                    except ray.exceptions.RayError as e:  # the host went away
                        lost.append(f"a host was lost: {type(e).__name__}: {str(e).splitlines()[0]}")
                        barrier.abort.remote(lost[-1])
                    else:
                        if outs[ref]["error"]:
                            barrier.abort.remote(outs[ref]["error"])
        finally:
            left = [r for r in refs if r not in outs]
            if left and not lost:  # Ctrl-C here: the hosts stop their workers, then we force it
                barrier.abort.remote("the driver was interrupted")
                for ref in left:
                    ray.cancel(ref, force=False)
                ray.wait(left, num_returns=len(left), timeout=CANCEL_GRACE_S)
                for ref in left:
                    ray.cancel(ref, force=True)
            ray.kill(barrier)
    doc = fleet_document(list(outs.values()), lost, plan_args, workload)
    run_dir = Path(launch_opts.run_dir or default_run_dir())
    for o in outs.values():  # each host's logs, as a local launch keeps them
        for name, text in o["logs"].items():
            path = run_dir / "hosts" / f"{o['host']['hostname']}-{o['host']['node_id'][:8]}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    from numabench.results import write_json_atomic

    for path in [run_dir / "fleet.json"] + ([output] if output is not None else []):
        write_json_atomic(path, doc)
    stream.write(f"fleet results: {', '.join(str(p) for p in [run_dir / 'fleet.json', output] if p)}\n")
    if doc["status"] != "ok":
        raise LaunchError("fleet launch failed: " + "; ".join(doc["errors"])
                          + f"; partial results and each host's logs in {run_dir}")
    return doc


def fleet_document(outs: list[dict[str, Any]], lost: list[str], plan_args: dict[str, Any],
                   workload) -> dict[str, Any]:
    runs = [host_run(o) for o in outs]
    errors = [r.error for r in runs if r.error] + lost
    warnings = [w for w in [mixed_types_warning([o["host"]["machine_type"] for o in outs])] if w]
    fleet = fleet_summary(runs)
    if fleet["start_skew_ms"] is not None and fleet["start_skew_ms"] > 50:
        warnings.append(f"hosts started {fleet['start_skew_ms']:.0f} ms apart: check their clocks (NTP)")
    return {
        "schema": FLEET_SCHEMA, "version": FLEET_VERSION,
        "status": "ok" if not errors and all(r.status == "ok" for r in runs) else "failed",
        "errors": errors, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "numabench": __version__, "plan_request": plan_args, "workload": asdict(workload),
        "fleet": fleet, "hosts": [asdict(r) for r in runs], "warnings": warnings,
        "documents": {o["host"]["node_id"]: o["doc"] for o in outs if o["doc"]},
    }
