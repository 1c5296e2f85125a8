"""numabench.cluster's pure parts and the sweep runner's executor hook: no Ray needed."""
from __future__ import annotations

import io
import json

import pytest
from test_plans_support import build_machine

from numabench.cluster.fleet import fleet_summary, host_run
from numabench.cluster.hosts import machine_type, mixed_types_warning
from numabench.cluster.serve import HostLoad, pick_host
from numabench.errors import LaunchError
from numabench.experiments.runner import run_sweep


def test_pick_host_routes_by_length_then_load_and_sheds_when_full():
    short = HostLoad("a", ((1, 64),), inflight=0, capacity=2)
    long_ = HostLoad("b", ((65, 512),), inflight=0, capacity=2)
    both = HostLoad("c", ((1, 512),), inflight=1, capacity=2)
    assert pick_host([short, long_, both], 600) == ("none", None)
    assert pick_host([short, long_, both], 300) == ("ok", "b")
    assert pick_host([short, long_, both], 10) == ("ok", "a")  # the idle one
    busy = HostLoad("b", ((65, 512),), inflight=2, capacity=2)
    assert pick_host([short, busy, HostLoad("c", ((1, 512),), 2, 2)], 300) == ("busy", None)
    assert pick_host([short, long_], 300, tried=frozenset({"b"})) == ("busy", None)
    assert pick_host([short, long_], None) == ("ok", "a")  # text: any host


def test_machine_types_are_flagged_only_when_they_differ():
    small, big = build_machine(cores_per_node=2), build_machine(sockets=2, cores_per_node=4)
    assert machine_type(small) != machine_type(big)
    assert mixed_types_warning([machine_type(small)] * 3) is None
    w = mixed_types_warning([machine_type(small), machine_type(big), machine_type(small)])
    assert "2 machine types" in w and f"2 x [{machine_type(small)}]" in w


def member(node: str, start_wall: float, start_mono: int, sent, received, samples) -> dict:
    return {"host": {"node_id": node, "hostname": "h", "machine_type": "t"}, "error": None,
            "start_wall": start_wall, "start_mono_ns": start_mono,
            "doc": {"status": "ok", "raw": {"sent_ns": sent, "received_ns": received},
                    "summary": {"samples": samples, "throughput": 10.0, "step_latency": {"p50_ns": 2e6}}}}


def test_fleet_window_runs_from_the_shared_start_to_the_last_completion_on_any_host():
    # host a: clock starts at wall 100.0 (its monotonic 5 s), last reply 1 s later
    a = host_run(member("a", 100.0, 5_000_000_000, [5_000_000_000], [6_000_000_000], 10))
    # host b: started 10 ms later on the wall clock, last reply 2 s after its start
    b = host_run(member("b", 100.01, 50_000_000_000, [50_000_000_000, 51_000_000_000],
                        [50_500_000_000, 52_000_000_000], 30))
    assert a.end_wall == pytest.approx(101.0) and b.end_wall == pytest.approx(102.01)
    assert a.max_latency_ms == pytest.approx(1000.0) and b.max_latency_ms == pytest.approx(1000.0)
    f = fleet_summary([a, b])
    assert f["window_s"] == pytest.approx(2.01) and f["samples"] == 40
    assert f["throughput"] == pytest.approx(40 / 2.01) and f["throughput_sum"] == 20.0
    assert f["start_skew_ms"] == pytest.approx(10.0)
    failed = host_run({"host": {"node_id": "c"}, "error": "on host c: boom", "doc": None})
    assert failed.status == "failed" and fleet_summary([a, failed])["samples"] == 10


EXP = """\
version: 1
kind: grid
name: fake
model: bert-tiny
backend: noop
seq: [8, 16, 32]
batch: 1
instances: 1
iterations: 2
"""


class FakeExecutor:
    """Points 'run elsewhere' and finish in reverse order; the one at seq 16 fails."""

    def __init__(self):
        self.outcomes = {}

    def run(self, sweep, todo):
        for k in reversed(todo):
            p = sweep.points[k]
            sweep.entry(k, p, "running", host={"node_id": f"n{k}"})
            self.outcomes[k] = (LaunchError("on host n1: boom") if p.seq == 16 else
                                {"status": "ok", "summary": {"throughput": float(p.seq)}})
            yield k

    def seconds(self, k):
        return 7.0

    def result(self, k):
        out = self.outcomes.pop(k)
        if isinstance(out, Exception):
            raise out
        return out


def test_the_runner_records_points_an_executor_ran_elsewhere(tmp_path):
    (tmp_path / "e.yaml").write_text(EXP)
    log = io.StringIO()
    with pytest.raises(LaunchError, match="1 of 3 points failed"):
        run_sweep(build_machine(cores_per_node=2), tmp_path / "e.yaml", tmp_path / "out",
                  executor=FakeExecutor(), stream=log)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["status"] == "failed"
    assert [(e["status"], e["host"]["node_id"]) for e in m["points"]] == [
        ("ok", "n0"), ("failed", "n1"), ("ok", "n2")]
    assert m["points"][1]["error"] == "on host n1: boom"
    assert all(e["seconds"] >= 7.0 for e in m["points"])  # the host's time, not the wait's
    doc = json.loads((tmp_path / "out" / "points" / "bert-tiny_noop_fp32_s32_b1_n1_r0.json").read_text())
    assert doc["experiment"]["point"]["seq"] == 32 and doc["summary"]["throughput"] == 32.0
    assert not (tmp_path / "out" / "points" / "bert-tiny_noop_fp32_s16_b1_n1_r0.json").exists()


def numabench(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_hosts_without_ray_is_refused_by_name():
    r = numabench("launch", "--hosts", "2", "--backend", "noop", "--model", "bert-tiny")
    assert r.returncode == 2 and "--hosts needs --ray ADDRESS" in r.stderr
    r = numabench("serve", "--hosts", "2", "--backend", "noop", "--model", "bert-tiny")
    assert r.returncode == 2 and "--hosts needs --ray ADDRESS" in r.stderr
