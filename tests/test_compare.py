"""`numabench compare`: runs are the unit; A/A stays quiet, a clear A/B is found, bad input is named."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_experiments import make_doc

from numabench.experiments.compare import (
    MIN_RUNS,
    CompareError,
    collect_side,
    compare_paths,
    compare_values,
    permutation_p,
    render_comparison,
)
from numabench.results import write_json_atomic

USABLE = sorted(os.sched_getaffinity(0))


def numabench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def verdicts(a_values, b_values, better="lower"):
    return compare_values("m", "ms", better, a_values, b_values).verdict


# ---- the statistics on simulated run values --------------------------------------------------

# Run-to-run noise as seen on shared machines: mild, large, heavy-tailed, and bimodal (the issue's
# two identical launches measured 2214.6 and 851.5 samples/s).
NOISE = {
    "normal 5%": lambda rng, n: 100 * (1 + 0.05 * rng.standard_normal(n)),
    "lognormal 30%": lambda rng, n: 100 * np.exp(0.3 * rng.standard_normal(n)),
    "heavy tail (t, 2 dof)": lambda rng, n: 100 * (1 + 0.03 * np.clip(rng.standard_t(2, n), -20, 20)),
    "bimodal": lambda rng, n: np.where(rng.random(n) < 0.5, 2214.6, 851.5) * (1 + 0.01 * rng.standard_normal(n)),
}


@pytest.mark.parametrize("noise", sorted(NOISE))
@pytest.mark.parametrize("runs", [3, 5])
def test_a_a_comes_out_no_difference_in_95_percent_of_trials(noise, runs):
    rng = np.random.default_rng([runs, sorted(NOISE).index(noise)])
    trials = 200
    out = [verdicts(NOISE[noise](rng, runs), NOISE[noise](rng, runs)) for _ in range(trials)]
    assert set(out) <= {"no-difference", "better", "worse"}
    false = sum(v in ("better", "worse") for v in out)
    assert false / trials <= 0.05, f"{noise}, {runs} runs a side: {false} of {trials} A/A called different"


def test_a_clear_effect_is_found_with_3_runs_a_side():
    rng = np.random.default_rng(7)
    for _ in range(50):  # twice the compute (3 ms vs 6 ms) under 5% noise: always found
        a = 3.0 * (1 + 0.05 * rng.standard_normal(3))
        b = 6.0 * (1 + 0.05 * rng.standard_normal(3))
        assert verdicts(a, b, "lower") == "worse"
        assert verdicts(b, a, "lower") == "better"
        assert verdicts(1 / a, 1 / b, "higher") == "worse"  # throughput: lower is worse
    # 20% under 3% noise: found in most trials (3 runs give little to estimate the noise from)
    found = [verdicts(3.0 * (1 + 0.03 * rng.standard_normal(3)), 3.6 * (1 + 0.03 * rng.standard_normal(3)))
             for _ in range(100)]
    assert set(found) <= {"worse", "no-difference"} and found.count("worse") >= 80


def test_fewer_than_3_runs_give_the_ratio_and_say_inconclusive():
    r = compare_values("throughput", "samples/s", "higher", [100.0, 101.0], [50.0, 51.0])
    assert r.verdict == "inconclusive" and r.ratio == pytest.approx(50.5 / 100.5)
    assert r.reason == f"inconclusive: 2 runs a side, {MIN_RUNS} needed" and r.ci is None and r.p is None
    assert compare_values("t", "u", "higher", [1.0] * 3, [1.0]).reason == "inconclusive: 3 runs on A, 1 on B, 3 needed"


def test_permutation_p_is_exact_for_small_sides():
    # 3 vs 3: 20 relabellings; complete separation is the most extreme, two-sided p = 2/20
    assert permutation_p(np.array([1.0, 2, 3]), np.array([4.0, 5, 6])) == pytest.approx(0.1)
    assert permutation_p(np.array([1.0, 2, 3, 4]), np.array([5.0, 6, 7, 8])) == pytest.approx(2 / 70)


def test_identical_values_are_no_difference_and_a_small_clean_shift_is_found():
    assert verdicts([5.0] * 3, [5.0] * 3) == "no-difference"
    assert verdicts([5.0] * 3, [5.5] * 3) == "worse"  # no noise at all: a 10% shift is real
    assert verdicts([5.0] * 3, [5.02] * 3) == "no-difference"  # under the 1% minimum effect


# ---- documents, folders and the command -----------------------------------------------------

def write_runs(folder: Path, latencies: list[float], **kw) -> list[Path]:
    """One results document per run, each with 12 steps around its latency (ms)."""
    paths = []
    for k, lat in enumerate(latencies):
        doc = make_doc([lat * (1 + 0.002 * (s % 3)) for s in range(12)], seed=k, **kw)
        doc["created"] = f"2026-01-01T00:00:{k:02d}+00:00"
        p = folder / f"rep-{k}" / "results.json"
        write_json_atomic(p, doc)
        paths.append(p)
    return paths


def test_compare_folders_of_runs_json_and_text(tmp_path):
    write_runs(tmp_path / "a", [10.0, 10.1, 9.9])
    write_runs(tmp_path / "b", [12.0, 12.2, 11.9])
    write_runs(tmp_path / "c", [10.05, 9.95, 10.0])
    r = numabench("compare", "--json", str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    metrics = {m["metric"]: m for m in out["metrics"]}
    assert set(metrics) == {"throughput", "step max latency p50", "step max latency p90", "request latency p50"}
    for m in metrics.values():
        assert set(m) >= {"metric", "ratio", "ci", "p", "runs", "verdict"}
        assert m["runs"] == {"a": 3, "b": 3} and len(m["ci"]) == 2 and m["ci"][0] <= m["ratio"] <= m["ci"][1]
    assert metrics["throughput"]["verdict"] == "worse" and metrics["throughput"]["ratio"] < 0.9
    assert metrics["step max latency p50"]["verdict"] == "worse"
    assert metrics["step max latency p50"]["ratio"] == pytest.approx(1.2, rel=0.02)
    same = json.loads(numabench("compare", "--json", str(tmp_path / "a"), str(tmp_path / "c")).stdout)
    assert {m["verdict"] for m in same["metrics"]} == {"no-difference"}
    text = numabench("compare", str(tmp_path / "a"), str(tmp_path / "b")).stdout
    assert "B/A" in text and "95% CI" in text and "worse" in text and "bootstrap" in text


def test_one_run_a_side_is_inconclusive_with_the_ratio(tmp_path):
    a, = write_runs(tmp_path / "a", [10.0])
    b, = write_runs(tmp_path / "b", [20.0])
    r = numabench("compare", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert "inconclusive: 1 run a side, 3 needed" in r.stdout and "2.000" in r.stdout


def test_different_workloads_are_listed_and_refused(tmp_path):
    write_runs(tmp_path / "a", [10.0] * 3, seq=128)
    write_runs(tmp_path / "b", [10.0] * 3, seq=384, instances=2)
    r = numabench("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.returncode == 2 and not r.stdout
    assert "seq: A 128 vs B 384" in r.stderr and "instances: A 1 vs B 2" in r.stderr
    assert "--allow-different" in r.stderr and "Traceback" not in r.stderr
    r = numabench("compare", "--allow-different", str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.returncode == 0 and "workloads differ" in r.stdout and "seq: A 128 vs B 384" in r.stdout


def test_failed_runs_are_excluded_and_named_duplicates_counted_once(tmp_path):
    paths = write_runs(tmp_path / "a", [10.0, 10.1, 9.9, 30.0])
    doc = json.loads(paths[3].read_text())
    doc.update(status="failed", error="instance 0 exited with code 1")
    write_json_atomic(paths[3], doc)
    (tmp_path / "a" / "copy.json").write_text(paths[0].read_text())  # launch -o beside --run-dir
    (tmp_path / "a" / "manifest.json").write_text('{"schema": "numabench.sweep"}')
    side = collect_side(tmp_path / "a")
    assert len(side.runs) == 3
    assert side.excluded == ((str(paths[3]), "status failed: instance 0 exited with code 1"),)
    skipped = dict(side.skipped)
    copy = tmp_path / "a" / "copy.json"  # found first (name order); its twin is skipped
    assert skipped[str(paths[0])] == f"the same run as {copy} (counted once)"
    assert "schema 'numabench.sweep'" in skipped[str(tmp_path / "a" / "manifest.json")]
    write_runs(tmp_path / "b", [10.0, 10.1, 9.9])
    text = render_comparison(compare_paths(tmp_path / "a", tmp_path / "b"))
    assert f"excluded {paths[3]}: status failed" in text


def test_warnings_of_the_documents_are_shown_next_to_the_figures(tmp_path):
    paths = write_runs(tmp_path / "a", [10.0, 10.1, 9.9])
    doc = json.loads(paths[0].read_text())
    doc["warnings"] = ["step max latency: unstable, stdev is 40% of the mean"]
    write_json_atomic(paths[0], doc)
    write_runs(tmp_path / "b", [10.0, 10.1, 9.9])
    c = compare_paths(tmp_path / "a", tmp_path / "b")
    step = next(m for m in c.metrics if m.metric == "step max latency p50")
    assert step.warnings == {"a": ("unstable 1/3",)}
    text = render_comparison(c)
    line = next(x for x in text.splitlines() if x.startswith("step max latency p50"))
    assert "[warnings A: unstable 1/3]" in line
    assert "warning (A, 1 of 3 runs): step max latency: unstable, stdev is 40% of the mean" in text
    assert c.to_dict()["metrics"][1]["warnings"] == {"a": ["unstable 1/3"]}


# ---- hostile input --------------------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2, 3]", "a JSON list, expected an object"),
    (b'{"schema": "numabench.results", "version": 1}', "malformed numabench results document"),
    (b'{"schema": "numabench.results", "version": 7}', "results version 7 is not supported"),
])
def test_bad_files_are_named_without_a_traceback(tmp_path, content, expected):
    good = write_runs(tmp_path / "good", [10.0])[0]
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    r = numabench("compare", str(good), str(bad))
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith(f"error: {bad}: ") and expected in r.stderr
    assert "Traceback" not in r.stderr


def test_empty_folder_and_folder_of_other_json_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.json").write_text("[]")
    good = write_runs(tmp_path / "good", [10.0])[0]
    for folder, extra in (("empty", ""), ("other", "x.json: not a results document")):
        r = numabench("compare", str(good), str(tmp_path / folder))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"{tmp_path / folder}: holds no numabench results documents" in r.stderr and extra in r.stderr


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=10)
HEADED = st.dictionaries(  # a results header over junk: the malformed-document path
    st.sampled_from(["workload", "plan", "summary", "raw", "status"]),
    st.none() | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2), max_size=5)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    HEADED.map(lambda d: json.dumps({"schema": "numabench.results", "version": 1, **d}).encode())))
def test_arbitrary_bytes_are_an_error_naming_the_file(tmp_path, data):
    p = tmp_path / "x.json"
    p.write_bytes(data)
    try:
        collect_side(p)
    except CompareError as e:
        assert str(e).startswith(f"{p}: ")


# ---- real runs ------------------------------------------------------------------------------

@pytest.mark.skipif(len(USABLE) < 1, reason="needs a usable CPU")
def test_real_noop_runs_1ms_vs_40ms_compute_is_worse(tmp_path):
    """Six real launches of the no-op backend (fresh workers each), 3 a side, interleaved.

    The per-run medians (step max latency p50, request latency p50) must say `worse`. The window
    throughput must be lower; on a heavily loaded machine one stalled run can widen its 3-run
    noise floor past a 2x shift (measured: 1 trial in 8 at load average 9 on 2 vCPUs, and once
    for the latencies under the parallel suite; a 4x and an 8x shift once each, with two suite
    workers per vCPU: a 1 ms sleep's wake-up delay inflated one A run's p50 several times), so
    the shift is 40x; for throughput `no-difference` is still an honest answer there, so only
    `better` fails.
    """
    for k in range(3):
        for side, us in (("a", 1000), ("b", 40000)):
            r = numabench("launch", "--backend", "noop", "-m", "bert-tiny", "-s", "8", "-i", "15",
                          "-w", "2", "--compute-us", str(us), "--run-dir", str(tmp_path / side / f"rep-{k}"))
            assert r.returncode == 0, r.stderr
    r = numabench("compare", "--json", str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    metrics = {m["metric"]: m for m in json.loads(r.stdout)["metrics"]}
    for name in ("step max latency p50", "request latency p50"):
        assert metrics[name]["verdict"] == "worse", metrics[name]
        assert metrics[name]["runs"] == {"a": 3, "b": 3} and metrics[name]["ratio"] > 3
    tput = metrics["throughput"]
    assert tput["ratio"] < 0.5 and tput["verdict"] in ("worse", "no-difference"), tput


def test_values_that_are_not_positive_numbers_are_inconclusive_not_a_verdict():
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        r = compare_values("throughput", "samples/s", "higher", [1.0, 1.1, bad], [1.0, 1.0, 1.0])
        assert r.verdict == "inconclusive" and r.ratio is None and "not a number" in r.reason


def test_passes_per_request_are_shown_when_the_sides_differ():
    from test_experiments import make_doc

    from numabench.experiments.compare import OTHER_FIELDS, Side, run_values, workload_differences

    def side(loops, name):
        doc = make_doc([5.0] * 3, mode="throughput")
        if loops is not None:
            doc["environment"]["loops"] = loops
        return Side(name, (run_values(doc, name),))

    one = side(None, "a")  # before version 4, or split mode: one pass per request
    auto = side({"per_instance": {"0": 53}, "calibrated": True, "target_ms": 50}, "b")
    given = side({"per_instance": {"0": 8}, "calibrated": False, "target_ms": None}, "c")
    assert [r.other["loops"] for s in (one, auto, given) for r in s.runs] == ["1", "calibrated", "8"]
    assert "loops: A 1 vs B calibrated" in workload_differences(one, auto, OTHER_FIELDS)
    assert not any(d.startswith("loops") for d in workload_differences(auto, auto, OTHER_FIELDS))
