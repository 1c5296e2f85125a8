"""Unpinned baselines (issue 14): `--binder none`, the out-of-the-box process, explicit binders
that cannot bind memory, and the sweep's `baseline:` points drawn beside the pinned ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from numabench.launcher import binding
from numabench.plans.model import InstancePlan

USABLE = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs: one bound "
                              "instance must leave a CPU its unbound twin can reach")


def numabench(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def launch_doc(tmp_path, *args, env=None):
    out = tmp_path / "r.json"
    r = numabench("launch", "--batch", "2", "--seq", "8", "--iterations", "3", "--warmup", "1",
                  "--run-dir", str(tmp_path / "run"), "-o", str(out), *args, env=env)
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text()), (tmp_path / "run" / "launch.log").read_text()


# ---- --binder none ------------------------------------------------------------------------------

def test_binder_none_binds_nothing_and_says_what_it_did():
    inst = InstancePlan(0, (2, 3), (1,), 2, 4)
    b = binding.detect_binder("none", probe_cpu=2, probe_node=1)
    assert (b.name, b.binds_cpus, b.binds_memory, b.warnings) == ("none", False, False, ())
    assert binding.bind_prefix(b, inst) == []
    assert b.bound(inst) == {"cpus": [], "memory_nodes": []}
    assert b.describe(inst) == ("cpus not bound (plan: [2, 3]), memory not bound (plan: nodes [1]; "
                                "first touch applies)")
    # thread counts are still set; placement is the launcher's to drop (launch.prepare)
    env, _, applied = binding.worker_env({}, inst, threading=binding.Threading("gnu", pin=False))
    assert applied == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # the out-of-the-box process sets no thread variable at all
    env, _, applied = binding.worker_env({}, inst, threading=binding.Threading("gnu", pin=True),
                                         set_threads=False)
    assert applied == {} and not set(env) & {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PLACES"}


@TWO_CPUS
def test_binder_none_worker_reads_an_unrestricted_affinity(tmp_path):
    """A one-core instance started with --binder none: the worker process itself reports (from
    os.sched_getaffinity, in READY) every CPU the launcher had, not the plan's one CPU."""
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--cores-per-instance", "1",
                             "--backend", "noop", "--model", "bert-tiny", "--binder", "none")
    inst = doc["instances"]["0"]
    assert len(inst["asked"]["cpus"]) == 1
    assert inst["got"]["affinity"] == USABLE  # the worker's own reading
    assert all(cpus == USABLE for cpus in inst["got"]["thread_cpus"])  # no thread placed either
    assert inst["got"]["mempolicy"]["mode"] == "default"
    assert inst["bound"] == {"cpus": [], "memory_nodes": []}
    env = doc["environment"]
    assert (env["binder"], env["binds_cpus"], env["binds_memory"]) == ("none", False, False)
    assert env["pin_threads"] is False
    # threads are still set per instance, and recorded
    assert env["variables_set"]["0"]["OMP_NUM_THREADS"] == "1"
    assert inst["asked"]["threads"] == inst["got"]["threads"] == 1
    assert "binder none" in log and "cpus not bound" in log and "memory nodes [" not in log
    assert not any("runs on CPUs" in w for w in doc["warnings"])  # not judged: unbound by design


@TWO_CPUS
def test_bound_instance_reads_its_plan_cpus_for_contrast(tmp_path):
    """The same launch bound (taskset): the worker reads exactly the plan's CPU, so the test
    above can tell the difference."""
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--cores-per-instance", "1",
                             "--backend", "noop", "--model", "bert-tiny", "--binder", "taskset")
    inst = doc["instances"]["0"]
    assert inst["got"]["affinity"] == inst["asked"]["cpus"] == inst["bound"]["cpus"]
    assert len(inst["got"]["affinity"]) == 1


# ---- explicit binders that cannot bind memory -------------------------------------------------

@pytest.mark.parametrize("binder_name", ["taskset", "self"])
def test_explicit_cpu_only_binder_warns_and_never_logs_unbound_memory(tmp_path, binder_name):
    if binder_name == "taskset" and not shutil.which("taskset"):
        pytest.skip("taskset not installed")
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--backend", "noop", "--model",
                             "bert-tiny", "--binder", binder_name)
    msg = f"--binder {binder_name} pins CPUs only: memory is not bound"
    assert msg in r.stdout and any(msg in w for w in doc["warnings"])
    inst = doc["instances"]["0"]
    assert inst["bound"]["memory_nodes"] == [] and inst["bound"]["cpus"] == inst["asked"]["cpus"]
    assert doc["environment"]["binds_memory"] is False
    assert "memory nodes [" not in log and "memory not bound (plan: nodes [0]" in log


def test_plan_without_memory_nodes_gets_no_memory_warning():
    b = binding.detect_binder("self", probe_cpu=0, probe_node=None)
    assert b.warnings == ()
