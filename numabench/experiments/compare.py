"""Compare two sets of runs. Runs are the unit: requests within one run are not independent.

A side (A or B) is a results document, a run folder, or a folder holding several (searched
recursively). Each metric becomes one value per run (window throughput, the run's step max
latency p50/p90, its median request latency); the sides are compared on those run values:

- `ratio`: median(B) / median(A);
- `ci`: 95% bootstrap percentile interval of that ratio (10,000 resamples of each side's runs,
  seeded, so the same inputs always give the same answer);
- `p`: two-sided rank-sum (Mann-Whitney) test of the run values, exact over every relabelling
  of the runs (or 20,000 random ones when there are more);
- `verdict`: `better` / `worse` only when the interval excludes 1 (significant) AND the shift is
  robust: at least MIN_EFFECT, and at least NOISE_K standard errors of the run-to-run noise
  (pooled standard deviation of the log run values). Otherwise `no-difference`; fewer than
  MIN_RUNS runs on a side: `inconclusive`. docs/experiments.md says why (3 runs a side cannot
  reach p < 0.05 by permutation; a bootstrap interval alone passes 10% of A/A pairs).

Documents are read through `run_values` only, so a change of the results format touches one place.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from numabench.errors import NumabenchError
from numabench.results import RESULTS_SCHEMA, VERSION_HISTORY

MIN_RUNS = 3
CONFIDENCE = 0.95
BOOTSTRAP = 10_000
PERMUTATIONS = 20_000  # exact enumeration up to this many relabellings, else random ones
MIN_EFFECT = 0.01  # shifts under 1% are not worth a verdict on this instrument
NOISE_K = 4.0  # the shift must exceed this many standard errors of the run-to-run noise
SEED = 0

# (key, label, unit, which direction is better)
METRICS = (
    ("throughput", "throughput", "samples/s", "higher"),
    ("step_p50", "step max latency p50", "ms", "lower"),
    ("step_p90", "step max latency p90", "ms", "lower"),
    ("latency_p50", "request latency p50", "ms", "lower"),
)
# What makes two runs comparable; a difference in any of these is refused without --allow-different.
WORKLOAD_FIELDS = ("model", "backend", "precision", "mode", "seq", "batch", "instances", "machine")
# Shown when they differ, but not refused (the point of a comparison is often one of these).
OTHER_FIELDS = ("backend_options", "threads", "cpus", "smt", "iterations", "duration_s", "binder",
                "allocator", "loops", "numabench")


class CompareError(NumabenchError):
    """Inputs that cannot be compared (unreadable, no runs, different workloads)."""


# ---- reading documents (the one place that knows the results format) ---------------------------

@dataclass(frozen=True)
class Run:
    """One run's facts, as compare needs them."""

    path: str
    status: str
    error: str | None
    workload: dict[str, Any]  # WORKLOAD_FIELDS
    other: dict[str, Any]  # OTHER_FIELDS
    values: dict[str, float | None]  # metric key -> value (None: not measured / not supported)
    warnings: tuple[str, ...]
    identity: str  # the same run found twice (launch -o plus its run folder) counts once


def _machine_label(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    usable = len(((m.get("cpus") or {}).get("usable")) or [])
    host = (doc.get("environment") or {}).get("hostname") or "?"
    return f"{host} ({m.get('model_name') or 'unknown CPU'}, {usable} usable CPUs)"


def _loops_label(loops: Any) -> str:
    """Passes per request in throughput mode: "calibrated" (counts vary run to run), the count
    given, or 1 (split mode, and documents before version 4)."""
    if not isinstance(loops, dict):
        return "1"
    if loops.get("calibrated"):
        return "calibrated"
    counts = sorted({str(n) for n in (loops.get("per_instance") or {}).values()})
    return ",".join(counts) or "1"


def run_values(doc: dict[str, Any], path: str) -> Run:
    """A results document as a Run; a malformed one is a CompareError naming the file."""
    try:
        w, plan, s = doc["workload"], doc["plan"], doc["summary"]
        insts = plan["instances"]
        raw = doc.get("raw") or {}
        sent = np.asarray(raw.get("sent_ns") or [], dtype=np.int64)
        recv = np.asarray(raw.get("received_ns") or [], dtype=np.int64)
        if len(sent) and len(sent) == len(recv):
            lat_p50 = float(np.median(recv - sent)) / 1e6
        else:  # no raw timings: the slowest instance's median
            p50s = [i["latency"].get("p50_ns") for i in (s.get("instances") or {}).values()]
            lat_p50 = max(p50s) / 1e6 if p50s and None not in p50s else None
        step = s.get("step_latency") or {}
        ms = lambda ns: None if ns is None else float(ns) / 1e6  # noqa: E731
        values = {"throughput": float(s["throughput"]), "step_p50": ms(step.get("p50_ns")),
                  "step_p90": ms(step.get("p90_ns")), "latency_p50": lat_p50}
        env = doc.get("environment") or {}
        workload = {"model": w["model"], "backend": w["backend"], "precision": w["precision"],
                    "mode": w["mode"], "seq": w["seq"], "batch": plan["batch"],
                    "instances": len(insts), "machine": _machine_label(doc)}
        other = {"backend_options": json.dumps(w.get("backend_options") or {}, sort_keys=True),
                 "threads": ",".join(sorted({str(i.get("threads")) for i in insts})),
                 "cpus": " ".join(str(i.get("cpus")) for i in insts), "smt": bool(plan.get("smt")),
                 "iterations": w.get("iterations"), "duration_s": w.get("duration_s"),
                 "binder": env.get("binder"), "allocator": env.get("allocator"),
                 "loops": _loops_label(env.get("loops")), "numabench": env.get("numabench")}
        identity = json.dumps([doc.get("created"), doc.get("run_dir"), s.get("window_ns"),
                               s.get("samples"), s["throughput"]])
        warnings = tuple(str(x) for x in (doc.get("warnings") or []))
        return Run(path, str(doc.get("status", "?")), doc.get("error"), workload, other, values,
                   warnings, identity)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CompareError(f"{path}: malformed numabench results document ({type(e).__name__}: {e}); "
                           "was it written by another numabench version, or edited?") from None


def read_document(path: Path) -> dict[str, Any]:
    """The JSON object in `path` if it is a numabench results document; CompareError otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompareError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CompareError(f"{path}: not a results document (not UTF-8 text)") from None
    except ValueError as e:
        raise CompareError(f"{path}: not a results document (not valid JSON: {e})") from None
    if not isinstance(doc, dict):
        raise CompareError(f"{path}: not a results document (a JSON {type(doc).__name__}, "
                           "expected an object)")
    if doc.get("schema") != RESULTS_SCHEMA:
        raise CompareError(f"{path}: not a numabench results document (schema "
                           f"{doc.get('schema')!r}, expected {RESULTS_SCHEMA!r})")
    if doc.get("version") not in VERSION_HISTORY:
        raise CompareError(f"{path}: results version {doc.get('version')!r} is not supported "
                           f"(this numabench reads versions {', '.join(map(str, VERSION_HISTORY))}); "
                           "upgrade numabench to read it")
    return doc


@dataclass(frozen=True)
class Side:
    source: str
    runs: tuple[Run, ...]  # status ok, each run once
    excluded: tuple[tuple[str, str], ...] = ()  # (path, why): failed/interrupted runs
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why): other JSON files, duplicates


def collect_side(source: str | Path) -> Side:
    """The runs of one side: a results file, or every results document under a folder."""
    src = Path(source)
    skipped: list[tuple[str, str]] = []
    if src.is_dir():
        runs = []
        for p in sorted(src.rglob("*.json")):
            try:
                runs.append(run_values(read_document(p), str(p)))
            except CompareError as e:
                skipped.append((str(p), str(e).removeprefix(f"{p}: ")))
        if not runs:
            found = f"; skipped: {'; '.join(f'{p}: {why}' for p, why in skipped[:5])}" if skipped else ""
            raise CompareError(f"{src}: holds no numabench results documents (searched *.json "
                               f"recursively{found})")
    elif src.exists():
        runs = [run_values(read_document(src), str(src))]
    else:
        raise CompareError(f"{src}: no such file or folder")
    seen: dict[str, str] = {}
    ok, excluded = [], []
    for r in runs:
        if r.identity in seen:
            skipped.append((r.path, f"the same run as {seen[r.identity]} (counted once)"))
            continue
        seen[r.identity] = r.path
        if r.status != "ok":
            why = f"status {r.status}" + (f": {str(r.error).splitlines()[0]}" if r.error else "")
            excluded.append((r.path, why))
        else:
            ok.append(r)
    if not ok:
        raise CompareError(f"{src}: no complete run to compare (every run was excluded: "
                           + "; ".join(f"{p}: {why}" for p, why in excluded) + ")")
    return Side(str(src), tuple(ok), tuple(excluded), tuple(skipped))


def workload_differences(a: Side, b: Side, fields: tuple[str, ...] = WORKLOAD_FIELDS) -> list[str]:
    """'field: A value(s) vs B value(s)' for each field that is not one value across all runs."""
    def values(side: Side, f: str) -> list[str]:
        vals = {str(r.workload.get(f, r.other.get(f))) for r in side.runs}
        return sorted(vals, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))

    out = []
    for f in fields:
        va, vb = values(a, f), values(b, f)
        if len(va) > 1 or len(vb) > 1 or va != vb:
            out.append(f"{f}: A {' | '.join(va)} vs B {' | '.join(vb)}")
    return out


# ---- the statistics (pure) ----------------------------------------------------------------------

def bootstrap_ci(a: np.ndarray, b: np.ndarray, resamples: int = BOOTSTRAP,
                 confidence: float = CONFIDENCE, seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of median(B*) / median(A*) over resamples of each side's runs."""
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), (resamples, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), (resamples, len(b)))], axis=1)
    ratios = mb / ma
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; ties get their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def permutation_p(a: np.ndarray, b: np.ndarray, permutations: int = PERMUTATIONS,
                  seed: int = SEED) -> float:
    """Two-sided rank-sum (Mann-Whitney) test on run values, by relabelling the runs.

    Exact (every relabelling once) while there are at most `permutations` of them, else that many
    random relabellings plus the observed one. Ranks: one wild run cannot dominate.
    """
    r = _ranks(np.concatenate([a, b]).astype(float))
    n, na = len(r), len(a)
    center = na * (n + 1) / 2.0
    observed = abs(r[:na].sum() - center)
    if math.comb(n, na) <= permutations:
        sums = r[np.array(list(itertools.combinations(range(n), na)))].sum(axis=1)
        extra = 0
    else:
        rng = np.random.default_rng(seed)
        sums = r[np.argsort(rng.random((permutations, n)), axis=1)[:, :na]].sum(axis=1)
        extra = 1
    extreme = np.count_nonzero(np.abs(sums - center) >= observed - 1e-9)
    return float((extreme + extra) / (len(sums) + extra))


def noise_floor(a: np.ndarray, b: np.ndarray) -> float:
    """NOISE_K standard errors of a shift in log values, from the pooled run-to-run spread."""
    la, lb = np.log(a), np.log(b)
    dof = len(a) + len(b) - 2
    pooled = math.sqrt((((la - la.mean()) ** 2).sum() + ((lb - lb.mean()) ** 2).sum()) / dof)
    return NOISE_K * pooled * math.sqrt(1 / len(a) + 1 / len(b))


@dataclass(frozen=True)
class MetricResult:
    metric: str
    unit: str
    better: str  # "higher" or "lower"
    a: tuple[float, ...]  # run values
    b: tuple[float, ...]
    ratio: float | None
    ci: tuple[float, float] | None
    p: float | None
    verdict: str  # better | worse | no-difference | inconclusive
    reason: str  # why that verdict, in words
    warnings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # side -> tags

    def to_dict(self) -> dict[str, Any]:
        med = lambda v: float(np.median(v)) if v else None  # noqa: E731
        return {"metric": self.metric, "unit": self.unit, "better": self.better,
                "a": med(self.a), "b": med(self.b), "ratio": self.ratio,
                "ci": list(self.ci) if self.ci else None, "p": self.p,
                "runs": {"a": len(self.a), "b": len(self.b)}, "verdict": self.verdict,
                "reason": self.reason, "values": {"a": list(self.a), "b": list(self.b)},
                "warnings": {k: list(v) for k, v in self.warnings.items()}}


def compare_values(metric: str, unit: str, better: str, a, b) -> MetricResult:
    """The verdict for one metric from each side's run values (pure)."""
    a = np.asarray([v for v in a if v is not None], dtype=float)
    b = np.asarray([v for v in b if v is not None], dtype=float)
    ta, tb = tuple(map(float, a)), tuple(map(float, b))
    if not len(a) or not len(b):
        return MetricResult(metric, unit, better, ta, tb, None, None, None, "inconclusive",
                            "not measured on one side (too few samples in a run, or not this mode)")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.any(a <= 0) or np.any(b <= 0):
        return MetricResult(metric, unit, better, ta, tb, None, None, None, "inconclusive",
                            "a run's value is zero, negative or not a number")
    ratio = float(np.median(b) / np.median(a))
    if len(a) < MIN_RUNS or len(b) < MIN_RUNS:
        runs = (f"{len(a)} run{'s' if len(a) != 1 else ''} a side" if len(a) == len(b) else
                f"{len(a)} run{'s' if len(a) != 1 else ''} on A, {len(b)} on B")
        return MetricResult(metric, unit, better, ta, tb, ratio, None, None, "inconclusive",
                            f"inconclusive: {runs}, {MIN_RUNS} needed")
    ci = bootstrap_ci(a, b)
    p = permutation_p(a, b)
    shift = abs(math.log(ratio))
    floor = max(math.log1p(MIN_EFFECT), noise_floor(a, b))
    significant = ci[0] > 1 or ci[1] < 1
    if significant and shift >= floor:
        verdict = "better" if (ratio > 1) == (better == "higher") else "worse"
        reason = f"{CONFIDENCE:.0%} interval excludes 1 and the shift exceeds the noise"
    else:
        verdict = "no-difference"
        reason = ("the interval includes 1" if not significant else
                  f"shift {math.expm1(shift):.1%} is within the run-to-run noise ({math.expm1(floor):.1%})")
    return MetricResult(metric, unit, better, ta, tb, ratio, ci, p, verdict, reason)


# ---- warnings stored in the documents ------------------------------------------------------------

def warning_tags(warnings: tuple[str, ...], metric: str) -> tuple[str, ...]:
    """Short tags (unstable, few samples, imbalanced) of the warnings that concern a metric.

    Throughput is made of every request, so every such warning concerns it."""
    tags = []
    for w in warnings:
        about_steps = w.startswith("step max latency")
        about_requests = re.match(r"instance \d+ latency", w) is not None
        if not {"throughput": True, "step_p50": about_steps, "step_p90": about_steps,
                "latency_p50": about_requests}.get(metric, False):
            continue
        if "unstable" in w:
            tags.append("unstable")
        elif re.search(r"only \d+ samples", w):
            tags.append("few samples")
        elif "imbalanced" in w:
            tags.append("imbalanced")
    return tuple(dict.fromkeys(tags))


def grouped_warnings(side: Side) -> list[tuple[str, int]]:
    """Distinct warnings (numbers folded) with the count of runs that carry them."""
    groups: dict[str, tuple[str, set[str]]] = {}
    for r in side.runs:
        for w in r.warnings:
            key = re.sub(r"\d+(\.\d+)?", "#", w)
            first, paths = groups.setdefault(key, (w, set()))
            paths.add(r.path)
    return [(first, len(paths)) for first, paths in groups.values()]


# ---- the comparison -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    a: Side
    b: Side
    differences: tuple[str, ...]  # refused without --allow-different
    other_differences: tuple[str, ...]  # shown only
    metrics: tuple[MetricResult, ...]

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {"source": s.source, "runs": [r.path for r in s.runs],
                    "excluded": [{"file": p, "why": w} for p, w in s.excluded],
                    "skipped": [{"file": p, "why": w} for p, w in s.skipped],
                    "workload": s.runs[0].workload,
                    "warnings": [{"message": m, "runs": n} for m, n in grouped_warnings(s)]}

        return {"a": side(self.a), "b": side(self.b), "differences": list(self.differences),
                "other_differences": list(self.other_differences),
                "method": method_text(), "metrics": [m.to_dict() for m in self.metrics]}


def method_text() -> str:
    return (f"runs are the unit; ratio = median(B)/median(A); ci = {CONFIDENCE:.0%} bootstrap "
            f"({BOOTSTRAP} resamples); p = rank-sum permutation test on run values; better/worse needs the "
            f"interval to exclude 1 and a shift of at least {MIN_EFFECT:.0%} and {NOISE_K:g} "
            f"standard errors of the run-to-run noise; fewer than {MIN_RUNS} runs a side: inconclusive")


def compare_sides(a: Side, b: Side, allow_different: bool = False) -> Comparison:
    diffs = tuple(workload_differences(a, b))
    if diffs and not allow_different:
        raise CompareError("the runs do not have the same workload, so a difference would not be "
                           "the setup's:\n  " + "\n  ".join(diffs)
                           + "\ncompare like with like, or add --allow-different to compare anyway")
    metrics = []
    for key, label, unit, better in METRICS:
        va = [r.values.get(key) for r in a.runs]
        vb = [r.values.get(key) for r in b.runs]
        if all(v is None for v in va + vb):
            continue  # not this mode (step latency in throughput mode)
        m = compare_values(label, unit, better, va, vb)
        tags = {}
        for name, side in (("a", a), ("b", b)):
            t = [tag for r in side.runs for tag in warning_tags(r.warnings, key)]
            if t:
                tags[name] = tuple(f"{tag} {t.count(tag)}/{len(side.runs)}" for tag in dict.fromkeys(t))
        metrics.append(replace(m, warnings=tags))
    return Comparison(a, b, diffs, tuple(workload_differences(a, b, OTHER_FIELDS)), tuple(metrics))


def compare_paths(a: str | Path, b: str | Path, allow_different: bool = False) -> Comparison:
    return compare_sides(collect_side(a), collect_side(b), allow_different)


# ---- text ---------------------------------------------------------------------------------------

def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")


def describe_workload(w: dict[str, Any]) -> str:
    return (f"{w['model']} {w['backend']} {w['precision']}, {w['mode']} mode, seq {w['seq']}, "
            f"batch {w['batch']}, {w['instances']} instance{'s' if w['instances'] != 1 else ''}; "
            f"{w['machine']}")


def render_comparison(c: Comparison) -> str:
    lines = []
    for name, s in (("A", c.a), ("B", c.b)):
        lines.append(f"{name}: {s.source}: {len(s.runs)} run{'s' if len(s.runs) != 1 else ''}, "
                     f"{describe_workload(s.runs[0].workload)}")
        for p, why in s.excluded:
            lines.append(f"   excluded {p}: {why}")
        for p, why in s.skipped:
            lines.append(f"   skipped {p}: {why}")
    if c.differences:
        lines.append("workloads differ (compared because of --allow-different):")
        lines += [f"   {d}" for d in c.differences]
    if c.other_differences:
        lines.append("also differ:")
        lines += [f"   {d}" for d in c.other_differences]
    head = (f"{'metric':<22} {'unit':<9} {'A':>9} {'B':>9} {'B/A':>7} {'95% CI':>15} {'p':>6}  "
            "verdict")
    lines += ["", head]
    for m in c.metrics:
        d = m.to_dict()
        ci = "-" if m.ci is None else f"{m.ci[0]:.3f}-{m.ci[1]:.3f}"
        p = "-" if m.p is None else f"{m.p:.3f}"
        verdict = m.reason if m.verdict == "inconclusive" else m.verdict
        warn = "; ".join(f"{k.upper()}: {', '.join(v)}" for k, v in m.warnings.items())
        lines.append(f"{m.metric:<22} {m.unit:<9} {_fmt(d['a']):>9} {_fmt(d['b']):>9} "
                     f"{'-' if m.ratio is None else f'{m.ratio:.3f}':>7} {ci:>15} {p:>6}  {verdict}"
                     + (f"   [warnings {warn}]" if warn else ""))
    lines += ["", f"A and B are medians over runs; {method_text()}"]
    for name, s in (("A", c.a), ("B", c.b)):
        for msg, n in grouped_warnings(s):
            lines.append(f"warning ({name}, {n} of {len(s.runs)} runs): {msg}")
    return "\n".join(lines)
