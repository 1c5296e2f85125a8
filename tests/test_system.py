"""`numabench system`: facts and verdicts on fake trees, real-machine fixtures and this machine."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysfs_tree import write_sysfs_tree

from numabench.system import read_system
from numabench.system.model import VERDICTS

CPU = "sys/devices/system/cpu"
THP = "sys/kernel/mm/transparent_hugepage"
MACHINE_FACTS = {"usable CPUs", "governor", "turbo", "transparent hugepages", "SMT", "isolated CPUs",
                 "nohz_full CPUs", "IRQ affinity", "load average", "cgroup CPU quota", "kernel"}
LIVE_FACTS = {"busiest other processes", "numactl", "allocators", "OpenMP runtimes", "versions"}


def put(root: Path, rel: str, text: str | bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text if isinstance(text, bytes) else text.encode())


def tree(tmp_path: Path, **kw) -> Path:
    """A 2-core fake machine with every knob `system` reads, set to a quiet machine's values."""
    root = write_sysfs_tree(tmp_path / "root", **kw)
    for c in (0, 1):
        put(root, f"{CPU}/cpu{c}/cpufreq/scaling_governor", "performance\n")
        put(root, f"{CPU}/cpu{c}/cpufreq/scaling_driver", "intel_pstate\n")
    put(root, f"{CPU}/intel_pstate/no_turbo", "1\n")
    put(root, f"{THP}/enabled", "always [madvise] never\n")
    put(root, f"{THP}/defrag", "always defer defer+madvise [madvise] never\n")
    put(root, f"{CPU}/smt/control", "off\n")
    put(root, f"{CPU}/smt/active", "0\n")
    put(root, "proc/loadavg", "0.01 0.05 0.10 1/200 4242\n")
    put(root, "proc/sys/kernel/osrelease", "6.1.0-test\n")
    put(root, "proc/irq/10/smp_affinity_list", "0-1\n")
    put(root, "proc/irq/11/effective_affinity_list", "0\n")
    return root


def facts(report) -> dict:
    return {f.name: f for f in report.facts}


def test_a_quiet_fake_machine_is_all_ok_and_leaves_out_live_facts(tmp_path):
    r = read_system(tree(tmp_path))
    f = facts(r)
    assert set(f) == MACHINE_FACTS
    assert {name: x.verdict for name, x in f.items() if x.verdict != "ok"} == {}
    assert f["governor"].value == "performance on 0-1 (intel_pstate)"
    assert f["turbo"].value == "off (intel_pstate/no_turbo)"
    assert f["kernel"].value == "6.1.0-test"
    assert r.verdict == "ok"
    json.dumps(r.to_dict())


@pytest.mark.parametrize("rel, text, fact, verdict, needle", [
    (f"{CPU}/cpu1/cpufreq/scaling_governor", "powersave\n", "governor", "warn", "powersave on 1"),
    (f"{CPU}/intel_pstate/no_turbo", "0\n", "turbo", "warn", "on (intel_pstate/no_turbo)"),
    (f"{THP}/enabled", "[always] madvise never\n", "transparent hugepages", "warn", "enabled=always"),
    (f"{THP}/defrag", "[always] defer defer+madvise madvise never\n", "transparent hugepages", "warn",
     "defrag=always"),
    (f"{CPU}/isolated", "1\n", "isolated CPUs", "warn", "1"),
    ("proc/loadavg", "3.50 2.00 1.00 4/200 4242\n", "load average", "warn", "3.50"),
    (f"{CPU}/smt/control", "on\n", "SMT", "ok", "on"),
])
def test_each_noisy_setting_gets_its_verdict_and_a_fix(tmp_path, rel, text, fact, verdict, needle):
    root = tree(tmp_path)
    put(root, rel, text)
    got = facts(read_system(root))[fact]
    assert got.verdict == verdict and needle in got.value
    if verdict == "warn":
        assert got.why and got.fix


def test_boost_knob_is_read_where_intel_pstate_is_absent(tmp_path):
    root = tree(tmp_path)
    (root / CPU / "intel_pstate/no_turbo").unlink()
    put(root, f"{CPU}/cpufreq/boost", "1\n")
    assert facts(read_system(root))["turbo"].verdict == "warn"
    put(root, f"{CPU}/cpufreq/boost", "0\n")
    assert facts(read_system(root))["turbo"].value == "off (cpufreq/boost)"


def test_irqs_steered_onto_the_judged_cpus_warn_only_for_a_part_of_the_machine(tmp_path):
    root = tree(tmp_path)
    assert facts(read_system(root))["IRQ affinity"].verdict == "ok"  # all CPUs: IRQs land somewhere
    got = facts(read_system(root, cpus=(0,)))["IRQ affinity"]
    assert got.verdict == "warn" and got.data["on_cpus"] == [11]
    assert facts(read_system(root, cpus=(1,)))["IRQ affinity"].verdict == "ok"


def test_cgroup_quota_below_the_usable_cpus_warns(tmp_path):
    root = tree(tmp_path, cgroup_cpus="0-1")
    put(root, "sys/fs/cgroup/numabench.slice/job/cpu.max", "50000 100000\n")
    got = facts(read_system(root))["cgroup CPU quota"]
    assert got.verdict == "warn" and got.value == "0.5 CPUs of time"


def test_cpus_asked_that_are_not_online_fail(tmp_path):
    got = facts(read_system(tree(tmp_path), cpus=(7,)))
    assert got["asked CPUs"].verdict == "fail"


def test_a_tree_without_topology_still_reports_the_rest(tmp_path):
    root = tmp_path / "empty"
    put(root, "proc/loadavg", "0.00 0.00 0.00 1/1 1\n")
    r = read_system(root)
    f = facts(r)
    assert f["usable CPUs"].verdict == "unknown" and "sys/devices/system/cpu" in f["usable CPUs"].why
    assert f["load average"].verdict == "ok"


# --- real machines ------------------------------------------------------------------------------

def test_every_real_machine_fixture_reads_without_error(topology_roots):
    for name, root in topology_roots.items():
        r = read_system(root)
        f = facts(r)
        assert set(f) == MACHINE_FACTS, name
        assert f["usable CPUs"].verdict == "ok", (name, f["usable CPUs"])
        assert all(x.verdict in VERDICTS for x in r.facts)
        json.dumps(r.to_dict())


def test_fixture_values(topology_roots):
    f = facts(read_system(topology_roots["memorysidecaches"]))
    assert f["SMT"].value == "on (active=1)"
    assert f["kernel"].value == "5.3.0-rc7"  # from proc/version
    cg = facts(read_system(topology_roots["32amd64-4s2n4c-cgroup2"]))
    assert cg["usable CPUs"].value.startswith("0-5 of 32")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "numabench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_this_machine_json_shape():
    r = run_cli("system", "--json", "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "numabench.system" and doc["version"] == 1 and doc["root"] == "/"
    assert doc["verdict"] in VERDICTS
    names = [f["name"] for f in doc["facts"]]
    assert MACHINE_FACTS | LIVE_FACTS <= set(names)
    for f in doc["facts"]:
        assert set(f) == {"name", "value", "verdict", "why", "fix", "data"}
        assert f["verdict"] in VERDICTS
    versions = next(f for f in doc["facts"] if f["name"] == "versions")["data"]
    assert "torch" in versions and "python" in versions


def test_this_machine_table_and_root_option(tmp_path):
    r = run_cli("system", "show", "--interval", "0.1")
    assert r.returncode == 0, r.stderr
    assert "verdict:" in r.stdout and "governor" in r.stdout and "numactl" in r.stdout
    r = run_cli("system", "--root", str(tree(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "performance on 0-1" in r.stdout and "numactl" not in r.stdout


def test_bad_cpu_list_is_a_clear_error():
    r = run_cli("system", "--cpus", "x-y")
    assert r.returncode == 2 and "not a CPU list" in r.stderr and "Traceback" not in r.stderr


# --- hostile input: garbage in any file gives a verdict, never a traceback ---------------------

HOSTILE_FILES = [
    f"{CPU}/cpu0/cpufreq/scaling_governor", f"{CPU}/cpu0/cpufreq/scaling_driver",
    f"{CPU}/intel_pstate/no_turbo", f"{THP}/enabled", f"{THP}/defrag", f"{CPU}/smt/control",
    f"{CPU}/isolated", f"{CPU}/nohz_full", "proc/loadavg", "proc/irq/11/effective_affinity_list",
    "proc/irq/10/smp_affinity_list", "proc/sys/kernel/osrelease", "proc/self/cgroup", "proc/self/mounts",
    f"{CPU}/online", "proc/self/status", f"{CPU}/cpu1/topology/core_cpus_list",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.sampled_from(HOSTILE_FILES), min_size=1, max_size=4, unique=True),
       data=st.binary(max_size=64))
def test_garbage_in_sysfs_files_never_raises(files, data):
    with tempfile.TemporaryDirectory() as d:
        root = tree(Path(d))
        for rel in files:
            put(root, rel, data)
        r = read_system(root)
        assert all(f.verdict in VERDICTS for f in r.facts)
        json.dumps(r.to_dict())


@pytest.mark.parametrize("rel, fact", [
    (f"{CPU}/cpu0/cpufreq/scaling_governor", "governor"),
    (f"{CPU}/cpu1/cpufreq/scaling_governor", "governor"),
    (f"{CPU}/intel_pstate/no_turbo", "turbo"),
    (f"{THP}/enabled", "transparent hugepages"),
    (f"{CPU}/smt/control", "SMT"),
    (f"{CPU}/isolated", "isolated CPUs"),
    ("proc/loadavg", "load average"),
    ("proc/sys/kernel/osrelease", "kernel"),
])
def test_garbage_gives_unknown(tmp_path, rel, fact):
    root = tree(tmp_path)
    put(root, rel, b"\xff\xfe\x00 garbage \x9c\n")
    assert facts(read_system(root))[fact].verdict == "unknown"


def test_a_huge_cpu_range_is_refused_not_expanded(tmp_path):
    root = tree(tmp_path)
    put(root, "proc/irq/11/effective_affinity_list", "0-4000000000\n")  # only `system` reads it
    got = facts(read_system(root, cpus=(0,)))["IRQ affinity"]
    assert got.data["readable"] == 1 and got.data["on_cpus"] == []  # irq 10 only: 11 was refused
