"""Experiments without running anything: YAML reading, expansion, validation, report data, compare."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_plans_support import build_machine

from numabench.experiments import ExperimentError, expand, parse_experiment, validate_points
from numabench.experiments.report import make_report, plot_data, point_row
from numabench.results import (
    RESULTS_SCHEMA,
    RESULTS_VERSION,
    Sample,
    samples_to_columns,
    summarize,
    summary_to_dict,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[1]


def exp(text: str):
    return parse_experiment("version: 1\n" + text, name="exp.yaml")


def refused(text: str) -> str:
    with pytest.raises(ExperimentError) as e:
        exp(text)
    return str(e.value)


# ---- YAML -------------------------------------------------------------------------------------

def test_yaml_reads_axes_as_scalars_or_lists():
    e = exp("kind: grid\nmodel: bert-tiny\nseq: [8, 16]\nbatch: 4\ninstances: [1, 2]\n"
            "smt: [false]\nmode: throughput\nduration: 2.5\nrepetitions: 2\n"
            "backend: noop\nbackend_options: {compute_ns: 1000}\n")
    assert e.kind == "grid" and e.models == ("bert-tiny",) and e.seqs == (8, 16)
    assert e.batches == (4,) and e.instances == (1, 2) and e.mode == "throughput"
    assert e.duration_s == 2.5 and e.iterations is None and e.repetitions == 2
    assert e.backend_options == (("compute_ns", 1000),) and e.name == "experiment"


def test_unknown_key_names_line_and_suggests():
    msg = refused("kind: core-scaling\nmodel: bert-tiny\nseqs: [8]\n")
    assert msg.startswith("exp.yaml:4: seqs: unknown key 'seqs' (did you mean 'seq'?)")


def test_wrong_type_names_the_list_item_line():
    msg = refused("kind: core-scaling\nseq:\n  - 8\n  - long\n")
    assert msg.startswith("exp.yaml:5: seq[1]: expected an integer, got 'long' (string)")


def test_bad_values_are_refused_with_field():
    assert refused("kind: grid\nmode: splitt\n").startswith(
        "exp.yaml:3: mode: unknown mode 'splitt' (did you mean 'split'?)")
    assert refused("kind: sweep\n").startswith("exp.yaml:2: kind: unknown kind 'sweep'")
    assert refused("kind: grid\nbatch: 0\n").startswith("exp.yaml:3: batch: must be at least 1")
    assert refused("kind: grid\nprecision: fp64\n").startswith("exp.yaml:3: precision: unknown precision")
    assert refused("kind: grid\nmodel: [bert-tiny, no-such-model]\n").startswith(
        "exp.yaml:3: model[1]: unknown model 'no-such-model'")
    assert refused("kind: grid\niterations: 5\nduration: 3\n").startswith(
        "exp.yaml:4: duration: give iterations or duration, not both")
    assert refused("kind: grid\nseq: [8, 8]\n").startswith("exp.yaml:3: seq[1]: 8 is listed twice")
    assert "compute_ns" in refused("kind: grid\nbackend: noop\nbackend_options: {compute_ns: fast}\n")
    assert refused("kind: grid\nbackend: pytorch\nbackend_options: {bogus: 1}\n").startswith(
        "exp.yaml:4: backend_options.bogus: backend 'pytorch' has no option 'bogus'")


def test_keys_that_do_not_apply_to_the_kind_are_refused():
    msg = refused("kind: core-scaling\ninstances: 4\n")
    assert msg.startswith("exp.yaml:3: instances: 'instances' does not apply to kind core-scaling")


def test_missing_version_and_kind():
    with pytest.raises(ExperimentError, match="missing 'version'"):
        parse_experiment("kind: grid\n", name="x.yaml")
    assert "missing 'kind'" in refused("seq: 8\n")
    with pytest.raises(ExperimentError, match=r"x.yaml:2: not valid YAML"):
        parse_experiment("version: [1\n", name="x.yaml")


# ---- expansion ---------------------------------------------------------------------------------

M16_SMT = build_machine(cores_per_node=16, threads_per_core=2)
M12 = build_machine(cores_per_node=12)


def test_core_scaling_auto_is_powers_of_two_then_all():
    pts = expand(exp("kind: core-scaling\nmodel: bert-tiny\nseq: [8, 16]\nbatch: 1\n"), M16_SMT)
    assert [(p.seq, p.cores_per_instance) for p in pts] == [
        (s, c) for s in (8, 16) for c in (1, 2, 4, 8, 16)]
    assert all(p.instances == 1 and not p.smt for p in pts)
    assert [p.cores_per_instance for p in expand(exp("kind: core-scaling\n"), M12)] == [1, 2, 4, 8, 12]


def test_batch_scaling_splits_cores_and_batch():
    pts = expand(exp("kind: batch-scaling\nbatch: 16\n"), M16_SMT)
    assert [(p.instances, p.cores_per_instance, p.batch) for p in pts] == [
        (1, 16, 16), (2, 8, 16), (4, 4, 16), (8, 2, 16), (16, 1, 16)]
    small = expand(exp("kind: batch-scaling\nbatch: 4\n"), M16_SMT)
    assert [(p.instances, p.cores_per_instance) for p in small] == [(1, 16), (2, 8), (4, 4)]
    assert pts[2].id == "bert-base-cased_pytorch_fp32_s128_b16_n4x4_r0"


def test_smt_kind_pairs_points_and_is_refused_without_smt():
    pts = expand(exp("kind: smt\ninstances: [1, 2]\n"), M16_SMT)
    assert [(p.instances, p.smt) for p in pts] == [(1, False), (1, True), (2, False), (2, True)]
    assert pts[1].id.endswith("_n1-smt_r0")
    with pytest.raises(ExperimentError, match="1 thread per core.*SMT comparison cannot run here"):
        expand(exp("kind: smt\n"), M12)
    plans = validate_points(pts, M16_SMT, "exp.yaml")
    assert len(plans[1].instances[0].cpus) == 2 * len(plans[0].instances[0].cpus)


def test_grid_is_the_product_and_repetitions_are_the_outer_loop():
    pts = expand(exp("kind: grid\nmodel: bert-tiny\nseq: [8, 16]\ninstances: [1, 2]\n"
                     "cores_per_instance: 2\nrepetitions: 2\n"), M16_SMT)
    assert len(pts) == 8 and [p.repetition for p in pts] == [0] * 4 + [1] * 4
    assert len({p.id for p in pts}) == 8
    derived = expand(exp("kind: grid\ncores_per_instance: 4\n"), M16_SMT)
    assert [(p.instances, p.cores_per_instance) for p in derived] == [(4, 4)]


def test_validation_names_every_bad_point_before_anything_runs():
    pts = expand(exp("kind: grid\nmodel: bert-tiny\nseq: [8, 1024]\ninstances: [1, 32]\nbatch: 32\n"),
                 M16_SMT)
    with pytest.raises(ExperimentError) as e:
        validate_points(pts, M16_SMT, "exp.yaml")
    msg = str(e.value)
    assert msg.startswith("exp.yaml: 3 of 4 points cannot run on this machine")
    assert "point 2/4 (bert-tiny fp32 seq 8 batch 32, 32 instances)" in msg
    assert "point 3/4 (bert-tiny fp32 seq 1024 batch 32, 1 instance)" in msg and "1024" in msg


def test_example_experiments_expand_on_the_article_machine():
    from test_plans_support import article_machine

    from numabench.experiments import load_experiment

    m = article_machine()
    for name in ("core-scaling", "batch-scaling", "smt"):
        e = load_experiment(REPO / "plans" / f"experiment-{name}.yaml")
        pts = expand(e, m)
        validate_points(pts, m, name)
        assert pts, name
    cs = expand(load_experiment(REPO / "plans" / "experiment-core-scaling.yaml"), m)
    assert sorted({p.cores_per_instance for p in cs}) == [1, 2, 4, 8, 16, 24, 48]
    bs = expand(load_experiment(REPO / "plans" / "experiment-batch-scaling.yaml"), m)
    assert sorted({p.instances for p in bs}) == [1, 2, 4, 8, 16, 32]  # <= 48 cores and <= batch 32
    lead = expand(load_experiment(REPO / "benchmarks" / "batch-scaling-bert-base.yaml"),
                  build_machine(cores_per_node=16))
    splits = [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert [(p.seq, p.instances, p.cores_per_instance) for p in lead] == (
        [(32, *s) for s in splits] + [(128, *s) for s in splits])


# ---- synthetic results documents -------------------------------------------------------------

def make_doc(latencies_ms, *, instances=1, seq=128, batch=None, mode="split", smt=False,
             cores=1, point=None, seed=0):
    """A results document whose raw timings have the given per-step latencies."""
    batch = batch or instances
    rng = np.random.default_rng(seed)
    samples, t = [], 1_000_000
    for step, lat in enumerate(latencies_ms):
        for i in range(instances):
            e2e = int(lat * 1e6 * (1 - 0.01 * rng.random())) if i else int(lat * 1e6)
            samples.append(Sample(i, step, batch // instances, t, t + e2e, int(e2e * 0.9), t + 1000))
        t += int(lat * 1e6) + 1000
    cores_list = [{"cpus": [c, c + 64] if smt else [c]} for c in range(64)]
    cpus = lambda i: list(range(i * cores, (i + 1) * cores)) + (  # noqa: E731
        [c + 64 for c in range(i * cores, (i + 1) * cores)] if smt else [])
    doc = {
        "schema": RESULTS_SCHEMA, "version": RESULTS_VERSION, "status": "ok",
        "created": "2026-01-01T00:00:00+00:00",
        "machine": {"model_name": "Test CPU", "cores": cores_list, "nodes": [{"id": 0, "cpus": [0]}]},
        "plan": {"version": 1, "batch": batch, "smt": smt,
                 "instances": [{"id": i, "cpus": ",".join(map(str, cpus(i))), "memory_nodes": [0],
                                "threads": len(cpus(i)), "batch": batch // instances}
                               for i in range(instances)]},
        "workload": {"model": "bert-tiny", "backend": "pytorch", "precision": "fp32", "seq": seq,
                     "mode": mode},
        "environment": {"hostname": "testhost", "versions": {"numabench": "0.1.0", "torch": "9.9"}},
        "raw": {"window_start_ns": 1_000_000, **samples_to_columns(samples)},
        "summary": summary_to_dict(summarize(samples, mode, 1_000_000)),
        "warnings": [],
    }
    if point:
        doc["experiment"] = {"point_id": point, "point": {"repetition": 0}}
    return doc


# ---- report ------------------------------------------------------------------------------------

def test_report_rows_csv_and_plot_series(tmp_path):
    folder = tmp_path / "set"
    expected = {}
    for seq, base in ((32, 10.0), (128, 40.0)):
        for n in (1, 2, 4):
            lat = base / n ** 0.5  # more instances: each smaller batch is faster
            doc = make_doc([lat] * 12, instances=n, seq=seq, batch=8, cores=4 // n)
            write_json_atomic(folder / f"s{seq}-n{n}.json", doc)
            expected[(seq, n)] = doc["summary"]["throughput"]
        for c in (1, 2, 4):  # core scaling: one instance on c cores
            write_json_atomic(folder / f"s{seq}-c{c}.json", make_doc([base * 2 / c] * 12, seq=seq, batch=8, cores=c))
    r = subprocess.run([sys.executable, "-m", "numabench.cli", "report", str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "samples/s" in r.stdout.splitlines()[0] and len(r.stdout.splitlines()) == 1 + 12
    out = folder / "report"
    rows = list(csv.DictReader(open(out / "points.csv")))
    assert len(rows) == 12
    plots = json.loads((out / "plots.json").read_text())
    assert "Test CPU" in plots["caption"] and "torch 9.9" in plots["caption"]
    assert "bert-tiny pytorch fp32 split mode" in plots["caption"]
    p = plots["plots"]
    assert set(p) == {"latency-vs-cores", "max-latency-vs-instances", "throughput-vs-instances",
                      "best-instances"}
    tput = p["throughput-vs-instances"]["series"]
    assert set(tput) == {"seq 32", "seq 128"}
    for seq in (32, 128):
        assert tput[f"seq {seq}"]["x"] == [1, 2, 4]
        assert tput[f"seq {seq}"]["y"] == pytest.approx([expected[(seq, n)] for n in (1, 2, 4)])
    # one instance runs at 1 (from the n1 files, on 4 cores), then c = 1, 2, 4 cores
    cores = p["latency-vs-cores"]["series"]["seq 128"]
    # two points at 4 cores (20 and 40 ms): the worse one is drawn, never their mean
    assert cores["x"] == [1, 2, 4] and cores["y"] == pytest.approx([80.0, 40.0, 40.0])
    maxlat = p["max-latency-vs-instances"]["series"]["seq 32"]
    assert maxlat["y"][0] == pytest.approx(10.0) and maxlat["y"][2] == pytest.approx(5.0)
    assert p["best-instances"]["series"]["seq 32"]["y"] == [4]
    assert p["throughput-vs-instances"]["y_label"].startswith("throughput (samples/s")
    for name in p:
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert "Test CPU" in (out / "latency-vs-cores.svg").read_text()


def test_smt_rows_count_physical_cores_and_make_the_smt_plot():
    rows = [point_row("a.json", make_doc([10.0] * 5, cores=4)),
            point_row("b.json", make_doc([8.0] * 5, cores=4, smt=True))]
    assert (rows[1]["cores_per_instance"], rows[1]["cpus"], rows[1]["smt"]) == (4, 8, True)
    smt = {p.name: p for p in plot_data(rows)}["smt"]
    assert smt.series["physical cores"]["y"] == pytest.approx([rows[0]["throughput"]])
    assert smt.series["+ SMT siblings"]["y"] == pytest.approx([rows[1]["throughput"]])


def test_report_of_an_empty_folder_is_refused(tmp_path):
    from numabench.errors import NumabenchError

    with pytest.raises(NumabenchError, match="holds no results"):
        make_report(tmp_path)
