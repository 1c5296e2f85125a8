"""Report on a results set: one row per point (terminal table and CSV), the article's figures as
small multiples, and report.html, one self-contained page to share.

Rows are derived from each results document's workload, plan and raw timings, so a folder of
plain `launch` results works as well as a sweep folder. Plot data is computed first (pure) and
written beside the figures as plots.json, so what is drawn can be checked without reading pixels.

Figures follow the reference article: one panel per sequence length, one line per batch size
(at most 8 a panel, each with its own colour and marker), the legend outside the data. A point is
the median over repetitions (for an even count, the middle value on the worse side: a real run,
never the mean of two) and every repetition is drawn beside it as a small mark.
"""
from __future__ import annotations

import csv
import json
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from numabench.errors import NumabenchError
from numabench.experiments.compare import CompareError, read_document

ROW_COLUMNS = ("id", "model", "backend", "precision", "seq", "mode", "batch", "instances",
               "cores_per_instance", "cores", "cpus", "idle_cores", "smt", "setup", "threads", "repetition",
               "status", "requests", "samples", "latency_p50_ms", "latency_p90_ms",
               "max_latency_p50_ms", "max_latency_p90_ms", "throughput", "throughput_sum",
               "imbalance", "padding_overhead", "warnings", "warning_messages")
# A line is one combination of these (those that vary among the points plotted); seq always.
# setup last: a batch's pinned, unpinned and out-of-the-box lines sit together in a panel.
SERIES_FIELDS = ("model", "backend", "precision", "batch", "smt", "mode", "seq", "setup")
MAX_LINES = 8
ROW_ORDER = ("model", "backend", "precision", "mode", "seq", "batch", "instances", "cores", "smt",
             "setup", "repetition", "id")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Baselines (docs/experiments.md): how each setup is named and drawn. The out-of-the-box process
# is one value per panel line group, drawn as a dotted reference across the panel.
SETUP_LABELS = {"pinned": "pinned", "unpinned": "unpinned", "oob": "out of the box (1 process)"}
SETUP_NOTE = ("pinned: solid; unpinned (same split, --binder none): dash-dot; out of the box (one "
              "process, no binding, framework thread defaults): dotted across the panel")
SETUP_LINESTYLES = {"pinned": "-", "unpinned": "-.", "oob": ":"}


def row_setup(doc: dict[str, Any]) -> str:
    """pinned | unpinned | oob: what the run's environment recorded (so plain `launch --binder
    none` results report as unpinned too), else the sweep point's."""
    env = doc.get("environment") or {}
    if env.get("framework_defaults"):
        return "oob"
    if env.get("binder") == "none":
        return "unpinned"
    point = (doc.get("experiment") or {}).get("point") or {}
    return str(point.get("setup") or "pinned")


def row_threads(doc: dict[str, Any], setup: str):
    """Threads per instance: the plan's, or for the out-of-the-box process the count its
    framework chose (nothing was asked)."""
    if setup == "oob":
        got = ((doc.get("instances") or {}).get("0") or {}).get("got") or {}
        return got.get("threads")
    return doc["plan"]["instances"][0]["threads"]


class ReportError(NumabenchError):
    """A results set that cannot be reported, or a report that cannot be written."""


# ---- reading the set ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ResultSet:
    folder: Path
    manifest: dict[str, Any] | None
    docs: tuple[tuple[str, dict[str, Any]], ...]  # (file name, results document), run order
    notes: tuple[str, ...]  # what was ignored or is missing


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: not a readable sweep manifest ({e}); repair or remove it") from None
    if not isinstance(m, dict) or not isinstance(m.get("points"), list):
        raise ReportError(f"{path}: not a sweep manifest (expected an object with a 'points' list)")
    return m


def load_result_set(folder: str | Path) -> ResultSet:
    """A sweep folder (only the points its manifest lists) or a folder of results JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder of results")
    notes: list[str] = []
    manifest = None
    if (folder / "manifest.json").exists():
        manifest = _read_manifest(folder / "manifest.json")
        entries = sorted((e for e in manifest["points"] if isinstance(e, dict) and e.get("id")),
                         key=lambda e: e.get("index", 0))
        listed = {f"{e['id']}.json" for e in entries}
        files = [folder / "points" / f"{e['id']}.json" for e in entries
                 if (folder / "points" / f"{e['id']}.json").exists()]
        stale = sorted(p.name for p in (folder / "points").glob("*.json") if p.name not in listed)
        if stale:
            notes.append(f"ignored {len(stale)} file(s) in points/ that the manifest does not list "
                         f"(an earlier sweep's?): {', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}")
        lost = [e["id"] for e in entries if e.get("status") == "ok"
                and not (folder / "points" / f"{e['id']}.json").exists()]
        if lost:
            notes.append(f"{len(lost)} point(s) the manifest lists as finished have no file in "
                         f"points/ ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); "
                         "rerun them with numabench sweep --resume")
        missing = [e["id"] for e in entries if e.get("status") != "ok"]
        if missing:
            notes.append(f"{len(missing)} point(s) of the sweep have no results yet "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                         "finish with numabench sweep --resume")
    elif (folder / "points").is_dir():
        files = sorted((folder / "points").glob("*.json"))
    else:
        files = sorted(p for p in folder.glob("*.json") if p.name != "manifest.json")
    docs = []
    for path in files:
        try:
            docs.append((path.name, read_document(path)))
        except CompareError as e:
            raise ReportError(f"{e}; move it out of {folder} or repair it") from None
    if not docs:
        raise ReportError(f"{folder} holds no results files (expected points/*.json or *.json)")
    return ResultSet(folder, manifest, tuple(docs), tuple(notes))


def load_set(folder: str | Path) -> tuple[dict[str, Any] | None, list[tuple[str, dict[str, Any]]]]:
    """(manifest or None, [(file name, results document)]) — see load_result_set."""
    rs = load_result_set(folder)
    return rs.manifest, list(rs.docs)


# ---- one row per point ----------------------------------------------------------------------------

def _ms(ns) -> float | None:
    return None if ns is None else ns / 1e6


def _pct(values: np.ndarray, q: float, need: int) -> float | None:
    return float(np.percentile(values, q)) if len(values) >= need else None


def warning_tags(warnings: list[str]) -> list[str]:
    """unstable / few samples / imbalanced: what a reader must know before trusting a number."""
    tags = []
    for w in warnings:
        if "unstable" in w:
            tags.append("unstable")
        elif re.search(r"only \d+ samples", w) or "no samples" in w:
            tags.append("few samples")
        elif "imbalanced" in w:
            tags.append("imbalanced")
    return list(dict.fromkeys(tags))


def usable_cores(machine: dict[str, Any]) -> int:
    cores = machine.get("cores") or []
    usable = set((machine.get("cpus") or {}).get("usable") or [])
    if any("usable_cpus" in c for c in cores):
        return sum(1 for c in cores if c.get("usable_cpus"))
    return sum(1 for c in cores if not usable or usable & set(c.get("cpus") or []))


def point_row(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One point's parameters and headline numbers (ms, samples/s); ReportError if malformed."""
    try:
        return _point_row(name, doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ReportError(f"{name}: malformed results document ({type(e).__name__}: {e})") from None


def _point_row(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    from numabench.topology.cpulist import parse_cpulist

    w, plan, s = doc["workload"], doc["plan"], doc["summary"]
    inst_cpus = [parse_cpulist(str(i["cpus"])) for i in plan["instances"]]
    core_of = {c: k for k, core in enumerate(doc["machine"].get("cores") or []) for c in core["cpus"]}
    # physical cores per instance: distinct cores among its CPUs (SMT siblings count once)
    inst_cores = [len({core_of.get(c, ("cpu", c)) for c in cpus}) for cpus in inst_cpus]
    cores_per = sorted(set(inst_cores))
    point = (doc.get("experiment") or {}).get("point") or {}
    smt = bool(plan.get("smt"))
    raw = doc.get("raw") or {}
    e2e = (np.asarray(raw.get("received_ns", []), dtype=np.int64)
           - np.asarray(raw.get("sent_ns", []), dtype=np.int64))
    if w["mode"] == "split" and s.get("step_latency"):
        max_p50, max_p90 = _ms(s["step_latency"].get("p50_ns")), _ms(s["step_latency"].get("p90_ns"))
    else:  # throughput mode: the slowest instance's latency
        lats = [p["latency"] for p in s["instances"].values() if p["latency"].get("count")]
        max_p50 = _ms(max((lt["p50_ns"] for lt in lats), default=None))
        p90s = [lt["p90_ns"] for lt in lats if lt.get("p90_ns") is not None]
        max_p90 = _ms(max(p90s)) if p90s and len(p90s) == len(lats) else None
    ncpus = sum(len(c) for c in inst_cpus)
    warnings = [str(x) for x in doc.get("warnings") or []]
    setup = row_setup(doc)
    idle = max(usable_cores(doc["machine"]) - sum(inst_cores), 0)
    return {
        "id": (doc.get("experiment") or {}).get("point_id") or Path(name).stem,
        "model": w["model"], "backend": w["backend"], "precision": w["precision"], "seq": w["seq"],
        "mode": w["mode"], "batch": plan["batch"], "instances": len(plan["instances"]),
        "cores_per_instance": cores_per[0] if len(cores_per) == 1 else "/".join(map(str, cores_per)),
        "cores": sum(inst_cores), "cpus": ncpus,
        "idle_cores": idle, "smt": smt, "setup": setup,
        "threads": row_threads(doc, setup), "repetition": point.get("repetition", 0),
        "status": doc["status"], "requests": len(e2e), "samples": s["samples"],
        "latency_p50_ms": _ms(_pct(e2e, 50, 1)), "latency_p90_ms": _ms(_pct(e2e, 90, 10)),
        "max_latency_p50_ms": max_p50, "max_latency_p90_ms": max_p90,
        "throughput": s["throughput"], "throughput_sum": s["throughput_sum"],
        "imbalance": s.get("imbalance"),
        # real text: tokens computed after padding / real tokens (None for random ids)
        "padding_overhead": (s.get("tokens") or {}).get("padding_overhead"),
        "warnings": "; ".join(warning_tags(warnings) + (["idle cores"] if idle else [])),
        "warning_messages": " | ".join(warnings),
    }


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3f}"
    return str(v)


TABLE_COLUMNS = (("model", "model"), ("backend", "backend"), ("precision", "prec"), ("mode", "mode"),
                 ("seq", "seq"), ("batch", "batch"), ("instances", "inst"),
                 ("cores_per_instance", "cores/inst"), ("idle_cores", "idle"), ("smt", "smt"),
                 ("setup", "setup"),
                 ("repetition", "rep"), ("status", "status"), ("latency_p50_ms", "lat p50 ms"),
                 ("max_latency_p50_ms", "max lat p50 ms"), ("max_latency_p90_ms", "max lat p90 ms"),
                 ("throughput", "samples/s"), ("throughput_sum", "sum samples/s"),
                 ("padding_overhead", "padding x"), ("warnings", "warnings"))


def render_table(rows: list[dict[str, Any]]) -> str:
    head = [h for _, h in TABLE_COLUMNS]
    body = [[_cell(r[k]) if r[k] != "" else "-" for k, _ in TABLE_COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        out.writeheader()
        for r in rows:
            out.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_COLUMNS})


# ---- plot data (pure) ------------------------------------------------------------------------

def representative(values: list[float], better: str) -> float:
    """The median of the repetitions; for an even count the middle value on the worse side,
    so the point is always a measured run (an outlier of two never moves it halfway)."""
    v = sorted(values)
    n = len(v)
    if n % 2:
        return v[n // 2]
    lo, hi = v[n // 2 - 1], v[n // 2]
    return lo if better == "higher" else hi


@dataclass
class Line:
    label: str  # within its panel: "batch 8"
    x: list
    y: list  # representative value at each x
    runs: list  # [x, y] of every repetition
    y_sum: list | None = None  # throughput: sum of per-instance throughputs (drawn dashed)
    runs_sum: list | None = None
    idle: list = field(default_factory=list)  # x values whose points leave usable cores idle
    setup: str = "pinned"  # pinned | unpinned | oob (drawn as a reference across the panel)

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.label, "x": self.x, "y": self.y, "runs": self.runs, "idle": self.idle,
             "setup": self.setup}
        if self.y_sum is not None:
            d.update(y_sum=self.y_sum, runs_sum=self.runs_sum)
        return d


@dataclass
class Panel:
    title: str
    lines: list[Line]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "lines": [line.to_dict() for line in self.lines]}


@dataclass
class PlotData:
    name: str  # file stem
    title: str
    x_label: str
    y_label: str
    kind: str = "line"  # line | bar
    series: dict[str, dict[str, list]] = field(default_factory=dict)  # label -> {x, y}, all panels
    log_x: bool = False
    notes: list[str] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)
    ring_idle: bool = False  # ring the points that leave cores idle (not when every point does)
    log_y: bool = False  # latency vs load: from milliseconds below saturation to seconds past it

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "x_label": self.x_label, "y_label": self.y_label,
                "kind": self.kind, "log_x": self.log_x, "series": self.series, "notes": self.notes,
                "panels": [p.to_dict() for p in self.panels], "ring_idle": self.ring_idle}


def _label(key: dict[str, Any], fields: list[str]) -> str:
    parts = []
    for f in fields:
        v = key[f]
        parts.append({"seq": f"seq {v}", "batch": f"batch {v}", "smt": "+SMT" if v else "no SMT",
                      "setup": SETUP_LABELS.get(v, str(v))}.get(f, str(v)))
    return ", ".join(parts)


def _sort_key(t: tuple) -> tuple:
    return tuple(f"{v:020.6f}" if isinstance(v, (int, float)) else str(v) for v in t)


def _panels(rows: list[dict[str, Any]], x: str, y: str, better: str, by_seq: bool,
            y_sum: str | None = None) -> tuple[list[Panel], dict[str, dict[str, list]], dict]:
    """Panels (one per sequence length when by_seq), lines of the other varying fields, at most
    MAX_LINES a panel (more become a second panel). Also the flat {label: {x, y}} series."""
    rows = [r for r in rows if r[y] is not None and r["status"] == "ok"]
    # What varies among the split points names the lines; the out-of-the-box process (all CPUs,
    # SMT siblings included) must not make "smt" look like an axis.
    split = [r for r in rows if r["setup"] != "oob"] or rows
    varying = [f for f in SERIES_FIELDS if len({r[f] for r in (rows if f == "setup" else split)}) > 1]
    line_fields = [f for f in varying if f != "seq"] if by_seq else varying or ["seq"]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[f] for f in SERIES_FIELDS)].append(r)
    panel_of: dict[Any, list[tuple]] = defaultdict(list)
    for k in sorted(groups, key=_sort_key):
        panel_of[k[SERIES_FIELDS.index("seq")] if by_seq else None].append(k)
    panels, flat, styles = [], {}, {}
    for pk in sorted(panel_of, key=lambda v: _sort_key((v,))):
        keys = panel_of[pk]
        chunks = [keys[i:i + MAX_LINES] for i in range(0, len(keys), MAX_LINES)]
        for c, chunk in enumerate(chunks):
            lines = []
            for k in chunk:
                kd = dict(zip(SERIES_FIELDS, k))
                by_x: dict[Any, list[dict[str, Any]]] = defaultdict(list)
                for r in groups[k]:
                    by_x[r[x]].append(r)
                xs = sorted(by_x)
                line = Line(_label(kd, line_fields) or _label(kd, ["seq"]), xs,
                            [representative([r[y] for r in by_x[v]], better) for v in xs],
                            [[r[x], r[y]] for v in xs for r in by_x[v]],
                            idle=[v for v in xs if any(r["idle_cores"] for r in by_x[v])],
                            setup=kd["setup"])
                if y_sum:
                    line.y_sum = [representative([r[y_sum] for r in by_x[v]], better) for v in xs]
                    line.runs_sum = [[r[x], r[y_sum]] for v in xs for r in by_x[v]]
                lines.append(line)
                flat[_label(kd, ["seq"] + [f for f in varying if f != "seq"])] = {"x": xs, "y": line.y}
                styles.setdefault(line.label, len(styles))
            title = f"seq {pk}" if by_seq else ""
            if len(chunks) > 1:
                title = f"{title} ({c + 1}/{len(chunks)})".strip()
            panels.append(Panel(title, lines))
    return panels, flat, styles


def plot_data(rows: list[dict[str, Any]]) -> list[PlotData]:
    """The article's figures that this results set supports (a figure needs 2+ x values)."""
    plots = []
    single = [r for r in rows if r["instances"] == 1]
    if len({r["cores"] for r in single}) > 1:
        panels, flat, _ = _panels(single, "cores", "latency_p50_ms", "lower", by_seq=False)
        plots.append(PlotData("latency-vs-cores", "Latency vs cores (one instance)",
                              "physical cores", "latency p50 (ms)", series=flat, log_x=True,
                              panels=panels))
    if len({r["instances"] for r in rows}) > 1:
        panels, flat, _ = _panels(rows, "instances", "max_latency_p50_ms", "lower", by_seq=True)
        plots.append(PlotData("max-latency-vs-instances", "Max latency vs instances",
                              "instances", "max latency p50 (ms)", series=flat, log_x=True,
                              panels=panels,
                              notes=["split mode: a step's latency is that of its slowest instance"]))
        panels, tput, _ = _panels(rows, "instances", "throughput", "higher", by_seq=True,
                                  y_sum="throughput_sum")
        plots.append(PlotData("throughput-vs-instances", "Throughput vs instances", "instances",
                              "throughput (samples/s)", series=tput, log_x=True, panels=panels,
                              notes=["solid: over the common window; dashed: sum of per-instance "
                                     "throughputs"]))
        best = {label: {"x": [label], "y": [s["x"][int(np.argmax(s["y"]))]],
                        "throughput": [max(s["y"])]} for label, s in tput.items()
                if not label.endswith(SETUP_LABELS["oob"])}
        bpanels = [Panel(p.title, [Line(line.label, [line.x[int(np.argmax(line.y))]], [max(line.y)], [])
                                   for line in p.lines if line.setup != "oob"]) for p in panels]
        plots.append(PlotData("best-instances", "Best instance count (highest throughput)",
                              "line", "instances", kind="bar", series=best, panels=bpanels))
    pairs: dict[tuple, dict[bool, list[float]]] = defaultdict(dict)
    for r in rows:
        if r["status"] == "ok":
            key = (r["model"], r["precision"], r["seq"], r["batch"], r["instances"], r["cores"], r["setup"])
            pairs[key].setdefault(r["smt"], []).append(r["throughput"])
    both = {k: v for k, v in pairs.items() if True in v and False in v}
    if both:
        series: dict[str, dict[str, list]] = {"physical cores": {"x": [], "y": []},
                                              "+ SMT siblings": {"x": [], "y": []}}
        for k in sorted(both):
            label = f"seq {k[2]}, b{k[3]}, {k[4]}x{k[5] // k[4]}c" + ("" if k[6] == "pinned" else f", {k[6]}")
            series["physical cores"]["x"].append(label)
            series["physical cores"]["y"].append(representative(both[k][False], "higher"))
            series["+ SMT siblings"]["x"].append(label)
            series["+ SMT siblings"]["y"].append(representative(both[k][True], "higher"))
        plots.append(PlotData("smt", "SMT impact", "configuration", "throughput (samples/s)",
                              kind="bar", series=series))
    if len({r["setup"] for r in rows if r["status"] == "ok"}) > 1:
        for p in plots:
            if p.panels:
                p.notes.append(SETUP_NOTE)
    idle = [r for r in rows if r["idle_cores"]]
    if idle:
        note = (f"every point leaves usable cores idle (at least {min(r['idle_cores'] for r in idle)})"
                if len(idle) == len(rows) else
                f"ringed points leave usable cores idle ({len(idle)} of {len(rows)} points)")
        for p in plots:
            p.notes.append(note)
            p.ring_idle = len(idle) < len(rows)
    return plots


def caption(docs: list[dict[str, Any]]) -> str:
    """Machine, model, backend, precision, mode and versions: what a figure needs to be read."""
    doc = docs[0]
    m = doc.get("machine") or {}
    cores = len(m.get("cores") or [])
    nodes = len([n for n in m.get("nodes") or [] if n.get("cpus")])
    what = sorted({f"{d['workload']['model']} {d['workload']['backend']} "
                   f"{d['workload']['precision']} {d['workload']['mode']} mode" for d in docs})
    v = (doc.get("environment") or {}).get("versions") or {}
    vers = ", ".join(f"{k} {v[k]}" for k in ("numabench", "torch", "transformers", "onnxruntime",
                                             "python") if k in v)
    host = (doc.get("environment") or {}).get("hostname")
    return (f"{m.get('model_name') or 'unknown CPU'} ({cores} cores, {nodes} NUMA node"
            f"{'s' if nodes != 1 else ''}{', ' + host if host else ''}) · {'; '.join(what)} · {vers}")


# ---- drawing ----------------------------------------------------------------------------------

def _style(index: int) -> dict[str, Any]:
    return {"color": COLORS[index % MAX_LINES], "marker": MARKERS[index % MAX_LINES]}


def _grouped_bars(fig, p: PlotData) -> None:
    """A figure without panels (smt): one group of bars per configuration, legend outside."""
    ax = fig.subplots()
    labels = list(dict.fromkeys(x for s in p.series.values() for x in s["x"]))
    width = 0.8 / max(len(p.series), 1)
    for j, (label, s) in enumerate(p.series.items()):
        ax.bar([labels.index(x) + j * width for x in s["x"]], s["y"], width=width, label=label,
               color=COLORS[j % MAX_LINES], gid=f"line:{label}")
    ax.set_xticks([i + width * (len(p.series) - 1) / 2 for i in range(len(labels))], labels,
                  rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(p.x_label, fontsize=9)
    ax.set_ylabel(p.y_label, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)


def _key_handles(p: PlotData) -> list:
    """Legend entries that explain line styles and marks rather than name a line."""
    from matplotlib.lines import Line2D

    lines = [line for pn in p.panels for line in pn.lines]
    out = []
    if any(line.y_sum is not None for line in lines):
        out += [Line2D([], [], color="black", linestyle="-", label="common window"),
                Line2D([], [], color="black", linestyle="--", label="sum of instances")]
    if any(len(line.runs) > len(line.x) for line in lines):
        out.append(Line2D([], [], color="grey", marker="o", linestyle="", alpha=0.5, markersize=4,
                          label="each run"))
    if p.ring_idle and any(line.idle for line in lines):
        out.append(Line2D([], [], color="black", marker="o", markerfacecolor="none", linestyle="",
                          markersize=10, label="leaves cores idle"))
    return out


def draw(p: PlotData, cap: str):
    """The figure of one PlotData (matplotlib Figure, Agg): panels in a grid, legend outside."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = p.panels
    n = max(len(panels), 1)
    ncols = 1 if n == 1 else 2 if n <= 4 else 3
    nrows = -(-n // ncols)
    fig = Figure(figsize=(4.3 * ncols + 2.4, 3.3 * nrows + 1.1), layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot state, and layouts can be measured
    if not panels:
        _grouped_bars(fig, p)
    labels = list(dict.fromkeys(line.label for pn in panels for line in pn.lines))
    shared = len(labels) <= MAX_LINES  # one style per line across panels, one legend
    keys = _key_handles(p)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel() if panels else []
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax, pn in zip(axes, panels):
        for i, line in enumerate(pn.lines):
            st = _style(labels.index(line.label) if shared else i)
            if p.kind == "bar":
                ax.bar(i, line.y[0], color=st["color"], label=line.label, gid=f"line:{line.label}")
                ax.annotate(f"{line.x[0]}", (i, line.y[0]), ha="center", va="bottom", fontsize=8)
                continue
            if line.setup == "oob" and len(set(line.x)) == 1:
                # one process, one value: a reference across the panel, marked where it ran
                ax.axhline(line.y[0], linestyle=SETUP_LINESTYLES["oob"], linewidth=1.4, label=line.label,
                           gid=f"line:{line.label}", color=st["color"], marker=st["marker"], markevery=[])
                ax.plot(line.x, line.y, linestyle="", label="_oob", **st)
            else:
                ax.plot(line.x, line.y, linestyle=SETUP_LINESTYLES.get(line.setup, "-"), label=line.label,
                        gid=f"line:{line.label}", **st)
            if line.y_sum is not None and line.setup != "oob":
                ax.plot(line.x, line.y_sum, linestyle="--", markerfacecolor="none", alpha=0.8,
                        label="_sum", **st)
            if len(line.runs) > len(line.x):  # repetitions: every run beside its median
                rx, ry = zip(*line.runs)
                ax.scatter(rx, ry, s=16, color=st["color"], alpha=0.5, marker=st["marker"],
                           linewidths=0, label="_runs")
            idle = [(x, y) for x, y in zip(line.x, line.y) if x in line.idle]
            if idle and p.ring_idle:
                ix, iy = zip(*idle)
                ax.scatter(ix, iy, s=140, facecolors="none", edgecolors="black", linewidths=0.8,
                           label="_idle")
        ax.set_title(pn.title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if p.kind == "bar":
            ax.set_xticks(range(len(pn.lines)), [line.label for line in pn.lines], rotation=30,
                          ha="right", fontsize=8)
            ax.set_ylabel("throughput (samples/s) at the best count", fontsize=8)
            continue
        if p.log_x:
            ax.set_xscale("log", base=2)
            xs = sorted({x for line in pn.lines for x in line.x})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(p.x_label, fontsize=9)
        ax.set_ylabel(p.y_label, fontsize=9)
        if p.log_y:
            ax.set_yscale("log")
        if not shared:  # lines differ between panels: each panel names its own, at its right
            named = [h for h in ax.get_lines() if (h.get_gid() or "").startswith("line:")]
            ax.legend(handles=named + keys, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0, fontsize=8)
    if panels and p.kind != "bar" and shared:
        setup_of = {line.label: line.setup for pn in panels for line in pn.lines}
        handles = [Line2D([], [], linestyle=SETUP_LINESTYLES.get(setup_of[lab], "-"), label=lab, **_style(i))
                   for i, lab in enumerate(labels)]
        fig.legend(handles=handles + keys, loc="outside right upper", fontsize=8)
    title = p.title if p.kind != "bar" or not panels else f"{p.title}: the bar's label is the instance count"
    # left-aligned: centred over the whole figure it ran into a wide legend at the top right
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    # The caption is the figure's supxlabel, so the layout keeps room for it under the panels.
    width = int(fig.get_figwidth() * 15)
    text = "\n".join(textwrap.fill(t, width) for t in [cap, *p.notes])
    fig.supxlabel(text, x=0.01, ha="left", fontsize=7, linespacing=1.3)
    return fig


def write_plots(plots: list[PlotData], cap: str, folder: Path) -> list[Path]:
    written = []
    for p in plots:
        fig = draw(p, cap)
        for ext in ("png", "svg"):
            path = folder / f"{p.name}.{ext}"
            fig.savefig(path, dpi=110, metadata={"Date": None} if ext == "svg" else None)
            written.append(path)
    return written


# ---- the report ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    table: str
    csv: Path
    plots: list[PlotData]
    files: list[Path]
    notes: tuple[str, ...] = ()
    html: Path | None = None


def make_report(folder: str | Path, out: str | Path | None = None) -> Report:
    """Rows, table, CSV, figures (PNG + SVG), plots.json and report.html into `out`
    (default FOLDER/report)."""
    if manifest_kind(folder) == "dispatch":  # requests served by plans: its own table and figures
        return make_dispatch_report(folder, out)
    rs = load_result_set(folder)
    rows = [point_row(name, doc) for name, doc in rs.docs]
    if rs.manifest is None:  # files in name order say nothing: order by the parameters
        order = sorted(range(len(rows)), key=lambda i: _sort_key(tuple(rows[i][k] for k in ROW_ORDER)))
        rows = [rows[i] for i in order]
        rs = ResultSet(rs.folder, None, tuple(rs.docs[i] for i in order), rs.notes)
    out = Path(out) if out is not None else Path(folder) / "report"
    plots = plot_data(rows)
    cap = caption([d for _, d in rs.docs])
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "points.csv"
        write_csv(rows, csv_path)
        files = [csv_path] + write_plots(plots, cap, out)
        (out / "plots.json").write_text(json.dumps(
            {"caption": cap, "notes": list(rs.notes),
             "plots": {p.name: p.to_dict() for p in plots}}, indent=1) + "\n")
        files.append(out / "plots.json")
        from numabench.experiments.html import render_html

        html_path = out / "report.html"
        html_path.write_text(render_html(rs, rows, plots, cap, out), encoding="utf-8")
        files.append(html_path)
    except OSError as e:
        where = e.filename or out
        raise ReportError(f"{where}: cannot write the report there ({e.strerror or e}); "
                          "choose another folder with -o") from None
    table = render_table(rows)
    if rs.notes:
        table += "\n" + "\n".join(f"note: {n}" for n in rs.notes)
    return Report(rows, table, csv_path, plots, files, rs.notes, html_path)


# ---- dispatch experiments (kind: dispatch) -------------------------------------------------------
# One row per point (plan x pad x rate x repetition); latency p50 and p99 vs offered load, one
# line per plan (and pad when it varies), and achieved vs offered throughput.

DISPATCH_COLUMNS = ("id", "plan", "pad", "offered_rate", "repetition", "status", "requests", "ok",
                    "busy", "error", "lost", "throughput", "latency_p50_ms", "latency_p90_ms",
                    "latency_p99_ms", "padding_overhead", "pools", "shape", "warnings")
DISPATCH_TABLE = (("plan", "plan"), ("pad", "pad"), ("offered_rate", "offered/s"),
                  ("repetition", "rep"), ("status", "status"), ("ok", "ok"), ("busy", "busy"),
                  ("error", "err"), ("lost", "lost"), ("throughput", "served/s"),
                  ("latency_p50_ms", "p50 ms"), ("latency_p90_ms", "p90 ms"),
                  ("latency_p99_ms", "p99 ms"), ("padding_overhead", "pad +%"), ("pools", "pools"),
                  ("tags", "warnings"))


def manifest_kind(folder: str | Path) -> str | None:
    """The kind a sweep folder's manifest names (None: no readable manifest)."""
    try:
        m = json.loads((Path(folder) / "manifest.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return m.get("kind") if isinstance(m, dict) else None


def _dispatch_docs(folder: Path) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], list[str]]:
    from numabench.experiments.dispatch import DISPATCH_SCHEMA

    manifest = _read_manifest(folder / "manifest.json")
    entries = sorted((e for e in manifest["points"] if isinstance(e, dict) and e.get("id")),
                     key=lambda e: e.get("index", 0))
    notes, docs = [], []
    missing = [e["id"] for e in entries if e.get("status") != "ok"]
    if missing:
        notes.append(f"{len(missing)} point(s) have no results ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''}); finish with numabench sweep --resume")
    for e in entries:
        path = folder / "points" / f"{e['id']}.json"
        if e.get("status") != "ok" or not path.exists():
            continue
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: not a readable dispatch point ({err}); rerun it with "
                              "numabench sweep --resume after moving it away") from None
        if not isinstance(doc, dict) or doc.get("schema") != DISPATCH_SCHEMA:
            raise ReportError(f"{path}: not a dispatch point document (schema "
                              f"{doc.get('schema') if isinstance(doc, dict) else None!r}, expected "
                              f"{DISPATCH_SCHEMA!r}); move it out of {folder}")
        docs.append((path.name, doc))
    if not docs:
        raise ReportError(f"{folder} holds no finished dispatch points (points/*.json)")
    return manifest, docs, notes


def dispatch_row(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    try:
        p, s = doc["point"], doc["summary"]
        lat = s["latency_ms"]
        pools = "; ".join(
            f"{k}: {v.get('ok', 0)} ok" + (f", load {v['load']:.2f}" if v.get("load") is not None else "")
            for k, v in s["pools"].items() if k != "-")
        return {"id": (doc.get("experiment") or {}).get("point_id") or Path(name).stem,
                "plan": p["plan"], "pad": p["pad"], "offered_rate": float(p["rate"]),
                "repetition": p["repetition"], "status": doc["status"], "requests": s["requests"],
                "ok": s["ok"], "busy": s["busy"], "error": s["error"], "lost": s["lost"],
                "throughput": float(s["throughput"]), "latency_p50_ms": _num_or_none(lat.get("p50")),
                "latency_p90_ms": _num_or_none(lat.get("p90")), "latency_p99_ms": _num_or_none(lat.get("p99")),
                "padding_overhead": (None if s.get("padding_overhead") is None
                                     else round(100 * s["padding_overhead"], 1)),
                "pools": pools, "shape": p.get("shape"), "tags": _dispatch_tags(doc.get("warnings") or []),
                "warnings": " | ".join(doc.get("warnings") or [])}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ReportError(f"{name}: malformed dispatch point ({type(e).__name__}: {e})") from None


def _num_or_none(v) -> float | None:
    return None if v is None else float(v)


def _dispatch_tags(warnings: list[str]) -> str:
    """busy / errors / lag / few samples: what to know before trusting a row."""
    tags = {"answered busy": "busy", "lost replies": "errors", "send lag": "lag", "no p99": "few samples"}
    return "; ".join(tag for text, tag in tags.items() if any(text in w for w in warnings))


def dispatch_plot_data(rows: list[dict[str, Any]]) -> list[PlotData]:
    """latency-vs-load (panels p50, p99; p90 where no point has the 100 requests p99 needs) and
    throughput-vs-load: x the offered rate, one line per plan (x pad when pads vary)."""
    rows = [r for r in rows if r["status"] == "ok"]
    pads = len({r["pad"] for r in rows}) > 1

    def label(r):
        return f"{r['plan']}, pad {r['pad']}" if pads else r["plan"]

    def lines(y: str, better: str) -> list[Line]:
        groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r[y] is not None:
                groups[label(r)][r["offered_rate"]].append(r[y])
        out = []
        for lab in dict.fromkeys(label(r) for r in rows):
            by_x = groups.get(lab, {})
            xs = sorted(by_x)
            out.append(Line(lab, xs, [representative(by_x[x], better) for x in xs],
                            [[x, v] for x in xs for v in by_x[x]]))
        return out

    tail = "latency_p99_ms" if any(r["latency_p99_ms"] is not None for r in rows) else "latency_p90_ms"
    notes = ["latency: from each request's scheduled (Poisson) send time to its reply; busy and "
             "failed requests are counted in the table, not in the latencies"]
    if tail == "latency_p90_ms":
        notes.append("p90 shown: no point served the 100 requests a p99 needs")
    series = {f"{line.label} {q}": {"x": line.x, "y": line.y}
              for q, ys in (("p50", lines("latency_p50_ms", "lower")), (tail[8:11], lines(tail, "lower")))
              for line in ys}
    lat = PlotData("latency-vs-load", "Latency vs offered load", "offered load (requests/s)",
                   "latency (ms, log scale)", series=series, notes=notes, log_y=True,
                   panels=[Panel("p50", lines("latency_p50_ms", "lower")),
                           Panel(tail[8:11], lines(tail, "lower"))])
    tput = lines("throughput", "higher")
    thr = PlotData("throughput-vs-load", "Served vs offered load", "offered load (requests/s)",
                   "served (requests/s)", series={line.label: {"x": line.x, "y": line.y} for line in tput},
                   panels=[Panel("", tput)],
                   notes=["served: requests answered ok over the stream's window"])
    return [lat, thr]


def dispatch_caption(manifest: dict[str, Any], docs: list[dict[str, Any]]) -> str:
    doc = docs[0]
    m = doc.get("machine") or {}
    p = doc["point"]
    lengths = p.get("lengths") or {}
    mix = lengths.get("distribution", "?")
    if lengths.get("min") is not None:
        mix += f" {lengths['min']}-{lengths['max']} tokens"
    if lengths.get("median") is not None:
        mix += f" (median {lengths['median']:g}, sigma {lengths['sigma']:g})"
    per = f"{p['duration_s']:g} s" if p.get("duration_s") else f"{p.get('requests')} requests"
    host = (doc.get("environment") or {}).get("hostname")
    nodes = len([n for n in m.get("nodes") or [] if n.get("cpus")])
    return (f"{m.get('model_name') or 'unknown CPU'} ({len(m.get('cores') or [])} cores, {nodes} NUMA "
            f"node{'s' if nodes != 1 else ''}{', ' + host if host else ''}) · {p['model']} "
            f"{p['backend']} {p['precision']} served by numabench serve · lengths {mix} · Poisson "
            f"arrivals, {per} a point · numabench {(doc.get('environment') or {}).get('numabench', '?')}")


def make_dispatch_report(folder: str | Path, out: str | Path | None = None) -> Report:
    """A dispatch experiment's table, CSV, figures, plots.json and report.html."""
    folder = Path(folder)
    manifest, docs, notes = _dispatch_docs(folder)
    rows = [dispatch_row(name, doc) for name, doc in docs]
    out = Path(out) if out is not None else folder / "report"
    plots = dispatch_plot_data(rows)
    try:
        cap = dispatch_caption(manifest, [d for _, d in docs])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ReportError(f"{docs[0][0]}: malformed dispatch point ({type(e).__name__}: {e})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "points.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=DISPATCH_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r[k] is None else r[k]) for k in DISPATCH_COLUMNS})
        files = [csv_path] + write_plots(plots, cap, out)
        (out / "plots.json").write_text(json.dumps(
            {"caption": cap, "notes": notes, "plots": {p.name: p.to_dict() for p in plots}},
            indent=1) + "\n")
        files.append(out / "plots.json")
        from numabench.experiments.html import render_dispatch_html

        html_path = out / "report.html"
        html_path.write_text(render_dispatch_html(manifest, docs, rows, plots, cap, notes, out),
                             encoding="utf-8")
        files.append(html_path)
    except OSError as e:
        raise ReportError(f"{e.filename or out}: cannot write the report there "
                          f"({e.strerror or e}); choose another folder with -o") from None
    table = render_dispatch_table(rows)
    if notes:
        table += "\n" + "\n".join(f"note: {n}" for n in notes)
    return Report(rows, table, csv_path, plots, files, tuple(notes), html_path)


def render_dispatch_table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for _, h in DISPATCH_TABLE]]
    for r in rows:
        cells.append([("-" if r[k] is None else _cell(r[k])) if k != "tags" else r[k]
                      for k, _ in DISPATCH_TABLE])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 1, 4, 14, 15) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells)
