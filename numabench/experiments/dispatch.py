"""Dispatch experiments: an open-loop Poisson stream of mixed-length requests, served by the real
`numabench serve` under two or more plans on the same cores (docs/experiments.md, `dispatch`).

Each point is one plan x pad x offered rate (x repetition). The point starts the daemon through
its command line (`python -m numabench serve --plan ... --pad ...`, its ipc socket in a private
temporary folder), so the routing, padding, queues and credits measured are serve's own; waits
until every instance is ready; sends the stream on schedule whatever the replies (open loop);
reads per-pool load from STATUS; stops and reaps the daemon, always. Every plan of a repetition
sees the same requests: the arrival times and lengths are drawn from the seed and the
repetition only (a higher rate is the same sequence, compressed in time).

The sweep runner (experiments/runner.py) keeps what it does for every kind (manifest, point
files, resume, Ctrl-C): a DispatchExecutor is its executor hook, running each point here.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from numabench import __version__
from numabench.errors import LaunchError, NumabenchError
from numabench.experiments.spec import MAX_POINTS, Experiment, ExperimentError, LengthMix, PlanChoice
from numabench.plans.model import Plan, SeqRange
from numabench.topology.model import Machine

DISPATCH_SCHEMA = "numabench.dispatch"
DISPATCH_VERSION = 1
START_DELAY_NS = 100_000_000  # the first arrival, after the client is connected
READY_TIMEOUT_S = 900.0  # the daemon gives each instance 600 s to warm up
DRAIN_S = 130.0  # replies still missing this long after the last send are "lost" (serve's request timeout is 120 s)
STOP_TIMEOUT_S = 60.0
LOG_TAIL = 2000
MAX_ID = 30_000  # random token ids stay under this (below every built-in vocabulary's size)


class DispatchError(LaunchError):
    """A dispatch point could not run: the daemon did not start, died, or did not stop."""


# ---- points ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DispatchPoint:
    """One plan x pad x rate x repetition. The parameters name the point file and, compared on
    --resume, decide whether an earlier result still stands (plan_digest: the served plan)."""

    plan: str
    source: str  # how the plan was given (preset, file, shape)
    shape: str  # its pools, e.g. "1-32: 1x8c, 33-384: 1x16c"
    pad: str
    rate: float
    repetition: int
    model: str
    backend: str
    precision: str
    lengths: tuple[tuple[str, Any], ...]
    duration_s: float | None
    requests: int | None
    warmup: int
    seed: int
    backend_options: tuple[tuple[str, Any], ...] = ()
    queue_size: int | None = None
    inflight: int | None = None
    plan_digest: str = ""

    @property
    def id(self) -> str:
        return f"{self.plan}_pad-{self.pad}_rate{self.rate:g}_r{self.repetition}"

    @property
    def label(self) -> str:
        rep = f", repetition {self.repetition + 1}" if self.repetition else ""
        return f"{self.plan} ({self.shape}), pad {self.pad}, {self.rate:g} requests/s{rep}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lengths"] = dict(self.lengths)
        d["backend_options"] = dict(self.backend_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DispatchPoint:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["lengths"] = tuple(dict(kw.get("lengths") or {}).items())
        kw["backend_options"] = tuple(sorted(dict(kw.get("backend_options") or {}).items()))
        return cls(**kw)


def pool_shape(plan: Plan) -> str:
    """'1-32: 1x8c, 33-384: 1x16c' — each pool's range and its instances' cores."""
    pools: dict[str, list[int]] = defaultdict(list)
    for inst in plan.instances:
        pools[_range_name(inst.seq_range)].append(len(inst.cpus))
    parts = []
    for name, sizes in pools.items():
        sizes_s = (f"{len(sizes)}x{sizes[0]}c" if len(set(sizes)) == 1
                   else "+".join(f"{s}c" for s in sizes))
        parts.append(f"{name}: {sizes_s}")
    return ", ".join(parts)


def _range_name(r: SeqRange | None) -> str:
    if r is None:
        return "all"
    return f"{r.min}-{r.max}" if r.max is not None else f"{r.min}-"


def served_plan(choice: PlanChoice, machine: Machine, mix: LengthMix) -> Plan:
    """The plan the daemon is started with. A plan without seq ranges is one pool; it gets the
    range 1..longest request of the mix, so that --pad max pads to the longest request the
    stream holds rather than to the model's positions."""
    from numabench.plans import plan_for_launch

    if choice.file:
        plan = plan_for_launch(machine, plan_file=choice.file)
    elif choice.preset:
        plan = plan_for_launch(machine, preset=choice.preset)
    else:
        plan = plan_for_launch(machine, instances=choice.instances,
                               cores_per_instance=choice.cores_per_instance, smt=choice.smt)
    if all(i.seq_range is None for i in plan.instances):
        cap = SeqRange(1, mix.max)
        plan = replace(plan, instances=tuple(replace(i, seq_range=cap) for i in plan.instances))
    return plan


def _check_coverage(name: str, plan: Plan, mix: LengthMix) -> None:
    """Every length the mix can draw must have a pool (else the daemon answers 'no pool')."""
    low, high = mix.min, mix.max
    ranges = sorted({i.seq_range for i in plan.instances}, key=lambda r: r.min)
    gaps, at = [], low
    for r in ranges:
        if r.min > at and at <= high:
            gaps.append((at, min(r.min - 1, high)))
        if r.max is None:
            at = high + 1
            break
        at = max(at, r.max + 1)
    if at <= high:
        gaps.append((at, high))
    if mix.values:  # a file of lengths: only the lengths it holds matter
        gaps = [g for g in gaps if any(g[0] <= v <= g[1] for v in mix.values)]
    if gaps:
        where = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gaps)
        raise NumabenchError(f"plan {name!r} has no pool for request lengths {where} of the mix "
                             f"(its pools: {pool_shape(plan)}); widen its seq ranges or narrow "
                             "lengths")


def _digest(plan: Plan) -> str:
    from numabench.plans.yamlio import dump_plan

    return hashlib.sha256(dump_plan(plan).encode()).hexdigest()[:12]


def plan_dispatch(exp: Experiment, machine: Machine) -> tuple[tuple[DispatchPoint, ...], tuple[Plan, ...]]:
    """Every point of a dispatch experiment with the plan it serves, all checked on this machine
    before anything runs: each plan made and validated, all on the same cores, every length of
    the mix served by a pool, the model and backend usable. Raises ExperimentError naming them."""
    from numabench.topology.cpulist import format_cpulist
    from numabench.workers.backends import check_backend

    d = exp.dispatch
    assert d is not None
    errors = []
    if d.lengths.distribution == "texts":  # the lengths are the tokenized texts'
        try:
            lengths = [len(t) for t in tokenize_texts(d.lengths, exp.models[0])]
            d = replace(d, lengths=replace(d.lengths, min=min(lengths), max=max(lengths)))
        except (NumabenchError, OSError, ValueError) as e:
            raise ExperimentError(f"cannot tokenize {d.lengths.file} with {exp.models[0]}'s "
                                  f"tokenizer: {e}", where=exp.where("lengths.texts")) from None
    plans: dict[str, Plan] = {}
    for k, choice in enumerate(d.plans):
        try:
            plan = served_plan(choice, machine, d.lengths)
            _check_coverage(choice.name, plan, d.lengths)
            plans[choice.name] = plan
        except NumabenchError as e:
            errors.append(f"plans[{k}] {choice.name} ({choice.describe()}): {e}")
    made = list(plans.items())
    for name, plan in made[1:]:
        first, cpus = made[0], set(plan.cpus)
        if cpus != set(first[1].cpus):
            errors.append(f"plan {name!r} runs on CPUs {format_cpulist(sorted(cpus))} but "
                          f"{first[0]!r} on {format_cpulist(sorted(first[1].cpus))}: a dispatch "
                          "comparison needs every plan on the same cores")
    extra = sorted(set(dict(exp.backend_options)) - {"compute_ns"})
    if extra:
        errors.append(f"backend_options {', '.join(extra)}: serve takes only compute_ns (noop)")
    try:
        check_backend(exp.backends[0], exp.precisions[0], dict(exp.backend_options))
    except NumabenchError as e:
        errors.append(str(e))
    if errors:
        raise ExperimentError(f"{len(errors)} problem{'s' if len(errors) > 1 else ''} before any "
                              "point can run on this machine:\n  " + "\n  ".join(errors),
                              where=exp.where("plans"))
    total = exp.repetitions * len(d.rates) * len(d.pads) * len(d.plans)
    if total > MAX_POINTS:
        raise ExperimentError(f"{total} points is more than {MAX_POINTS}: shorten an axis or "
                              "lower repetitions", where=exp.where("rate"))
    # Plans innermost: the setups compared run next to each other in time, so a drift of the
    # machine (another job, a clock change) hits them alike.
    points, point_plans = [], []
    for rep in range(exp.repetitions):
        for rate in d.rates:
            for pad in d.pads:
                for choice in d.plans:
                    plan = plans[choice.name]
                    points.append(DispatchPoint(
                        plan=choice.name, source=choice.describe(), shape=pool_shape(plan), pad=pad,
                        rate=rate, repetition=rep, model=exp.models[0], backend=exp.backends[0],
                        precision=exp.precisions[0], lengths=tuple(d.lengths.to_dict().items()),
                        duration_s=d.duration_s, requests=d.requests, warmup=exp.warmup,
                        seed=exp.seed, backend_options=exp.backend_options,
                        queue_size=d.queue_size, inflight=d.inflight, plan_digest=_digest(plan)))
                    point_plans.append(plan)
    return tuple(points), tuple(point_plans)


# ---- the request stream (pure, seeded) -------------------------------------------------------------

def arrivals(seed: int, repetition: int, rate: float, duration_s: float | None,
             requests: int | None) -> np.ndarray:
    """Poisson arrival offsets (ns from the start): exponential gaps of mean 1/rate. The unit
    gaps depend on the seed and repetition only, so every rate replays the same sequence."""
    rng = np.random.default_rng([seed, repetition, 1])
    if requests is not None:
        unit = np.cumsum(rng.exponential(1.0, requests))
    else:  # as many as fall inside the duration
        want = duration_s * rate
        unit = np.cumsum(rng.exponential(1.0, int(want + 10 * np.sqrt(want) + 10)))
        unit = unit[unit < want]
    return (unit / rate * 1e9).astype(np.int64)


def draw_lengths(mix: LengthMix, seed: int, repetition: int, n: int,
                 text_lengths: list[int] | None = None) -> np.ndarray:
    """n request lengths (tokens) from the mix; for texts, indexes into the texts instead."""
    rng = np.random.default_rng([seed, repetition, 2])
    if mix.distribution == "uniform":
        return rng.integers(mix.min, mix.max + 1, size=n)
    if mix.distribution == "lognormal":  # truncated to [min, max] by drawing again
        out = np.empty(0, dtype=np.int64)
        for _ in range(100):
            draw = np.rint(rng.lognormal(np.log(mix.median), mix.sigma, size=max(n, 16))).astype(np.int64)
            out = np.concatenate([out, draw[(draw >= mix.min) & (draw <= mix.max)]])
            if len(out) >= n:
                return out[:n]
        return np.clip(np.concatenate([out, np.full(n, int(mix.median))]), mix.min, mix.max)[:n]
    if mix.distribution == "file":
        return np.asarray(mix.values, dtype=np.int64)[rng.integers(0, len(mix.values), size=n)]
    assert text_lengths is not None
    return rng.integers(0, len(text_lengths), size=n)  # texts: which text each request sends


def tokenize_texts(mix: LengthMix, model: str) -> list[np.ndarray]:
    """The texts file, one text a line, as token ids from the model's tokenizer (truncated to
    the model's positions)."""
    from numabench.fileio import read_text
    from numabench.workers.models import load_tokenizer, resolve_model

    spec = resolve_model(model)
    tok = load_tokenizer(spec)
    if tok is None:
        raise NumabenchError(f"lengths.texts needs a tokenizer; {model} has none")
    text = read_text(mix.file, "texts file")
    if mix.digest and hashlib.sha256(text.encode()).hexdigest()[:12] != mix.digest:
        raise NumabenchError(f"{mix.file} changed since the experiment was checked; run the sweep again")
    texts = [t.strip() for t in text.splitlines() if t.strip()]
    limit = spec.max_positions or 512
    return [np.asarray(tok(t, truncation=True, max_length=limit)["input_ids"], dtype=np.int64)
            for t in texts]


# ---- the daemon, as a subprocess ------------------------------------------------------------------

class _Daemon:
    """`numabench serve` for one point: started, waited for, always stopped and reaped."""

    def __init__(self, point: DispatchPoint, plan_file: Path, run_dir: Path, binder: str,
                 allocator: str):
        self.runtime = Path(tempfile.mkdtemp(prefix="nb-dispatch-"))  # 0700: a private folder
        self.endpoint = f"ipc://{self.runtime}/serve.sock"
        self.log_path = run_dir / "daemon.log"
        cmd = [sys.executable, "-m", "numabench", "serve", "--plan", str(plan_file),
               "--model", point.model, "--backend", point.backend, "--precision", point.precision,
               "--pad", point.pad, "--bind", self.endpoint, "--run-dir", str(run_dir / "serve"),
               "--warmup", str(point.warmup), "--seed", str(point.seed), "--binder", binder,
               "--allocator", allocator]
        if point.queue_size is not None:
            cmd += ["--queue-size", str(point.queue_size)]
        if point.inflight is not None:
            cmd += ["--inflight", str(point.inflight)]
        compute_ns = dict(point.backend_options).get("compute_ns")
        if compute_ns is not None:
            cmd += ["--compute-us", str(compute_ns / 1000)]
        self.cmd = cmd
        env = {**os.environ, "NUMABENCH_RUNTIME_DIR": str(self.runtime)}
        env.pop("NUMABENCH_ENDPOINT", None)
        self.log = open(self.log_path, "wb")
        try:
            # its own session: a terminal's Ctrl-C reaches us, and we stop it (drained, reaped)
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except BaseException:
            self.log.close()
            shutil.rmtree(self.runtime, ignore_errors=True)
            raise

    def tail(self) -> str:
        try:
            text = self.log_path.read_bytes()[-LOG_TAIL:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n    " + "\n    ".join(text.strip().splitlines()[-12:])

    def wait_ready(self, client, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """The status document once every instance is ready; DispatchError if the daemon exits,
        gives an instance up, or is not ready in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DispatchError(f"the daemon exited with code {self.proc.returncode} before it "
                                    f"was ready (log {self.log_path}):{self.tail()}")
            try:
                status = client.status(timeout_s=1.0)
            except NumabenchError:  # not listening yet
                continue
            failed = [i for i in status.get("instances", []) if i.get("state") == "failed"]
            if failed:
                raise DispatchError(f"the daemon gave up instance {failed[0].get('id')}: "
                                    f"{failed[0].get('last_error')} (log {self.log_path}):{self.tail()}")
            if status.get("state") == "serving":
                return status
            time.sleep(0.2)
        raise DispatchError(f"the daemon was not ready within {timeout_s:.0f} s (log "
                            f"{self.log_path}):{self.tail()}")

    def stop(self) -> None:
        """STOP over the socket (drain, workers stopped), then SIGTERM, then SIGKILL of its
        process group; always reaped. Signals wait meanwhile: a second Ctrl-C must not leave
        the daemon behind."""
        held = _hold_signals()
        try:
            if self.proc.poll() is None:
                from numabench.daemon.client import Client

                try:
                    with Client(self.endpoint, timeout_s=5.0) as c:
                        c.stop(timeout_s=STOP_TIMEOUT_S)
                except NumabenchError:
                    pass
                for sig, wait_s in ((None, STOP_TIMEOUT_S), (signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
                    if sig is not None:
                        try:
                            os.killpg(self.proc.pid, sig)
                        except ProcessLookupError:
                            pass
                    try:
                        self.proc.wait(timeout=wait_s)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            self.proc.wait()
        finally:
            self.log.close()
            shutil.rmtree(self.runtime, ignore_errors=True)
            _restore_signals(held)


def _hold_signals() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        held[sig] = signal.signal(sig, signal.SIG_IGN)
    return held


def _restore_signals(held: dict) -> None:
    for sig, handler in held.items():
        signal.signal(sig, handler)


# ---- one point ------------------------------------------------------------------------------------

@dataclass
class _Records:
    """Per request: scheduled, sent and reply times (monotonic ns), reply status, pool, padding."""

    offsets_ns: np.ndarray  # from the stream's start
    scheduled_ns: np.ndarray
    seq: np.ndarray
    sent_ns: np.ndarray
    received_ns: np.ndarray
    status: list[str]
    pool: list[str | None]
    instance: list[int | None]
    padded_seq: list[int | None]


def drive(client, offsets_ns: np.ndarray, payloads: list[np.ndarray], drain_s: float = DRAIN_S) -> _Records:
    """Send request k at start + offsets_ns[k] whether or not earlier ones were answered (open
    loop), reading replies while waiting; then wait up to drain_s for the missing replies."""
    n = len(offsets_ns)
    rec = _Records(offsets_ns=np.asarray(offsets_ns, np.int64), scheduled_ns=np.zeros(n, np.int64),
                   seq=np.array([len(p) for p in payloads], np.int64), sent_ns=np.zeros(n, np.int64),
                   received_ns=np.zeros(n, np.int64), status=["lost"] * n, pool=[None] * n,
                   instance=[None] * n, padded_seq=[None] * n)
    missing = set()

    def take(reply) -> None:
        k = reply.id
        if isinstance(k, int) and k in missing:
            missing.discard(k)
            rec.received_ns[k] = reply.received_ns
            rec.status[k] = reply.status
            rec.pool[k] = reply.pool
            rec.instance[k] = reply.instance
            rec.padded_seq[k] = reply.header.get("padded_seq")

    start = time.monotonic_ns() + START_DELAY_NS
    rec.scheduled_ns[:] = start + offsets_ns
    for k in range(n):
        while (left := int(rec.scheduled_ns[k]) - time.monotonic_ns()) > 0:
            reply = client.recv(left / 1e9)
            if reply is not None:
                take(reply)
        missing.add(k)
        client.send_infer(input_ids=payloads[k], req_id=k)
        rec.sent_ns[k] = time.monotonic_ns()
        while (reply := client.recv(0)) is not None:  # whatever is already back
            take(reply)
    deadline = time.monotonic() + drain_s
    while missing and (left := deadline - time.monotonic()) > 0:
        reply = client.recv(min(left, 0.5))
        if reply is not None:
            take(reply)
    return rec


def _pcts_ms(values_ns) -> dict[str, Any]:
    from numabench.results import PERCENTILE_MIN_SAMPLES, percentile

    v = sorted(int(x) for x in values_ns)
    out: dict[str, Any] = {"count": len(v)}
    for q, need in PERCENTILE_MIN_SAMPLES.items():
        out[f"p{q}"] = round(percentile(v, q) / 1e6, 3) if len(v) >= max(need, 1) else None
    out["mean"] = round(float(np.mean(v)) / 1e6, 3) if v else None
    out["max"] = round(v[-1] / 1e6, 3) if v else None
    return out


def summarize(point: DispatchPoint, rec: _Records, status: dict[str, Any] | None) -> dict[str, Any]:
    """The point's numbers: latency from each request's scheduled send (queueing behind a late
    send counts: no coordinated omission), achieved rate over the stream's window, per-pool
    requests and load (compute time / window per instance, from the daemon's status)."""
    ok = np.array([s == "ok" for s in rec.status], dtype=bool)
    lat = (rec.received_ns - rec.scheduled_ns)[ok]
    # The window: the stream's own span (its duration, or up to the last arrival), longer when
    # replies came after it (an overloaded plan); its start is the stream's start, not the first
    # arrival, so a Poisson draw's first gap does not inflate the rate.
    start = int(rec.scheduled_ns[0] - rec.offsets_ns[0]) if len(rec.scheduled_ns) else 0
    nominal_s = (point.duration_s if point.duration_s is not None
                 else (float(rec.offsets_ns[-1]) / 1e9 if len(rec.offsets_ns) else 0.0))
    end = int(rec.received_ns[ok].max()) if ok.any() else start
    window_s = max((end - start) / 1e9, nominal_s)
    counts = {s: rec.status.count(s) for s in ("ok", "busy", "error", "lost")}
    pools: dict[str, dict[str, Any]] = {}
    by_pool: dict[str, list[int]] = defaultdict(list)
    for k, p in enumerate(rec.pool):
        by_pool[p or "-"].append(k)
    for name, ks in sorted(by_pool.items()):
        ks_ok = [k for k in ks if rec.status[k] == "ok"]
        pools[name] = {"requests": len(ks), **{s: sum(rec.status[k] == s for k in ks)
                                               for s in ("ok", "busy", "error")},
                       "latency_ms": _pcts_ms(rec.received_ns[ks_ok] - rec.scheduled_ns[ks_ok])}
    instances = []
    for pst in (status or {}).get("pools", []):
        entry = pools.setdefault(pst["name"], {"requests": 0, "ok": 0, "busy": 0, "error": 0,
                                               "latency_ms": _pcts_ms([])})
        members = [i for i in status.get("instances", []) if i.get("pool") == pst["name"]]
        busy_s = sum(float(i.get("busy_s") or 0.0) for i in members)
        entry.update(seq_min=pst.get("seq_min"), seq_max=pst.get("seq_max"),
                     shapes=pst.get("shapes"), instances=len(members), served=pst.get("served"),
                     busy_replies=pst.get("busy"), busy_s=round(busy_s, 4),
                     load=round(busy_s / (window_s * len(members)), 4)
                     if window_s > 0 and members else None)
    for i in (status or {}).get("instances", []):
        instances.append({k: i.get(k) for k in ("id", "pool", "pid", "cpus", "served", "errors",
                                                 "restarts", "busy_s", "state")})
    real = int(rec.seq[ok].sum())
    padded = sum(int(p) for p, s in zip(rec.padded_seq, rec.status) if s == "ok" and p)
    lag = rec.sent_ns - rec.scheduled_ns
    warnings = []
    if counts["busy"]:
        warnings.append(f"{counts['busy']} of {len(ok)} requests answered busy (a pool's queue "
                        "was full): the offered rate is above what this plan serves")
    if counts["error"] or counts["lost"]:
        warnings.append(f"{counts['error']} error and {counts['lost']} lost replies; see daemon.log")
    if len(lag) and np.percentile(lag, 99) > 10e6:
        warnings.append(f"send lag p99 {np.percentile(lag, 99) / 1e6:.1f} ms: the load generator "
                        "fell behind its schedule (a loaded machine?); latencies count from the "
                        "scheduled time")
    if counts["ok"] < 100:
        warnings.append(f"only {counts['ok']} requests served: no p99 (100 needed)")
    return {
        "offered_rate": point.rate, "requests": len(ok),
        "arrival_rate": round(len(ok) / nominal_s, 3) if nominal_s > 0 else None, **counts,
        "throughput": round(counts["ok"] / window_s, 3) if window_s > 0 else 0.0,
        "window_s": round(window_s, 3), "latency_ms": _pcts_ms(lat),
        "send_lag_ms": _pcts_ms(lag), "tokens": real, "padded_tokens": padded,
        "padding_overhead": round(padded / real - 1, 4) if real else None,
        "pools": pools, "instances": instances, "warnings": warnings,
    }


def run_point(point: DispatchPoint, plan: Plan, run_dir: Path, machine: Machine, *,
              binder: str = "auto", allocator: str = "default",
              texts: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Serve the point's request stream under its plan; the point document (schema
    numabench.dispatch). Raises DispatchError when the daemon cannot serve it."""
    from numabench.daemon.client import Client
    from numabench.launcher import placement
    from numabench.plans.yamlio import dump_plan
    from numabench.topology import machine_to_dict
    from numabench.workers.models import resolve_model

    mix = LengthMix(**dict(point.lengths))
    offsets = arrivals(point.seed, point.repetition, point.rate, point.duration_s, point.requests)
    if mix.distribution == "texts":
        assert texts is not None
        pick = draw_lengths(mix, point.seed, point.repetition, len(offsets), [len(t) for t in texts])
        payloads = [texts[i] for i in pick]
    else:
        values = _file_values(mix) if mix.distribution == "file" else ()
        lengths = draw_lengths(replace(mix, values=values), point.seed, point.repetition, len(offsets))
        vocab = min(resolve_model(point.model).vocab_size or 1000, MAX_ID)
        base = np.random.default_rng([point.seed, 3]).integers(1, vocab, size=int(max(lengths, default=1)),
                                                                dtype=np.int64)
        payloads = [base[:int(n)] for n in lengths]
    run_dir.mkdir(parents=True, exist_ok=True)
    plan_file = run_dir / "plan.yaml"
    plan_file.write_text(dump_plan(plan))
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    daemon = _Daemon(point, plan_file, run_dir, binder, allocator)
    # the generator, like launch's coordinator and serve's loop, off the workers' CPUs where the
    # plan leaves any (pinned after the daemon started: it inherits the full set and narrows it)
    where = placement.coordinator_placement(machine, plan.cpus)
    try:
        with Client(daemon.endpoint, timeout_s=10.0) as client:
            daemon.wait_ready(client)
            undo = (lambda: None) if where.shares_cpus_with_workers else placement.pin_threads(where.cpus)
            try:
                rec = drive(client, offsets, payloads)
            finally:
                undo()
            if daemon.proc.poll() is not None:
                raise DispatchError(f"the daemon exited with code {daemon.proc.returncode} during "
                                    f"the stream (log {daemon.log_path}):{daemon.tail()}")
            status = client.status(timeout_s=30.0)
    finally:
        daemon.stop()
    summary = summarize(point, rec, status)
    return {
        "schema": DISPATCH_SCHEMA, "version": DISPATCH_VERSION, "status": "ok",
        "started": started, "point": point.to_dict(), "plan_file": "plan.yaml",
        "plan": _plan_dict(plan), "daemon": {"command": daemon.cmd[1:], "pid": status.get("pid"),
                                             "options": status.get("options"),
                                             "loop_cpus": status.get("loop_cpus")},
        "generator": where.record(),
        "machine": machine_to_dict(machine),
        "environment": {"python": platform.python_version(), "numabench": __version__,
                        "hostname": socket.gethostname(), "kernel": platform.release(),
                        "versions": {"numabench": __version__, "python": platform.python_version()}},
        "summary": summary, "warnings": summary.pop("warnings"),
        "raw": {"offset_ns": rec.offsets_ns.tolist(), "scheduled_ns": rec.scheduled_ns.tolist(),
                "sent_ns": rec.sent_ns.tolist(),
                "received_ns": rec.received_ns.tolist(), "seq": rec.seq.tolist(),
                "status": rec.status, "pool": rec.pool, "instance": rec.instance,
                "padded_seq": rec.padded_seq},
    }


def _plan_dict(plan: Plan) -> dict[str, Any]:
    import yaml

    from numabench.plans.yamlio import dump_plan

    return yaml.safe_load(dump_plan(plan))


def _file_values(mix: LengthMix) -> tuple[int, ...]:
    """The lengths file again (checked when the experiment was read; a point keeps only its digest)."""
    from numabench.experiments.spec import length_lines
    from numabench.fileio import read_text

    text = read_text(mix.file, "lengths file")
    if hashlib.sha256(text.encode()).hexdigest()[:12] != mix.digest:
        raise NumabenchError(f"{mix.file} changed since the experiment was checked; run the sweep again")
    return tuple(int(line) for _, line in length_lines(text))


# ---- the runner's executor hook -------------------------------------------------------------------

class DispatchExecutor:
    """Runs dispatch points here, one after the other, for experiments/runner.py: `run` yields
    each point's index, then `result` runs it (so the runner times and records it as usual)."""

    def __init__(self):
        self.sweep = None
        self._texts: list[np.ndarray] | None = None

    def run(self, sweep, todo: list[int]):
        self.sweep = sweep
        yield from todo

    def seconds(self, k: int) -> float:
        return 0.0  # the point runs inside result(), which the runner times

    def result(self, k: int) -> dict[str, Any]:
        sweep = self.sweep
        point, plan = sweep.points[k], sweep.plans[k]
        run_dir = _fresh_run_dir(sweep.out_dir / "runs" / point.id)
        texts = None
        if dict(point.lengths).get("distribution") == "texts":
            if self._texts is None:
                self._texts = tokenize_texts(LengthMix(**dict(point.lengths)), point.model)
            texts = self._texts
        opts = sweep.launch_opts
        return run_point(point, plan, run_dir, sweep.machine, binder=opts.binder,
                         allocator=opts.allocator, texts=texts)


def _fresh_run_dir(run_dir: Path) -> Path:
    """An earlier failed or interrupted attempt's folder is kept aside as <id>.attempt-K."""
    if run_dir.exists():
        attempt = 1
        while run_dir.with_name(f"{run_dir.name}.attempt-{attempt}").exists():
            attempt += 1
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.attempt-{attempt}"))
    return run_dir
