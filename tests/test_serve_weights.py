"""serve shares weights like launch: one read-only copy per NUMA node, mapped by the node's
workers, removed at stop, and a killed daemon's copy removed by the next start. Real daemon,
real PyTorch workers (bert-tiny)."""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import psutil
import pytest
from test_serve import Daemon
from test_shared_weights import needs_shm, needs_torch

pytestmark = [needs_torch, needs_shm]


@pytest.fixture
def shm_dir():
    folder = Path("/dev/shm") / f"numabench-test-{uuid.uuid4().hex[:8]}"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _workers(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)
            if c.name().startswith("numabench-w")]


def test_serve_workers_map_the_nodes_copy_and_the_next_start_removes_a_killed_daemons(
        tmp_path, shm_dir, monkeypatch):
    # An empty weights cache: the first daemon's fork server writes the file in a child (no
    # torch in the daemon); the second daemon finds it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = ("--backend", "pytorch", "--instances", "1", "--weights-dir", str(shm_dir))
    (tmp_path / "a").mkdir()
    first = Daemon(tmp_path / "a", *args)
    try:
        log = first.output()
        assert "weights of bert-tiny written in" in log and " by fork server " in log, log
        weights = first.status()["weights"]
        assert len(weights) == 1, weights
        (path,) = weights.values()
        assert Path(path).parent == shm_dir and f".pid{first.proc.pid}." in path
        workers = _workers(first.proc.pid)
        assert workers
        for w in workers:
            assert path in Path(f"/proc/{w.pid}/maps").read_text()
        # A crash: nobody cleans up; the orphaned workers exit on their own.
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        _, alive = psutil.wait_procs(workers, timeout=30)
        for p in alive:
            p.kill()
        assert not alive
        assert os.path.exists(path)
    finally:
        first.close()
    (tmp_path / "b").mkdir()
    # The next daemon shares nothing itself (--no-share-weights) and still removes the dead copy.
    second = Daemon(tmp_path / "b", *args, "--no-share-weights")
    try:
        assert not os.path.exists(path), "the killed daemon's copy survived the next start"
        assert second.status()["weights"] == {}
        for w in _workers(second.proc.pid):
            assert str(shm_dir) not in Path(f"/proc/{w.pid}/maps").read_text()
        r = second.cli("stop")
        assert r.returncode == 0, r.stderr
        second.proc.wait(30)
    finally:
        second.close()
    assert not shm_dir.exists()  # the emptied folder is removed too


def test_reload_to_another_node_writes_its_copy_and_removes_the_unused_one(tmp_path, shm_dir):
    from test_serve import USABLE

    plan = tmp_path / "plan.yaml"
    text = ("version: 1\nbatch: 1\ninstances:\n- {{id: 0, cpus: '{cpu}', memory_nodes: {nodes}, "
            "threads: 1, batch: 1}}\n")
    plan.write_text(text.format(cpu=USABLE[0], nodes="[]"))
    d = Daemon(tmp_path, "--plan", str(plan), "--backend", "pytorch", "--weights-dir", str(shm_dir))
    try:
        (before,) = d.status()["weights"].values()
        assert "nodes-any" in before
        node = min(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
        plan.write_text(text.format(cpu=USABLE[0], nodes=f"[{node}]"))
        r = d.cli("reload")
        assert r.returncode == 0, r.stderr
        s = d.wait_status(lambda s: s["state"] == "serving" and s["instances"][0]["memory_nodes"] == [node],
                          timeout=120)
        assert list(s["weights"]) == [f"node{node}"], s["weights"]
        (after,) = s["weights"].values()
        assert os.path.exists(after) and not os.path.exists(before)
        assert after in Path(f"/proc/{s['instances'][0]['pid']}/maps").read_text()
    finally:
        d.close()
    assert not os.path.exists(after)
