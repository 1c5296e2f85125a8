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

from numabench.errors import NumabenchError
from numabench.fileio import (
    read_text,
    write_json_atomic,  # noqa: F401  (the one atomic writer; re-exported)
)

RESULTS_SCHEMA = "numabench.results"
RESULTS_VERSION = 4
# Every version this numabench has written, and what changed (as pyperf keeps it). Each one is
# still read: a change only adds keys, so older documents lack them and nothing else.
VERSION_HISTORY = {
    1: "first version: raw timing columns, summary, machine, plan, workload, environment",
    2: "per-request queue time (worker start - coordinator send) as its own distribution "
       "(summary.queue, summary.instances[*].queue); repetition (launch --repeat)",
    3: "real text (--text): raw.tokens, each request's real (unpadded) token count, and "
       "summary.tokens {requests, real, padded, padding_overhead}; instances[*].bound (what the "
       "binder really bound); environment.binds_cpus, framework_defaults (--binder none, baselines)",
    4: "throughput mode: several forward passes per request (launch --loops; environment.loops): "
       "a sample is one pass, the passes of one request share its sent_ns and received_ns; "
       "latency, overhead and queue are per request (instances[*].requests), compute per pass "
       "(instances[*].passes)",
}

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
    tokens: int | None = None  # real text: the request's real token count, before padding

    @property
    def e2e_ns(self) -> int:
        return self.received_ns - self.sent_ns

    @property
    def overhead_ns(self) -> int:
        return self.e2e_ns - self.compute_ns

    @property
    def queue_ns(self) -> int:
        """Coordinator send → worker starts computing: encode, transport, wake-up, decode, and
        waiting behind earlier requests when several are in flight."""
        return self.start_ns - self.sent_ns

    to_worker_ns = queue_ns  # its name in results version 1


SAMPLE_COLUMNS = ("instance", "step", "batch", "sent_ns", "received_ns", "compute_ns", "start_ns")
TOKENS_COLUMN = "tokens"  # only in documents of runs on real text (version 3)


def percentile(sorted_values: list[int], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    """Statistics of ns durations; a percentile is None where the count cannot support it.

    `d["p50_ns"]` and `d.get(...)` read it as the JSON dict did, for code not yet switched."""

    count: int
    min_ns: int | None = None
    max_ns: int | None = None
    mean_ns: float | None = None
    stdev_ns: float | None = None
    p50_ns: float | None = None
    p90_ns: float | None = None
    p99_ns: float | None = None

    @classmethod
    def of(cls, values_ns, what: str = "", warnings: list[str] | None = None) -> Distribution:
        return cls.from_dict(describe(list(values_ns), what, warnings))

    def to_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0}
        return {k: getattr(self, k) for k in DISTRIBUTION_KEYS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Distribution:
        return cls(count=int(d.get("count") or 0), **{k: d.get(k) for k in DISTRIBUTION_KEYS[1:]})

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


DISTRIBUTION_KEYS = ("count", "min_ns", "max_ns", "mean_ns", "stdev_ns", "p50_ns", "p90_ns", "p99_ns")


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
class InstanceStats:
    """One instance's share of a run. Per request: latency = received - sent (coordinator),
    queue = its first pass's start - coordinator send (transport, decode and waiting behind
    earlier requests when several are in flight). Per forward pass: compute = the backend call
    (worker). One pass per request except in throughput mode with loops."""

    requests: int
    samples: int
    throughput: float  # samples/s over this instance's own window
    latency: Distribution
    compute: Distribution
    queue: Distribution
    passes: int | None = None  # None: one per request (documents before version 4)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "passes": self.passes if self.passes is not None else self.requests,
                "samples": self.samples, "throughput": self.throughput,
                "latency": self.latency.to_dict(), "compute": self.compute.to_dict(),
                "queue": self.queue.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceStats:
        return cls(requests=d["requests"], samples=d["samples"], throughput=d["throughput"],
                   latency=Distribution.from_dict(d["latency"]),
                   compute=Distribution.from_dict(d["compute"]),
                   queue=Distribution.from_dict(d.get("queue") or {"count": 0}),
                   passes=d.get("passes"))

    def __getitem__(self, key: str):  # reads like the JSON dict, for code not yet switched
        return getattr(self, key)


@dataclass(frozen=True)
class TokenStats:
    """Real text: tokens the requests really held vs the tokens computed after padding."""

    requests: int  # requests with a known real token count
    real: int
    padded: int  # what the model ran: rows x the padded length

    @property
    def padding_overhead(self) -> float | None:
        """padded / real: 1.0 means no padding; 4.0 means three quarters of the work is padding."""
        return self.padded / self.real if self.real else None

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "real": self.real, "padded": self.padded,
                "padding_overhead": self.padding_overhead}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenStats:
        return cls(requests=int(d["requests"]), real=int(d["real"]), padded=int(d["padded"]))


def token_stats(samples: list[Sample], seq: int | None) -> TokenStats | None:
    """Real vs padded tokens over the requests that carried real text (each padded to `seq`)."""
    known = [s for s in samples if s.tokens is not None]
    if not known or not seq:
        return None
    return TokenStats(len(known), sum(s.tokens for s in known), sum(s.batch * seq for s in known))


@dataclass(frozen=True)
class Summary:
    """What a run measured, derived from the samples (see `summarize`)."""

    samples: int
    window_ns: int
    throughput: float  # samples/s over the common window
    throughput_sum: float  # sum of per-instance throughputs over each instance's own window
    instances: dict[int, InstanceStats]
    step_latency: Distribution | None  # split mode: the step's max latency
    overhead: Distribution  # end-to-end - compute
    queue: Distribution  # worker start - coordinator send ("to_worker" in version 1)
    imbalance: float | None
    warnings: tuple[str, ...] = field(default=())
    tokens: TokenStats | None = None  # real text only

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "window_ns": self.window_ns,
            "throughput": self.throughput,
            "throughput_sum": self.throughput_sum,
            "instances": {str(k): v.to_dict() for k, v in self.instances.items()},
            "step_latency": self.step_latency.to_dict() if self.step_latency else None,
            "overhead": {**self.overhead.to_dict(), "to_worker": self.queue.to_dict()},
            "queue": self.queue.to_dict(),
            "imbalance": self.imbalance,
            "warnings": list(self.warnings),
            **({"tokens": self.tokens.to_dict()} if self.tokens is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        overhead = dict(d["overhead"])
        queue = d.get("queue") or overhead.get("to_worker") or {"count": 0}
        return cls(
            samples=d["samples"], window_ns=d["window_ns"], throughput=d["throughput"],
            throughput_sum=d["throughput_sum"],
            instances={int(k): InstanceStats.from_dict(v) for k, v in d["instances"].items()},
            step_latency=Distribution.from_dict(d["step_latency"]) if d.get("step_latency") else None,
            overhead=Distribution.from_dict(overhead), queue=Distribution.from_dict(queue),
            imbalance=d["imbalance"], warnings=tuple(d.get("warnings") or ()),
            tokens=TokenStats.from_dict(d["tokens"]) if d.get("tokens") else None)


def requests_of(samples: list[Sample]) -> list[list[Sample]]:
    """The requests behind the samples, in order: the passes of one request (throughput mode
    with loops) share its instance, sent_ns and received_ns; otherwise one sample each."""
    groups: dict[tuple[int, int, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.instance, s.sent_ns, s.received_ns), []).append(s)
    return list(groups.values())


def _request_overhead(passes: list[Sample]) -> int:
    """End-to-end minus the compute of all its passes."""
    return passes[0].e2e_ns - sum(s.compute_ns for s in passes)


def _request_queue(passes: list[Sample]) -> int:
    """Coordinator send to the first pass's start."""
    return min(s.queue_ns for s in passes)


def summarize(samples: list[Sample], mode: str, window_start_ns: int | None = None, *,
              seq: int | None = None) -> Summary:
    """Derive throughput and latency statistics (and, for real text, real vs padded tokens:
    `seq` is the length every request was padded to).

    The common window runs from the first send (or `window_start_ns`, the moment all instances
    were ready) to the last completion, so throughput is never inflated by instances that
    started late or finished early.
    """
    warnings: list[str] = []
    if not samples:
        empty = Distribution(0)
        return Summary(0, 0, 0.0, 0.0, {}, None, empty, empty, None, ("no samples were measured",))
    start = min(s.sent_ns for s in samples) if window_start_ns is None else window_start_ns
    end = max(s.received_ns for s in samples)
    window = max(end - start, 1)
    total = sum(s.batch for s in samples)
    per: dict[int, InstanceStats] = {}
    reqs = requests_of(samples)
    for iid in sorted({s.instance for s in samples}):
        mine = [s for s in samples if s.instance == iid]
        my_reqs = [r for r in reqs if r[0].instance == iid]
        own_window = max(max(s.received_ns for s in mine) - min(s.sent_ns for s in mine), 1)
        n = sum(s.batch for s in mine)
        per[iid] = InstanceStats(
            requests=len(my_reqs), samples=n, throughput=n / own_window * 1e9,
            latency=Distribution.of([r[0].e2e_ns for r in my_reqs], f"instance {iid} latency", warnings),
            compute=Distribution.of([s.compute_ns for s in mine]),
            queue=Distribution.of([_request_queue(r) for r in my_reqs]), passes=len(mine))
    step_latency = None
    if mode == "split":
        steps: dict[int, list[Sample]] = {}
        for s in samples:
            steps.setdefault(s.step, []).append(s)
        step_ns = [max(x.received_ns for x in g) - min(x.sent_ns for x in g) for g in steps.values()]
        step_latency = Distribution.of(step_ns, "step max latency", warnings)
    rates = [p.throughput for p in per.values()]
    imbalance = None
    if len(rates) > 1 and max(rates) > 0:
        imbalance = (max(rates) - min(rates)) / max(rates)
        if mode == "throughput" and imbalance > IMBALANCE_WARN:
            warnings.append(f"instances are imbalanced: slowest is {imbalance:.0%} below the fastest")
    return Summary(
        samples=total,
        window_ns=window,
        throughput=total / window * 1e9,
        throughput_sum=sum(rates),
        instances=per,
        step_latency=step_latency,
        overhead=Distribution.of([_request_overhead(r) for r in reqs]),
        queue=Distribution.of([_request_queue(r) for r in reqs]),
        imbalance=imbalance,
        warnings=tuple(warnings),
        tokens=token_stats(samples, seq),
    )


def summary_to_dict(s: Summary) -> dict[str, Any]:
    return s.to_dict()


def summary_from_dict(d: dict[str, Any]) -> Summary:
    return Summary.from_dict(d)


def samples_to_columns(samples: list[Sample]) -> dict[str, list[int]]:
    """Raw timings as columns: compact in JSON and loss-free (integer ns); a tokens column only
    when the requests carried real text."""
    cols = {c: [getattr(s, c) for s in samples] for c in SAMPLE_COLUMNS}
    if any(s.tokens is not None for s in samples):
        cols[TOKENS_COLUMN] = [s.tokens for s in samples]
    return cols


def samples_from_columns(cols: dict[str, list[int]]) -> list[Sample]:
    n = len(cols["instance"])
    tokens = cols.get(TOKENS_COLUMN)
    if tokens is not None and len(tokens) != n:
        raise ValueError(f"raw.{TOKENS_COLUMN} has {len(tokens)} values for {n} requests")
    return [Sample(*(int(cols[c][i]) for c in SAMPLE_COLUMNS),
                   tokens=None if tokens is None or tokens[i] is None else int(tokens[i]))
            for i in range(n)]


STATUSES = ("ok", "failed", "interrupted")


class ResultsError(NumabenchError):
    """A file is not a results document this numabench can read."""


@dataclass(frozen=True)
class RunResult:
    """One launch's results document: built here, written as JSON, read back by `load_result`.

    `status` is "ok" only when the run ended without an exception (launch decides it in a
    try/finally that starts from "failed"). `raw` samples are the record; `summary` derives
    from them. Plain-dict parts (machine, plan, workload, environment, instances) are the
    documents of their own modules, kept as they were written.
    """

    status: str
    error: str | None
    failed_instance: int | None
    created: str
    command: tuple[str, ...]
    run_dir: str
    machine: dict[str, Any]
    plan: dict[str, Any]
    workload: dict[str, Any]
    environment: dict[str, Any]
    instances: dict[str, Any]  # instance id -> {"asked": ..., "got": ...}
    window_start_ns: int | None
    samples: tuple[Sample, ...]
    summary: Summary
    warnings: tuple[str, ...]
    repetition: dict[str, Any] | None = None  # launch --repeat: {"index", "of", "fresh_workers"}
    experiment: dict[str, Any] | None = None  # sweep: which point this is
    # requests sent and never answered (a failed or interrupted run): columns instance, step,
    # batch, sent_ns
    unanswered: dict[str, list[int]] | None = None
    version: int = RESULTS_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "schema": RESULTS_SCHEMA,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "failed_instance": self.failed_instance,
            "created": self.created,
            "command": list(self.command),
            "run_dir": self.run_dir,
            "machine": self.machine,
            "plan": self.plan,
            "workload": self.workload,
            "environment": self.environment,
            "instances": self.instances,
            "raw": {"window_start_ns": self.window_start_ns, **samples_to_columns(list(self.samples)),
                    **({"unanswered": self.unanswered} if self.unanswered is not None else {})},
            "summary": self.summary.to_dict(),
            "warnings": list(self.warnings),
            "repetition": self.repetition,
        }
        if self.experiment is not None:
            doc["experiment"] = self.experiment
        return doc

    @classmethod
    def from_dict(cls, doc: Any, source: str = "results") -> RunResult:
        """Read a document; ResultsError names `source` and what is wrong."""
        if not isinstance(doc, dict) or doc.get("schema") != RESULTS_SCHEMA:
            raise ResultsError(f"{source}: not a numabench results document (no "
                               f"\"schema\": \"{RESULTS_SCHEMA}\")")
        version = doc.get("version")
        if version not in VERSION_HISTORY:
            newer = isinstance(version, int) and version > RESULTS_VERSION
            raise ResultsError(
                f"{source}: results version {version!r} is not supported (this numabench reads "
                f"versions {', '.join(map(str, VERSION_HISTORY))})"
                + ("; it was written by a newer numabench: upgrade to read it" if newer else ""))
        try:
            raw = dict(doc["raw"])
            samples = tuple(samples_from_columns(raw))
            return cls(
                status=doc["status"], error=doc.get("error"), failed_instance=doc.get("failed_instance"),
                created=doc.get("created", ""), command=tuple(doc.get("command") or ()),
                run_dir=doc.get("run_dir", ""), machine=doc.get("machine") or {},
                plan=doc.get("plan") or {}, workload=doc["workload"],
                environment=doc.get("environment") or {}, instances=doc.get("instances") or {},
                window_start_ns=raw.get("window_start_ns"), samples=samples,
                summary=Summary.from_dict(doc["summary"]), warnings=tuple(doc.get("warnings") or ()),
                repetition=doc.get("repetition"), experiment=doc.get("experiment"),
                unanswered=raw.get("unanswered"), version=version)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ResultsError(f"{source}: damaged results document ({type(e).__name__}: "
                               f"{str(e)[:120]})") from None


def load_result(path: str | os.PathLike) -> RunResult:
    """A results file as a RunResult; every failure is a ResultsError naming the file."""
    return RunResult.from_dict(load_results(path), source=os.fspath(path))


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file as its JSON dict (checked: schema and a known version)."""
    text = read_text(path, "results document")
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{os.fspath(path)}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != RESULTS_SCHEMA:
        raise ResultsError(f"{os.fspath(path)}: not a numabench results document")
    if doc.get("version") not in VERSION_HISTORY:
        RunResult.from_dict(doc, source=os.fspath(path))  # raises the version message
    return doc


def fmt_ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}"


def render_summary(s: Summary, warnings: list[str] | None = None) -> str:
    """The readable table printed after a run (`warnings` replaces the summary's own)."""
    looped = any(p.passes not in (None, p.requests) for p in s.instances.values())
    lines = [f"{'instance':>8} {'requests':>8} " + (f"{'passes':>8} " if looped else "")
             + f"{'samples':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'compute p50':>11} {'samples/s':>10}"]
    for iid, p in s.instances.items():
        lat = p.latency
        lines.append(f"{iid:>8} {p.requests:>8} " + (f"{p.passes:>8} " if looped else "")
                     + f"{p.samples:>8} {fmt_ms(lat.p50_ns):>8} "
                     f"{fmt_ms(lat.p90_ns):>8} {fmt_ms(lat.p99_ns):>8} "
                     f"{fmt_ms(p.compute.p50_ns):>11} {p.throughput:>10.2f}")
    if looped:
        lines.append("(p50/p90/p99: latency of a request of several forward passes; compute: one pass)")
    lines.append("")
    if s.step_latency:
        sl = s.step_latency
        lines.append(f"step max latency: p50 {fmt_ms(sl.p50_ns)} ms, p90 {fmt_ms(sl.p90_ns)} ms, "
                     f"p99 {fmt_ms(sl.p99_ns)} ms over {sl.count} steps")
    lines.append(f"throughput: {s.throughput:.2f} samples/s over the common window "
                 f"({s.window_ns / 1e9:.3f} s, {s.samples} samples)")
    lines.append(f"sum of per-instance throughputs: {s.throughput_sum:.2f} samples/s")
    if s.imbalance is not None:
        lines.append(f"imbalance (fastest vs slowest instance): {s.imbalance:.1%}")
    if s.tokens is not None and s.tokens.padding_overhead is not None:
        t = s.tokens
        lines.append(f"tokens: {t.real} real, {t.padded} computed after padding: padding overhead "
                     f"{t.padding_overhead:.2f}x (padded / real)")
    if s.overhead.count:
        lines.append(f"numabench overhead (end-to-end - compute, per request): p50 {s.overhead.p50_ns / 1e3:.0f} us"
                     f", of which queue (send to compute start) p50 {s.queue.p50_ns / 1e3:.0f} us")
    for w in s.warnings if warnings is None else warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
