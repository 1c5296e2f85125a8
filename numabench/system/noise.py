"""Noise during a measuring window: load average, per-CPU busy and steal time, other processes' CPU time.

Two snapshots (start and end of the window) are compared by a pure function. Other processes are
those outside an excluded set (by default this process and its descendants: the coordinator and its
workers). A process's CPU time is attributed to the plan's CPUs by its affinity: all of it when it
may run only there, a share |affinity ∩ plan| / |affinity| when it may run elsewhere too (the kernel
does not say on which CPU a process spent its time). Processes that start and end inside the window
are not seen; /proc/stat's per-CPU busy time still counts them.

Thresholds (why these numbers: a tick is 10 ms, so short windows need an absolute floor too):
- OTHER_SHARE: another process attributed more than 10% of one CPU's time on the plan's CPUs over
  the window, and at least OTHER_MIN_S seconds, warns.
- STEAL_SHARE: the hypervisor took more than 5% of a plan CPU's time (steal) during the window.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numabench.system.facts import parse_loadavg
from numabench.system.model import read_text

OTHER_SHARE = 0.10
OTHER_MIN_S = 0.05
STEAL_SHARE = 0.05
TOP = 10  # processes kept in the record
CMDLINE_CHARS = 120


@dataclass(frozen=True)
class CpuTicks:
    busy: int  # user+nice+system+irq+softirq+steal (guest time is inside user)
    steal: int
    total: int  # busy + idle + iowait


@dataclass(frozen=True)
class ProcTime:
    pid: int
    name: str
    cpu_s: float  # user + system, all threads
    affinity: tuple[int, ...]
    cmdline: str = ""  # the first CMDLINE_CHARS characters: "python" alone names nothing


@dataclass(frozen=True)
class Snapshot:
    t_ns: int  # time.monotonic_ns()
    loadavg: tuple[float, float, float] | None
    cpus: dict[int, CpuTicks]
    procs: dict[tuple[int, float], ProcTime]  # (pid, create_time) → times: pid reuse is not confused
    errors: tuple[str, ...] = ()


def parse_proc_stat(text: str | None) -> dict[int, CpuTicks]:
    out: dict[int, CpuTicks] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu" or not parts[0][3:].isdigit():
            continue
        try:
            v = [int(x) for x in parts[1:9]]
            v += [0] * (8 - len(v))  # old kernels have fewer columns
        except ValueError:
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        busy = user + nice + system + irq + softirq + steal
        out[int(parts[0][3:])] = CpuTicks(busy, steal, busy + idle + iowait)
    return out


def own_tree() -> set[int]:
    """This process and its descendants (the coordinator, numactl-exec'd workers and their helpers)."""
    import psutil

    me = psutil.Process()
    try:
        return {me.pid} | {c.pid for c in me.children(recursive=True)}
    except psutil.Error:
        return {me.pid}


def _procs(cpus: set[int], exclude: Callable[[int], bool]) -> tuple[dict, list[str]]:
    import psutil

    out: dict[tuple[int, float], ProcTime] = {}
    errors: list[str] = []
    for p in psutil.process_iter(["pid", "name", "create_time", "cmdline"]):
        pid = p.info["pid"]
        if exclude(pid):
            continue
        try:
            aff = tuple(p.cpu_affinity())
            if not cpus & set(aff):
                continue
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            errors.append(f"pid {pid}: access denied")
            continue
        cmd = " ".join(p.info["cmdline"] or ())[:CMDLINE_CHARS]
        out[(pid, p.info["create_time"] or 0.0)] = ProcTime(pid, p.info["name"] or "?", t.user + t.system, aff, cmd)
    return out, errors


def snapshot(cpus: Iterable[int], exclude: Iterable[int] | Callable[[int], bool] | None = None,
             root: str | os.PathLike = "/") -> Snapshot:
    """Load average, /proc/stat and other processes that may run on `cpus`, now.

    `exclude`: pids (or a predicate on a pid) whose time is the run's own; default: own_tree().
    Processes are read live (psutil) only when `root` is "/".
    """
    root = Path(root)
    cpu_set = set(cpus)
    if exclude is None:
        mine = own_tree()
        skip = mine.__contains__
    elif callable(exclude):
        skip = exclude
    else:
        skip = set(exclude).__contains__
    procs, errors = _procs(cpu_set, skip) if str(root) == "/" else ({}, [])
    stat = parse_proc_stat(read_text(root, "proc/stat"))
    return Snapshot(time.monotonic_ns(), parse_loadavg(read_text(root, "proc/loadavg")),
                    {c: t for c, t in stat.items() if c in cpu_set}, procs, tuple(errors))


def compare(start: Snapshot, end: Snapshot, cpus: Iterable[int]) -> tuple[dict[str, Any], list[str]]:
    """(record, warnings) for the window between two snapshots. Pure."""
    plan = set(cpus)
    window_s = max((end.t_ns - start.t_ns) / 1e9, 1e-9)
    busy, steal = {}, {}
    for c in sorted(plan):
        a, b = start.cpus.get(c), end.cpus.get(c)
        if a is None or b is None or b.total <= a.total:
            continue
        total = b.total - a.total
        busy[str(c)] = round((b.busy - a.busy) / total, 4)
        steal[str(c)] = round((b.steal - a.steal) / total, 4)

    others = []
    for key, p in end.procs.items():
        before = start.procs.get(key)
        used = p.cpu_s - (before.cpu_s if before else 0.0)
        if used <= 0:
            continue
        inside = plan & set(p.affinity)
        only_plan = set(p.affinity) <= plan
        attributed = used if only_plan else used * len(inside) / max(len(p.affinity), 1)
        others.append({"pid": p.pid, "name": p.name, "cpu_s": round(used, 3),
                       "on_plan_cpus_s": round(attributed, 3), "share": round(attributed / window_s, 4),
                       "pinned_to_plan_cpus": only_plan, "started_in_window": before is None,
                       "affinity": _short(p.affinity), "cmdline": p.cmdline})
    others.sort(key=lambda o: -o["on_plan_cpus_s"])

    warnings = []
    for o in others:
        if o["share"] > OTHER_SHARE and o["on_plan_cpus_s"] >= OTHER_MIN_S:
            where = "pinned to" if o["pinned_to_plan_cpus"] else "allowed on"
            warnings.append(f"busy machine: process {o['name']} (pid {o['pid']}, {where} the plan's CPUs) "
                            f"used {o['share']:.0%} of a CPU there during the measuring window; timings "
                            "may be distorted")
    stolen = {c: s for c, s in steal.items() if s > STEAL_SHARE}
    if stolen:
        warnings.append("busy host: the hypervisor took " + ", ".join(f"{s:.0%} of CPU {c}" for c, s in stolen.items())
                        + " (steal time) during the measuring window; timings may be distorted")
    record = {
        "window_s": round(window_s, 3),
        "cpus": sorted(plan),
        "loadavg": {"start": list(start.loadavg) if start.loadavg else None,
                    "end": list(end.loadavg) if end.loadavg else None},
        "cpu_busy": busy,  # includes the run's own workers
        "cpu_steal": steal,
        "other_processes": others[:TOP],
        "thresholds": {"other_share": OTHER_SHARE, "other_min_s": OTHER_MIN_S, "steal_share": STEAL_SHARE},
        "errors": sorted(set(start.errors + end.errors))[:10],
        "warnings": warnings,
    }
    return record, warnings


def _short(cpus: tuple[int, ...]) -> str:
    from numabench.topology.cpulist import format_cpulist

    return format_cpulist(sorted(cpus))


class NoiseRecorder:
    """The launcher's hook: `start()` when the window opens, `stop()` when measuring ends.

    Never raises: noise is evidence about a run, not a reason to lose it; a failure is recorded.
    """

    def __init__(self, cpus: Iterable[int], exclude=None):
        self.cpus = tuple(cpus)
        self.exclude = exclude
        self._start: Snapshot | None = None
        self._end: Snapshot | None = None
        self._error: str | None = None
        self._record: dict[str, Any] | None = None

    def _take(self) -> Snapshot | None:
        try:
            return snapshot(self.cpus, self.exclude)
        except Exception as e:  # noqa: BLE001 - recorded in the document instead
            self._error = f"{type(e).__name__}: {e}"
            return None

    def start(self) -> None:
        self._start = self._take()

    def stop(self) -> None:
        if self._start is not None and self._end is None:
            self._end = self._take()

    def record(self) -> dict[str, Any] | None:
        """The window's record; a run that failed inside the window is closed here, and says so."""
        if self._record is None:
            ended_early = self._start is not None and self._end is None
            self.stop()
            if self._start is None or self._end is None:
                return {"error": self._error} if self._error else None
            self._record = compare(self._start, self._end, self.cpus)[0]
            if ended_early:
                self._record["window_closed"] = "when the results were written (the run stopped early)"
        return self._record

    def warnings(self) -> list[str]:
        rec = self.record()
        return list(rec.get("warnings", [])) if rec else []
