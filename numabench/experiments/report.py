"""Report on a results set: one row per point (terminal table and CSV) and the article's plots.

Rows are derived from each results document's workload, plan and raw timings, so a folder of
plain `launch` results works as well as a sweep folder. Plot data is computed first (pure) and
written beside the figures as plots.json, so what is drawn can be checked without reading pixels.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from numabench.errors import NumabenchError
from numabench.results import load_results

ROW_COLUMNS = ("id", "model", "backend", "precision", "seq", "mode", "batch", "instances",
               "cores_per_instance", "cores", "cpus", "smt", "threads", "repetition", "status",
               "requests", "samples", "latency_p50_ms", "latency_p90_ms", "max_latency_p50_ms",
               "max_latency_p90_ms", "throughput", "throughput_sum", "imbalance", "warnings")
# A line is one combination of these (those that vary among the points plotted); seq always.
SERIES_FIELDS = ("model", "backend", "precision", "batch", "smt", "mode", "seq")


def load_set(folder: str | Path) -> tuple[dict[str, Any] | None, list[tuple[str, dict[str, Any]]]]:
    """(manifest or None, [(file name, results document)]) of a sweep folder or a folder of JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NumabenchError(f"{folder} is not a folder of results")
    manifest = None
    if (folder / "manifest.json").exists():
        manifest = json.loads((folder / "manifest.json").read_text())
    files = sorted((folder / "points").glob("*.json")) if (folder / "points").is_dir() else \
        sorted(p for p in folder.glob("*.json") if p.name != "manifest.json")
    docs = []
    for path in files:
        try:
            docs.append((path.name, load_results(path)))
        except (ValueError, OSError) as e:
            raise NumabenchError(f"{path}: {e}") from None
    if not docs:
        raise NumabenchError(f"{folder} holds no results files (expected points/*.json or *.json)")
    if manifest:  # run order, not alphabetical
        order = {f"{e['id']}.json": e["index"] for e in manifest.get("points", [])}
        docs.sort(key=lambda d: (order.get(d[0], 1 << 30), d[0]))
    return manifest, docs


def _ms(ns) -> float | None:
    return None if ns is None else ns / 1e6


def _pct(values: np.ndarray, q: float, need: int) -> float | None:
    return float(np.percentile(values, q)) if len(values) >= need else None


def point_row(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """One point's parameters and headline numbers (ms, samples/s)."""
    w, plan, s = doc["workload"], doc["plan"], doc["summary"]
    from numabench.topology.cpulist import parse_cpulist

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
    return {
        "id": (doc.get("experiment") or {}).get("point_id") or Path(name).stem,
        "model": w["model"], "backend": w["backend"], "precision": w["precision"], "seq": w["seq"],
        "mode": w["mode"], "batch": plan["batch"], "instances": len(plan["instances"]),
        "cores_per_instance": cores_per[0] if len(cores_per) == 1 else "/".join(map(str, cores_per)),
        "cores": sum(inst_cores), "cpus": ncpus, "smt": smt,
        "threads": plan["instances"][0]["threads"], "repetition": point.get("repetition", 0),
        "status": doc["status"], "requests": len(e2e), "samples": s["samples"],
        "latency_p50_ms": _ms(_pct(e2e, 50, 1)), "latency_p90_ms": _ms(_pct(e2e, 90, 10)),
        "max_latency_p50_ms": max_p50, "max_latency_p90_ms": max_p90,
        "throughput": s["throughput"], "throughput_sum": s["throughput_sum"],
        "imbalance": s.get("imbalance"), "warnings": len(doc.get("warnings") or []),
    }


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3f}"
    return str(v)


TABLE_COLUMNS = (("model", "model"), ("precision", "prec"), ("seq", "seq"), ("batch", "batch"),
                 ("instances", "inst"), ("cores_per_instance", "cores/inst"), ("smt", "smt"),
                 ("repetition", "rep"), ("status", "status"), ("latency_p50_ms", "lat p50 ms"),
                 ("max_latency_p50_ms", "max lat p50 ms"), ("max_latency_p90_ms", "max lat p90 ms"),
                 ("throughput", "samples/s"), ("throughput_sum", "sum samples/s"))


def render_table(rows: list[dict[str, Any]]) -> str:
    head = [h for _, h in TABLE_COLUMNS]
    body = [[_cell(r[k]) for k, _ in TABLE_COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*b) for b in body])


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        out.writeheader()
        for r in rows:
            out.writerow({k: ("" if r[k] is None else r[k]) for k in ROW_COLUMNS})


# ---- plot data (pure) ------------------------------------------------------------------------

@dataclass
class PlotData:
    name: str  # file stem
    title: str
    x_label: str
    y_label: str
    kind: str = "line"  # line | bar
    series: dict[str, dict[str, list]] = field(default_factory=dict)  # label -> {x, y}
    log_x: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "x_label": self.x_label, "y_label": self.y_label,
                "kind": self.kind, "log_x": self.log_x, "series": self.series, "notes": self.notes}


def _series_label(key: dict[str, Any], varying: list[str]) -> str:
    parts = [f"seq {key['seq']}"]
    for f in varying:
        if f == "seq":
            continue
        v = key[f]
        parts.append({"batch": f"batch {v}", "smt": "+SMT" if v else "no SMT"}.get(f, str(v)))
    return ", ".join(parts)


def _lines(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, dict[str, list]]:
    """Median over repetitions of y at each x, one line per combination of SERIES_FIELDS."""
    rows = [r for r in rows if r[y] is not None and r["status"] == "ok"]
    varying = [f for f in SERIES_FIELDS if len({r[f] for r in rows}) > 1]
    groups: dict[tuple, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    keys: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        k = tuple(r[f] for f in SERIES_FIELDS)
        keys[k] = {f: r[f] for f in SERIES_FIELDS}
        groups[k][r[x]].append(r[y])
    out = {}
    for k in sorted(groups, key=lambda t: tuple(str(v) if not isinstance(v, (int, float)) else
                                                   f"{v:012.3f}" for v in t)):
        xs = sorted(groups[k])
        out[_series_label(keys[k], varying)] = {"x": xs, "y": [median(groups[k][v]) for v in xs]}
    return out


def plot_data(rows: list[dict[str, Any]]) -> list[PlotData]:
    """The article's figures that this results set supports (a figure needs 2+ x values)."""
    plots = []
    single = [r for r in rows if r["instances"] == 1]
    if len({r["cores"] for r in single}) > 1:
        plots.append(PlotData("latency-vs-cores", "Latency vs cores (one instance)",
                              "physical cores", "latency p50 (ms)",
                              series=_lines(single, "cores", "latency_p50_ms"), log_x=True))
    if len({r["instances"] for r in rows}) > 1:
        plots.append(PlotData("max-latency-vs-instances", "Max latency vs instances",
                              "instances", "max latency p50 (ms)",
                              series=_lines(rows, "instances", "max_latency_p50_ms"), log_x=True,
                              notes=["split mode: a step's latency is that of its slowest instance"]))
        tput = _lines(rows, "instances", "throughput")
        plots.append(PlotData("throughput-vs-instances", "Throughput vs instances", "instances",
                              "throughput (samples/s, common window)", series=tput, log_x=True))
        best = {label: {"x": [label], "y": [s["x"][int(np.argmax(s["y"]))]],
                        "throughput": [max(s["y"])]} for label, s in tput.items()}
        plots.append(PlotData("best-instances", "Best instance count (highest throughput)",
                              "line (sequence length)", "instances", kind="bar", series=best))
    pairs = defaultdict(dict)
    for r in rows:
        if r["status"] == "ok":
            key = (r["model"], r["precision"], r["seq"], r["batch"], r["instances"], r["cores"])
            pairs[key].setdefault(r["smt"], []).append(r["throughput"])
    both = {k: v for k, v in pairs.items() if True in v and False in v}
    if both:
        series: dict[str, dict[str, list]] = {"physical cores": {"x": [], "y": []},
                                              "+ SMT siblings": {"x": [], "y": []}}
        for k in sorted(both):
            label = f"seq {k[2]}, b{k[3]}, {k[4]}x{k[5] // k[4]}c"
            series["physical cores"]["x"].append(label)
            series["physical cores"]["y"].append(median(both[k][False]))
            series["+ SMT siblings"]["x"].append(label)
            series["+ SMT siblings"]["y"].append(median(both[k][True]))
        plots.append(PlotData("smt", "SMT impact", "configuration", "throughput (samples/s)",
                              kind="bar", series=series))
    return plots


def caption(docs: list[dict[str, Any]]) -> str:
    doc = docs[0]
    m = doc["machine"]
    cores = len(m.get("cores") or [])
    nodes = len([n for n in m.get("nodes") or [] if n.get("cpus")])
    models = sorted({f"{d['workload']['model']} {d['workload']['precision']}" for d in docs})
    v = doc.get("environment", {}).get("versions", {})
    vers = ", ".join(f"{k} {v[k]}" for k in ("numabench", "torch", "transformers", "python") if k in v)
    host = doc.get("environment", {}).get("hostname")
    return (f"{m.get('model_name') or 'unknown CPU'} ({cores} cores, {nodes} NUMA node"
            f"{'s' if nodes != 1 else ''}{', ' + host if host else ''}) · {', '.join(models)} · {vers}")


def write_plots(plots: list[PlotData], cap: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for p in plots:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        if p.kind == "line":
            for label, s in p.series.items():
                ax.plot(s["x"], s["y"], marker="o", label=label)
            if p.log_x:
                ax.set_xscale("log", base=2)
                xs = sorted({x for s in p.series.values() for x in s["x"]})
                ax.set_xticks(xs, [str(x) for x in xs])
        elif p.name == "best-instances":  # one bar per line of the instances plots
            from matplotlib.ticker import MaxNLocator

            labels = list(p.series)
            bars = ax.bar(range(len(labels)), [s["y"][0] for s in p.series.values()], width=0.6)
            for bar, s in zip(bars, p.series.values()):
                ax.annotate(f"{s['throughput'][0]:.1f} samples/s", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="center")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            labels = list(dict.fromkeys(x for s in p.series.values() for x in s["x"]))
            width = 0.8 / max(len(p.series), 1)
            for j, (label, s) in enumerate(p.series.items()):
                pos = [labels.index(x) + j * width for x in s["x"]]
                ax.bar(pos, s["y"], width=width, label=label)
            ax.set_xticks([i + width * (len(p.series) - 1) / 2 for i in range(len(labels))], labels,
                          rotation=20, ha="right")
        ax.set_title(p.title)
        ax.set_xlabel(p.x_label)
        ax.set_ylabel(p.y_label)
        ax.grid(True, alpha=0.3)
        if p.kind == "line" or (p.name != "best-instances" and len(p.series) > 1):
            ax.legend(fontsize="small")
        fig.text(0.01, 0.01, cap + ("\n" + "; ".join(p.notes) if p.notes else ""), fontsize=6.5,
                 ha="left", va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        for ext in ("png", "svg"):
            path = folder / f"{p.name}.{ext}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    table: str
    csv: Path
    plots: list[PlotData]
    files: list[Path]


def make_report(folder: str | Path, out: str | Path | None = None) -> Report:
    """Rows, table, CSV, plots (PNG + SVG) and plots.json into `out` (default FOLDER/report)."""
    manifest, docs = load_set(folder)
    rows = [point_row(name, doc) for name, doc in docs]
    out = Path(out) if out is not None else Path(folder) / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "points.csv"
    write_csv(rows, csv_path)
    plots = plot_data(rows)
    cap = caption([d for _, d in docs])
    files = [csv_path] + write_plots(plots, cap, out)
    (out / "plots.json").write_text(json.dumps(
        {"caption": cap, "plots": {p.name: p.to_dict() for p in plots}}, indent=1) + "\n")
    files.append(out / "plots.json")
    table = render_table(rows)
    if manifest:
        missing = [e["id"] for e in manifest.get("points", []) if e.get("status") != "ok"]
        if missing:
            table += (f"\n{len(missing)} point(s) of the sweep have no results yet "
                      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                      "finish with numabench sweep --resume")
    return Report(rows, table, csv_path, plots, files)
