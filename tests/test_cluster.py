"""numabench on Ray: one module-scoped test cluster of simulated hosts (ray.cluster_utils.Cluster),
each advertising `numabench_host: 1`; noop workers, a few iterations each."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil
import pytest

# find_spec, not importorskip: every xdist worker collects this file, and importing Ray takes
# half a second of CPU each time; the cluster fixture imports it.
if importlib.util.find_spec("ray") is None:
    pytest.skip("Ray is not installed (pip install 'numabench[ray]')", allow_module_level=True)
pytestmark = pytest.mark.ray

from numabench.cluster import HOST_RESOURCE  # noqa: E402
from numabench.cluster.sweep import run_cluster_sweep  # noqa: E402
from numabench.experiments.runner import run_sweep  # noqa: E402
from numabench.launcher.launch import LaunchOptions  # noqa: E402
from numabench.topology import read_machine  # noqa: E402

NODE = dict(num_cpus=1, object_store_memory=80 << 20)
OPTS = LaunchOptions(binder="taskset", progress=False, ready_timeout_s=120)

NOOP = """\
version: 1
kind: grid
name: noop
model: bert-tiny
backend: noop
seq: [8, 16]
batch: 1
instances: 1
iterations: 4
warmup: 1
backend_options: {compute_ns: 50000000}
"""


def numabench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_no_cluster_is_a_clear_error(tmp_path):
    """Runs before the module's cluster exists: `auto` finds nothing."""
    (tmp_path / "e.yaml").write_text(NOOP)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "numabench.cli", "sweep", str(tmp_path / "e.yaml"),
                        "-o", str(tmp_path / "res"), "--ray", "auto"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr
    assert "--ray auto: no Ray cluster answers there" in r.stderr and "ray start --head" in r.stderr
    assert not (tmp_path / "res").exists()


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # Ray's memory monitor would kill our tiny workers when *other* work fills this shared
    # machine; a point lost that way is retried, but the tests should not depend on it.
    old = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    # The head schedules nothing of ours (no host resource): the driver's side of the cluster.
    # No CPUs there either, so Ray starts no idle worker processes on it.
    c = Cluster(initialize_head=True, connect=True,
                head_node_args=dict(NODE, num_cpus=0, include_dashboard=False, resources={"driver": 1}))
    hosts = [c.add_node(**NODE, resources={HOST_RESOURCE: 1}) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, hosts
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_memory_monitor_refresh_ms", None)
        else:
            os.environ["RAY_memory_monitor_refresh_ms"] = old


def node_ids(handles) -> set[str]:
    return {h.node_id for h in handles}


def test_sweep_spreads_points_over_hosts_like_a_local_sweep(cluster, tmp_path):
    c, hosts = cluster
    exp = tmp_path / "noop.yaml"
    exp.write_text(NOOP)
    log = io.StringIO()
    out = run_cluster_sweep(c.address, exp, tmp_path / "ray", launch_opts=OPTS, stream=log)
    assert len(out.ran) == 2 and not out.failed, log.getvalue()
    local = run_sweep(read_machine("/"), exp, tmp_path / "local", launch_opts=OPTS, stream=io.StringIO())
    assert sorted(local.ran) == sorted(out.ran)

    on_ray = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    here = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert on_ray["status"] == "ok" and set(on_ray) == set(here)
    used = {e["host"]["node_id"] for e in on_ray["points"]}
    assert used == node_ids(hosts), "the points did not spread over both hosts"
    for e in on_ray["points"]:
        assert e["status"] == "ok" and e["machine_type"] and len(e["attempts"]) == 1
    for pid in out.ran:
        a = json.loads((tmp_path / "ray" / "points" / f"{pid}.json").read_text())
        b = json.loads((tmp_path / "local" / "points" / f"{pid}.json").read_text())
        assert set(a) - set(b) == {"cluster"} and not set(b) - set(a)
        assert a["experiment"] == b["experiment"] and a["status"] == "ok"
        assert a["summary"]["samples"] == b["summary"]["samples"] == 4
        assert a["cluster"]["host"]["node_id"] in node_ids(hosts)
        # the host's logs came back where a local sweep keeps them
        assert "all 1 instances ready" in (tmp_path / "ray" / "runs" / pid / "launch.log").read_text()
    # hosts advertise the same machine here: nothing flagged
    assert "machine types" not in log.getvalue()

    # resume: only a point whose file is gone runs again
    (tmp_path / "ray" / "points" / f"{out.ran[0]}.json").unlink()
    again = run_cluster_sweep(c.address, exp, tmp_path / "ray", resume=True, launch_opts=OPTS,
                              stream=io.StringIO())
    assert again.ran == (out.ran[0],) and again.skipped == out.ran[1:]


LONG = """\
version: 1
kind: grid
name: long
model: bert-tiny
backend: noop
seq: 8
batch: 1
instances: 1
iterations: 30
warmup: 1
backend_options: {compute_ns: 100000000}
"""


def victim_workers(since: float) -> list:
    """The worker processes of the point now running (its host's run folder names their pids)."""
    import re
    import tempfile
    from pathlib import Path

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for log in Path(tempfile.gettempdir(), "numabench-ray").glob("bert-tiny_noop_fp32_s8_b1_n1_r0-*/launch.log"):
            text = log.read_text() if log.stat().st_mtime >= since else ""
            if "all 1 instances ready" in text:
                return log.parent, [psutil.Process(int(pid)) for pid in re.findall(r"pid (\d+)", text)]
        time.sleep(0.05)
    raise AssertionError("the point's workers never became ready")


def test_a_point_whose_host_dies_is_rerun_elsewhere(cluster, tmp_path):
    c, hosts = cluster
    hosts.append(c.add_node(**NODE, resources={HOST_RESOURCE: 1}))  # the one we may lose
    c.wait_for_nodes()
    (tmp_path / "long.yaml").write_text(LONG)
    out_dir = tmp_path / "res"
    result: dict = {}

    def sweep():
        try:
            result["outcome"] = run_cluster_sweep(c.address, tmp_path / "long.yaml", out_dir,
                                                  launch_opts=OPTS, stream=io.StringIO())
        except Exception as e:  # reported by the assertions below
            result["error"] = e

    t = threading.Thread(target=sweep)
    since = time.time() - 1
    t.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline and t.is_alive():
        try:
            entry = json.loads((out_dir / "manifest.json").read_text())["points"][0]
        except (OSError, ValueError, KeyError, IndexError):
            entry = {}
        if entry.get("status") == "running" and entry.get("host"):
            victim = entry["host"]["node_id"]
        time.sleep(0.1)
    assert victim, f"the point never started: {result}"
    victim_dir, workers = victim_workers(since)
    c.remove_node(next(h for h in hosts if h.node_id == victim))
    hosts[:] = [h for h in hosts if h.node_id != victim]
    t.join(timeout=120)
    assert not t.is_alive() and "error" not in result, result
    # the lost host's workers went with it (their parent's death ends them), none left behind
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers of the lost host left behind: {alive}"
    # a lost host does not clean up its run folder
    for d in [victim_dir, *victim_dir.parent.glob("bert-tiny_noop_fp32_s8_b1_n1_r0-*")]:
        if d.exists() and d.stat().st_mtime >= since:
            shutil.rmtree(d, ignore_errors=True)
    assert result["outcome"].ran == ("bert-tiny_noop_fp32_s8_b1_n1_r0",)
    entry = json.loads((out_dir / "manifest.json").read_text())["points"][0]
    assert entry["status"] == "ok"
    lost, rerun = entry["attempts"]
    assert lost["status"] == "failed" and lost["host"]["node_id"] == victim
    assert "lost mid-point" in lost["error"]
    assert rerun["status"] == "ok" and rerun["host"]["node_id"] != victim
    assert entry["host"]["node_id"] == rerun["host"]["node_id"]
    doc = json.loads((out_dir / "points" / "bert-tiny_noop_fp32_s8_b1_n1_r0.json").read_text())
    assert doc["status"] == "ok" and doc["cluster"]["attempts"] == entry["attempts"]


def test_fleet_launch_measures_every_host_from_a_common_start(cluster, tmp_path):
    from numabench.cluster.fleet import run_fleet
    from numabench.errors import NumabenchError
    from numabench.launcher.launch import Workload

    c, hosts = cluster
    workload = Workload(model="bert-tiny", backend="noop", seq=8, iterations=5, warmup=1,
                        backend_options={"compute_ns": 20_000_000})
    plan_args = {"instances": 1, "batch": 2}
    with pytest.raises(NumabenchError, match=r"--hosts 9: the cluster has 2 host\(s\)"):
        run_fleet(c.address, 9, plan_args, workload, OPTS, stream=io.StringIO())
    doc = run_fleet(c.address, 2, plan_args, workload, OPTS, tmp_path / "fleet.json", stream=io.StringIO())
    assert doc == json.loads((tmp_path / "fleet.json").read_text())
    assert doc["schema"] == "numabench.fleet" and doc["status"] == "ok" and not doc["errors"]
    assert {h["host"]["node_id"] for h in doc["hosts"]} == node_ids(hosts)
    assert set(doc["documents"]) == node_ids(hosts)
    for h in doc["hosts"]:
        assert h["status"] == "ok" and h["samples"] == 10 and h["max_latency_ms"] >= 20
        assert h["end_wall"] > h["start_wall"]
    f = doc["fleet"]
    assert f["hosts"] == 2 and f["samples"] == 20
    # the common window holds every host's own window: fleet throughput never exceeds the sum
    assert f["window_s"] >= max(h["end_wall"] - h["start_wall"] for h in doc["hosts"])
    assert f["throughput"] == pytest.approx(20 / f["window_s"]) and f["throughput"] <= f["throughput_sum"]
    for d in doc["documents"].values():  # each host planned and ran the request itself
        assert d["status"] == "ok" and len(d["plan"]["instances"]) == 1 and d["plan"]["batch"] == 2

    # a request no host can plan: every host says why, the fleet fails, its document is written
    bad = LaunchOptions(binder="taskset", progress=False, run_dir=tmp_path / "bad")
    with pytest.raises(NumabenchError, match="fleet launch failed: on host .*99 instances") as e:
        run_fleet(c.address, 2, {"instances": 99}, workload, bad, stream=io.StringIO())
    assert str(tmp_path / "bad") in str(e.value)
    failed = json.loads((tmp_path / "bad" / "fleet.json").read_text())
    assert failed["status"] == "failed" and len(failed["errors"]) == 2


def test_serve_routes_across_hosts_sheds_load_and_survives_a_host(cluster, tmp_path, monkeypatch):
    import numpy as np

    from numabench.cluster.serve import run_cluster_serve
    from numabench.daemon.client import Client
    from numabench.daemon.server import ServeOptions
    from numabench.launcher.options import Workload

    c, hosts = cluster
    monkeypatch.setenv("NUMABENCH_RUNTIME_DIR", str(tmp_path / "runtime"))
    # one instance per host, one request queued behind it: each host holds 2 requests at most
    opts = ServeOptions(workload=Workload(model="bert-tiny", backend="noop", warmup=0,
                                          backend_options={"compute_ns": 1_000_000_000}),
                        queue_size=1, binder="taskset", ready_timeout_s=120)
    started, box = threading.Event(), {}

    def on_ready(front):
        box["endpoint"] = front.endpoint
        started.set()

    def serve():
        try:
            box["rc"] = run_cluster_serve(c.address, 2, {"instances": 1}, opts, bind="tcp://127.0.0.1:0",
                                          on_ready=on_ready)
        except Exception as e:
            box["error"] = e
            started.set()

    t = threading.Thread(target=serve, daemon=True)  # a failed test must not hang pytest
    t.start()
    try:
        assert started.wait(120) and "error" not in box, box
        ids = np.zeros((1, 8), dtype=np.int64)
        with Client(box["endpoint"], timeout_s=60) as cl:
            r = cl.infer(input_ids=np.zeros((1, 600), dtype=np.int64))
            assert r.status == "error" and "no host serves 600 tokens (hosts serve 1-512)" in r.reason

            sent = [cl.send_infer(input_ids=ids) for _ in range(5)]
            replies = [cl.wait(rid) for rid in sent]
            assert [x.status for x in replies] == ["ok"] * 4 + ["busy"], [x.header for x in replies]
            assert "busy" in replies[4].reason
            served_by = [x.header["host"]["node_id"] for x in replies[:4]]
            assert set(served_by) == node_ids(hosts) and served_by.count(served_by[0]) == 2
            assert all(x.compute_ns >= 1_000_000_000 for x in replies[:4])

            # a host dies with a request in flight: it is retried once on the other one
            sent = [cl.send_infer(input_ids=ids) for _ in range(2)]
            doc = cl.status()
            assert [h["inflight"] for h in doc["hosts"]] == [1, 1]
            victim = doc["hosts"][0]["host"]["node_id"]
            c.remove_node(next(h for h in hosts if h.node_id == victim))
            hosts[:] = [h for h in hosts if h.node_id != victim]
            replies = [cl.wait(rid) for rid in sent]
            assert [x.status for x in replies] == ["ok", "ok"], [x.header for x in replies]
            assert {x.header["host"]["node_id"] for x in replies} == node_ids(hosts)
            assert sorted(x.header["retried"] for x in replies) == [False, True]
            doc = cl.status()
            assert [h["host"]["node_id"] for h in doc["hosts"]] == [hosts[0].node_id]
            assert [h["node_id"] for h in doc["removed"]] == [victim]
            cl.stop()
    finally:
        t.join(60)  # after STOP (or a failed assertion's Client close and the fixture's shutdown)
    assert not t.is_alive() and box.get("rc") == 0, box
