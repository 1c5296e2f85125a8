"""Fork servers (workers/zygote.py, launcher/forkserver.py): workers forked from one process that
imported the framework, how they bind themselves, and what happens when the server fails."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil
import pytest
from cli_procs import assert_all_gone, descendants, start_cli, wait_for_line

from numabench.launcher import forkserver
from numabench.launcher.launch import LaunchOptions, Workload, run_launch
from numabench.plans import plan_for_launch
from numabench.topology import read_machine
from numabench.workers.config import ConfigError, WorkerConfig
from numabench.workers.worker import pin_framework_threads

USABLE = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs")
NOOP = Workload(model="bert-tiny", backend="noop", seq=8, iterations=3, warmup=1,
                backend_options={"compute_ns": 500_000})


def _launch(tmp_path, n=1, **opts):
    machine = read_machine("/")
    plan = plan_for_launch(machine, instances=n, batch=n)
    return run_launch(machine, plan, NOOP, LaunchOptions(run_dir=tmp_path / "run", progress=False,
                                                         **opts)).to_dict()


def test_forked_noop_instances_report_their_server_and_exec_is_still_there(tmp_path):
    doc = _launch(tmp_path / "fork", n=min(2, len(USABLE)))
    start = doc["environment"]["start"]
    assert doc["status"] == "ok" and start["method"] == "fork" and len(start["servers"]) == 1
    server = start["servers"][0]
    log = (tmp_path / "fork" / "run" / "launch.log").read_text()
    assert log.count(f"forked by fork server {server['pid']}") == len(doc["instances"])
    assert not psutil.pid_exists(server["pid"]) or psutil.Process(server["pid"]).status() == "zombie"

    doc = _launch(tmp_path / "exec", start="exec")
    assert doc["status"] == "ok"
    assert doc["environment"]["start"] == {"method": "exec", "why_exec": "--start exec", "servers": []}
    assert "forked by" not in (tmp_path / "exec" / "run" / "launch.log").read_text()


def test_a_server_that_cannot_start_falls_back_to_exec_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(forkserver, "server_argv",
                        lambda prefix, backend, model: [sys.executable, "-c", "import sys; sys.exit(3)"])
    doc = _launch(tmp_path)
    assert doc["status"] == "ok"
    start = doc["environment"]["start"]
    assert start["method"] == "exec" and "fork server did not start: it exited" in start["why_exec"]
    assert any("fork server did not start" in w and "fresh processes instead" in w for w in doc["warnings"])


def test_a_users_own_thread_placement_means_exec(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_PLACES", "cores")  # read at import: a fork server would lose it
    doc = _launch(tmp_path)
    assert doc["environment"]["start"]["method"] == "exec"
    assert "OMP_PLACES" in doc["environment"]["start"]["why_exec"]
    assert doc["instances"]["0"]["got"]["env"]["OMP_PLACES"] == "cores"


def test_bad_start_method_is_refused_before_anything_starts(tmp_path):
    from numabench.errors import NumabenchError

    with pytest.raises(NumabenchError, match="--start must be one of fork, exec"):
        _launch(tmp_path, start="spawn")
    assert not (tmp_path / "run").exists()


@TWO_CPUS
def test_killing_the_fork_server_ends_the_run_and_names_its_workers(tmp_path):
    run_dir = tmp_path / "run"
    p = start_cli("launch", "--instances", "2", "--batch", "2", "--seq", "8", "--backend", "noop",
                  "--model", "bert-tiny", "--compute-us", "2000", "--duration", "60", "--mode",
                  "throughput", "--run-dir", str(run_dir))
    try:
        wait_for_line(run_dir / "launch.log", "measuring")
        procs = descendants(p.pid)
        (server,) = [q for q in procs if q.name() == "numabench-fork"]
        assert sorted(q.name() for q in server.children()) == ["numabench-w0", "numabench-w1"]
        server.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, err
    assert "its fork server" in err and "ended first" in err, err
    assert_all_gone(procs)
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "failed" and "instance" in doc["error"]


def test_config_pin_threads_is_checked():
    base = {"instance": 0, "endpoint": "ipc:///tmp/x", "model": "bert-tiny", "backend": "noop"}
    assert WorkerConfig.from_dict({**base, "cpus": [0], "pin_threads": True}).pin_threads
    with pytest.raises(ConfigError, match="pin_threads must be true or false"):
        WorkerConfig.from_dict({**base, "cpus": [0], "pin_threads": "yes"})
    with pytest.raises(ConfigError, match="pin_threads needs cpus"):
        WorkerConfig.from_dict({**base, "pin_threads": True})


@TWO_CPUS
def test_pin_framework_threads_binds_the_busy_thread_and_leaves_the_idle_one():
    """Real threads: one computes, one sleeps (as PyTorch's inter-op pool does); with 2 threads
    on 2 CPUs the main thread gets the first CPU and the busy thread the second."""
    ids: dict[str, int] = {}
    stop = threading.Event()

    def busy():
        ids["busy"] = threading.get_native_id()
        while not stop.is_set():
            sum(range(1000))

    def idle():
        ids["idle"] = threading.get_native_id()
        stop.wait()

    before = os.sched_getaffinity(0)
    threads = [threading.Thread(target=busy), threading.Thread(target=idle)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        cpus = tuple(USABLE[:2])
        got = pin_framework_threads([ids["busy"], ids["idle"]], cpus, threads=2)
        assert got == {"pinned": {str(threading.get_native_id()): cpus[0], str(ids["busy"]): cpus[1]},
                       "error": None}
        assert os.sched_getaffinity(ids["busy"]) == {cpus[1]}
        assert os.sched_getaffinity(ids["idle"]) == before  # not a compute thread: left alone
        assert os.sched_getaffinity(0) == {cpus[0]}

        got = pin_framework_threads([], cpus, threads=2)  # no thread started
        assert got["pinned"] == {} and "0 framework threads computed for 2 threads" in got["error"]
        got = pin_framework_threads([ids["busy"]], cpus, threads=1)  # threads != CPUs
        assert got["pinned"] == {} and "not bound one per CPU" in got["error"]
    finally:
        stop.set()
        for t in threads:
            t.join()
        os.sched_setaffinity(0, before)


def test_a_server_answers_hostile_requests_and_still_forks(tmp_path):
    """Whatever reaches its stdin, the server refuses what is not a fork or build request and
    carries on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_worker_process import Coordinator

    server = forkserver.ForkServer(forkserver.server_argv([], "noop", "bert-tiny"), dict(os.environ),
                                   tmp_path / "fork-server.log", timeout_s=60)
    coord = Coordinator(tmp_path)
    try:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
                         st.just(b'{"op": "fork"}'), st.just(b"[1, 2]"), st.just(b'{"op": "fork", "config": {},'
                                                                                  b' "env": {"A": 1}, "log": "x"}'),
                         st.just(b'{"op": "build_weights", "model": "bert-tiny", "path": "w", "log": "x"}'),
                         st.just(b'{"op": "build_weights", "model": "bert-tiny", "seed": true, "path": "w",'
                                 b' "log": "x"}'),
                         st.just(b'{"op": "build_weights", "model": 1, "seed": 0, "path": "w", "log": "x"}')))
        def hostile(line):
            server.proc.stdin.write(line + b"\n")
            server.proc.stdin.flush()
            reply = server._next_reply(10)
            assert reply is not None and reply["op"] == "refused", reply

        hostile()
        # A build that fails in the server's child: None (the launcher builds it itself), the
        # child's error in the log it was given, no file.
        weights, log = tmp_path / "w.safetensors", tmp_path / "build.log"
        assert server.build_weights("no-such-model", 0, weights, log, timeout_s=60) is None
        assert "unknown model 'no-such-model'" in log.read_text() and not weights.exists()
        proc = coord.fork(server, 0)
        ident, head, _ = coord.recv(timeout_s=30)
        assert (ident, head["type"]) == (0, "HELLO") and head["pid"] == proc.pid
        coord.send(0, "STOP")
        assert proc.wait(30) == 0
    finally:
        server.close()
        coord.close()
    assert server.proc.returncode == 0


@TWO_CPUS
def test_a_daemon_whose_fork_server_dies_restarts_its_workers_as_fresh_processes(tmp_path):
    from test_serve import Daemon, ids

    d = Daemon(tmp_path, "--instances", "2", "--compute-us", "1000")
    try:
        first = {i["id"]: i["pid"] for i in d.status()["instances"]}
        (server,) = {psutil.Process(pid).parent() for pid in first.values()}
        assert server.name() == "numabench-fork" and server.parent().pid == d.proc.pid
        server.send_signal(signal.SIGKILL)  # its workers die with it (PDEATHSIG)
        s = d.wait_status(lambda s: all(i["state"] == "ready" and i["pid"] not in first.values()
                                        for i in s["instances"]), timeout=60)
        for inst in s["instances"]:
            assert "fork server" in inst["last_exit"] and "ended first" in inst["last_exit"], inst
            assert psutil.Process(inst["pid"]).parent().pid == d.proc.pid  # exec'd by the daemon now
        with d.client(timeout_s=30) as c:
            assert all(c.infer(input_ids=ids(8)).ok for _ in range(4))
        assert "workers are started as fresh processes instead" in d.output()
    finally:
        d.close()


def test_a_server_whose_launcher_stopped_reading_still_stops_its_workers(tmp_path):
    """Its reports go nowhere (a broken pipe); it must still SIGTERM, reap and exit cleanly."""
    from test_worker_process import Coordinator

    server = forkserver.ForkServer(forkserver.server_argv([], "noop", "bert-tiny"), dict(os.environ),
                                   tmp_path / "fork-server.log", timeout_s=60)
    coord = Coordinator(tmp_path)
    try:
        proc = coord.fork(server, 0)
        assert coord.recv(timeout_s=30)[1]["type"] == "HELLO"
        worker = psutil.Process(proc.pid)
        server.proc.stdout.close()  # what a dead launcher leaves: the server's reports fail
        server.proc.stdin.close()  # EOF: stop
        assert server.proc.wait(30) == 0, (tmp_path / "fork-server.log").read_text()
        assert_all_gone([worker])
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        coord.close()


def test_serve_refuses_an_unknown_start_method_before_anything_starts(tmp_path):
    from numabench.daemon.server import Daemon, ServeOptions
    from numabench.errors import NumabenchError

    machine = read_machine("/")
    with pytest.raises(NumabenchError, match="--start must be one of fork, exec, not 'spawn'"):
        Daemon(plan_for_launch(machine, instances=1, batch=1),
               ServeOptions(workload=NOOP, start="spawn", run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()
