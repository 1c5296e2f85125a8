"""Noise over a measuring window: attribution, thresholds, and a real CPU hog during a noop launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from numabench.system import noise
from numabench.system.noise import CpuTicks, NoiseRecorder, ProcTime, Snapshot, compare, parse_proc_stat

STAT = """cpu  10 0 10 100 0 0 0 0 0 0
cpu0 5 0 5 50 0 0 0 0 0 0
cpu1 5 1 5 50 2 1 1 3 0 0
intr 12345
cpu7 1 2 3
"""


def test_parse_proc_stat_counts_busy_steal_and_old_kernels_short_lines():
    got = parse_proc_stat(STAT)
    assert got[0] == CpuTicks(busy=10, steal=0, total=60)
    assert got[1] == CpuTicks(busy=16, steal=3, total=68)
    assert got[7] == CpuTicks(busy=6, steal=0, total=6)  # columns missing on old kernels count as 0
    assert parse_proc_stat("cpu0 a b c\n\x00\xff") == {}
    assert parse_proc_stat(None) == {}


def snap(t_s: float, procs=(), cpus=None) -> Snapshot:
    return Snapshot(int(t_s * 1e9), (0.1, 0.2, 0.3), cpus or {},
                    {(p.pid, 1.0): p for p in procs})


def test_a_process_pinned_to_the_plan_cpu_is_attributed_and_warned_about():
    start = snap(0, [ProcTime(7, "hog", 1.0, (1,)), ProcTime(8, "quiet", 5.0, (1,))])
    end = snap(2, [ProcTime(7, "hog", 2.6, (1,)), ProcTime(8, "quiet", 5.02, (1,))])
    record, warnings = compare(start, end, [1])
    hog = record["other_processes"][0]
    assert hog["pid"] == 7 and hog["on_plan_cpus_s"] == pytest.approx(1.6) and hog["pinned_to_plan_cpus"]
    assert hog["share"] == pytest.approx(0.8)
    assert len(warnings) == 1 and "hog (pid 7, pinned to the plan's CPUs) used 80%" in warnings[0]


def test_a_process_allowed_elsewhere_too_gets_a_proportional_share():
    start = snap(0, [ProcTime(9, "spread", 0.0, (0, 1, 2, 3))])
    end = snap(1, [ProcTime(9, "spread", 0.8, (0, 1, 2, 3))])
    record, warnings = compare(start, end, [1])
    assert record["other_processes"][0]["on_plan_cpus_s"] == pytest.approx(0.2)
    assert "allowed on the plan's CPUs) used 20%" in warnings[0]


def test_tick_sized_usage_in_a_short_window_does_not_warn():
    start = snap(0, [ProcTime(7, "blip", 0.0, (1,))])
    end = snap(0.1, [ProcTime(7, "blip", 0.02, (1,))])  # 20% of 0.1 s, but one or two ticks
    assert compare(start, end, [1])[1] == []


def test_new_processes_count_from_zero_and_pid_reuse_is_not_confused():
    start = Snapshot(0, None, {}, {(7, 1.0): ProcTime(7, "old", 100.0, (1,))})
    end = Snapshot(10**9, None, {}, {(7, 2.0): ProcTime(7, "new", 0.5, (1,))})
    record, warnings = compare(start, end, [1])
    assert record["other_processes"][0]["started_in_window"] and record["other_processes"][0]["cpu_s"] == 0.5
    assert len(warnings) == 1


def test_steal_time_on_a_plan_cpu_warns():
    start = snap(0, cpus={1: CpuTicks(0, 0, 0)})
    end = snap(1, cpus={1: CpuTicks(60, 20, 100)})
    record, warnings = compare(start, end, [1])
    assert record["cpu_busy"] == {"1": 0.6} and record["cpu_steal"] == {"1": 0.2}
    assert warnings == ["busy host: the hypervisor took 20% of CPU 1 (steal time) during the measuring "
                        "window; timings may be distorted"]


def test_snapshot_excludes_our_own_tree_and_reads_this_machine():
    cpus = sorted(os.sched_getaffinity(0))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        s = noise.snapshot(cpus)
        pids = {pid for pid, _ in s.procs}
        assert os.getpid() not in pids and child.pid not in pids
        assert set(s.cpus) == set(cpus) and s.loadavg is not None
        s = noise.snapshot(cpus, exclude=[os.getpid()])
        assert child.pid in {pid for pid, _ in s.procs}
    finally:
        child.kill()
        child.wait()


def test_recorder_never_raises_and_records_the_error(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no /proc here")

    monkeypatch.setattr(noise, "snapshot", boom)
    r = NoiseRecorder([0])
    r.start()
    r.stop()
    assert r.record() == {"error": "RuntimeError: no /proc here"} and r.warnings() == []


HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def test_a_cpu_hog_on_the_plan_cpu_is_recorded_in_the_results(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(cpu)])
    try:
        out = tmp_path / "results.json"
        r = subprocess.run([sys.executable, "-m", "numabench", "launch", "--instances", "1", "--batch", "1",
                            "--seq", "8", "--backend", "noop", "--model", "bert-tiny", "--cpus", str(cpu),
                            "--mode", "throughput", "--duration", "1", "--compute-us", "1000",
                            "--run-dir", str(tmp_path / "run"),
                            "-o", str(out)], capture_output=True, text=True, timeout=240)
        hog_cpu_s = sum(psutil.Process(hog.pid).cpu_times()[:2])
    finally:
        hog.kill()
        hog.wait()
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    rec = doc["environment"]["noise"]
    assert rec["cpus"] == [cpu] and rec["window_s"] > 0
    mine = [o for o in rec["other_processes"] if o["pid"] == hog.pid]
    assert mine, rec["other_processes"]
    h = mine[0]
    # all of the hog's time in the window is attributed to the plan's CPU, and no more than it ran
    assert h["pinned_to_plan_cpus"] and h["affinity"] == str(cpu)
    assert 0 < h["on_plan_cpus_s"] == h["cpu_s"] <= hog_cpu_s
    # the warning names the hog, in the record and in the document's warnings
    warned = [w for w in doc["warnings"] if f"pid {hog.pid}," in w]
    assert warned and h["share"] > noise.OTHER_SHARE, (h, doc["warnings"])
    assert warned == [w for w in rec["warnings"] if f"pid {hog.pid}," in w]
    # the run's own workers are not counted as others
    workers = {i["got"].get("pid") for i in doc["instances"].values()}
    assert workers and not workers & {o["pid"] for o in rec["other_processes"]}
