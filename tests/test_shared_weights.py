"""Shared weights (workers/backends/shared_weights.py, launcher/memory.py): the per-node planning,
the cache (corrupt entries rebuilt), the tmpfs copies (placed, mapped, removed after the run and
after a killed run), and the same outputs with and without sharing, on bert-tiny."""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from numabench.launcher import memory
from numabench.launcher.forkserver import ForkServer, server_argv
from numabench.workers.backends import Preparation
from numabench.workers.backends import shared_weights as sw

HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec(
    "transformers") is not None and importlib.util.find_spec("safetensors") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch, transformers, safetensors")
needs_shm = pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="needs a writable /dev/shm")
USABLE = sorted(os.sched_getaffinity(0))


@pytest.fixture
def shm_dir():
    """A private folder on tmpfs, removed after the test whatever happened."""
    folder = Path("/dev/shm") / f"numabench-test-{uuid.uuid4().hex[:8]}"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights-cache")


# ---- pure ----

def test_one_copy_per_node_set_named_by_node_and_owner(tmp_path):
    copies = sw.plan_copies([(1,), (0,), (0,), (1,)], tmp_path, "bert-fp32-abc", 4242, keep=False)
    assert [c.nodes for c in copies] == [(0,), (1,)]
    assert [c.path.name for c in copies] == ["bert-fp32-abc.node0.pid4242.safetensors",
                                             "bert-fp32-abc.node1.pid4242.safetensors"]
    assert all(c.per_run for c in copies)
    kept = sw.plan_copies([(0, 1), ()], tmp_path, "m", 1, keep=True)
    assert [(c.nodes, c.path.name, c.per_run) for c in kept] == [
        ((), "m.nodes-any.safetensors", False), ((0, 1), "m.node0-1.safetensors", False)]
    assert sw.mempolicy_mask((0, 3)) == 0b1001


def test_stale_copies_are_those_of_dead_owners():
    names = ["m.node0.pid10.safetensors", "m.node1.pid10.safetensors.tmp",
             "m.node0.pid11.safetensors", "m.node0.safetensors", "m.node0.safetensors.json"]
    assert sw.stale_copies(names, alive=lambda pid: pid == 11) == [
        "m.node0.pid10.safetensors", "m.node1.pid10.safetensors.tmp"]


def test_each_instance_gets_its_nodes_copy():
    prep = Preparation(options={"a": 1}, record={}, warnings=[],
                       node_options={(0,): {"weights_path": "/n0"}, (1,): {"weights_path": "/n1"}})
    assert prep.options_for((1,)) == {"a": 1, "weights_path": "/n1"}
    assert prep.options_for((0,)) == {"a": 1, "weights_path": "/n0"}
    assert prep.options_for(()) == {"a": 1}


SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 00:1b 2                          /dev/shm/w.safetensors
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
Private_Dirty:       800 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Rss:                 900 kB
Pss:                 900 kB
Private_Dirty:       900 kB
Anonymous:           900 kB
7f0000400000-7f0000500000 rw-p 00100000 00:1b 2                          /dev/shm/w.safetensors
Rss:                  12 kB
Pss:                   8 kB
Private_Dirty:         8 kB
Anonymous:             8 kB
"""
NUMA_MAPS = """\
7f0000000000 default file=/dev/shm/w.safetensors mapped=200 N0=150 N1=50 kernelpagesize_kB=4
7f0000200000 default anon=225 dirty=225 N0=225 kernelpagesize_kB=4
7f0000400000 default file=/dev/shm/w.safetensors anon=2 dirty=2 N1=2 kernelpagesize_kB=4
"""


def test_memory_parsers():
    files = ["/dev/shm/w.safetensors"]
    assert memory.parse_smaps(SMAPS, files) == {files[0]: {
        "rss": 812 * 1024, "pss": 408 * 1024, "copied": 8 * 1024, "mappings": 2}}
    assert memory.parse_numa_maps(NUMA_MAPS, files) == {files[0]: {"0": 150 * 4096, "1": 52 * 4096}}
    assert memory.parse_rollup("Rss: 10 kB\nAnonymous:  12 kB\n") == {"anonymous": 12 * 1024}


@needs_shm
def test_a_tmpfs_mapping_counts_copies_not_dirty_pages(shm_dir):
    """tmpfs pages are always dirty, so smaps calls every page only this process maps
    Private_Dirty; only a write makes a copy (an anonymous page in the mapping)."""
    shm_dir.mkdir()
    path = shm_dir / "w.safetensors"
    path.write_bytes(os.urandom(64 * 4096))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                           prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0  # read every page
        ours, dirty = False, 0
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if memory._SMAPS_HEADER.match(line):
                ours = line.endswith(str(path))
            elif ours and line.startswith("Private_Dirty:"):
                dirty += int(line.split()[1])
        assert dirty == 64 * 4  # kB: all of it "private dirty", none of it copied
        seen = memory.sample(os.getpid(), [str(path)])["shared_files"][str(path)]
        assert seen["rss"] == 64 * 4096 and seen["copied"] == 0, seen
        m[0], m[5 * 4096] = 1, 2
        seen = memory.sample(os.getpid(), [str(path)])["shared_files"][str(path)]
        assert seen["copied"] == 2 * 4096, seen


# ---- copies on tmpfs ----

@needs_shm
def test_copy_written_under_the_nodes_policy_lands_on_that_node(shm_dir, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1 << 20))
    shm_dir.mkdir()
    dest = shm_dir / "w.node0.pid1.safetensors"
    sha = sw.file_sha256(src)
    sw._write_in_child(src, dest, sha, (0,))
    assert sw.file_sha256(dest) == sha and not list(shm_dir.glob("*.tmp"))
    with open(dest, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[0:4096:512]  # touch pages so they show in numa_maps
        got = memory.parse_numa_maps(Path("/proc/self/numa_maps").read_text(), [str(dest)])
    assert set(got[str(dest)]) == {"0"}
    with pytest.raises(Exception, match="changed while it was copied"):
        sw._write_in_child(src, shm_dir / "bad.safetensors", "0" * 64, (0,))
    assert not (shm_dir / "bad.safetensors").exists()


@needs_torch
@needs_shm
def test_cache_rebuilds_corrupt_entries_and_kept_copies(cache_dir, shm_dir):
    from numabench.workers.models import resolve_model

    spec = resolve_model("bert-tiny")
    # A builder that could not (returns None): this process builds the file itself.
    first = sw.prepare_shared_weights(spec, 7, [(0,)], cache_dir=cache_dir, copies_dir=shm_dir,
                                      keep=True, builder=lambda *_: None)
    assert first.record["placement"] == "tmpfs" and first.temporary == ()
    assert first.record["built_by"] == f"pid {os.getpid()}"
    (copy,) = first.paths.values()
    hit = sw.prepare_shared_weights(spec, 7, [(0,)], cache_dir=cache_dir, copies_dir=shm_dir, keep=True)
    assert hit.record["cache"] == "hit" and hit.record["copies"][0]["cache"] == "reused"
    # Flip one byte of the cache file and of the kept copy: both are found out and rewritten.
    entry = Path(first.record["cache_file"])
    for path in (entry, Path(copy)):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    built = []

    def builder(spec, seed, path):  # as a fork server's child does it: the file, then who
        built.append(sw.build_file(spec, seed, path))
        return "the test's builder"

    again = sw.prepare_shared_weights(spec, 7, [(0,)], cache_dir=cache_dir, copies_dir=shm_dir,
                                      keep=True, builder=builder)
    assert again.record["cache"] == "rebuilt" and again.record["built_by"] == "the test's builder"
    assert built == [again.record["file_bytes"]]
    assert again.record["rebuilt_reason"] == "corrupt: checksum mismatch"
    assert again.record["copies"][0]["cache"] == "rewritten (corrupt)"
    assert sw.file_sha256(Path(copy)) == sw.file_sha256(entry) == first.record["sha256"]
    assert any("rebuilt" in w for w in again.warnings)


@needs_torch
def test_without_tmpfs_workers_share_the_page_cache_copy(cache_dir, tmp_path):
    from numabench.workers.models import resolve_model

    if sw._is_tmpfs(tmp_path.resolve()):
        pytest.skip("the test folder is on tmpfs here")
    got = sw.prepare_shared_weights(resolve_model("bert-tiny"), 7, [(0,)], cache_dir=cache_dir,
                                    copies_dir=tmp_path / "copies")
    assert got.record["placement"] == "page cache" and got.temporary == ()
    assert got.paths == {(0,): got.record["cache_file"]}
    assert "not on tmpfs" in got.warnings[0]


# ---- workers: same outputs, mapped not copied ----

@needs_torch
@needs_shm
def test_outputs_identical_with_and_without_sharing(cache_dir, shm_dir, tmp_path):
    from test_worker_process import Coordinator

    from numabench.workers import protocol as p
    from numabench.workers.models import resolve_model

    shared = sw.prepare_shared_weights(resolve_model("bert-tiny"), 7, [(0,)], cache_dir=cache_dir,
                                       copies_dir=shm_dir)
    (path,) = shared.paths.values()
    coord = Coordinator(tmp_path)
    # Six workers from one fork server (as launch starts them): one torch import, not six.
    server = ForkServer(server_argv([], "pytorch", "bert-tiny"), dict(os.environ),
                        tmp_path / "fork-server.log", timeout_s=120)
    workers = {}  # instance -> (precision, shared)
    procs = {}
    try:
        for k, (precision, share) in enumerate((pc, s) for pc in ("fp32", "bf16", "int8")
                                               for s in (False, True)):
            workers[k] = (precision, share)
            procs[k] = coord.fork(server, k, backend="pytorch", precision=precision, seed=7,
                                  cpus=[USABLE[k % len(USABLE)]], pin_self=True,
                                  options={"weights_path": path} if share else {})
        ready = {}
        while len(ready) < len(procs):
            ident, head, _ = coord.recv(timeout_s=120)
            if head["type"] != p.HELLO:
                assert head["type"] == p.READY, (head, coord.log(ident))
                ready[ident] = head
        ids = np.random.default_rng(3).integers(0, 1000, size=(2, 16), dtype=np.int64)
        outs = {}
        for k in procs:
            coord.send(k, p.RUN, {"req": k, "want": "outputs"}, {"input_ids": ids})
            res, arrays = coord.recv_from(k, timeout_s=60)
            assert res["type"] == p.RESULT, res
            outs[workers[k]] = arrays["output"]
            maps = Path(f"/proc/{ready[k]['pid']}/maps").read_text()
            # The shared workers map the node's file; the others do not.
            assert (path in maps) == workers[k][1]
            assert ready[k]["backend_info"]["weights_path"] == (path if workers[k][1] else None)
            if workers[k][1]:
                seen = memory.sample(ready[k]["pid"], [path])["shared_files"][path]
                assert seen["rss"] > 0 and seen["copied"] == 0, seen
        for precision in ("fp32", "bf16", "int8"):
            assert np.array_equal(outs[precision, False], outs[precision, True]), precision
    finally:
        for k, proc in procs.items():
            if proc.poll() is None:
                coord.send(k, p.STOP)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
        server.close()
        coord.close()
        sw.remove_copies(shared.temporary)


# ---- launch end to end ----

def _launch_argv(run_dir, shm_dir, *extra, instances=2):
    # One instance where the memory records are not checked: each worker is a torch import. (With
    # one worker, smaps counts the copy's pages as Private_Dirty: no other process maps them.)
    return [sys.executable, "-m", "numabench.cli", "launch", "--instances", str(min(instances, len(USABLE))),
            "--batch", "2", "--seq", "8", "--model", "bert-tiny", "--warmup", "1",
            "--weights-dir", str(shm_dir), "--run-dir", str(run_dir), *extra]


def _env():
    # The session's XDG_CACHE_HOME (conftest): bert-tiny's weights file is built by the first
    # launch, then a hit, so the other launchers never import torch.
    return dict(os.environ)


def _wait_for(path: Path, needle: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path}")


def check_memory_records(doc: dict, copy: str) -> None:
    record = doc["environment"]["backend"]["shared_weights"]
    assert record["placement"] == "tmpfs" and record["copies"][0]["path"] == copy
    for inst in doc["instances"].values():
        got = inst["got"]
        assert got["backend_info"]["weights_path"] == copy
        assert got["startup_s"] > 0
        for stage in ("ready", "measured") if doc["status"] == "ok" else ("ready",):
            mem = got["memory"][stage]
            assert mem["pss"] > 0 and mem["anonymous"] > 0
            mapped = mem["shared_files"][copy]
            assert mapped["copied"] == 0 and mapped["rss"] > 0
            nodes = [str(n) for n in inst["asked"]["memory_nodes"]]
            if nodes:  # bound instances: the copy's pages are on the instance's node
                assert set(mapped["nodes"]) <= set(nodes), mapped


@needs_torch
@needs_shm
def test_launch_maps_the_nodes_copy_then_removes_it(tmp_path, shm_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_launch_argv(run_dir, shm_dir, "--duration", "120", "--mode", "throughput",
                                         "-o", str(tmp_path / "r.json")),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(run_dir / "launch.log", "instances ready", proc)
        copies = list(shm_dir.glob(f"*.node*.pid{proc.pid}.safetensors"))
        assert len(copies) == 1, list(shm_dir.iterdir())
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.name().startswith("numabench-w")]
        assert workers
        for worker in workers:
            assert str(copies[0]) in Path(f"/proc/{worker.pid}/maps").read_text()
        _wait_for(run_dir / "launch.log", "measuring", proc)
        proc.send_signal(signal.SIGTERM)  # stops the run as Ctrl-C does; it still cleans up
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "interrupted" and doc["workload"]["share_weights"] is True
    check_memory_records(doc, str(copies[0]))
    assert not copies[0].exists() and not shm_dir.exists()


@needs_torch
@needs_shm
def test_next_run_removes_the_copy_of_a_killed_launcher_whatever_it_runs(tmp_path, shm_dir):
    run_dir = tmp_path / "killed"
    # The killed launcher cannot remove its socket folder: it goes in one of ours (short, for
    # AF_UNIX's path limit), removed at the end, not in /tmp.
    sockets = tempfile.mkdtemp(prefix="nbk-")
    proc = subprocess.Popen(_launch_argv(run_dir, shm_dir, "--duration", "60", instances=1),
                            env={**_env(), "TMPDIR": sockets}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(run_dir / "launch.log", "instances ready", proc)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)
    # The orphaned workers notice their parent is gone and exit on their own.
    _, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:
        p.kill()
    assert not alive
    left = list(shm_dir.glob(f"*.pid{proc.pid}.safetensors"))
    assert len(left) == 1  # nobody cleaned up: the launcher was killed
    # The next run, whatever it runs (here the no-op backend, which has no weights to share),
    # removes the dead run's copy.
    r = subprocess.run(_launch_argv(tmp_path / "next", shm_dir, "--iterations", "2", "--backend", "noop",
                                    "-o", str(tmp_path / "next.json"), instances=1),
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert not left[0].exists()
    assert "left by interrupted runs" in (tmp_path / "next" / "launch.log").read_text()
    doc = json.loads((tmp_path / "next.json").read_text())
    assert doc["status"] == "ok" and "backend" not in doc["environment"]
    assert not shm_dir.exists()  # its last copy gone, the emptied folder is removed too


@needs_torch
@needs_shm
def test_prepare_backend_gives_each_node_set_its_own_copy(cache_dir, shm_dir):
    from numabench.workers.backends import prepare_backend, release_preparation
    from numabench.workers.models import resolve_model

    # Node 0 (bound) and unbound instances: two copies, the first written under node 0's policy.
    prep = prepare_backend("pytorch", resolve_model("bert-tiny"), "fp32", {}, seed=7,
                           share_weights=True, node_sets=((0,), ()), weights_dir=str(shm_dir),
                           weights_cache_dir=str(cache_dir))
    try:
        bound, unbound = prep.options_for((0,))["weights_path"], prep.options_for(())["weights_path"]
        assert Path(bound).name.endswith(f".node0.pid{os.getpid()}.safetensors")
        assert Path(unbound).name.endswith(f".nodes-any.pid{os.getpid()}.safetensors")
        assert sorted(prep.temporary) == sorted([bound, unbound])
        assert prep.record["shared_weights"]["shared"] == "all" and not prep.warnings
        assert sw.file_sha256(Path(bound)) == sw.file_sha256(Path(unbound))
    finally:
        release_preparation(prep)
    assert not Path(bound).exists() and not Path(unbound).exists() and not shm_dir.exists()
    int8 = prepare_backend("pytorch", resolve_model("bert-tiny"), "int8", {}, seed=7,
                           share_weights=True, node_sets=((0,),), weights_dir=str(shm_dir),
                           weights_cache_dir=str(cache_dir))
    release_preparation(int8)
    assert int8.record["shared_weights"]["shared"] == "partly"
    assert any("repacks every Linear weight" in w for w in int8.warnings)
    assert prepare_backend("pytorch", resolve_model("bert-tiny"), "fp32", {}, share_weights=False) is None
