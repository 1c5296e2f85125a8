"""Worker pieces that need no worker process: registry, backend checks, config, /proc readers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from numabench.errors import NumabenchError
from numabench.workers import models, worker
from numabench.workers.backends import (
    BACKENDS,
    PRECISIONS,
    check_backend,
    create_backend,
)

# ---- model registry ----


def test_registry_is_importable_without_the_framework():
    # The launcher validates names before it starts anything: no torch, transformers or numpy.
    code = (
        "import sys\n"
        "import numabench.workers.models as m, numabench.workers.backends as b\n"
        "import numabench.workers.worker\n"
        "m.resolve_model('bert-base-cased'); m.resolve_model('minilm')\n"
        "b.check_backend('pytorch', 'bf16')\n"
        "print(sorted(k for k in ('torch', 'transformers', 'numpy', 'zmq') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name, vocab, positions", [
    ("bert-base-cased", 28996, 512),
    ("bert-large-cased", 28996, 512),
    ("distilbert-base-cased", 28996, 512),
    ("roberta-base", 50265, 512),  # 514 embeddings, 512 usable
    ("bert-tiny", 1000, 512),
])
def test_builtin_models(name, vocab, positions):
    spec = models.resolve_model(name)
    assert spec.kind == "builtin" and spec.name == name
    assert spec.vocab_size == vocab and spec.max_positions == positions
    assert spec.has_tokenizer is False
    assert spec.config["model_type"] in models.CONFIG_CLASSES


def test_bert_tiny_is_tiny():
    cfg = models.MODELS["bert-tiny"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (2, 32, 2, 64, 1000)


def test_minilm_resolves_to_the_packaged_folder():
    spec = models.resolve_model("minilm")
    assert spec.kind == "package" and spec.has_tokenizer is True
    assert spec.vocab_size == 30522 and spec.max_positions == 512
    assert os.path.isfile(os.path.join(spec.path, "model.safetensors"))


def test_unknown_model_lists_known_names():
    with pytest.raises(NumabenchError) as e:
        models.resolve_model("bert-huge")
    for name in list(models.MODELS) + ["minilm"]:
        assert name in str(e.value)


def test_folder_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "roberta", "vocab_size": 123, "max_position_embeddings": 130, "pad_token_id": 1}))
    spec = models.resolve_model(str(tmp_path))
    assert spec.kind == "folder" and spec.vocab_size == 123 and spec.max_positions == 128
    assert spec.has_tokenizer is False
    (tmp_path / "tokenizer.json").write_text("{}")
    assert models.resolve_model(str(tmp_path)).has_tokenizer is True


def test_folder_without_config_and_bad_config(tmp_path):
    with pytest.raises(NumabenchError, match="no config.json"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("[1")
    with pytest.raises(NumabenchError, match="cannot read"):
        models.resolve_model(str(tmp_path))


def test_hub_ids():
    spec = models.resolve_model("google-bert/bert-base-uncased")
    assert spec.kind == "hub" and spec.path == "google-bert/bert-base-uncased"
    assert spec.has_tokenizer is None and spec.vocab_size is None
    for bad in ("/no/such/folder", "./nope", "a/b/c"):
        with pytest.raises(NumabenchError, match="unknown model"):
            models.resolve_model(bad)


def test_model_spec_is_frozen_and_hashable():
    spec = models.resolve_model("bert-tiny")
    with pytest.raises(AttributeError):
        spec.name = "x"
    assert hash(spec) == hash(models.resolve_model("bert-tiny"))


# ---- backends ----

def test_backend_names():
    assert BACKENDS == {"pytorch", "noop", "onnxruntime"}
    assert PRECISIONS == ("fp32", "bf16", "int8")
    for backend in BACKENDS:
        for precision in PRECISIONS:
            if (backend, precision) != ("onnxruntime", "bf16"):  # tests/test_onnxruntime.py
                check_backend(backend, precision)


@pytest.mark.parametrize("backend, precision, options, match", [
    ("tensorflow", "fp32", None, "unknown backend"),
    ("onnxruntime", "bf16", None, "bf16 on onnxruntime needs"),
    ("pytorch", "fp16", None, "unknown precision"),
    ("noop", "fp32", {"compute": 1}, "no option"),
    ("noop", "fp32", {"compute_ns": True}, "must be int"),
    ("noop", "fp32", {"spin": 1}, "must be bool"),
    ("pytorch", "fp32", {"compute_ns": 1}, "no option"),
])
def test_check_backend_refuses(backend, precision, options, match):
    with pytest.raises(NumabenchError, match=match):
        check_backend(backend, precision, options)


def test_noop_backend_in_process():
    spec = models.resolve_model("bert-tiny")
    backend = create_backend("noop")
    backend.load(spec, "fp32", 3, {"compute_ns": 5_000_000, "spin": True})
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    t0 = time.monotonic_ns()
    out = backend.run({"input_ids": ids})
    assert time.monotonic_ns() - t0 >= 5_000_000
    assert out.dtype == np.float32 and out.shape == (2, 3) and out.sum() == ids.sum()
    info = backend.info()
    assert info["threads"] == 3 and info["model"]["vocab_size"] == 1000


def test_noop_backend_reuses_its_output_only_for_the_same_immutable_input():
    backend = create_backend("noop")
    backend.load(models.resolve_model("bert-tiny"), "fp32", 1, {})
    frozen = np.frombuffer(np.arange(6, dtype=np.int64).tobytes(), dtype=np.int64).reshape(2, 3)
    first = backend.run({"input_ids": frozen})
    assert backend.run({"input_ids": frozen}) is first  # what a resent shard decodes to
    # A writable array may change between calls: converted each time.
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert backend.run({"input_ids": ids}).sum() == 15
    ids += 1
    assert backend.run({"input_ids": ids}).sum() == 21
    # A read-only view of writable memory is not trusted either.
    view = ids.view()
    view.flags.writeable = False
    assert backend.run({"input_ids": view}).sum() == 21
    ids += 1
    assert backend.run({"input_ids": view}).sum() == 27


# ---- worker config ----

BASE = {"instance": 2, "endpoint": "ipc:///tmp/x.sock", "model": "bert-tiny"}


def test_config_defaults_and_full():
    cfg = worker.WorkerConfig.from_dict(BASE)
    assert (cfg.backend, cfg.precision, cfg.threads, cfg.cpus, cfg.pin_self) == (
        "pytorch", "fp32", 1, None, False)
    assert cfg.timeout_s == 600.0 and cfg.warmup == worker.WarmupSpec()
    cfg = worker.WorkerConfig.from_dict({
        **BASE, "backend": "noop", "precision": "int8", "threads": 4, "cpus": [3, 1, 2, 0],
        "pin_self": True, "warmup": {"shapes": [[8, 128], [1, 16]], "iterations": 3},
        "seed": 5, "options": {"spin": True}, "timeout_s": 2, "future_key": 1})
    assert cfg.cpus == (0, 1, 2, 3) and cfg.warmup.shapes == ((8, 128), (1, 16))
    assert cfg.warmup.iterations == 3 and cfg.options == {"spin": True} and cfg.timeout_s == 2.0
    assert worker.WorkerConfig.from_dict({**BASE, "threads": 0}).threads == 0


@pytest.mark.parametrize("change, match", [
    ({"instance": -1}, "instance"),
    ({"instance": True}, "instance"),
    ({"endpoint": "coord.sock"}, "endpoint"),
    ({"model": ""}, "model"),
    ({"backend": "nope"}, "unknown backend"),
    ({"precision": "fp8"}, "unknown precision"),
    ({"threads": -1}, "threads"),  # 0 is allowed: the framework's own default (oob baseline)
    ({"cpus": []}, "cpus"),
    ({"cpus": [0, -1]}, "cpus"),
    ({"io_cpus": []}, "io_cpus"),
    ({"io_cpus": [1, "2"]}, "io_cpus"),
    ({"io_cpus": 3}, "io_cpus"),
    ({"pin_self": True}, "pin_self needs cpus"),
    ({"pin_self": "yes"}, "pin_self"),
    ({"warmup": {"shapes": [[8]]}}, "warmup.shapes"),
    ({"warmup": {"shapes": [[8, 0]]}}, "warmup.shapes"),
    ({"warmup": {"iterations": -1}}, "iterations"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"backend": "noop", "options": {"x": 1}}, "no option"),
])
def test_config_refuses(change, match):
    with pytest.raises(worker.ConfigError, match=match):
        worker.WorkerConfig.from_dict({**BASE, **change})


def test_config_needs_keys():
    for key in ("instance", "endpoint", "model"):
        with pytest.raises(worker.ConfigError, match=key):
            worker.WorkerConfig.from_dict({k: v for k, v in BASE.items() if k != key})


# ---- /proc readers ----

def test_worker_reads_cpu_lists_with_the_one_parser(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nMems_allowed_list:\t0-1,3\n")
    assert worker.read_mems_allowed(str(status)) == [0, 1, 3]


def test_read_mems_allowed(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nMems_allowed:\t00000003\nMems_allowed_list:\t0-1\n")
    assert worker.read_mems_allowed(str(status)) == [0, 1]
    assert worker.read_mems_allowed(str(tmp_path / "missing")) is None
    assert isinstance(worker.read_mems_allowed(), list)


@pytest.mark.parametrize("line, mode, nodes", [
    ("55a5dcf1d000 default file=/usr/bin/head mapped=2 N0=2", "default", []),
    ("55a5dcf1d000 bind:0-1 file=/usr/bin/head mapped=2 N0=2", "bind", [0, 1]),
    ("55a5dcf1d000 prefer:1 file=/usr/bin/head", "preferred", [1]),
    ("55a5dcf1d000 interleave:0,2 anon=3", "interleave", [0, 2]),
    ("55a5dcf1d000 local anon=3", "local", []),
])
def test_mempolicy_from_numa_maps(tmp_path, line, mode, nodes):
    path = tmp_path / "numa_maps"
    path.write_text(line + "\n")
    policy = worker._mempolicy_numa_maps(str(path))
    assert policy["mode"] == mode and policy["nodes"] == nodes and policy["source"] == "numa_maps"


def test_read_mempolicy_here():
    policy = worker.read_mempolicy()
    assert policy["mode"] in set(worker.MPOL_MODES.values()) | {"unknown"}
    assert isinstance(policy["nodes"], list)


def test_worker_config_round_trips_through_json():
    import json

    from numabench.launcher import spawn
    from numabench.plans.model import InstancePlan

    inst = InstancePlan(id=3, cpus=(4, 5), memory_nodes=(1,), threads=2, batch=4)
    cfg = spawn.worker_config(inst, endpoint="ipc:///tmp/x", model="bert-tiny", backend="noop",
                              precision="fp32", seed=10, pin_self=True, timeout_s=5.0,
                              warmup_shapes=[(4, 32)], warmup_iterations=2, options={"compute_ns": 1})
    assert cfg.seed == 13 and cfg.cpus == (4, 5) and cfg.threads == 2 and cfg.io_cpus is None
    assert worker.WorkerConfig.from_dict(json.loads(cfg.to_json())) == cfg
    cfg = spawn.worker_config(inst, endpoint="ipc:///tmp/x", model="bert-tiny", backend="noop",
                              precision="fp32", seed=10, pin_self=True, timeout_s=5.0,
                              warmup_shapes=[(4, 32)], warmup_iterations=2, io_cpus=(7, 6))
    assert worker.WorkerConfig.from_dict(json.loads(cfg.to_json())).io_cpus == (6, 7)
