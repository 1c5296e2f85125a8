"""Run results: raw timings (integer ns), their statistics, and the versioned JSON document.

The raw samples are the record; every summary number is derived from them here, with the
sample-count rules and stability warnings in one place.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

from numabench.fileio import write_json_atomic  # noqa: F401  (the one atomic writer; re-exported)

RESULTS_SCHEMA = "numabench.results"
RESULTS_VERSION = 1

# A percentile is only reported when enough samples back it: p90 needs 10, p99 needs 100.
PERCENTILE_MIN_SAMPLES = {50: 1, 90: 10, 99: 100}
UNSTABLE_CV = 0.10  # stdev above 10% of the mean
IMBALANCE_WARN = 0.10  # fastest vs slowest instance throughput


@dataclass(frozen=True)
class Sample:
    """One request to one instance. Times are time.monotonic_ns() on this host."""

    instance: int
    step: int  # split mode: the step it belongs to; throughput mode: the instance's request index
    batch: int
    sent_ns: int  # coordinator, just before sending
    received_ns: int  # coordinator, right after the reply arrived
    compute_ns: int  # worker, the backend call only
    start_ns: int  # worker, when the backend call began (same clock as sent_ns)

    @property
    def e2e_ns(self) -> int:
        return self.received_ns - self.sent_ns

    @property
    def overhead_ns(self) -> int:
        return self.e2e_ns - self.compute_ns

    @property
    def to_worker_ns(self) -> int:
        """Coordinator send → worker starts computing: encode, transport, wake-up, decode."""
        return self.start_ns - self.sent_ns


SAMPLE_COLUMNS = ("instance", "step", "batch", "sent_ns", "received_ns", "compute_ns", "start_ns")


def percentile(sorted_values: list[int], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def describe(values_ns: list[int], what: str, warnings: list[str] | None = None) -> dict[str, Any]:
    """Summary of a list of ns durations; percentiles only where the count supports them."""
    vals = sorted(values_ns)
    out: dict[str, Any] = {"count": len(vals)}
    if not vals:
        return out
    mean = statistics.fmean(vals)
    out.update(min_ns=vals[0], max_ns=vals[-1], mean_ns=mean)
    out["stdev_ns"] = statistics.stdev(vals) if len(vals) > 1 else None
    for q, need in PERCENTILE_MIN_SAMPLES.items():
        out[f"p{q}_ns"] = percentile(vals, q) if len(vals) >= need else None
    if warnings is not None:
        if len(vals) < PERCENTILE_MIN_SAMPLES[90]:
            warnings.append(f"{what}: only {len(vals)} samples, p90/p99 not reported; use more --iterations")
        elif len(vals) < PERCENTILE_MIN_SAMPLES[99]:
            warnings.append(f"{what}: {len(vals)} samples, p99 not reported (needs 100)")
        if out["stdev_ns"] is not None and mean > 0 and out["stdev_ns"] / mean > UNSTABLE_CV:
            warnings.append(f"{what}: unstable, stdev is {out['stdev_ns'] / mean:.0%} of the mean")
    return out


@dataclass(frozen=True)
class Summary:
    """What a run measured, derived from the samples (see `summarize`)."""

    samples: int
    window_ns: int
    throughput: float  # samples/s over the common window
    throughput_sum: float  # sum of per-instance throughputs over each instance's own window
    instances: dict[int, dict[str, Any]]
    step_latency: dict[str, Any] | None  # split mode: the step's max latency
    overhead: dict[str, Any]
    imbalance: float | None
    warnings: tuple[str, ...] = field(default=())


def summarize(samples: list[Sample], mode: str, window_start_ns: int | None = None) -> Summary:
    """Derive throughput and latency statistics.

    The common window runs from the first send (or `window_start_ns`, the moment all instances
    were ready) to the last completion, so throughput is never inflated by instances that
    started late or finished early.
    """
    warnings: list[str] = []
    if not samples:
        return Summary(0, 0, 0.0, 0.0, {}, None, {"count": 0}, None, ("no samples were measured",))
    start = min(s.sent_ns for s in samples) if window_start_ns is None else window_start_ns
    end = max(s.received_ns for s in samples)
    window = max(end - start, 1)
    total = sum(s.batch for s in samples)
    per: dict[int, dict[str, Any]] = {}
    for iid in sorted({s.instance for s in samples}):
        mine = [s for s in samples if s.instance == iid]
        own_window = max(max(s.received_ns for s in mine) - min(s.sent_ns for s in mine), 1)
        n = sum(s.batch for s in mine)
        per[iid] = {
            "requests": len(mine),
            "samples": n,
            "throughput": n / own_window * 1e9,
            "latency": describe([s.e2e_ns for s in mine], f"instance {iid} latency", warnings),
            "compute": describe([s.compute_ns for s in mine], f"instance {iid} compute"),
        }
    step_latency = None
    if mode == "split":
        steps: dict[int, list[Sample]] = {}
        for s in samples:
            steps.setdefault(s.step, []).append(s)
        step_ns = [max(x.received_ns for x in g) - min(x.sent_ns for x in g) for g in steps.values()]
        step_latency = describe(step_ns, "step max latency", warnings)
    rates = [p["throughput"] for p in per.values()]
    imbalance = None
    if len(rates) > 1 and max(rates) > 0:
        imbalance = (max(rates) - min(rates)) / max(rates)
        if mode == "throughput" and imbalance > IMBALANCE_WARN:
            warnings.append(f"instances are imbalanced: slowest is {imbalance:.0%} below the fastest")
    overhead = describe([s.overhead_ns for s in samples], "overhead")
    overhead["to_worker"] = describe([s.to_worker_ns for s in samples], "overhead to worker")
    return Summary(
        samples=total,
        window_ns=window,
        throughput=total / window * 1e9,
        throughput_sum=sum(rates),
        instances=per,
        step_latency=step_latency,
        overhead=overhead,
        imbalance=imbalance,
        warnings=tuple(warnings),
    )


def summary_to_dict(s: Summary) -> dict[str, Any]:
    return {
        "samples": s.samples,
        "window_ns": s.window_ns,
        "throughput": s.throughput,
        "throughput_sum": s.throughput_sum,
        "instances": {str(k): v for k, v in s.instances.items()},
        "step_latency": s.step_latency,
        "overhead": s.overhead,
        "imbalance": s.imbalance,
        "warnings": list(s.warnings),
    }


def samples_to_columns(samples: list[Sample]) -> dict[str, list[int]]:
    """Raw timings as columns: compact in JSON and loss-free (integer ns)."""
    return {c: [getattr(s, c) for s in samples] for c in SAMPLE_COLUMNS}


def samples_from_columns(cols: dict[str, list[int]]) -> list[Sample]:
    n = len(cols["instance"])
    return [Sample(*(int(cols[c][i]) for c in SAMPLE_COLUMNS)) for i in range(n)]


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: not a numabench results document")
    if doc.get("version") != RESULTS_VERSION:
        raise ValueError(f"{path}: results version {doc.get('version')} is not supported "
                         f"(this numabench reads version {RESULTS_VERSION})")
    return doc


def fmt_ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}"


def render_summary(s: Summary, warnings: list[str] | None = None) -> str:
    """The readable table printed after a run (`warnings` replaces the summary's own)."""
    lines = [f"{'instance':>8} {'requests':>8} {'samples':>8} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'compute p50':>11} {'samples/s':>10}"]
    for iid, p in s.instances.items():
        lat, comp = p["latency"], p["compute"]
        lines.append(f"{iid:>8} {p['requests']:>8} {p['samples']:>8} {fmt_ms(lat.get('p50_ns')):>8} "
                     f"{fmt_ms(lat.get('p90_ns')):>8} {fmt_ms(lat.get('p99_ns')):>8} "
                     f"{fmt_ms(comp.get('p50_ns')):>11} {p['throughput']:>10.2f}")
    lines.append("")
    if s.step_latency:
        sl = s.step_latency
        lines.append(f"step max latency: p50 {fmt_ms(sl.get('p50_ns'))} ms, p90 {fmt_ms(sl.get('p90_ns'))} ms, "
                     f"p99 {fmt_ms(sl.get('p99_ns'))} ms over {sl['count']} steps")
    lines.append(f"throughput: {s.throughput:.2f} samples/s over the common window "
                 f"({s.window_ns / 1e9:.3f} s, {s.samples} samples)")
    lines.append(f"sum of per-instance throughputs: {s.throughput_sum:.2f} samples/s")
    if s.imbalance is not None:
        lines.append(f"imbalance (fastest vs slowest instance): {s.imbalance:.1%}")
    ov = s.overhead
    if ov.get("count"):
        lines.append(f"numabench overhead (end-to-end - compute): p50 {ov['p50_ns'] / 1e3:.0f} us")
    for w in s.warnings if warnings is None else warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def summary_from_dict(d: dict[str, Any]) -> Summary:
    return Summary(
        samples=d["samples"], window_ns=d["window_ns"], throughput=d["throughput"],
        throughput_sum=d["throughput_sum"],
        instances={int(k): v for k, v in d["instances"].items()},
        step_latency=d["step_latency"], overhead=d["overhead"], imbalance=d["imbalance"],
        warnings=tuple(d["warnings"]),
    )
