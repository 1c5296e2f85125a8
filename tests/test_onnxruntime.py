"""The ONNX Runtime backend: cached export, agreement with PyTorch, pinning, and `launch` end to end.

Tolerance (stated in onnx_cache): fp32 ONNX Runtime vs PyTorch fp32 on the same inputs, largest
absolute difference of the last hidden state <= 1e-4 (measured ~5e-7 on bert-tiny, ~3e-6 on
bert-base); int8 (dynamic quantization) vs PyTorch fp32: correlation >= 0.99.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# tests/ is on sys.path (pytest's rootdir import mode): share the ROUTER harness.
from test_worker_process import Coordinator

from numabench.errors import NumabenchError
from numabench.workers import models
from numabench.workers import protocol as p
from numabench.workers.backends import check_backend, create_backend

if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "torch", "transformers")):
    pytest.skip("onnxruntime, onnx, torch and transformers are needed", allow_module_level=True)

from numabench.workers.backends import onnx_cache  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 usable CPUs")
FP32_TOL = onnx_cache.FP32_MAX_ABS_DIFF
SPEC = models.resolve_model("bert-tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One fp32 export shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    first = onnx_cache.prepare_onnx(SPEC, "fp32", folder, seed=0)
    return folder, first


def _inputs(batch=3, seq=40, seed=5):
    ids = np.random.default_rng(seed).integers(0, 1000, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, seq // 2:] = 0  # one padded row: the mask path counts
    return {"input_ids": ids, "attention_mask": mask}


# ---- registry and refusals (no framework imported) ----

def test_registry_imports_no_framework():
    code = ("import sys, numabench.workers.backends as b, numabench.workers.backends.onnx_cache; "
            "assert 'onnxruntime' in b.BACKENDS; "
            "assert not {'torch', 'onnxruntime', 'onnx', 'transformers'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_backend_onnxruntime():
    check_backend("onnxruntime", "fp32", {"opt_level": "basic", "cache_dir": "/tmp/x"})
    check_backend("onnxruntime", "int8")
    with pytest.raises(NumabenchError, match="bf16 on onnxruntime needs bfloat16 kernels.*use fp32 or int8"):
        check_backend("onnxruntime", "bf16")
    with pytest.raises(NumabenchError, match="must be one of disable, basic, extended, all"):
        check_backend("onnxruntime", "fp32", {"opt_level": "max"})
    with pytest.raises(NumabenchError, match="no option 'threads'"):
        check_backend("onnxruntime", "fp32", {"threads": 2})


def test_launch_refuses_bf16_before_starting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "numabench.cli", "launch", "--backend", "onnxruntime",
                        "--precision", "bf16", "--model", "bert-tiny", "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "error: bf16 on onnxruntime needs" in r.stderr and "use fp32 or int8" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before any process or file


def test_ort_flags_need_the_ort_backend(tmp_path):
    r = subprocess.run([sys.executable, "-m", "numabench.cli", "launch", "--backend", "noop",
                        "--ort-opt-level", "basic", "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "apply to --backend onnxruntime only" in r.stderr


# ---- export, cache, agreement (in process) ----

def test_export_then_reuse(cache):
    folder, first = cache
    assert first.cache == "miss" and first.exports == 1 and first.rebuilt_reason is None
    assert first.path.parent == folder.resolve() and first.path.suffix == ".onnx"
    assert first.digest in first.path.name and "bert-tiny-fp32" in first.path.name
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["sha256"] == onnx_cache.file_sha256(first.path)
    assert meta["key"]["versions"]["onnxruntime"] and meta["key"]["opset"] == onnx_cache.OPSET
    assert first.agreement["within"] and first.agreement["max_abs_diff"] <= FP32_TOL
    mtime = first.path.stat().st_mtime_ns
    again = onnx_cache.prepare_onnx(SPEC, "fp32", folder, seed=0)
    assert again.cache == "hit" and again.exports == 0 and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime
    assert again.agreement["max_abs_diff"] == first.agreement["max_abs_diff"]
    # Another seed (other random weights) is another entry.
    assert onnx_cache.cache_key(SPEC, "fp32", 1) != onnx_cache.cache_key(SPEC, "fp32", 0)


def _copy_cache(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "corrupt: model checksum mismatch"),
    ("garbage-with-matching-checksum", "unreadable by onnxruntime"),
    ("stale-key", "stale: key differs in versions"),
    ("no-sidecar", "sidecar missing"),
])
def test_corrupt_or_stale_entry_is_rebuilt(cache, tmp_path, damage, reason):
    folder = _copy_cache(cache[0], tmp_path / "cache")
    model = next(folder.glob("*.onnx"))
    sidecar = model.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "garbage-with-matching-checksum":
        model.write_bytes(b"not an onnx file" * 100)
        meta["sha256"] = onnx_cache.file_sha256(model)
        sidecar.write_text(json.dumps(meta))
    elif damage == "stale-key":
        meta["key"]["versions"]["torch"] = "0.0.1"
        sidecar.write_text(json.dumps(meta))
    else:
        sidecar.unlink()
    events = []
    got = onnx_cache.prepare_onnx(SPEC, "fp32", folder, seed=0, log_event=events.append)
    assert got.cache == "rebuilt" and got.exports == 1
    assert got.rebuilt_reason.startswith(reason), got.rebuilt_reason
    assert any("unusable" in e and reason in e for e in events), events
    assert any("was unusable" in w and "rebuilt" in w for w in got.warnings())
    assert got.record()["rebuilt_reason"] == got.rebuilt_reason
    assert got.agreement["max_abs_diff"] <= FP32_TOL
    again = onnx_cache.prepare_onnx(SPEC, "fp32", folder, seed=0)
    assert again.cache == "hit" and again.exports == 0


def test_int8_is_quantized_once_and_correlates(cache, tmp_path):
    folder = _copy_cache(cache[0], tmp_path / "cache")
    got = onnx_cache.prepare_onnx(SPEC, "int8", folder, seed=0)
    assert got.cache == "miss" and got.quantizations == 1 and got.record()["exports"] == 0
    assert got.source is not None and got.source.cache == "hit"  # the fp32 export was reused
    assert got.agreement["correlation"] >= onnx_cache.INT8_MIN_CORRELATION and got.agreement["within"]
    assert got.path.stat().st_size < got.source.path.stat().st_size
    again = onnx_cache.prepare_onnx(SPEC, "int8", folder, seed=0)
    assert again.cache == "hit" and again.quantizations == 0


@pytest.mark.parametrize("opt_level", ["disable", "all"])
def test_backends_agree_with_pytorch(cache, opt_level):
    """Same weights (seed 0), same inputs, other shapes than the export's: within FP32_TOL."""
    path = cache[1].path
    torch_backend = create_backend("pytorch")
    torch_backend.load(SPEC, "fp32", 1, {}, seed=0)
    ort_backend = create_backend("onnxruntime")
    ort_backend.load(SPEC, "fp32", 1, {"model_path": str(path), "opt_level": opt_level})
    for batch, seq in ((3, 40), (1, 1), (4, 128)):
        arrays = _inputs(batch, seq)
        want = torch_backend.run(arrays)
        got = ort_backend.run(arrays)
        assert got.dtype == np.float32 and got.shape == want.shape == (batch, seq, 32)
        assert float(np.abs(got - want).max()) <= FP32_TOL, (batch, seq)
    info = ort_backend.info()
    assert info["threads"] == 1 and info["interop_threads"] == 1 and info["opt_level"] == opt_level
    assert info["providers"] == ["CPUExecutionProvider"]


# ---- real worker processes ----

@TWO_CPUS
def test_worker_threads_stay_on_its_cpus(cache, tmp_path):
    """3 intra-op threads on 1 CPU: ORT's pool threads are told to stay on the instance's CPUs."""
    coord = Coordinator(tmp_path)
    try:
        coord.start(0, backend="onnxruntime", threads=3, cpus=[CPUS[1]], pin_self=True,
                    options={"model_path": str(cache[1].path)})
        assert coord.recv_from(0)[0]["type"] == p.HELLO
        ready, _ = coord.recv_from(0, timeout_s=60)
        assert ready["type"] == p.READY, coord.log(0)
        assert ready["affinity"] == [CPUS[1]] and ready["threads"] == 3
        info = ready["backend_info"]
        assert info["threads_cpus"] == [CPUS[1]] and info["threads_within_affinity"]
        assert info["os_threads"] >= 3  # the pool threads exist and were all looked at
        assert ready["versions"]["onnxruntime"] and "torch" not in ready["versions"]
        coord.send(0, p.RUN, {"req": 1, "want": "outputs"}, _inputs(2, 16))
        head, arrays = coord.recv_from(0)
        assert head["type"] == p.RESULT and arrays["output"].shape == (2, 16, 32)
        coord.send(0, p.STOP)
        assert coord.recv_from(0)[0]["type"] == p.BYE
    finally:
        coord.close()


@TWO_CPUS
def test_workers_without_a_prepared_file_prepare_it_once(cache, tmp_path):
    """Two int8 workers started together, each told to prepare its model itself, on a cache
    holding the fp32 export: one quantization (under the entry's lock), the other worker reuses
    it. (The export itself takes the same lock; starting from the module's export keeps torch
    out of these workers: 4-5 CPU-seconds each.)"""
    coord = Coordinator(tmp_path)
    folder = _copy_cache(cache[0], tmp_path / "cache")
    try:
        for i in (0, 1):
            coord.start(i, backend="onnxruntime", precision="int8", seed=0, cpus=[CPUS[i]],
                        pin_self=True, options={"cache_dir": str(folder)})
        ready = {}
        while len(ready) < 2:
            iid, head, _ = coord.recv(timeout_s=120)
            assert head["type"] in (p.HELLO, p.READY), (head, coord.log(iid))
            if head["type"] == p.READY:
                ready[iid] = head
        records = [r["backend_info"]["prepared_in_worker"] for r in ready.values()]
        assert sum(r["exports"] for r in records) == 0
        assert sum(r["quantizations"] for r in records) == 1
        assert sorted(r["cache"] for r in records) == ["hit", "miss"]
        assert {r["model_path"] for r in records} == {str(next(folder.glob("*int8*.onnx")))}
        for i in (0, 1):
            coord.send(i, p.RUN, {"req": i}, _inputs(2, 16))
            head, _ = coord.recv_from(i)
            assert head["type"] == p.RESULT and head["output"]["shape"] == [2, 16, 32]
            coord.send(i, p.STOP)
            assert coord.recv_from(i)[0]["type"] == p.BYE
    finally:
        coord.close()


def _launch(tmp_path, run, cache_dir, *extra):
    out = tmp_path / f"{run}.json"
    r = subprocess.run(
        [sys.executable, "-m", "numabench.cli", "launch", "--backend", "onnxruntime", "--instances", "2",
         "--batch", "2", "--model", "bert-tiny", "--seq", "16", "--iterations", "4", "--warmup", "1",
         "--cache-dir", str(cache_dir), "--run-dir", str(tmp_path / run), "-o", str(out), *extra],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text()), (tmp_path / run / "launch.log").read_text()


@TWO_CPUS
def test_launch_two_instances_use_the_launchers_cached_file(cache, tmp_path):
    """The launcher prepares the ONNX file once for all its workers (here a cache hit on the
    module's export; the daemon's test starts from an empty cache and counts one export)."""
    cache_dir = _copy_cache(cache[0], tmp_path / "cache")
    model = next(cache_dir.glob("*.onnx")).resolve()
    mtime = model.stat().st_mtime_ns
    doc, log = _launch(tmp_path, "run", cache_dir, "--ort-opt-level", "basic")
    assert doc["status"] == "ok" and doc["workload"]["backend"] == "onnxruntime"
    backend = doc["environment"]["backend"]
    assert backend["cache"] == "hit" and backend["exports"] == 0 and "exporting" not in log
    assert backend["model_path"] == str(model) and model.stat().st_mtime_ns == mtime
    assert backend["agreement"]["opt_level"] == "basic"
    assert backend["agreement"]["max_abs_diff"] <= FP32_TOL and backend["agreement"]["within"]
    # Weights are not shared on onnxruntime (prepacking): said in the record and the warnings.
    assert backend["shared_weights"]["shared"] == "none"
    assert any("onnxruntime does not share weights" in w for w in doc["warnings"])
    for iid, inst in doc["instances"].items():
        got = inst["got"]
        assert got["affinity"] == inst["asked"]["cpus"], iid
        assert got["threads"] == inst["asked"]["threads"] == 1
        assert got["backend_info"]["model_path"] == str(model)
        assert got["backend_info"]["prepared_in_worker"] is None  # the launcher prepared it
        assert got["backend_info"]["opt_level"] == "basic"
        assert set(got["backend_info"]["threads_cpus"]) <= set(inst["asked"]["cpus"])
        assert got["model_info"]["backend"] == "onnxruntime"
        assert got["versions"]["onnxruntime"]
    assert len(doc["raw"]["instance"]) == 8
    assert not (tmp_path / "xdg" / "numabench").exists()  # --cache-dir was used, not the default
