"""`numabench sweep` and `report` end to end: real launches, Ctrl-C in the middle, --resume."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

USABLE = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs")


def numabench(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


TINY = """\
version: 1
kind: core-scaling
name: tiny
model: bert-tiny
backend: noop
seq: [8, 16]
batch: 2
cores: auto
iterations: 3
warmup: 1
"""


@TWO_CPUS
def test_tiny_sweep_2x2_then_report(tmp_path):
    """2 sequence lengths x 1, 2 cores: four real launches, then the report. The noop backend:
    the sweep and the report are the point here; a real framework's launch is tested in test_launch."""
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "res"
    r = numabench("sweep", str(tmp_path / "tiny.yaml"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "sweep tiny (core-scaling): 4 points" in r.stderr
    assert "[4/4]" in r.stderr and "done 4/4" in r.stderr and "left" in r.stderr
    names = sorted(p.name for p in (out / "points").glob("*.json"))
    assert names == sorted(f"bert-tiny_noop_fp32_s{s}_b2_{n}_r0.json"
                           for s in (8, 16) for n in ("n1x1", "n1x2"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "numabench.sweep" and manifest["status"] == "ok"
    assert [e["status"] for e in manifest["points"]] == ["ok"] * 4
    assert (out / "experiment.yaml").read_text() == TINY
    doc = json.loads((out / "points" / names[0]).read_text())
    assert doc["status"] == "ok" and doc["experiment"]["point"]["seq"] == 16
    assert (out / "runs" / names[0].removesuffix(".json") / "launch.log").exists()

    again = numabench("sweep", str(tmp_path / "tiny.yaml"), "-o", str(out))
    assert again.returncode == 2 and "already holds a sweep; add --resume" in again.stderr

    r = numabench("report", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "report" / "points.csv")))
    assert [(int(x["seq"]), int(x["instances"]), int(x["cores_per_instance"])) for x in rows] == [
        (8, 1, 1), (8, 1, 2), (16, 1, 1), (16, 1, 2)]
    assert all(x["status"] == "ok" and float(x["latency_p50_ms"]) > 0 for x in rows)
    plots = json.loads((out / "report" / "plots.json").read_text())["plots"]
    assert set(plots) == {"latency-vs-cores"}  # one instance throughout: no instances plots
    lat = plots["latency-vs-cores"]["series"]
    assert set(lat) == {"seq 8", "seq 16"}
    for row in rows:
        s = lat[f"seq {row['seq']}"]
        assert s["x"] == [1, 2]
        assert s["y"][s["x"].index(int(row["cores"]))] == pytest.approx(float(row["latency_p50_ms"]))
    assert plots["latency-vs-cores"]["x_label"] == "physical cores"
    assert plots["latency-vs-cores"]["y_label"] == "latency p50 (ms)"
    for ext in ("png", "svg"):
        assert (out / "report" / f"latency-vs-cores.{ext}").stat().st_size > 1000


SLOW_NOOP = """\
version: 1
kind: batch-scaling
name: slow
model: bert-tiny
backend: noop
seq: [8, 16]
batch: 2
instances: [1, 2]
iterations: 25
warmup: 1
backend_options: {compute_ns: 40000000}
"""


@TWO_CPUS
def test_interrupted_sweep_resumes_only_the_rest(tmp_path):
    (tmp_path / "slow.yaml").write_text(SLOW_NOOP)
    out = tmp_path / "res"
    p = subprocess.Popen([sys.executable, "-m", "numabench.cli", "sweep", str(tmp_path / "slow.yaml"),
                          "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((out / "points").glob("*.json")):
            time.sleep(0.05)
        assert list((out / "points").glob("*.json")), "the first point never finished"
        time.sleep(0.4)  # the second point is now running
        workers = psutil.Process(p.pid).children(recursive=True)
        os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "--resume" in err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"processes left behind: {[w.pid for w in alive]}"
    first = sorted((out / "points").glob("*.json"))
    assert len(first) == 1
    mtimes = {f.name: f.stat().st_mtime_ns for f in first}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [e["status"] for e in manifest["points"]][:2] == ["ok", "interrupted"]

    r = numabench("sweep", str(tmp_path / "slow.yaml"), "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "4 points, 1 already finished (skipped)" in r.stderr
    assert "[2/4]" in r.stderr and "[1/4]" not in r.stderr
    assert "3 points run, 1 skipped" in r.stdout
    done = sorted((out / "points").glob("*.json"))
    assert len(done) == 4
    assert {f.name: f.stat().st_mtime_ns for f in done if f.name in mtimes} == mtimes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok" and [e["status"] for e in manifest["points"]] == ["ok"] * 4
    assert manifest["points"][1]["previous_status"] == "interrupted"
    # the interrupted attempt's logs are kept aside, not overwritten
    assert list((out / "runs").glob("*.attempt-1"))

    # the report of the finished sweep: the instances figures, with what the points measured
    r = numabench("report", str(out))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "report" / "points.csv")))
    assert [(int(x["seq"]), int(x["instances"]), int(x["cores_per_instance"])) for x in rows] == [
        (8, 1, 2), (8, 2, 1), (16, 1, 2), (16, 2, 1)]
    plots = json.loads((out / "report" / "plots.json").read_text())["plots"]
    assert set(plots) == {"max-latency-vs-instances", "throughput-vs-instances", "best-instances"}
    tput = plots["throughput-vs-instances"]["series"]
    assert set(tput) == {"seq 8", "seq 16"}
    for row in rows:
        s = tput[f"seq {row['seq']}"]
        assert s["x"] == [1, 2]
        assert s["y"][s["x"].index(int(row["instances"]))] == pytest.approx(float(row["throughput"]))
        m = plots["max-latency-vs-instances"]["series"][f"seq {row['seq']}"]
        assert m["y"][m["x"].index(int(row["instances"]))] == pytest.approx(float(row["max_latency_p50_ms"]))
    # 40 ms of compute per request bounds the max latency from below
    assert min(min(s["y"]) for s in plots["max-latency-vs-instances"]["series"].values()) >= 40
    best = plots["best-instances"]["series"]["seq 8"]
    assert best["y"][0] == tput["seq 8"]["x"][tput["seq 8"]["y"].index(max(tput["seq 8"]["y"]))]
    for name in plots:
        for ext in ("png", "svg"):
            assert (out / "report" / f"{name}.{ext}").stat().st_size > 1000


def test_invalid_experiment_is_refused_with_line_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nkind: batch-scaling\nmodel: bert-tiny\nbatch: two\n")
    r = numabench("sweep", str(bad), "-o", str(tmp_path / "res"))
    assert r.returncode == 2
    assert f"error: {bad}:4: batch: expected an integer, got 'two' (string)" in r.stderr
    assert not (tmp_path / "res").exists()
    bad.write_text("version: 1\nkind: grid\nmodel: bert-tiny\ninstances: [1, 999]\n")
    r = numabench("sweep", str(bad), "-o", str(tmp_path / "res"))
    assert r.returncode == 2 and "1 of 2 points cannot run on this machine" in r.stderr
    assert "point 2/2 (bert-tiny fp32 seq 128 batch 8, 999 instances)" in r.stderr
    assert not (tmp_path / "res").exists()
