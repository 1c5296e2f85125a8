"""Faults outside client handling (timers, process checks, worker events, metrics, the stop
itself) are caught by the event loop's one guard: logged, counted, answered where a request is
involved, and the daemon goes on serving. An in-process daemon with faults injected into its own
methods; real worker processes (noop backend), real ZeroMQ."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_serve import USABLE, ids

from numabench.daemon import endpoints, server
from numabench.daemon.client import Client
from numabench.launcher.options import Workload
from numabench.plans import load_plan

pytestmark = pytest.mark.skipif(not USABLE, reason="needs a usable CPU")


class Boom(RuntimeError):
    pass


def _raising(times: float, then=None):
    """A stand-in that raises its first `times` calls, then calls `then` (if any)."""
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise Boom(f"injected fault {calls['n']}")
        return then(*args, **kwargs) if then else None

    fake.calls = calls
    return fake


def _wait(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_faults_in_timers_events_metrics_and_stop_leave_the_daemon_serving(tmp_path, monkeypatch):
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv(endpoints.RUNTIME_ENV, str(tmp_path / "rt"))
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"version: 1\nbatch: 1\ninstances:\n- {{id: 0, cpus: '{USABLE[0]}', "
                         "memory_nodes: [], threads: 1, batch: 1}\n")
    opts = server.ServeOptions(
        workload=Workload(model="bert-tiny", backend="noop", warmup=0,
                          backend_options={"compute_ns": 1_000_000}),
        run_dir=tmp_path / "run", pin_loop=False, metrics_port=0, binder="taskset")
    d = server.Daemon(load_plan(plan_file), opts, plan_file=str(plan_file))
    # Always failing: the timers and the metrics refresh. Failing a few times, then working: the
    # process check. One RESULT whose handling fails (its request is involved: it gets an error).
    monkeypatch.setattr(d, "_check_timers", _raising(float("inf")))
    monkeypatch.setattr(d, "_check_processes", _raising(3, d._check_processes))
    monkeypatch.setattr(d, "_complete", _raising(1, d._complete))
    monkeypatch.setattr(d, "_check_drained", _raising(float("inf")))
    box: dict = {}

    def run():
        try:
            box["rc"] = d.run()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        _wait(lambda: d.endpoint or "error" in box or not t.is_alive(), what="the endpoint")
        assert "error" not in box, box
        with Client(d.endpoint, timeout_s=30) as c:
            _wait(lambda: c.status()["state"] == "serving", what="serving")
            monkeypatch.setattr(d.metrics, "refresh", _raising(float("inf")))
            first = c.infer(input_ids=ids(8))
            assert not first.ok and "internal error in result" in first.reason and "Boom" in first.reason
            for k in range(5):
                assert c.ping()["pid"]
                r = c.infer(input_ids=ids(8, seed=k), want="outputs")
                assert r.ok, r.reason
                assert isinstance(r.output, np.ndarray) and r.output.shape[:2] == (1, 8)
            _wait(lambda: c.status()["faults"].get("metrics", 0) >= 2, what="a metrics fault")
            faults = c.status()["faults"]
            assert faults["timers"] >= 3 and faults["process check"] == 3 and faults["result"] == 1
            assert t.is_alive() and c.status()["instances"][0]["state"] == "ready"
            # A stop whose drain step raises still stops, answers its caller, leaves no worker.
            assert c.stop()["stopped"] is True
        t.join(60)
        assert not t.is_alive() and box.get("rc") == 0, box
        assert not d.group.alive()
        assert d.faults["stop"] >= 1
    finally:
        if t.is_alive():
            d.begin_stop("test cleanup")
            d.phase = server.Phase.DONE
            t.join(60)

