"""`numabench report`: readable small multiples, honest points, manifest-only, report.html in a browser."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_experiments import make_doc

from numabench.experiments.report import (
    MAX_LINES,
    ReportError,
    caption,
    draw,
    make_report,
    plot_data,
    point_row,
    representative,
)
from numabench.results import write_json_atomic

SEQS = (20, 32, 128, 384)
BATCHES = (1, 2, 4, 8, 16, 32)


def numabench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "numabench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def grid_doc(seq, batch, n, rep=0, usable_cores=16):
    lat = seq / 10 * batch ** 0.8 / n ** 0.6 * (1 + 0.05 * rep)
    doc = make_doc([lat] * 12, instances=n, seq=seq, batch=batch, cores=16 // n)
    doc["machine"]["cores"] = doc["machine"]["cores"][:usable_cores]
    doc["experiment"] = {"point_id": f"s{seq}_b{batch}_n{n}_r{rep}", "point": {"repetition": rep}}
    return doc


def grid_rows(seqs=SEQS, batches=BATCHES, reps=2):
    return [point_row(f"s{s}_b{b}_n{n}_r{r}.json", grid_doc(s, b, n, r))
            for r in range(reps) for s in seqs for b in batches for n in (1, 2, 4, 8, 16) if n <= b]


def bbox_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def check_layout(fig, panels: int):
    """Panel count, at most 8 distinguishable lines per panel, every legend outside every axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == panels
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends, "no legend"
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith("line:")]
        assert 0 < len(lines) <= MAX_LINES
        styles = {(ln.get_color(), ln.get_marker()) for ln in lines}
        assert len(styles) == len(lines), "two lines share colour and marker"
        assert len({c for c, _ in styles}) == len(lines) and len({m for _, m in styles}) == len(lines)
        for leg in legends:
            assert not bbox_overlap(leg.get_window_extent(renderer), ax.get_window_extent(renderer)), \
                f"legend covers panel {ax.get_title()!r}"
    return fig


def test_4_seq_x_6_batch_grid_renders_readable_panels():
    rows = grid_rows()
    plots = {p.name: p for p in plot_data(rows)}
    assert set(plots) == {"max-latency-vs-instances", "throughput-vs-instances", "best-instances"}
    cap = caption([grid_doc(128, 8, 2)])
    for name in ("max-latency-vs-instances", "throughput-vs-instances"):
        p = plots[name]
        assert [pn.title for pn in p.panels] == [f"seq {s}" for s in SEQS]
        assert all([ln.label for ln in pn.lines] == [f"batch {b}" for b in BATCHES] for pn in p.panels)
        fig = check_layout(draw(p, cap), panels=len(SEQS))
        assert [ax.get_title() for ax in fig.axes] == [f"seq {s}" for s in SEQS]
        assert cap.split(" · ")[0] in fig._supxlabel.get_text()
    tput = plots["throughput-vs-instances"]
    fig = draw(tput, cap)
    for ax in fig.axes:  # window throughput solid, summed throughput dashed, one each per line
        solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(solid) == len(dashed) == len(BATCHES)
        assert {ln.get_color() for ln in solid} == {ln.get_color() for ln in dashed}
    legend_text = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"common window", "sum of instances", "each run"} <= set(legend_text)
    best = draw(plots["best-instances"], cap)  # bars, labelled on their axis: no legend needed
    assert len(best.axes) == len(SEQS)
    for ax in best.axes:
        assert len(ax.patches) == len(BATCHES) <= MAX_LINES
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"batch {b}" for b in BATCHES]
    # spread: both repetitions are kept beside the plotted median
    line = tput.panels[2].lines[3]  # seq 128, batch 8
    assert len(line.runs) == 2 * len(line.x) and line.y_sum is not None


def test_more_than_8_lines_make_another_panel_each_with_its_own_legend():
    rows = [point_row("x.json", grid_doc(128, b, n)) for b in range(1, 12) for n in (1, 2)]
    p = next(p for p in plot_data(rows) if p.name == "max-latency-vs-instances")
    assert [pn.title for pn in p.panels] == ["seq 128 (1/2)", "seq 128 (2/2)"]
    assert [len(pn.lines) for pn in p.panels] == [8, 3]
    fig = check_layout(draw(p, "cap"), panels=2)
    assert not fig.legends and all(ax.get_legend() for ax in fig.axes)
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert texts == ["batch 9", "batch 10", "batch 11"]


def test_the_plotted_point_is_a_measured_run_never_the_mean_of_two():
    assert representative([100.0, 1.0], "higher") == 1.0  # throughput: the worse of two
    assert representative([100.0, 1.0], "lower") == 100.0  # latency: the worse of two
    assert representative([5.0, 1.0, 500.0], "higher") == 5.0  # odd: the median
    rows = [point_row("a.json", grid_doc(32, 4, n, rep)) for n in (1, 2) for rep in range(2)]
    rows[0]["throughput"] = 1e6  # an outlier repetition
    tput = next(p for p in plot_data(rows) if p.name == "throughput-vs-instances")
    assert tput.series["seq 32"]["y"][0] == rows[1]["throughput"]  # the other repetition at n=1


def test_idle_cores_are_ringed_where_a_point_leaves_some_unused():
    full = [point_row("a.json", grid_doc(32, 4, n)) for n in (1, 2, 4)]
    part = point_row("b.json", grid_doc(32, 4, 2))
    part["idle_cores"] = 8
    rows = [r for r in full if r["instances"] != 2] + [part]
    assert [r["idle_cores"] for r in full] == [0, 0, 0]
    p = next(p for p in plot_data(rows) if p.name == "max-latency-vs-instances")
    assert p.panels[0].lines[0].idle == [2] and any("ringed points" in n for n in p.notes)
    fig = draw(p, "cap")
    assert "leaves cores idle" in [t.get_text() for t in fig.legends[0].get_texts()]
    rings = [c for c in fig.axes[0].collections if c.get_label() == "_idle"]
    assert len(rings) == 1 and rings[0].get_offsets().tolist() == [[2, rows[-1]["max_latency_p50_ms"]]]


def sweep_folder(tmp: Path, ids_listed, ids_on_disk) -> Path:
    for pid in ids_on_disk:
        s, b, n, r = (int(part[1:]) for part in pid.split("_"))
        doc = grid_doc(s, b, n, r)
        doc["warnings"] = ["step max latency: only 5 samples, p90/p99 not reported; use more --iterations"]
        write_json_atomic(tmp / "points" / f"{pid}.json", doc)
    write_json_atomic(tmp / "manifest.json", {
        "schema": "numabench.sweep", "version": 1, "status": "ok", "name": "mini",
        "points": [{"id": pid, "index": k, "status": "ok"} for k, pid in enumerate(ids_listed)]})
    return tmp


def test_only_the_manifest_points_are_reported_with_backend_mode_precision_and_warnings(tmp_path):
    listed = ["s32_b4_n1_r0", "s32_b4_n2_r0", "s128_b4_n1_r0", "s128_b4_n2_r0"]
    folder = sweep_folder(tmp_path / "sw", listed + ["s128_b4_n4_r0"], listed + ["s32_b4_n4_r0"])
    r = numabench("report", str(folder))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = lines[0].split()
    assert {"backend", "prec", "mode", "warnings", "idle"} <= set(head)
    assert len([x for x in lines if " split " in x]) == 4
    assert "note: ignored 1 file(s) in points/ that the manifest does not list" in r.stdout
    assert "s32_b4_n4_r0.json" in r.stdout and "few samples" in lines[1]
    assert "1 point(s) the manifest lists as finished have no file in points/ (s128_b4_n4_r0)" in r.stdout
    rows = list(csv.DictReader(open(folder / "report" / "points.csv")))
    assert [x["id"] for x in rows] == listed
    assert {(x["backend"], x["mode"], x["precision"]) for x in rows} == {("pytorch", "split", "fp32")}
    assert rows[0]["warnings"] == "few samples" and "only 5 samples" in rows[0]["warning_messages"]
    plots = json.loads((folder / "report" / "plots.json").read_text())
    assert plots["plots"]["throughput-vs-instances"]["series"]["seq 32"]["x"] == [1, 2]
    assert "ignored 1 file(s)" in plots["notes"][0]


# ---- hostile input --------------------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    (b"\x00\xff\xfe garbage", "not UTF-8"),
    (b"[]", "a JSON list, expected an object"),
    (b'{"schema": "numabench.results", "version": 1, "workload": 3}', "malformed results document"),
])
def test_report_names_a_bad_file_without_a_traceback(tmp_path, content, expected):
    write_json_atomic(tmp_path / "good.json", grid_doc(32, 4, 1))
    (tmp_path / "bad.json").write_bytes(content)
    r = numabench("report", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad.json" in r.stderr and expected in r.stderr


def test_report_of_an_empty_folder_and_an_unwritable_output(tmp_path):
    (tmp_path / "empty").mkdir()
    r = numabench("report", str(tmp_path / "empty"))
    assert r.returncode == 2 and "holds no results files" in r.stderr and "Traceback" not in r.stderr
    write_json_atomic(tmp_path / "set" / "a.json", grid_doc(32, 4, 1))
    r = numabench("report", str(tmp_path / "set"), "-o", "/proc/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: /proc/x") and "cannot write the report" in r.stderr
    bad_manifest = tmp_path / "set" / "manifest.json"
    bad_manifest.write_bytes(b"\x89PNG")
    r = numabench("report", str(tmp_path / "set"))
    assert r.returncode == 2 and f"{bad_manifest}: not a readable sweep manifest" in r.stderr


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drop=st.sets(st.sampled_from(["workload", "plan", "summary", "machine", "raw", "status"])),
       junk=st.none() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2))
def test_a_malformed_document_is_a_report_error(drop, junk):
    doc = grid_doc(32, 4, 2)
    for k in drop:
        doc[k] = junk
    try:
        point_row("x.json", doc)
    except ReportError as e:
        assert str(e).startswith("x.json: malformed results document")


# ---- report.html in a real browser ------------------------------------------------------------

def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def test_report_html_is_self_contained_and_renders_in_headless_chromium(tmp_path):
    folder = tmp_path / "set"
    for s in (32, 128):
        for b in (2, 8):
            for n in (1, 2):
                for rep in range(2):
                    write_json_atomic(folder / f"s{s}_b{b}_n{n}_r{rep}.json", grid_doc(s, b, n, rep))
    rep = make_report(folder)
    page = rep.html.read_text()
    assert rep.html == folder / "report" / "report.html"
    assert page.count("<svg") == len(rep.plots) == 3
    for p in rep.plots:
        assert f"id='fig-{p.name}'" in page and (folder / "report" / f"{p.name}.svg").exists()
    low = page.lower()
    assert "<script" not in low and "<link" not in low and "<img" not in low
    assert "http://" not in low and "https://" not in low
    # references stay inside the page: url(#clip), xlink:href="#marker"
    import re

    assert set(re.findall(r"url\((.)", page)) <= {"#"}
    assert set(re.findall(r"(?:href|src)\s*=\s*[\"']?(.)", page)) <= {"#"}
    assert "<h2>Machine</h2>" in page and "Test CPU" in page and "NUMA node 0" in page
    assert page.count("<details>") == 16 and "memory nodes" in page  # each point's plan
    assert "<style>" in page and "samples/s (window)" in page

    exe = chromium()
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium (as .ci/run does)")
    shot = tmp_path / "shot.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                        "--window-size=1280,2000", rep.html.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    assert float(img.std()) > 0.05, "the page rendered blank"
    # the figures drew: plenty of coloured (non-grey) pixels, as the lines and markers are
    colourful = np.ptp(img, axis=2) > 0.3
    assert colourful.mean() > 0.001


def test_smt_figure_draws_grouped_bars_with_the_legend_outside():
    rows = [point_row("a.json", make_doc([10.0] * 5, cores=4)),
            point_row("b.json", make_doc([8.0] * 5, cores=4, smt=True))]
    smt = next(p for p in plot_data(rows) if p.name == "smt")
    fig = draw(smt, "cap")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    assert [round(b.get_height(), 6) for b in ax.patches] == [round(rows[0]["throughput"], 6),
                                                             round(rows[1]["throughput"], 6)]
    (leg,) = fig.legends
    assert [t.get_text() for t in leg.get_texts()] == ["physical cores", "+ SMT siblings"]
    assert not bbox_overlap(leg.get_window_extent(renderer), ax.get_window_extent(renderer))
