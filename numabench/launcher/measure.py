"""The measuring loops of `launch`: send requests, collect replies, keep every raw timing.

Pipelined, credit-based dispatch (throughput mode): each instance has at most `inflight`
requests outstanding, and the coordinator tops it up the moment a reply arrives, so the worker
always finds its next input already queued and computes back to back instead of idling for a
round trip. Queueing is never hidden: every sample keeps `sent_ns` (coordinator) and the
worker's `start_ns` and `compute_ns`, so time spent waiting inside the worker
(start_ns - sent_ns) is reported apart from compute.

`split` mode keeps its step semantics: a step's shards are sent together and the step ends at
its last reply; nothing of the next step is sent early (that would change what a step means).

Loops (throughput mode): a request may ask its worker for `loops` forward passes of its inputs
back to back, each timed, so numabench's own cost per message (receive, decode, reply, and the
caches it disturbs: 10-20% of a 0.7 ms bert-tiny forward on the 2-vCPU dev VM) is paid once per
`loops` passes, as pyperf amortizes its timer over loops. Each pass is a Sample; the passes of
one request share its `sent_ns` and `received_ns`, and each one's queue time (start - sent) counts
the passes before it: they were requested together and waited for each other. `calibrate` picks
the count per instance from a few single passes: at least a target of compute (launch takes a
longer one when the coordinator shares the workers' CPUs, options.LOOPS_TARGET_SHARED_NS).

The coordinator-like object needs `send_frames(instance, frames)` and
`recv(timeout_s, watching=, what=)` -> (instance, header, arrays); see coordinator.py. Each
instance's RUN is encoded once (protocol.RequestTemplate); a request then costs a bytes join.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from numabench.errors import LaunchError
from numabench.launcher.coordinator import WorkerFailed
from numabench.launcher.options import DEFAULT_INFLIGHT, DEFAULT_ITERATIONS, LOOPS_TARGET_NS
from numabench.results import Sample
from numabench.workers import protocol

Payload = tuple[dict[str, Any], Any]  # (header extras, arrays or PreparedArrays)


class Channel(Protocol):
    def send_frames(self, instance: int, frames: list[Any]) -> None: ...

    def recv(self, timeout_s: float, watching: frozenset[int] | None = None,
             what: str = "a reply") -> tuple[int, dict[str, Any], dict[str, Any]]: ...


@dataclass(frozen=True)
class Limits:
    """When to stop sending. `iterations`: steps (split) or requests per instance (throughput);
    `duration_s`: stop sending after this long, still collecting every reply in flight."""

    iterations: int | None = None
    duration_s: float | None = None
    inflight: int = DEFAULT_INFLIGHT
    request_timeout_s: float = 300.0
    # throughput mode: forward passes per request, per instance (absent: 1); see `calibrate`
    loops: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inflight < 1:
            raise ValueError(f"inflight must be at least 1 (got {self.inflight})")
        if any(not 1 <= n <= protocol.MAX_LOOPS for n in self.loops.values()):
            raise ValueError(f"loops must be from 1 to {protocol.MAX_LOOPS} (got {dict(self.loops)})")


class Pending(NamedTuple):
    """A request sent and not answered (yet): what a failed run had in flight. A NamedTuple:
    one is made per request, cheaper to make than a frozen dataclass."""

    instance: int
    step: int
    batch: int
    sent_ns: int
    loops: int = 1


class Measurement:
    """The loop's state: answered samples and requests still in flight, readable at any time
    (a run that fails midway saves both).

    A reply is kept as it came (request, receive time, the worker's timings) and made into
    Samples only when `samples` is read: not on the coordinator's path per reply, where with
    every CPU a worker's it takes a worker's CPU (one Sample per pass: ~50 per bert-tiny reply)."""

    def __init__(self) -> None:
        self._samples: list[Sample] = []
        self._answers: list[tuple[Pending, int, Any, Any]] = []  # (request, received_ns, compute, start)
        self.passes = 0  # answered so far
        self.pending: dict[int, Pending] = {}  # req -> request
        self.window_start_ns: int | None = None
        self._req = 0

    @property
    def samples(self) -> list[Sample]:
        if self._answers:
            answers, self._answers = self._answers, []
            for p, received, compute, start in answers:
                if p.loops == 1:  # integers, checked on arrival (measure's collect)
                    self._samples.append(Sample(p.instance, p.step, p.batch, p.sent_ns, received,
                                                compute, start))
                else:
                    self._samples.extend(Sample(p.instance, p.step + k, p.batch, p.sent_ns, received, c, t)
                                         for k, (c, t) in enumerate(zip(compute, start)))
        return self._samples

    def answered(self, p: Pending, received_ns: int, compute: Any, start: Any) -> None:
        self._answers.append((p, received_ns, compute, start))
        self.passes += p.loops

    def unanswered(self) -> list[Pending]:
        return sorted(self.pending.values(), key=lambda p: (p.instance, p.step))

    def in_flight(self, instance: int) -> int:
        return sum(1 for p in self.pending.values() if p.instance == instance)


CALIBRATION_PASSES = 3


def loops_for(compute_ns: int, target_ns: int = LOOPS_TARGET_NS) -> int:
    """Passes per request for a forward of compute_ns: enough for target_ns (pure)."""
    return max(1, min(protocol.MAX_LOOPS, math.ceil(target_ns / max(compute_ns, 1))))


def calibrate(channel: Channel, payloads: Mapping[int, Payload], timeout_s: float,
              target_ns: int = LOOPS_TARGET_NS) -> dict[int, int]:
    """Loops per instance from its fastest of CALIBRATION_PASSES single passes (all instances at
    once, before the clock starts; nothing of it is a sample)."""
    best: dict[int, int] = {}
    ids = frozenset(payloads)
    runs = {iid: protocol.RequestTemplate(protocol.RUN, {"want": "shape", **payloads[iid][0]},
                                          payloads[iid][1]).encode for iid in ids}
    for k in range(CALIBRATION_PASSES):
        for iid in sorted(ids):
            channel.send_frames(iid, runs[iid](k))
        for _ in ids:
            iid, head, _ = channel.recv(timeout_s, watching=ids, what="a RESULT")
            if head["type"] != protocol.RESULT:
                raise WorkerFailed(iid, f"instance {iid} failed a calibration request: {head.get('message')}")
            compute = head.get("compute_ns")
            if type(compute) is not int or compute < 0:
                raise LaunchError(f"instance {iid} answered a calibration request with compute_ns {compute!r}")
            best[iid] = min(best.get(iid, compute), compute)
    return {iid: loops_for(ns, target_ns) for iid, ns in best.items()}


def make_payloads(instances: Sequence[Any], seq: int, seed: int, vocab: Mapping[int, int],
                  texts: list[str] | None = None) -> dict[int, Payload]:
    """Per-instance request payloads: random ids from a fixed seed, or real text."""
    out: dict[int, Payload] = {}
    for inst in instances:
        if texts:
            chunk = [texts[(inst.id * inst.batch + k) % len(texts)] for k in range(inst.batch)]
            out[inst.id] = ({"texts": chunk, "seq": seq}, {})
            continue
        rng = np.random.default_rng(seed + inst.id)
        ids = rng.integers(0, vocab.get(inst.id, 1000), size=(inst.batch, seq), dtype=np.int64)
        # No attention_mask: random ids have no padding, and a worker reads a missing mask
        # as all ones; one frame less per request.
        out[inst.id] = ({}, protocol.prepare_arrays({"input_ids": ids}))
    return out


def measure(channel: Channel, batches: Mapping[int, int], payloads: Mapping[int, Payload],
            mode: str, limits: Limits, state: Measurement | None = None,
            on_progress: Callable[[str], None] | None = None) -> Measurement:
    """Drive one workload; returns (and fills, as it goes) `state`.

    `batches`: instance id -> its batch. On a WorkerFailed the failure is re-raised with the
    number of requests that instance still had in flight; `state.pending` keeps them all.
    """
    m = state if state is not None else Measurement()
    ids = frozenset(payloads)
    order = sorted(ids)
    count = limits.iterations if limits.iterations is not None or limits.duration_s is not None \
        else DEFAULT_ITERATIONS
    loops = {iid: limits.loops.get(iid, 1) if mode == "throughput" else 1 for iid in ids}
    encoders: dict[tuple[int, int], Callable[[int], list[Any]]] = {}

    def encoder(iid: int, n: int) -> Callable[[int], list[Any]]:
        """The instance's RUN for n passes, encoded once (a run's last request may ask fewer)."""
        enc = encoders.get((iid, n))
        if enc is None:
            extra = {"loops": n} if n > 1 else {}
            enc = encoders[iid, n] = protocol.RequestTemplate(
                protocol.RUN, {"want": "shape", **payloads[iid][0], **extra}, payloads[iid][1]).encode
        return enc

    pending, answered = m.pending, m.answered
    send_frames, recv, now_ns = channel.send_frames, channel.recv, time.monotonic_ns
    # a request of n passes may take n times as long as one
    timeout_s, RESULT = limits.request_timeout_s * max(loops.values(), default=1), protocol.RESULT

    def send(iid: int, step: int, n: int = 1) -> None:
        m._req = req = m._req + 1
        frames = encoder(iid, n)(req)
        sent = now_ns()
        send_frames(iid, frames)
        pending[req] = Pending(iid, step, batches[iid], sent, n)

    def collect() -> int:
        iid, head, _ = recv(timeout_s, watching=ids, what="a RESULT")
        received = now_ns()
        kind = head["type"]
        p = pending.pop(head.get("req"), None) if kind == RESULT else None
        if p is None:
            if kind == protocol.ERROR:
                raise WorkerFailed(iid, f"instance {iid} failed a request: {head.get('message')}")
            raise LaunchError(f"instance {iid} sent an unexpected {kind} message")
        compute, start = head["compute_ns"], head["start_ns"]
        # The timings are checked here, made into Samples later (Measurement.samples): one
        # integer each for one pass, else a list of `loops` each (JSON gives exact ints).
        if p.loops == 1 and type(compute) is int and type(start) is int:  # the common case first
            answered(p, received, compute, start)
            return p.instance
        lists = type(compute) is list, type(start) is list
        if p.loops == 1 and lists == (False, False):
            raise LaunchError(f"instance {iid} sent timings that are not integers")
        if lists != (True, True) or not len(compute) == len(start) == p.loops:
            got = f"a list of {len(compute)}" if lists[0] else "a single"
            raise LaunchError(f"instance {iid} answered a request of {p.loops} pass{'es' if p.loops != 1 else ''} "
                              f"with {got} compute_ns and {'a list' if lists[1] else 'a single'} start_ns")
        if p.loops == 1 or not all(type(x) is int for x in (*compute, *start)):
            raise LaunchError(f"instance {iid} sent timings that are not integers")
        answered(p, received, compute, start)
        return p.instance

    m.window_start_ns = time.monotonic_ns()
    deadline = (m.window_start_ns + int(limits.duration_s * 1e9)
                if limits.duration_s is not None else None)

    def more(done: int) -> bool:
        return done < count if count is not None else time.monotonic_ns() < deadline

    try:
        if mode == "split":
            step = 0
            while more(step):
                for iid in order:
                    send(iid, step)
                while pending:
                    collect()
                step += 1
                if on_progress:
                    on_progress(f"measuring: step {step}" + (f"/{count}" if count else ""))
        else:
            sent = dict.fromkeys(order, 0)  # passes asked of each instance so far

            def top_up(iid: int) -> None:
                n = loops[iid] if count is None else min(loops[iid], count - sent[iid])
                send(iid, sent[iid], n)
                sent[iid] += n

            # Fill every instance's credits first, round-robin, so all start together.
            for _ in range(limits.inflight):
                for iid in order:
                    if more(sent[iid]):
                        top_up(iid)
            done = 0
            while pending:
                iid = collect()
                done += 1
                if more(sent[iid]):  # a credit came back: the worker's next input, at once
                    top_up(iid)
                if on_progress:
                    on_progress(f"measuring: {m.passes} passes" if m.passes != done
                                else f"measuring: {done} requests")
    except WorkerFailed as e:
        left = m.in_flight(e.instance)
        if left:
            raise WorkerFailed(e.instance, _with_unanswered(str(e), left)) from None
        raise
    return m


def _with_unanswered(message: str, left: int) -> str:
    first, sep, rest = message.partition("\n")
    return f"{first} ({left} request{'s' if left != 1 else ''} in flight to it unanswered){sep}{rest}"
