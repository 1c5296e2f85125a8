"""`numabench topology` as a user runs it: on a generated root, on a bad root, on this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from sysfs_tree import write_sysfs_tree


def numabench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_human_output_on_a_root(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2, threads_per_core=2,
                            memory_only_nodes=1, allowed_cpus="0-2,4-5")
    r = numabench("topology", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "Package 1 (id 1): CPUs 2-3,6-7" in r.stdout
    assert "Node 0: 16.0 GiB" in r.stdout and "core 0,4" in r.stdout
    assert "core 3,7          not usable" in r.stdout and "usable: 2" in r.stdout
    assert "Memory-only nodes" in r.stdout and "avx512f" in r.stdout


def test_json_on_a_root(tmp_path):
    root = write_sysfs_tree(tmp_path, sockets=2, cores_per_node=2, threads_per_core=2)
    r = numabench("topology", "--root", str(root), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cpus"]["usable"] == list(range(8))
    assert [n["cpus"] for n in d["nodes"]] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [c["cpus"] for c in d["cores"]] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_lscpu_option_reports_disagreement(tmp_path):
    root = write_sysfs_tree(tmp_path, cores_per_node=2)
    lscpu = tmp_path / "lscpu.txt"
    lscpu.write_text("# CPU,Core,Socket,Node\n0,0,0,0\n1,0,0,0\n")
    r = numabench("topology", "--root", str(root), "--lscpu", str(lscpu))
    assert r.returncode == 0, r.stderr
    assert "lscpu disagrees on cores" in r.stdout


@pytest.mark.parametrize("make_bad", ["missing", "empty", "garbage"])
def test_bad_root_is_one_line_error(tmp_path, make_bad):
    root = tmp_path / "root"
    if make_bad == "empty":
        root.mkdir()
    elif make_bad == "garbage":
        write_sysfs_tree(root)
        (root / "sys/devices/system/cpu/online").write_text("bogus\n")
    r = numabench("topology", "--root", str(root))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(root) in lines[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux sysfs")
@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu is not installed")
def test_live_machine_agrees_with_lscpu_and_affinity():
    r = numabench("topology", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    text = subprocess.run(["lscpu", "-p"], capture_output=True, text=True, check=True,
                          env={**os.environ, "LC_ALL": "C"}).stdout
    header = next(line for line in text.splitlines() if line.startswith("# CPU,"))
    columns = [c.upper() for c in header[2:].split(",")]
    rows = [dict(zip(columns, line.split(","))) for line in text.splitlines()
            if line and not line.startswith("#")]
    online = sorted(int(r["CPU"]) for r in rows)  # plain `lscpu -p` lists online CPUs
    assert d["cpus"]["online"] == online
    cores: dict[tuple, set] = {}
    for row in rows:
        cores.setdefault((row["SOCKET"], row["CORE"]), set()).add(int(row["CPU"]))
    assert sorted(map(sorted, cores.values())) == sorted(c["cpus"] for c in d["cores"])
    node_of = {int(r["CPU"]): int(r["NODE"]) for r in rows if r.get("NODE", "").strip()}
    for core in d["cores"]:
        for cpu in core["cpus"]:
            assert node_of.get(cpu, core["node"]) == core["node"]
    assert d["cpus"]["usable"] == sorted(os.sched_getaffinity(0) & set(online))
