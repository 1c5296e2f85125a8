"""results.RunResult: the results document built and read in one place, versioned."""
from __future__ import annotations

import json

import pytest

from numabench.errors import NumabenchError
from numabench.results import (
    RESULTS_SCHEMA,
    RESULTS_VERSION,
    VERSION_HISTORY,
    Distribution,
    ResultsError,
    RunResult,
    Sample,
    load_result,
    summarize,
)


def make(samples=None, **kw) -> RunResult:
    samples = samples or [Sample(0, k, 2, 100 * k, 100 * k + 60, 40, 100 * k + 15) for k in range(12)]
    fields = dict(status="ok", error=None, failed_instance=None, created="2026-11-28T00:00:00+00:00",
                  command=("numabench", "launch"), run_dir="runs/x", machine={}, plan={},
                  workload={"mode": "split", "model": "bert-tiny"}, environment={}, instances={},
                  window_start_ns=0, samples=tuple(samples), summary=summarize(samples, "split", 0),
                  warnings=())
    fields.update(kw)
    return RunResult(**fields)


def test_round_trip_through_json(tmp_path):
    r = make(repetition={"index": 1, "of": 3, "fresh_workers": True, "reused": ["plan"]})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r.to_dict()))
    back = load_result(path)
    assert back == r
    assert back.summary.queue == Distribution.of([15] * 12)
    assert back.summary.instances[0].queue.count == 12
    assert back.summary.instances[0].latency.p90_ns == 60 and back.summary.instances[0].latency.p99_ns is None


def test_passes_of_one_request_count_once_for_latency_overhead_and_queue():
    from numabench.results import render_summary, requests_of

    # two requests of 3 passes (sent 0 and 10, answered 400 and 700), each pass 100 ns
    s = [Sample(0, k, 1, 0, 400, 100, 20 + 100 * k) for k in range(3)]
    s += [Sample(0, 3 + k, 1, 10, 700, 100, 320 + 100 * k) for k in range(3)]
    assert [len(r) for r in requests_of(s)] == [3, 3]
    out = summarize(s, "throughput")
    inst = out.instances[0]
    assert (inst.requests, inst.passes, inst.samples) == (2, 6, 6)
    assert sorted([inst.latency.min_ns, inst.latency.max_ns]) == [400, 690]
    assert inst.compute.count == 6 and inst.queue.count == 2 and inst.queue.max_ns == 310
    assert out.overhead.count == 2 and out.overhead.max_ns == 690 - 300  # minus all 3 passes
    text = render_summary(out)
    assert "passes" in text.splitlines()[0] and "several forward passes" in text
    assert "passes" not in render_summary(summarize(s[:1], "throughput")).splitlines()[0]


def test_queue_latency_and_compute_are_separate_distributions():
    # two requests in flight: the second waits behind the first inside the worker
    s = [Sample(0, 0, 1, 0, 50, 40, 5), Sample(0, 1, 1, 1, 90, 40, 50)]
    out = summarize(s, "throughput")
    inst = out.instances[0]
    assert inst.latency.max_ns == 89 and inst.compute.max_ns == 40 and inst.queue.max_ns == 49
    assert out.to_dict()["instances"]["0"]["queue"]["max_ns"] == 49


def test_version_one_documents_are_still_read():
    d = make().to_dict()
    d["version"] = 1
    d.pop("repetition")
    d["summary"].pop("queue")
    for inst in d["summary"]["instances"].values():
        inst.pop("queue")
    r = RunResult.from_dict(d)
    assert r.version == 1 and r.summary.queue.count == 12  # from overhead.to_worker


@pytest.mark.parametrize("doc, needle", [
    ([1, 2], "not a numabench results document"),
    ({"schema": "other"}, "not a numabench results document"),
    ({"schema": RESULTS_SCHEMA, "version": RESULTS_VERSION + 1}, "newer numabench: upgrade"),
    ({"schema": RESULTS_SCHEMA, "version": "x"}, "version 'x' is not supported"),
    ({"schema": RESULTS_SCHEMA, "version": RESULTS_VERSION, "status": "ok"}, "damaged"),
])
def test_unreadable_documents_name_the_file(tmp_path, doc, needle):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=needle) as e:
        load_result(path)
    assert str(path) in str(e.value) and isinstance(e.value, NumabenchError)


def test_status_is_checked_and_history_covers_the_current_version():
    with pytest.raises(ValueError):
        make(status="fine")
    assert RESULTS_VERSION in VERSION_HISTORY and not make().to_dict()["error"]
