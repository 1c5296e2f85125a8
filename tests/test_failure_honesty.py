"""Issue 10: every failure honest. Real processes (noop backend: fast) where the behaviour is
about processes: signals, hung workers, results that must not claim success."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_procs import assert_all_gone, descendants, start_cli, wait_for_line

from numabench.results import load_result

NOOP = ("--backend", "noop", "--model", "bert-tiny", "--seq", "8")


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def private_tmp(tmp_path: Path) -> dict[str, str]:
    """An environment whose temporary folder is ours, to see the socket folder go."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_launch_stopped_by_a_signal_saves_results_and_cleans_up(tmp_path, sig):
    run_dir = tmp_path / "run"
    env = private_tmp(tmp_path)
    p = start_cli("launch", "-n", "1", "-b", "1", *NOOP, "--compute-us", "1000", "--duration", "60",
              "--run-dir", str(run_dir), env=env)
    try:
        wait_for_line(run_dir / "launch.log", "measuring")
        workers = descendants(p.pid)
        assert workers
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert_all_gone(workers)
    result = load_result(run_dir / "results.json")
    assert result.status == "interrupted" and sig.name in result.error
    assert os.listdir(env["TMPDIR"]) == []  # the socket folder is gone


def test_two_ctrl_c_within_milliseconds_exit_130_with_results(tmp_path):
    run_dir = tmp_path / "run"
    p = start_cli("launch", "-n", "1", "-b", "1", *NOOP, "--compute-us", "1000", "--duration", "60",
              "--run-dir", str(run_dir))
    try:
        wait_for_line(run_dir / "launch.log", "measuring")
        workers = descendants(p.pid)
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    assert_all_gone(workers)
    assert load_result(run_dir / "results.json").status == "interrupted"


def test_a_hung_worker_is_named_and_the_wait_is_shortened(tmp_path):
    run_dir = tmp_path / "run"
    r = cli("launch", "-n", "1", "-b", "1", *NOOP, "--warmup", "0", "--compute-us", "60000000",
            "--iterations", "1", "--request-timeout", "0.5", "--run-dir", str(run_dir))
    assert r.returncode == 1, r.stderr
    assert "no reply from instance 0" in r.stderr and "--request-timeout" in r.stderr
    result = load_result(run_dir / "results.json")
    assert result.status == "failed" and "instance 0" in result.error


def test_an_unexpected_exception_is_never_saved_as_ok(tmp_path, monkeypatch):
    """A bug inside the run (here: measure raises ZeroDivisionError) is a failure in the
    results document, its traceback in launch.log, and every worker is reaped."""
    from numabench.errors import LaunchError
    from numabench.launcher import launch
    from numabench.plans import plan_for_launch
    from numabench.topology import read_machine

    def broken(self, coord):
        self.measured.window_start_ns = time.monotonic_ns()  # the clock had started
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(launch._Run, "measure", broken)
    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=1, batch=1)
    workload = launch.Workload(model="bert-tiny", backend="noop", seq=8, warmup=0)
    opts = launch.LaunchOptions(run_dir=tmp_path / "run", progress=False)
    before = set(p.pid for p in descendants(os.getpid()))
    with pytest.raises(LaunchError, match="unexpected error: ZeroDivisionError"):
        launch.run_launch(machine, plan, workload, opts)
    assert not [p for p in descendants(os.getpid()) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
    result = load_result(tmp_path / "run" / "results.json")
    assert result.status == "failed" and "ZeroDivisionError" in result.error
    assert "Traceback" in (tmp_path / "run" / "launch.log").read_text()


def test_run_dir_holding_results_is_refused_and_files_follow_the_umask(tmp_path):
    run_dir = tmp_path / "run"
    out = tmp_path / "r.json"
    old = os.umask(0o022)
    try:
        r = cli("launch", "-n", "1", "-b", "1", *NOOP, "-i", "2", "--warmup", "0", "--run-dir", str(run_dir),
                "-o", str(out), "--repeat", "1")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    for f in (out, run_dir / "results.json"):
        assert f.stat().st_mode & 0o777 == 0o644, f  # readable by colleagues, as umask 022 says
    first = (run_dir / "results.json").read_bytes()
    again = cli("launch", "-n", "1", "-b", "1", *NOOP, "-i", "2", "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds results" in again.stderr
    assert (run_dir / "results.json").read_bytes() == first


def test_repeat_writes_one_document_per_repetition_with_fresh_workers(tmp_path):
    run_dir = tmp_path / "run"
    r = cli("launch", "-n", "1", "-b", "1", *NOOP, "-i", "2", "--warmup", "0", "--repeat", "2",
            "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    pids = set()
    for k in (1, 2):
        result = load_result(run_dir / f"rep-{k}" / "results.json")
        assert result.status == "ok" and len(result.samples) == 2
        assert result.repetition == {"index": k, "of": 2, "fresh_workers": True,
                                     "reused": ["machine", "plan"]}
        pids.add(result.instances["0"]["got"]["pid"])
    assert len(pids) == 2  # a new worker process each time
    assert not (run_dir / "results.json").exists()


EXPERIMENT = """\
version: 1
kind: grid
name: {name}
model: bert-tiny
backend: noop
seq: [8, 16]
instances: 1
batch: 1
iterations: 2
warmup: 0
"""


def test_sweep_point_that_raises_is_failed_and_the_others_run(tmp_path, monkeypatch):
    """An unexpected exception in one point marks that point failed, the next point still
    runs, and the manifest ends `failed`, not `running`."""
    from numabench.errors import LaunchError
    from numabench.experiments import runner
    from numabench.topology import read_machine

    (tmp_path / "e.yaml").write_text(EXPERIMENT.format(name="bug"))
    real = runner.run_launch
    calls = []

    def flaky(machine, plan, workload, opts):
        calls.append(workload.seq)
        if len(calls) == 1:
            raise RuntimeError("a bug in the first point")
        return real(machine, plan, workload, opts)

    monkeypatch.setattr(runner, "run_launch", flaky)
    with pytest.raises(LaunchError, match="1 of 2 points failed"):
        runner.run_sweep(read_machine("/"), tmp_path / "e.yaml", tmp_path / "out",
                         stream=io.StringIO())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [e["status"] for e in manifest["points"]] == ["failed", "ok"]
    assert "RuntimeError: a bug in the first point" in manifest["points"][0]["error"]
    assert len(calls) == 2


def test_sweep_stopped_by_sighup_finishes_its_manifest(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(EXPERIMENT.format(name="hup").replace("iterations: 2", "duration: 60"))
    out = tmp_path / "out"
    env = private_tmp(tmp_path)
    p = start_cli("sweep", str(exp), "-o", str(out), env=env)
    try:
        wait_for_line(out / "runs" / "bert-tiny_noop_fp32_s8_b1_n1_r0" / "launch.log", "measuring")
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [e["status"] for e in manifest["points"]] == ["interrupted", "pending"]
    assert "SIGHUP" in manifest["points"][0]["error"]
    doc = json.loads((out / "runs" / "bert-tiny_noop_fp32_s8_b1_n1_r0" / "results.json").read_text())
    assert doc["status"] == "interrupted"
    assert os.listdir(env["TMPDIR"]) == []


def test_experiment_name_cannot_escape_the_output_folder(tmp_path):
    (tmp_path / "e.yaml").write_text(EXPERIMENT.format(name="../../escape"))
    r = cli("sweep", str(tmp_path / "e.yaml"), "--dry-run")
    assert r.returncode == 2 and "cannot be a folder name" in r.stderr and "e.yaml:3" in r.stderr


def test_repetitions_are_bounded_before_expanding(tmp_path):
    (tmp_path / "e.yaml").write_text(EXPERIMENT.format(name="big") + "repetitions: 100000000\n")
    r = cli("sweep", str(tmp_path / "e.yaml"), "--dry-run", timeout=30)
    assert r.returncode == 2 and "repetitions: must be at most" in r.stderr
