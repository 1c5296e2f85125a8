"""Dispatch experiments (kind: dispatch): the YAML refused with file:line, the request stream,
the plans checked against the machine, and one real run of `numabench serve` under two plans on
bert-tiny, reported with both plans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_plans_support import article_machine, build_machine

from numabench.cli import cli
from numabench.experiments.dispatch import arrivals, draw_lengths, plan_dispatch
from numabench.experiments.spec import ExperimentError, LengthMix, load_experiment, parse_experiment

REPO = Path(__file__).resolve().parents[1]

SPLIT = """version: 1
name: split
batch: 2
instances:
- {id: 0, cpus: "0", memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 1, max: 32}}
- {id: 1, cpus: "1", memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 33, max: 64}}
"""
UNIFORM = """version: 1
name: uniform
batch: 2
instances:
- {id: 0, cpus: "0", memory_nodes: [0], threads: 1, batch: 1}
- {id: 1, cpus: "1", memory_nodes: [0], threads: 1, batch: 1}
"""
ONE_CORE = """version: 1
batch: 1
instances:
- {id: 0, cpus: "0", memory_nodes: [0], threads: 1, batch: 1}
"""
BASE = {
    "kind": "kind: dispatch",
    "model": "model: bert-tiny",
    "plans": "plans: [split.yaml, uniform.yaml]",
    "lengths": "lengths: {distribution: uniform, min: 8, max: 64}",
    "rate": "rate: 6",
    "requests": "requests: 12",
    # routing, padding and the report are the point, not the framework (6 torch imports otherwise)
    "backend": "backend: noop",
}


def write_exp(folder: Path, **change: str | None) -> Path:
    (folder / "split.yaml").write_text(SPLIT)
    (folder / "uniform.yaml").write_text(UNIFORM)
    (folder / "one.yaml").write_text(ONE_CORE)
    lines = {**BASE, **change}
    path = folder / "exp.yaml"
    path.write_text("version: 1\n" + "".join(f"{v}\n" for v in lines.values() if v is not None))
    return path


def dry_run(path: Path):
    return CliRunner().invoke(cli, ["sweep", str(path), "--dry-run"], catch_exceptions=False)


# ---- the YAML: hostile values exit 2 naming file, line and field --------------------------------

@pytest.mark.parametrize("change, where, words", [
    ({"rate": "rate: .nan"}, "exp.yaml:6: rate", "finite number above 0"),
    ({"rate": "rate: [2, .inf]"}, "exp.yaml:6: rate[1]", "finite number above 0"),
    ({"rate": "rate: -3"}, "exp.yaml:6: rate", "not -3"),
    ({"rate": "rate: 1000000"}, "exp.yaml:6: rate", "at most 100000"),
    ({"rate": "rate: 0.01", "requests": "duration: 10"}, "exp.yaml:6: rate", "less than one request"),
    ({"plans": None}, "exp.yaml", "missing 'plans'"),
    ({"plans": "plans: [split.yaml]"}, "exp.yaml:4: plans", "two or more plans"),
    ({"plans": "plans: [split.yaml, nothere.yaml]"}, "exp.yaml:4: plans[1]", "does not exist"),
    ({"plans": "plans: [split.yaml, {preset: nosuch}]"}, "exp.yaml:4: plans[1].preset", "unknown preset"),
    ({"lengths": "lengths: {distribution: zipf, min: 1, max: 8}"}, "exp.yaml:5: lengths.distribution",
     "unknown distribution 'zipf'"),
    ({"lengths": "lengths: {distribution: uniform, min: 8, max: 9999}"}, "exp.yaml:5: lengths.max",
     "at most 512"),
    ({"lengths": "lengths: {texts: t.txt}"}, "exp.yaml:5: lengths.texts", "cannot read"),
    ({"requests": "requests: 0"}, "exp.yaml:7: requests", "at least 1"),
    ({"requests": "duration: 700000"}, "exp.yaml:7: duration", "at most 604800"),
    ({"requests": "pad: [max, maximum]"}, "exp.yaml:7: pad[1]", "unknown pad 'maximum'"),
    ({"requests": "seq: 8"}, "exp.yaml:7: seq", "does not apply to kind dispatch"),
])
def test_hostile_spec_values_exit_2_naming_the_field(tmp_path, change, where, words):
    result = dry_run(write_exp(tmp_path, **change))
    assert result.exit_code == 2, result.output
    assert f"error: {tmp_path / where}" in result.output and words in result.output, result.output
    assert "Traceback" not in result.output


def test_lengths_file_lines_are_checked(tmp_path):
    (tmp_path / "lengths.txt").write_text("8\n# a comment\n16\nlong\n")
    result = dry_run(write_exp(tmp_path, lengths="lengths: {file: lengths.txt}"))
    assert result.exit_code == 2
    assert "lengths.txt:4: 'long' is not a length" in result.output
    (tmp_path / "lengths.txt").write_text("8\n16\n40\n")
    e = load_experiment(write_exp(tmp_path, lengths="lengths: {file: lengths.txt}"))
    assert e.dispatch.lengths.values == (8, 16, 40) and e.dispatch.lengths.max == 40


def test_plans_must_share_cores_and_cover_every_length(tmp_path):
    result = dry_run(write_exp(tmp_path, plans="plans: [split.yaml, one.yaml]"))
    assert result.exit_code == 2
    assert "runs on CPUs 0 but 'split' on 0-1: a dispatch comparison needs every plan on the same cores" \
        in result.output
    result = dry_run(write_exp(tmp_path, lengths="lengths: {distribution: uniform, min: 8, max: 100}"))
    assert result.exit_code == 2
    assert "plan 'split' has no pool for request lengths 65-100" in result.output


def test_dry_run_lists_plans_x_pads_x_rates(tmp_path):
    result = dry_run(write_exp(tmp_path, rate="rate: [2, 4]", requests="pad: [max, bucket]"))
    assert result.exit_code == 0, result.output
    assert "8 points, all valid on" in result.output
    ids = [line.split()[1] for line in result.output.splitlines()[1:]]
    assert ids[:4] == ["split_pad-max_rate2_r0", "uniform_pad-max_rate2_r0",
                       "split_pad-bucket_rate2_r0", "uniform_pad-bucket_rate2_r0"]
    assert "(1-32: 1x1c, 33-64: 1x1c)" in result.output
    assert "(1-64: 2x1c)" in result.output  # a plan without ranges serves 1..the mix's longest


def test_article_experiment_plans_on_the_article_machine():
    exp = load_experiment(REPO / "plans" / "experiment-smart-dispatch.yaml")
    points, plans = plan_dispatch(exp, article_machine())
    assert len(points) == 3 * 5 * 2 * 2  # repetitions x rates x pads x plans
    smart, uniform = plans[0], plans[1]
    assert points[0].plan == "smart-dispatch" and points[1].plan == "uniform"
    assert smart.cpus == uniform.cpus and len(smart.cpus) == 48
    assert points[0].shape == "1-32: 1x8c, 33-384: 1x16c, 385-: 1x24c"
    assert points[1].shape == "1-512: 6x8c"
    with pytest.raises(ExperimentError, match="no node has that many free"):
        plan_dispatch(exp, build_machine(cores_per_node=4))


# ---- the stream -------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_and_shared_by_every_rate():
    a = arrivals(0, 0, 10.0, 300.0, None)
    assert 2700 < len(a) < 3300 and np.all(np.diff(a) >= 0) and a[-1] < 300e9
    gaps = np.diff(a) / 1e9
    assert 0.09 < gaps.mean() < 0.11 and 0.8 < gaps.std() / gaps.mean() < 1.2  # exponential
    assert np.array_equal(a, arrivals(0, 0, 10.0, 300.0, None))
    fast = arrivals(0, 0, 20.0, None, 100)
    assert np.allclose(fast * 2, a[:100], atol=2)  # the same sequence, twice as dense
    assert not np.array_equal(arrivals(0, 1, 10.0, None, 100), a[:100])  # another repetition


def test_lognormal_lengths_stay_inside_the_range():
    mix = LengthMix("lognormal", min=8, max=128, median=24.0, sigma=1.0)
    v = draw_lengths(mix, 0, 0, 5000)
    assert v.min() >= 8 and v.max() <= 128 and 18 <= np.median(v) <= 30
    with pytest.raises(ExperimentError, match="lengths.sigma: must be a finite number"):
        parse_experiment("version: 1\nkind: dispatch\nmodel: bert-tiny\nplans: [{instances: 1}, "
                         "{instances: 2}]\nrate: 1\nlengths: {distribution: lognormal, min: 1, "
                         "max: 9, sigma: .inf}\n")


# ---- a real run: two plans on bert-tiny, reported --------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_dispatch_experiment_runs_both_plans_and_reports_them(tmp_path):
    path = write_exp(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "numabench", "sweep", str(path), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "dispatch" and manifest["status"] == "ok"
    assert [e["id"] for e in manifest["points"]] == ["split_pad-max_rate6_r0", "uniform_pad-max_rate6_r0"]
    docs = {p: json.loads((out / "points" / f"{p}_pad-max_rate6_r0.json").read_text())
            for p in ("split", "uniform")}
    for name, doc in docs.items():
        s = doc["summary"]
        assert doc["status"] == "ok" and s["requests"] == 12 and s["ok"] == 12, (name, s)
        assert s["latency_ms"]["p50"] > 0 and s["throughput"] > 0
        assert doc["experiment"]["point"]["plan"] == name
        # the generator is pinned off the plan's CPUs 0-1 where the machine has others
        assert doc["generator"]["pinned"] == bool(os.sched_getaffinity(0) - {0, 1})
        # the daemon and its workers are gone
        assert _gone(doc["daemon"]["pid"]) and all(_gone(i["pid"]) for i in s["instances"])
    split, uniform = docs["split"], docs["uniform"]
    # the same requests reached both plans (seeded by repetition, not by plan)
    assert split["raw"]["seq"] == uniform["raw"]["seq"] and split["raw"]["offset_ns"] == uniform["raw"]["offset_ns"]
    # serve's routing: short requests to the 1-32 pool, the others to 33-64, each padded to its pool's max
    for seq, pool, padded in zip(split["raw"]["seq"], split["raw"]["pool"], split["raw"]["padded_seq"]):
        assert (pool, padded) == (("1-32", 32) if seq <= 32 else ("33-64", 64))
    assert set(uniform["raw"]["pool"]) == {"1-64"} and set(uniform["raw"]["padded_seq"]) == {64}
    assert split["summary"]["padding_overhead"] < uniform["summary"]["padding_overhead"]
    pools = split["summary"]["pools"]
    assert pools["1-32"]["served"] + pools["33-64"]["served"] == 12
    assert uniform["summary"]["pools"]["1-64"]["instances"] == 2

    result = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "split " in result.output and "uniform " in result.output
    report = out / "report"
    for f in ("latency-vs-load.png", "latency-vs-load.svg", "throughput-vs-load.png", "report.html"):
        assert (report / f).stat().st_size > 1000, f
    plots = json.loads((report / "plots.json").read_text())["plots"]
    panels = plots["latency-vs-load"]["panels"]
    assert [p["title"] for p in panels] == ["p50", "p90"]  # 12 requests: too few for a p99
    assert [line["label"] for line in panels[0]["lines"]] == ["split", "uniform"]
    assert all(line["x"] == [6.0] and line["y"][0] > 0 for line in panels[0]["lines"])
    html = (report / "report.html").read_text()
    assert html.count("<svg") == 2 and "split" in html and "uniform" in html
    rows = (report / "points.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("split_pad-max_rate6_r0,split,max,6.0")


def _processes_naming(text: str) -> list[int]:
    """Pids whose command line holds `text` (our sweep folder names every daemon we start)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_ctrl_c_mid_stream_stops_the_daemon_and_marks_the_point_interrupted(tmp_path):
    import signal
    import time

    path = write_exp(tmp_path, requests="duration: 60")
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "numabench", "sweep", str(path), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        log = out / "runs" / "split_pad-max_rate6_r0" / "daemon.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (log.exists() and "serving on" in log.read_text()):
            time.sleep(0.2)
        time.sleep(1.0)  # into the stream
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [e["status"] for e in manifest["points"]] == ["interrupted", "pending"]
    assert "STOP received" in log.read_text() and "no worker left" in log.read_text()
    assert _processes_naming(str(out)) == []  # the daemon and its workers are reaped
