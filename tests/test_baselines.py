"""Unpinned baselines (issue 14): `--binder none`, the out-of-the-box process, explicit binders
that cannot bind memory, and the sweep's `baseline:` points drawn beside the pinned ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from numabench.launcher import binding
from numabench.plans.model import InstancePlan

USABLE = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs: one bound "
                              "instance must leave a CPU its unbound twin can reach")


def numabench(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def launch_doc(tmp_path, *args, env=None):
    out = tmp_path / "r.json"
    r = numabench("launch", "--batch", "2", "--seq", "8", "--iterations", "3", "--warmup", "1",
                  "--run-dir", str(tmp_path / "run"), "-o", str(out), *args, env=env)
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text()), (tmp_path / "run" / "launch.log").read_text()


# ---- --binder none ------------------------------------------------------------------------------

def test_binder_none_binds_nothing_and_says_what_it_did():
    inst = InstancePlan(0, (2, 3), (1,), 2, 4)
    b = binding.detect_binder("none", probe_cpu=2, probe_node=1)
    assert (b.name, b.binds_cpus, b.binds_memory, b.warnings) == ("none", False, False, ())
    assert binding.bind_prefix(b, inst) == []
    assert b.bound(inst) == {"cpus": [], "memory_nodes": []}
    assert b.describe(inst) == ("cpus not bound (plan: [2, 3]), memory not bound (plan: nodes [1]; "
                                "first touch applies)")
    # thread counts are still set; placement is the launcher's to drop (launch.prepare)
    env, _, applied = binding.worker_env({}, inst, threading=binding.Threading("gnu", pin=False))
    assert applied == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # the out-of-the-box process sets no thread variable at all
    env, _, applied = binding.worker_env({}, inst, threading=binding.Threading("gnu", pin=True),
                                         set_threads=False)
    assert applied == {} and not set(env) & {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PLACES"}


@TWO_CPUS
def test_binder_none_worker_reads_an_unrestricted_affinity(tmp_path):
    """A one-core instance started with --binder none: the worker process itself reports (from
    os.sched_getaffinity, in READY) every CPU the launcher had, not the plan's one CPU."""
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--cores-per-instance", "1",
                             "--backend", "noop", "--model", "bert-tiny", "--binder", "none")
    inst = doc["instances"]["0"]
    assert len(inst["asked"]["cpus"]) == 1
    assert inst["got"]["affinity"] == USABLE  # the worker's own reading
    assert all(cpus == USABLE for cpus in inst["got"]["thread_cpus"])  # no thread placed either
    assert inst["got"]["mempolicy"]["mode"] == "default"
    assert inst["bound"] == {"cpus": [], "memory_nodes": []}
    env = doc["environment"]
    assert (env["binder"], env["binds_cpus"], env["binds_memory"]) == ("none", False, False)
    assert env["pin_threads"] is False
    # threads are still set per instance, and recorded
    assert env["variables_set"]["0"]["OMP_NUM_THREADS"] == "1"
    assert inst["asked"]["threads"] == inst["got"]["threads"] == 1
    assert "binder none" in log and "cpus not bound" in log and "memory nodes [" not in log
    assert not any("runs on CPUs" in w for w in doc["warnings"])  # not judged: unbound by design


@TWO_CPUS
def test_bound_instance_reads_its_plan_cpus_for_contrast(tmp_path):
    """The same launch bound (taskset): the worker reads exactly the plan's CPU, so the test
    above can tell the difference."""
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--cores-per-instance", "1",
                             "--backend", "noop", "--model", "bert-tiny", "--binder", "taskset")
    inst = doc["instances"]["0"]
    assert inst["got"]["affinity"] == inst["asked"]["cpus"] == inst["bound"]["cpus"]
    assert len(inst["got"]["affinity"]) == 1


# ---- explicit binders that cannot bind memory -------------------------------------------------

@pytest.mark.parametrize("binder_name", ["taskset", "self"])
def test_explicit_cpu_only_binder_warns_and_never_logs_unbound_memory(tmp_path, binder_name):
    if binder_name == "taskset" and not shutil.which("taskset"):
        pytest.skip("taskset not installed")
    r, doc, log = launch_doc(tmp_path, "--instances", "1", "--backend", "noop", "--model",
                             "bert-tiny", "--binder", binder_name)
    msg = f"--binder {binder_name} pins CPUs only: memory is not bound"
    assert msg in r.stdout and any(msg in w for w in doc["warnings"])
    inst = doc["instances"]["0"]
    assert inst["bound"]["memory_nodes"] == [] and inst["bound"]["cpus"] == inst["asked"]["cpus"]
    assert doc["environment"]["binds_memory"] is False
    assert "memory nodes [" not in log and "memory not bound (plan: nodes [0]" in log


def test_plan_without_memory_nodes_gets_no_memory_warning():
    b = binding.detect_binder("self", probe_cpu=0, probe_node=None)
    assert b.warnings == ()


# ---- the experiment option baseline: [oob, unpinned] -----------------------------------------

def test_baseline_option_expands_oob_once_per_batch_and_an_unpinned_twin_per_split():
    from test_plans_support import article_machine

    from numabench.experiments import ExperimentError, expand, parse_experiment, validate_points

    m = article_machine()
    e = parse_experiment("version: 1\nkind: batch-scaling\nmodel: bert-tiny\nseq: [8, 16]\n"
                         "batch: [4, 8]\ninstances: [1, 4]\nbaseline: [oob, unpinned]\n", name="e.yaml")
    assert e.baselines == ("oob", "unpinned")
    pts = expand(e, m)
    # per seq: (oob, 1, 1u, 4, 4u) for batch 4 then batch 8
    assert [p.setup for p in pts[:5]] == ["oob", "pinned", "unpinned", "pinned", "unpinned"]
    assert len(pts) == 2 * 2 * 5 and sum(p.setup == "oob" for p in pts) == 4
    ids = [p.id for p in pts[:5]]
    assert ids == ["bert-tiny_pytorch_fp32_s8_b4_oob_r0", "bert-tiny_pytorch_fp32_s8_b4_n1x48_r0",
                   "bert-tiny_pytorch_fp32_s8_b4_n1x48-unpinned_r0", "bert-tiny_pytorch_fp32_s8_b4_n4x12_r0",
                   "bert-tiny_pytorch_fp32_s8_b4_n4x12-unpinned_r0"]
    plans = validate_points(pts, m, "e.yaml")
    oob = plans[0]
    assert len(oob.instances) == 1 and oob.cpus == tuple(range(96)) and oob.instances[0].memory_nodes == ()
    assert plans[2] == plans[1]  # the unpinned twin runs the very same split
    # pinned points keep their old id and parameters (a sweep made before baselines resumes)
    assert "setup" not in pts[1].to_dict() and pts[2].to_dict()["setup"] == "unpinned"
    from numabench.launcher.options import LaunchOptions

    base = LaunchOptions(binder="numactl")
    assert pts[1].launch_options(base) is base
    assert pts[2].launch_options(base).binder == "none" and not pts[2].launch_options(base).framework_defaults
    assert pts[0].launch_options(base).framework_defaults
    with pytest.raises(ExperimentError, match=r"e.yaml:3: baseline\[1\]: unknown baseline 'pinned'"):
        parse_experiment("version: 1\nkind: grid\nbaseline: [oob, pinned]\n", name="e.yaml")


def test_experiment_binder_key_binds_its_points_and_is_checked():
    from test_plans_support import article_machine

    from numabench.experiments import ExperimentError, expand, parse_experiment
    from numabench.experiments.spec import BINDER_CHOICES
    from numabench.launcher.options import LaunchOptions

    assert BINDER_CHOICES == binding.BINDERS
    e = parse_experiment("version: 1\nkind: grid\nmodel: bert-tiny\ninstances: 2\nbinder: none\n"
                         "baseline: oob\n", name="e.yaml")
    oob, split = expand(e, article_machine())
    assert split.binder == "none" and split.to_dict()["binder"] == "none" and "binder" not in oob.to_dict()
    assert split.launch_options(LaunchOptions(binder="numactl")).binder == "none"
    assert oob.launch_options(LaunchOptions(binder="numactl")).framework_defaults
    with pytest.raises(ExperimentError, match="e.yaml:3: binder: binder none already runs every point unpinned"):
        parse_experiment("version: 1\nkind: grid\nbinder: none\nbaseline: [unpinned]\n", name="e.yaml")
    with pytest.raises(ExperimentError, match="e.yaml:3: binder: unknown binder 'numa'"):
        parse_experiment("version: 1\nkind: grid\nbinder: numa\n", name="e.yaml")


def sweep_with_baselines(tmp_path):
    exp = tmp_path / "b.yaml"
    exp.write_text("version: 1\nkind: grid\nname: b\nmodel: bert-tiny\nbackend: noop\nseq: 8\n"
                   "batch: 2\ninstances: [1, 2]\nbaseline: [oob, unpinned]\niterations: 3\n"
                   "warmup: 1\nbackend_options: {compute_ns: 200000}\n")
    out = tmp_path / "res"
    r = numabench("sweep", str(exp), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


@TWO_CPUS
def test_sweep_baselines_in_manifest_table_and_figure_data(tmp_path):
    out = sweep_with_baselines(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    entries = {e["id"]: e for e in manifest["points"]}
    assert list(entries) == ["bert-tiny_noop_fp32_s8_b2_oob_r0", "bert-tiny_noop_fp32_s8_b2_n1_r0",
                             "bert-tiny_noop_fp32_s8_b2_n1-unpinned_r0", "bert-tiny_noop_fp32_s8_b2_n2_r0",
                             "bert-tiny_noop_fp32_s8_b2_n2-unpinned_r0"]
    assert all(e["status"] == "ok" for e in entries.values())
    assert entries["bert-tiny_noop_fp32_s8_b2_oob_r0"]["params"]["setup"] == "oob"
    assert "framework defaults" in entries["bert-tiny_noop_fp32_s8_b2_oob_r0"]["label"]
    # what ran: the oob process unbound with no thread variable, unpinned twins unbound with threads
    doc = lambda i: json.loads((out / "points" / f"{i}.json").read_text())  # noqa: E731
    oob = doc("bert-tiny_noop_fp32_s8_b2_oob_r0")
    assert oob["environment"]["framework_defaults"] is True and oob["environment"]["binder"] == "none"
    assert oob["environment"]["variables_set"] == {"0": {}}
    assert oob["instances"]["0"]["asked"]["threads"] is None
    assert oob["instances"]["0"]["got"]["affinity"] == USABLE
    un = doc("bert-tiny_noop_fp32_s8_b2_n2-unpinned_r0")
    assert un["environment"]["binder"] == "none" and not un["environment"]["framework_defaults"]
    assert all(i["got"]["affinity"] == USABLE and i["bound"]["cpus"] == [] for i in un["instances"].values())
    pinned = doc("bert-tiny_noop_fp32_s8_b2_n2_r0")
    assert all(i["got"]["affinity"] == i["asked"]["cpus"] != USABLE for i in pinned["instances"].values())

    r = numabench("report", str(out))
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert "setup" in table[0].split()
    assert [line.split()[table[0].split().index("setup")] for line in table[1:6]] == \
        ["oob", "pinned", "unpinned", "pinned", "unpinned"]
    plots = json.loads((out / "report" / "plots.json").read_text())["plots"]
    for name in ("max-latency-vs-instances", "throughput-vs-instances"):
        p = plots[name]
        (panel,) = p["panels"]  # pinned, unpinned and the default process in the same panel
        by_setup = {line["setup"]: line for line in panel["lines"]}
        assert set(by_setup) == {"pinned", "unpinned", "oob"}
        assert by_setup["pinned"]["x"] == by_setup["unpinned"]["x"] == [1, 2]
        assert by_setup["oob"]["x"] == [1] and by_setup["oob"]["label"] == "out of the box (1 process)"
        assert any("dotted across the panel" in n for n in p["notes"])
    assert all(line["setup"] != "oob" for line in plots["best-instances"]["panels"][0]["lines"])
    svg = (out / "report" / "throughput-vs-instances.svg").read_text()
    for label in ("pinned", "unpinned", "out of the box (1 process)"):
        assert f"line:{label}" in svg  # each drawn, with its own legend entry
    html = (out / "report" / "report.html").read_text()
    assert "<th class=l>setup</th>" in html and ">unpinned</td>" in html and ">oob</td>" in html
    rows = list(__import__("csv").DictReader(open(out / "report" / "points.csv")))
    assert [r["setup"] for r in rows] == ["oob", "pinned", "unpinned", "pinned", "unpinned"]


def test_drawn_baselines_keep_lines_distinct_and_the_legend_outside():
    """pinned, unpinned and oob lines for two batches in one panel: every line its own colour
    and marker, the oob values drawn as references, the legend off the data."""
    from test_report import check_layout, grid_doc

    from numabench.experiments.report import caption, draw, plot_data, point_row

    rows = []
    for b in (4, 8):
        for n in (1, 2, 4):
            for setup in ("pinned", "unpinned"):
                d = grid_doc(32, b, n)
                d["experiment"]["point"]["setup"] = setup
                rows.append(point_row(f"{b}{n}{setup}.json", d))
        d = grid_doc(32, b, 1)
        d["experiment"]["point"]["setup"] = "oob"
        rows.append(point_row(f"{b}oob.json", d))
    plots = {p.name: p for p in plot_data(rows)}
    p = plots["throughput-vs-instances"]
    assert [line.setup for line in p.panels[0].lines] == ["oob", "pinned", "unpinned"] * 2
    fig = check_layout(draw(p, caption([grid_doc(32, 4, 1)])), panels=1)
    renderer = fig.canvas.get_renderer()
    title, legend = fig._suptitle.get_window_extent(renderer), fig.legends[0].get_window_extent(renderer)
    assert title.x1 < legend.x0 or title.y1 < legend.y0, "the long baseline legend covers the title"
    styles = {ln.get_gid(): ln.get_linestyle() for ln in fig.axes[0].get_lines()
              if (ln.get_gid() or "").startswith("line:")}
    assert styles == {"line:batch 4, pinned": "-", "line:batch 4, unpinned": "-.",
                      "line:batch 4, out of the box (1 process)": ":", "line:batch 8, pinned": "-",
                      "line:batch 8, unpinned": "-.", "line:batch 8, out of the box (1 process)": ":"}


@TWO_CPUS
@pytest.mark.parametrize("binder_name", ["none", "auto"])
def test_serve_binder_none_leaves_its_workers_unbound(tmp_path, binder_name):
    """A real daemon's worker processes: with --binder none each may run on every CPU the daemon
    had (read from the running process), bound it runs on its one planned CPU."""
    import psutil
    from test_serve import Daemon

    d = Daemon(tmp_path, "--instances", "1", "--cores-per-instance", "1", "--binder", binder_name)
    try:
        (inst,) = d.status()["instances"]
        got = sorted(psutil.Process(inst["pid"]).cpu_affinity())
        assert got == (USABLE if binder_name == "none" else sorted(inst["cpus"]))
        assert len(inst["cpus"]) == 1
    finally:
        d.close()
