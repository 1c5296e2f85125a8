"""Launcher pieces on their own: binding commands, environments, process groups, statistics."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from numabench.errors import LaunchError, NumabenchError
from numabench.launcher import binding
from numabench.launcher.procs import ProcessGroup
from numabench.plans.model import InstancePlan
from numabench.results import Sample, describe, percentile, summarize

INST = InstancePlan(id=3, cpus=(4, 5, 6), memory_nodes=(1,), threads=3, batch=2)


def test_numactl_prefix_binds_cpus_and_memory():
    b = binding.Binder("numactl", "/usr/bin/numactl", binds_memory=True)
    assert binding.bind_prefix(b, INST) == ["/usr/bin/numactl", "--physcpubind=4,5,6", "--membind=1", "--"]


def test_numactl_without_memory_binding_only_pins():
    b = binding.Binder("numactl", "/usr/bin/numactl", binds_memory=False)
    assert binding.bind_prefix(b, INST) == ["/usr/bin/numactl", "--physcpubind=4,5,6", "--"]


def test_taskset_and_self_prefixes():
    assert binding.bind_prefix(binding.Binder("taskset", "/t", False), INST) == ["/t", "-c", "4,5,6"]
    assert binding.bind_prefix(binding.Binder("self", None, False), INST) == []


def test_worker_env_sets_threads_and_keeps_user_values_with_a_warning():
    env, warnings, applied = binding.worker_env({"PATH": "/bin"}, INST)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert applied == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"} and warnings == ()
    env, warnings, applied = binding.worker_env({"OMP_NUM_THREADS": "8"}, INST, preload="/lib/libjemalloc.so.2")
    assert env["OMP_NUM_THREADS"] == "8"  # never silently overridden
    assert len(warnings) == 1 and "OMP_NUM_THREADS=8" in warnings[0] and "instance 3" in warnings[0]
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and "OMP_NUM_THREADS" not in applied


def test_gnu_threads_are_bound_one_per_cpu_with_real_cpu_numbers():
    t = binding.Threading("gnu", pin=True)
    env, warnings, applied = binding.worker_env({"PATH": "/bin"}, INST, threading=t)
    assert env["OMP_PROC_BIND"] == "close" and env["OMP_PLACES"] == "{4},{5},{6}"
    assert applied["OMP_PLACES"] == "{4},{5},{6}" and warnings == () and "LD_PRELOAD" not in env
    # Fewer threads than CPUs (SMT siblings given): no per-CPU list that could stack threads.
    fewer = InstancePlan(id=0, cpus=(0, 1, 8, 9), memory_nodes=(), threads=2, batch=1)
    assert binding.thread_placement_env(fewer, t) == {}
    assert binding.thread_placement_env(INST, binding.Threading("gnu", pin=False)) == {}


def test_intel_runtime_is_preloaded_with_kmp_settings():
    t = binding.Threading("intel", pin=True, iomp="/venv/lib/libiomp5.so")
    env, warnings, applied = binding.worker_env({"LD_PRELOAD": "/x.so"}, INST, preload="/lib/libjemalloc.so.2",
                                                threading=t)
    assert env["KMP_AFFINITY"] == "granularity=fine,proclist=[4,5,6],explicit" and env["KMP_BLOCKTIME"] == "1"
    assert env["LD_PRELOAD"] == "/venv/lib/libiomp5.so:/lib/libjemalloc.so.2:/x.so"
    assert applied["LD_PRELOAD"] == env["LD_PRELOAD"] and "OMP_PLACES" not in env
    unpinned = binding.thread_placement_env(INST, binding.Threading("intel", pin=False, iomp="/l.so"))
    assert unpinned == {"KMP_BLOCKTIME": "1"}


def test_a_users_own_thread_placement_is_kept_with_a_warning():
    t = binding.Threading("gnu", pin=True)
    env, warnings, applied = binding.worker_env({"OMP_PROC_BIND": "spread"}, INST, threading=t)
    assert env["OMP_PROC_BIND"] == "spread" and "OMP_PLACES" not in env  # none mixed in
    assert "OMP_PROC_BIND" not in applied and "OMP_PLACES" not in applied
    assert len(warnings) == 1 and "OMP_PROC_BIND=spread" in warnings[0] and "kept" in warnings[0]


def test_intel_runtime_missing_is_refused(monkeypatch):
    monkeypatch.setattr(binding, "find_iomp", lambda: None)
    with pytest.raises(NumabenchError, match="pip install intel-openmp"):
        binding.prepare_threading("intel")
    with pytest.raises(NumabenchError, match="unknown OpenMP runtime"):
        binding.prepare_threading("llvm")
    assert binding.prepare_threading("gnu", pin=False) == binding.Threading("gnu", False, None)


def test_detect_binder_fallbacks(tmp_path):
    empty = str(tmp_path)
    b = binding.detect_binder("auto", path=empty)
    assert b.name == "self" and not b.binds_memory
    assert any("numactl not found" in w for w in b.warnings)
    with pytest.raises(LaunchError, match="numactl was asked for"):
        binding.detect_binder("numactl", path=empty)
    taskset = shutil.which("taskset")
    if taskset:
        (tmp_path / "taskset").symlink_to(taskset)
        b = binding.detect_binder("auto", path=empty)
        assert b.name == "taskset"


@pytest.mark.skipif(not shutil.which("numactl"), reason="numactl not installed")
def test_detect_binder_probes_numactl_membind():
    cpu = min(os.sched_getaffinity(0))
    b = binding.detect_binder("auto", probe_cpu=cpu, probe_node=0)
    assert b.name == "numactl"
    # Where the container refuses set_mempolicy the binder must say memory is not bound.
    ok = subprocess.run(["numactl", f"--physcpubind={cpu}", "--membind=0", "true"]).returncode == 0
    assert b.binds_memory == ok and (ok or b.warnings)


def test_process_group_stop_kills_the_whole_group(tmp_path):
    # A worker that ignores SIGTERM and has a child: both must be gone after stop().
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('u' + 'p', flush=True); time.sleep(60)")
    group = ProcessGroup(tmp_path)
    p = group.start(0, [sys.executable, "-c", script], dict(os.environ))
    deadline = time.monotonic() + 20
    while "\nup" not in group.tail(0) and time.monotonic() < deadline:
        time.sleep(0.05)
    family = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
    assert len(family) == 2
    t0 = time.monotonic()
    group.stop(grace_s=0.5)
    assert time.monotonic() - t0 < 5
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive
    assert group.exited()[0].describe() == "killed by SIGKILL"
    assert "up" in group.tail(0)


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    vals = sorted([5, 1, 9, 3, 7, 2, 8])
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


def test_describe_reports_percentiles_only_with_enough_samples():
    w: list[str] = []
    d = describe(list(range(1, 10)), "x", w)
    assert d["p50_ns"] == 5 and d["p90_ns"] is None and d["p99_ns"] is None
    assert any("only 9 samples" in s for s in w)
    d = describe([100] * 50 + [200] * 50, "y", w)
    assert d["p90_ns"] == 200 and d["p99_ns"] == 200
    w.clear()
    describe([100, 300] * 60, "z", w)
    assert any("unstable" in s for s in w)


def test_summarize_uses_the_common_window():
    # Instance 0: two requests in [0, 100]; instance 1 starts late: one request in [50, 250].
    s = [Sample(0, 0, 4, 0, 40, 30, 5), Sample(0, 1, 4, 50, 100, 30, 60), Sample(1, 0, 4, 50, 250, 150, 80)]
    out = summarize(s, "throughput")
    assert out.window_ns == 250 and out.samples == 12
    assert out.throughput == pytest.approx(12 / 250 * 1e9)
    assert out.instances[0]["throughput"] == pytest.approx(8 / 100 * 1e9)
    assert out.instances[1]["throughput"] == pytest.approx(4 / 200 * 1e9)
    assert out.throughput_sum == pytest.approx((8 / 100 + 4 / 200) * 1e9)
    assert out.imbalance == pytest.approx(0.75)
    assert any("imbalanced" in w for w in out.warnings)
    # overhead = end-to-end - compute, and its first leg ends when the worker starts computing
    assert out.overhead.max_ns == 50 and out.queue.max_ns == 30
    assert out.instances[1].queue.max_ns == 30 and out.instances[0].queue.count == 2
    # the JSON keeps version 1's overhead.to_worker beside the new queue
    d = out.to_dict()
    assert d["overhead"]["to_worker"] == d["queue"] == out.queue.to_dict()
    # split mode: the step's latency is its slowest shard
    split = summarize([Sample(0, 0, 2, 0, 10, 5, 2), Sample(1, 0, 2, 0, 30, 5, 20)], "split")
    assert split.step_latency.max_ns == 30
    assert summarize([Sample(0, 0, 2, 5, 10, 5, 6)], "split", window_start_ns=0).window_ns == 10


def test_progress_stays_silent_when_not_a_terminal():
    import io

    from numabench.launcher.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    p = Progress(stream=quiet)
    p.update("loading", force=True)
    p.done()
    assert quiet.getvalue() == ""
    tty = Tty()
    p = Progress(stream=tty)
    p.update("loading 1/2", force=True)
    p.done()
    assert "loading 1/2" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[2K")


def test_plan_for_launch_presets_restrictions_and_default_batch(tmp_path):
    from test_plans_support import article_machine

    from numabench.errors import NumabenchError
    from numabench.plans import dump_plan, plan_for_launch

    m = article_machine()  # 2 sockets x 24 cores, SMT, one node per socket
    base = plan_for_launch(m)  # the baseline: one instance on every physical core
    assert len(base.instances) == 1 and len(base.instances[0].cpus) == 48 and base.batch == 8
    per_node = plan_for_launch(m, preset="per-node")
    assert [i.memory_nodes for i in per_node.instances] == [(0,), (1,)]
    assert [i.batch for i in per_node.instances] == [4, 4]
    # throughput preset: 48 one-core instances; the default batch rises to one sample each
    tp = plan_for_launch(m, preset="throughput")
    assert len(tp.instances) == 48 and tp.batch == 48
    # 3 instances: 8 rounded up to a multiple of 3, equal shares
    three = plan_for_launch(m, instances=3)
    assert three.batch == 9 and {i.batch for i in three.instances} == {3}
    assert plan_for_launch(m, instances=3, batch=8).batch == 8
    one_node = plan_for_launch(m, preset="latency", nodes=(1,))
    assert len(one_node.instances) == 6 and all(i.memory_nodes == (1,) for i in one_node.instances)
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(dump_plan(per_node))
    with pytest.raises(NumabenchError, match="--preset, --nodes|--nodes, --preset"):
        plan_for_launch(m, plan_file=str(plan_file), preset="latency", nodes=(0,))
    assert plan_for_launch(m, plan_file=str(plan_file)) == per_node


def test_sending_to_a_killed_worker_names_how_it_died(tmp_path):
    import json
    import signal

    from numabench.launcher.coordinator import Coordinator, WorkerFailed
    from numabench.workers import protocol

    with ProcessGroup(tmp_path) as group, Coordinator(group) as coord:
        cfg = {"instance": 0, "endpoint": coord.endpoint, "backend": "noop", "model": "bert-tiny", "timeout_s": 30}
        proc = group.start(0, [sys.executable, "-m", "numabench.workers", "--config", json.dumps(cfg)],
                           dict(os.environ))
        coord.wait_for(protocol.READY, {0}, timeout_s=60)
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(WorkerFailed) as failed:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until ZeroMQ has dropped the route
                coord.send(0, protocol.RUN, {"req": 1})
                time.sleep(0.05)
        assert failed.value.instance == 0
        assert "instance 0 killed by SIGKILL" in str(failed.value) and "last lines of" in str(failed.value)
