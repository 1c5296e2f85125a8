"""The PyTorch backend in real worker processes: bert-tiny in fp32/bf16/int8, and real MiniLM.

The workers start together (one ROUTER, several identities) so the framework imports overlap;
each is pinned to one CPU, round-robin over what this process may use.
"""
from __future__ import annotations

import importlib.util
import json
import os
from functools import partial

import numpy as np
import pytest

# tests/ is on sys.path (pytest's rootdir import mode): share the ROUTER harness.
from test_worker_process import Coordinator

from numabench.launcher.forkserver import ForkServer, server_argv
from numabench.workers import protocol as p
from numabench.workers import worker as w

# find_spec, not importorskip: importing torch here would cost seconds and test nothing.
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("torch and transformers are not installed", allow_module_level=True)

CPUS = sorted(os.sched_getaffinity(0))
# instance -> (model, precision)
WORKERS = {0: ("bert-tiny", "fp32"), 1: ("bert-tiny", "bf16"), 2: ("bert-tiny", "int8"),
           3: ("minilm", "fp32")}
BROKEN = 9  # a folder whose config.json transformers cannot build


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pytorch")
    broken = tmp / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    coord = Coordinator(tmp)
    # The bert-tiny workers and the broken one are forked from one fork server (as launch and
    # serve start them); MiniLM's is exec'd, a fresh interpreter (--start exec).
    server = ForkServer(server_argv([], "pytorch", "bert-tiny"), dict(os.environ), tmp / "fork-server.log",
                        timeout_s=120)
    procs = {}
    for instance, (model, precision) in WORKERS.items():
        cpu = CPUS[instance % len(CPUS)]
        start = coord.start if model == "minilm" else partial(coord.fork, server)
        procs[instance] = start(
            instance, backend="pytorch", model=model, precision=precision, cpus=[cpu],
            pin_self=True, seed=7, warmup={"shapes": [[2, 16]], "iterations": 2},
            tokenizer=True)  # MiniLM's is loaded (test_minilm_texts); bert-tiny has none
    procs[BROKEN] = coord.fork(server, BROKEN, backend="pytorch", model=str(broken))
    messages: dict[int, list[dict]] = {i: [] for i in procs}
    # Everyone says HELLO, then READY (or a fatal ERROR) — in whatever order they finish loading.
    while sum(len(m) for m in messages.values()) < 2 * len(procs):
        ident, head, _ = coord.recv(timeout_s=120)
        messages[ident].append(head)
    yield coord, procs, messages
    for instance, proc in procs.items():
        if proc.poll() is None:
            coord.send(instance, p.STOP)
    server.close()
    coord.close()


def _run(coord, instance, header, arrays=None):
    coord.send(instance, p.RUN, header, arrays)
    return coord.recv_from(instance, timeout_s=60)


def test_ready_reports_what_runs(pool):
    coord, _, messages = pool
    for instance, (model, precision) in WORKERS.items():
        hello, ready = messages[instance]
        assert hello["type"] == p.HELLO
        assert ready["type"] == p.READY, (ready, coord.log(instance))
        assert ready["affinity"] == [CPUS[instance % len(CPUS)]]
        assert ready["threads"] == 1
        assert {"torch", "transformers", "numpy", "python", "numabench"} <= set(ready["versions"])
        info = ready["model_info"]
        assert (info["name"], info["precision"], info["backend"]) == (model, precision, "pytorch")
        assert info["parameters"] > 0 and ready["load_ns"] > 0 and ready["warmup_ns"] > 0
        assert ready["backend_info"]["interop_threads"] == 1
    tiny = messages[0][1]["model_info"]
    assert (tiny["hidden_size"], tiny["layers"], tiny["vocab_size"], tiny["kind"]) == (32, 2, 1000, "builtin")
    minilm = messages[3][1]["model_info"]
    assert (minilm["hidden_size"], minilm["layers"], minilm["kind"], minilm["has_tokenizer"]) == (
        384, 6, "package", True)


def test_broken_model_folder_is_fatal(pool):
    _, procs, messages = pool
    hello, err = messages[BROKEN]
    assert hello["type"] == p.HELLO
    assert err["type"] == p.ERROR and err["fatal"] is True and err["traceback"]
    assert procs[BROKEN].wait(30) == w.EXIT_LOAD


def test_precisions_agree_on_bert_tiny(pool):
    coord, _, _ = pool
    ids = np.random.default_rng(3).integers(0, 1000, size=(2, 16), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0  # padding in the second row
    outputs = {}
    for instance in (0, 1, 2):
        res, arrays = _run(coord, instance, {"req": instance, "want": "outputs"},
                           {"input_ids": ids, "attention_mask": mask})
        assert res["type"] == p.RESULT, res
        out = arrays["output"]
        assert out.shape == (2, 16, 32) and out.dtype == np.float32
        assert res["output"]["shape"] == [2, 16, 32] and res["output"]["dtype"] == "float32"
        assert res["output"]["checksum"] == pytest.approx(float(out.sum(dtype=np.float64)), abs=1e-3)
        assert res["output"]["abs_sum"] == pytest.approx(float(np.abs(out).sum(dtype=np.float64)), rel=1e-6)
        assert 0 < res["compute_ns"] == res["end_ns"] - res["start_ns"]
        outputs[instance] = out
    # Same seed, same weights: bf16 and int8 approximate fp32 (not equal to it).
    for instance in (1, 2):
        corr = np.corrcoef(outputs[0].ravel(), outputs[instance].ravel())[0, 1]
        assert corr > 0.9, (WORKERS[instance], corr)
        assert not np.array_equal(outputs[0], outputs[instance])


def test_fp32_is_deterministic_and_summary_has_no_frame(pool):
    coord, _, _ = pool
    ids = np.random.default_rng(4).integers(0, 1000, size=(2, 16), dtype=np.int64)
    first, a1 = _run(coord, 0, {"req": "a"}, {"input_ids": ids})
    second, a2 = _run(coord, 0, {"req": "b"}, {"input_ids": ids})
    assert a1 == a2 == {}
    assert first["output"] == second["output"]
    # Another shape than the warm-up one still runs (warm-up is a performance matter only).
    res, _ = _run(coord, 0, {"req": "c"}, {"input_ids": ids[:1, :8]})
    assert res["output"]["shape"] == [1, 8, 32]


def test_loops_time_each_forward_and_answer_the_same_output(pool):
    """PyTorchBackend.run_loops: the forward alone per pass, the output of the last one, which
    is what one pass gives (fp32 is deterministic); a mask given is used in every pass."""
    coord, _, _ = pool
    ids = np.random.default_rng(6).integers(0, 1000, size=(2, 16), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    for arrays in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
        one, out1 = _run(coord, 0, {"req": "one", "want": "outputs"}, arrays)
        many, out3 = _run(coord, 0, {"req": "many", "want": "outputs", "loops": 3}, arrays)
        assert many["type"] == p.RESULT, many
        assert len(many["compute_ns"]) == len(many["start_ns"]) == 3
        assert all(c > 0 for c in many["compute_ns"])
        starts, computes = many["start_ns"], many["compute_ns"]
        assert all(b >= a + c for a, b, c in zip(starts, starts[1:], computes))
        assert np.array_equal(out1["output"], out3["output"])


def test_reused_input_buffers_give_each_request_its_own_outputs(pool):
    """The backend copies ids into one buffer per shape and reuses an all-ones mask: outputs must
    not depend on what ran before, in the same shape or another."""
    coord, _, _ = pool
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 1000, size=(2, 16), dtype=np.int64) for _ in range(2))
    small = rng.integers(0, 1000, size=(1, 8), dtype=np.int64)

    def out(req, arrays):
        res, got = _run(coord, 0, {"req": req, "want": "outputs"}, arrays)
        assert res["type"] == p.RESULT, res
        return got["output"]

    first_a = out(1, {"input_ids": a})
    first_b = out(2, {"input_ids": b})
    first_small = out(3, {"input_ids": small})
    assert not np.allclose(first_a, first_b)
    assert np.array_equal(out(4, {"input_ids": a}), first_a)  # after b and another shape
    assert np.array_equal(out(5, {"input_ids": small}), first_small)
    assert np.array_equal(out(6, {"input_ids": b}), first_b)
    # An explicit all-ones mask is the cached one; a padding mask is not overwritten by it.
    assert np.array_equal(out(7, {"input_ids": a, "attention_mask": np.ones_like(a)}), first_a)
    mask = np.ones_like(a)
    mask[0, 10:] = 0
    padded = out(8, {"input_ids": a, "attention_mask": mask})
    assert not np.allclose(padded[0], first_a[0]) and np.allclose(padded[1], first_a[1], atol=1e-5)
    assert np.array_equal(out(9, {"input_ids": a}), first_a)
    # An int32 request (allowed on the wire) fills the int64 buffer the same way.
    assert np.array_equal(out(10, {"input_ids": a.astype(np.int32)}), first_a)


def test_failing_run_keeps_serving(pool):
    coord, _, _ = pool
    err, _ = _run(coord, 2, {"req": 1}, {"input_ids": np.full((1, 4), 5000, dtype=np.int64)})
    assert err["type"] == p.ERROR and err["fatal"] is False and "vocabulary" in err["message"]
    res, _ = _run(coord, 2, {"req": 2}, {"input_ids": np.ones((1, 4), dtype=np.int64)})
    assert res["type"] == p.RESULT


def test_minilm_texts(pool):
    coord, _, _ = pool
    texts = ["NUMA-pinned instances beat one big process.", "hello world"]
    res, arrays = _run(coord, 3, {"req": "t", "want": "outputs", "texts": texts, "seq": 12})
    assert res["type"] == p.RESULT, res
    assert res["output"]["shape"] == [2, 12, 384]
    out = arrays["output"]
    assert np.isfinite(out).all()
    # Real weights: the two sentences embed differently; the same text twice embeds the same.
    assert not np.allclose(out[0], out[1])
    again, _ = _run(coord, 3, {"req": "u", "texts": texts, "seq": 12})
    assert again["output"]["checksum"] == pytest.approx(res["output"]["checksum"], rel=1e-5)
    # bert-tiny has no tokenizer: texts are refused, not crashed on.
    err, _ = _run(coord, 0, {"req": "v", "texts": texts, "seq": 12})
    assert err["type"] == p.ERROR and "no tokenizer" in err["message"]


def test_stop_all(pool):
    coord, procs, _ = pool
    for instance in WORKERS:
        coord.send(instance, p.STOP)
    byes = {}
    for _ in WORKERS:
        ident, head, _ = coord.recv(timeout_s=20)
        byes[ident] = head["type"]
    assert byes == {instance: p.BYE for instance in WORKERS}
    for instance in WORKERS:
        assert procs[instance].wait(20) == 0
