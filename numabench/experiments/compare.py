"""Compare two results documents: each metric's ratio B/A and a significance test on raw samples.

The test is the two-sided Mann-Whitney U test (rank based: no normality assumed, robust to the
long tails latencies have). scipy computes it where installed; without scipy the same U statistic
is tested by permutation with numpy (exact enough for small samples), or by its normal
approximation with tie correction for large ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ALPHA = 0.05
MIN_SAMPLES = 5  # fewer values on either side: no test
PERMUTATIONS = 10_000
PERMUTATION_MAX_N = 5_000  # above: normal approximation


@dataclass(frozen=True)
class Test:
    p: float | None
    method: str


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    unit: str
    a: float | None  # median (or the single value) of A
    b: float | None
    ratio: float | None  # b / a
    n_a: int
    n_b: int
    test: Test
    better: str  # "lower" or "higher"

    @property
    def verdict(self) -> str:
        if self.test.p is None:
            return f"no test ({self.test.method})"
        if self.test.p >= ALPHA:
            return "not significant"
        if self.ratio is None or self.ratio == 1:
            return "significant"
        good = (self.ratio < 1) == (self.better == "lower")
        return f"significant: B {'better' if good else 'worse'}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "unit": self.unit, "a": self.a, "b": self.b,
                "ratio": self.ratio, "n_a": self.n_a, "n_b": self.n_b, "p": self.test.p,
                "test": self.test.method, "better": self.better, "verdict": self.verdict}


# ---- the test ----------------------------------------------------------------------------------

def rank(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def u_statistic(a: np.ndarray, b: np.ndarray) -> float:
    r = rank(np.concatenate([a, b]))
    return float(r[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0)


def permutation_test(a, b, permutations: int = PERMUTATIONS, seed: int = 0) -> Test:
    """Two-sided test of U by relabelling: p = (extreme relabellings + 1) / (permutations + 1)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, n = len(a), len(a) + len(b)
    ranks = rank(np.concatenate([a, b]))
    center = na * (n + 1) / 2.0  # expected rank sum of A under the null
    observed = abs(ranks[:na].sum() - center)
    rng = np.random.default_rng(seed)
    extreme, done = 0, 0
    chunk = max(1, 2_000_000 // n)
    while done < permutations:
        k = min(chunk, permutations - done)
        perm = rng.permuted(np.broadcast_to(ranks, (k, n)).copy(), axis=1)
        sums = perm[:, :na].sum(axis=1)
        extreme += int(np.count_nonzero(np.abs(sums - center) >= observed - 1e-9))
        done += k
    return Test((extreme + 1) / (permutations + 1), f"Mann-Whitney U, {permutations} permutations")


def normal_test(a, b) -> Test:
    """U's normal approximation with tie and continuity correction (as scipy's 'asymptotic')."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = len(a), len(b)
    n = na + nb
    u = u_statistic(a, b)
    _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    ties = float((counts ** 3 - counts).sum())
    var = na * nb / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:
        return Test(1.0, "Mann-Whitney U, normal approximation (all values equal)")
    z = (abs(u - na * nb / 2.0) - 0.5) / math.sqrt(var)
    return Test(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))), "Mann-Whitney U, normal approximation")


def significance(a, b, use_scipy: bool = True) -> Test:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < MIN_SAMPLES or len(b) < MIN_SAMPLES:
        return Test(None, f"needs {MIN_SAMPLES}+ samples on each side")
    if use_scipy:
        try:
            from scipy.stats import mannwhitneyu
        except ImportError:
            pass
        else:
            if np.all(a == a[0]) and np.all(b == a[0]):
                return Test(1.0, "Mann-Whitney U (scipy)")
            return Test(float(mannwhitneyu(a, b, alternative="two-sided").pvalue), "Mann-Whitney U (scipy)")
    if len(a) + len(b) <= PERMUTATION_MAX_N:
        return permutation_test(a, b)
    return normal_test(a, b)


# ---- metrics from a results document ------------------------------------------------------------

def _raw(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    raw = doc.get("raw") or {}
    return {k: np.asarray(v, dtype=np.int64) for k, v in raw.items() if isinstance(v, list)}


def metric_samples(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per-request and per-step samples (ms) that the tests run on."""
    r = _raw(doc)
    if "sent_ns" not in r or not len(r["sent_ns"]):
        return {}
    e2e = (r["received_ns"] - r["sent_ns"]) / 1e6
    out = {"request latency": e2e, "compute time": r["compute_ns"] / 1e6,
           "overhead": e2e - r["compute_ns"] / 1e6}
    if doc["workload"]["mode"] == "split":
        steps = np.unique(r["step"])
        out["step max latency"] = np.array(
            [(r["received_ns"][r["step"] == s].max() - r["sent_ns"][r["step"] == s].min()) / 1e6
             for s in steps])
    return out


def compare_docs(a: dict[str, Any], b: dict[str, Any], use_scipy: bool = True) -> list[MetricComparison]:
    sa, sb = metric_samples(a), metric_samples(b)
    out = []
    for name in ("request latency", "step max latency", "compute time", "overhead"):
        if name not in sa or name not in sb:
            continue
        ma, mb = float(np.median(sa[name])), float(np.median(sb[name]))
        out.append(MetricComparison(name, "ms (median)", ma, mb, mb / ma if ma else None,
                                    len(sa[name]), len(sb[name]),
                                    significance(sa[name], sb[name], use_scipy), "lower"))
    ta, tb = a["summary"]["throughput"], b["summary"]["throughput"]
    # One number per run: its significance is that of the latencies it is made of.
    basis = next((c for c in out if c.metric == ("step max latency" if a["workload"]["mode"] == "split"
                                                   and b["workload"]["mode"] == "split" else "request latency")), None)
    test = (Test(basis.test.p, f"from the {basis.metric} test") if basis is not None
            else Test(None, "one value per run"))
    out.insert(0, MetricComparison("throughput", "samples/s", ta, tb, tb / ta if ta else None, 1, 1,
                                   test, "higher"))
    return out


def describe_run(doc: dict[str, Any]) -> str:
    w, plan = doc["workload"], doc["plan"]
    n = len(plan["instances"])
    threads = plan["instances"][0]["threads"]
    return (f"{w['model']} {w['backend']} {w['precision']}, seq {w['seq']}, batch {plan['batch']}, "
            f"{n} instance{'s' if n > 1 else ''} x {threads} threads{' +SMT' if plan.get('smt') else ''}, "
            f"{w['mode']} mode; {doc['environment'].get('hostname', '?')}, {doc.get('created', '?')}")


def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")


def render_comparison(a_name: str, a: dict[str, Any], b_name: str, b: dict[str, Any],
                      rows: list[MetricComparison]) -> str:
    lines = [f"A: {a_name}: {describe_run(a)}", f"B: {b_name}: {describe_run(b)}"]
    if a.get("status") != "ok" or b.get("status") != "ok":
        lines.append(f"warning: run status A {a.get('status')}, B {b.get('status')}: partial results")
    head = f"{'metric':<18} {'unit':<12} {'A':>10} {'B':>10} {'B/A':>7} {'p':>8}  verdict"
    lines += ["", head]
    for r in rows:
        p = "-" if r.test.p is None else (f"{r.test.p:.3f}" if r.test.p >= 0.001 else "<0.001")
        lines.append(f"{r.metric:<18} {r.unit:<12} {_fmt(r.a):>10} {_fmt(r.b):>10} "
                     f"{'-' if r.ratio is None else f'{r.ratio:.3f}':>7} {p:>8}  {r.verdict}")
    methods = sorted({r.test.method for r in rows})
    lines += ["", f"test: {'; '.join(methods)}; two-sided, significant where p < {ALPHA}"]
    return "\n".join(lines)
