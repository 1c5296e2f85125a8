"""The measuring loop (launcher/measure.py) against a scripted channel: credits, limits, failures."""
from __future__ import annotations

import time
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numabench.errors import LaunchError
from numabench.launcher.coordinator import WorkerFailed
from numabench.launcher.measure import (
    LOOPS_TARGET_NS,
    Limits,
    Measurement,
    calibrate,
    loops_for,
    make_payloads,
    measure,
)
from numabench.plans.model import InstancePlan
from numabench.workers import protocol


class ScriptedWorkers:
    """Stands in for the coordinator: each instance queues what it is sent and answers in order,
    one reply per recv, instances taking turns. Counts what is outstanding at the worker side."""

    def __init__(self, die: dict[int, int] | None = None, compute_ns: int = 1000):
        self.compute_ns = compute_ns
        self.queues: dict[int, deque] = {}
        self.max_queued: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.die = die or {}  # instance -> after how many replies it dies
        self.replied: dict[int, int] = {}
        self.turn = 0
        self.headers: list[dict] = []
        self.routes: dict[int, set] = {}  # instance -> the reqs sent to it

    def send_frames(self, instance, frames):
        header, _ = protocol.decode(frames)  # what a worker would read
        assert header["type"] == protocol.RUN
        self.headers.append(header)
        self.routes.setdefault(instance, set()).add(header["req"])
        q = self.queues.setdefault(instance, deque())
        q.append((header["req"], header.get("loops", 1)))
        self.sent[instance] = self.sent.get(instance, 0) + 1
        self.max_queued[instance] = max(self.max_queued.get(instance, 0), len(q))

    def recv(self, timeout_s, watching=None, what="a reply"):
        busy = sorted(i for i, q in self.queues.items() if q)
        assert busy, "recv with nothing in flight would hang"
        iid = busy[self.turn % len(busy)]
        self.turn += 1
        if iid in self.die and self.replied.get(iid, 0) >= self.die[iid]:
            raise WorkerFailed(iid, f"instance {iid} killed by SIGKILL\n--- last lines ---\n(log)")
        req, loops = self.queues[iid].popleft()
        self.replied[iid] = self.replied.get(iid, 0) + 1
        now, c = time.monotonic_ns(), self.compute_ns
        if loops == 1:
            return iid, {"type": protocol.RESULT, "req": req, "compute_ns": c, "start_ns": now}, {}
        return iid, {"type": protocol.RESULT, "req": req, "compute_ns": [c] * loops,
                     "start_ns": [now + k * c for k in range(loops)]}, {}


PAYLOADS = {0: ({}, {}), 1: ({}, {})}
BATCHES = {0: 2, 1: 3}


@pytest.mark.parametrize("inflight", [1, 2, 4])
def test_throughput_keeps_exactly_the_credits_in_flight(inflight):
    w = ScriptedWorkers()
    m = measure(w, BATCHES, PAYLOADS, "throughput", Limits(iterations=10, inflight=inflight))
    # Never more than the credits outstanding at a worker, and the credits are used.
    assert w.max_queued == {0: inflight, 1: inflight}
    assert w.sent == {0: 10, 1: 10}
    assert not m.pending
    for iid in (0, 1):
        mine = sorted(s.step for s in m.samples if s.instance == iid)
        assert mine == list(range(10))
        assert all(s.batch == BATCHES[iid] for s in m.samples if s.instance == iid)
    # Every request has its own id, and the timed runs ask for no checksums.
    assert len({h["req"] for h in w.headers}) == 20 and {h["want"] for h in w.headers} == {"shape"}


def test_credits_beyond_the_iterations_are_not_sent():
    w = ScriptedWorkers()
    measure(w, BATCHES, PAYLOADS, "throughput", Limits(iterations=2, inflight=5))
    assert w.sent == {0: 2, 1: 2} and w.max_queued == {0: 2, 1: 2}


def test_split_sends_one_shard_per_instance_per_step():
    w = ScriptedWorkers()
    m = measure(w, BATCHES, PAYLOADS, "split", Limits(iterations=4, inflight=3))
    assert w.max_queued == {0: 1, 1: 1}  # a step is one shard each, whatever --inflight says
    steps = {}
    for s in m.samples:
        steps.setdefault(s.step, set()).add(s.instance)
    assert steps == {k: {0, 1} for k in range(4)}


def test_duration_stops_sending_but_collects_everything_in_flight():
    w = ScriptedWorkers()
    m = measure(w, BATCHES, PAYLOADS, "throughput", Limits(duration_s=0.05, inflight=3))
    assert not m.pending  # every request sent was answered and kept
    assert len(m.samples) == sum(w.sent.values())
    assert max(w.max_queued.values()) <= 3


def test_a_dead_worker_is_named_with_its_unanswered_requests():
    w = ScriptedWorkers(die={1: 3})
    m = Measurement()
    with pytest.raises(WorkerFailed) as info:
        measure(w, BATCHES, PAYLOADS, "throughput", Limits(iterations=50, inflight=3), state=m)
    e = info.value
    assert e.instance == 1
    first = str(e).splitlines()[0]
    assert first.startswith("instance 1 killed by SIGKILL") and "3 requests in flight to it unanswered" in first
    assert "--- last lines ---" in str(e)  # the log tail is kept
    # Accounting: every request sent is either a sample or unanswered, none lost or doubled.
    for iid in (0, 1):
        answered = [s.step for s in m.samples if s.instance == iid]
        unanswered = [p.step for p in m.unanswered() if p.instance == iid]
        assert sorted(answered + unanswered) == list(range(w.sent[iid]))
    assert [p.step for p in m.unanswered() if p.instance == 1] == [3, 4, 5]


def test_inflight_must_be_positive():
    with pytest.raises(ValueError):
        Limits(inflight=0)


def test_payloads_are_seeded_per_instance_and_inside_the_vocabulary():
    insts = [InstancePlan(0, (0,), (), 1, 2), InstancePlan(1, (1,), (), 1, 3)]
    a = make_payloads(insts, seq=16, seed=7, vocab={0: 50, 1: 50})
    b = make_payloads(insts, seq=16, seed=7, vocab={0: 50, 1: 50})
    assert a[0][1].frames[0].tobytes() == b[0][1].frames[0].tobytes()
    assert a[0][1].specs[0]["shape"] == [2, 16] and a[1][1].specs[0]["shape"] == [3, 16]
    texts = make_payloads(insts, seq=8, seed=0, vocab={}, texts=["x", "y"])
    assert texts[1][0] == {"texts": ["y", "x", "y"], "seq": 8}


@settings(max_examples=60, deadline=None)
@given(iterations=st.integers(1, 40), loops=st.integers(1, 9), inflight=st.integers(1, 3))
def test_loops_split_the_passes_over_requests_and_every_pass_is_a_sample(iterations, loops, inflight):
    w = ScriptedWorkers()
    m = measure(w, BATCHES, PAYLOADS, "throughput",
                Limits(iterations=iterations, inflight=inflight, loops={0: loops, 1: 1}))
    assert not m.pending
    for iid, n in ((0, loops), (1, 1)):
        asked = [h.get("loops", 1) for h in w.headers if h["req"] in w.routes[iid]]
        # full requests of n passes, the last one what is left; never more passes than asked
        assert asked == [n] * (iterations // n) + ([iterations % n] if iterations % n else [])
        assert sorted(s.step for s in m.samples if s.instance == iid) == list(range(iterations))
        assert max(w.max_queued.values()) <= inflight
    # the passes of one request share its send and reply times, and each keeps its own timing
    by_req: dict = {}
    for s in m.samples:
        by_req.setdefault((s.instance, s.sent_ns), []).append(s)
    assert all(len({s.received_ns for s in g}) == 1 for g in by_req.values())


def test_a_dead_worker_with_loops_leaves_its_requests_with_their_pass_counts():
    w = ScriptedWorkers(die={1: 2})
    m = Measurement()
    with pytest.raises(WorkerFailed):
        measure(w, BATCHES, PAYLOADS, "throughput", Limits(iterations=50, inflight=2, loops={0: 5, 1: 4}),
                state=m)
    lost = [(p.step, p.loops) for p in m.unanswered() if p.instance == 1]
    assert lost == [(8, 4), (12, 4)]  # two requests of 4 passes each: steps 8-11 and 12-15


class BadTimings(ScriptedWorkers):
    """Answers its third reply with `bad` as the timings."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def recv(self, timeout_s, watching=None, what="a reply"):
        iid, head, arrays = super().recv(timeout_s, watching, what)
        if sum(self.replied.values()) == 3:
            head = {**head, **self.bad}
        return iid, head, arrays


@pytest.mark.parametrize("loops,bad,match", [
    (3, {"compute_ns": [1, 2]}, "3 passes with a list of 2 compute_ns"),
    (3, {"start_ns": 5}, "list of 3 compute_ns and a single start_ns"),
    (1, {"compute_ns": [1]}, "1 pass with a list of 1 compute_ns"),
    (1, {"compute_ns": 1.5}, "not integers"),
    (3, {"start_ns": [1, 2, True]}, "not integers"),
    (1, {"start_ns": None}, "not integers"),
])
def test_a_reply_with_bad_timings_fails_the_run_and_keeps_what_came_before(loops, bad, match):
    m = Measurement()
    with pytest.raises(LaunchError, match=match):
        measure(BadTimings(bad), BATCHES, PAYLOADS, "throughput",
                Limits(iterations=30, inflight=2, loops={0: loops, 1: loops}), state=m)
    # the two good replies became samples (made when read, after the loop), the bad one did not
    assert len(m.samples) == m.passes == 2 * loops
    assert all(type(s.compute_ns) is int for s in m.samples)


def test_calibrate_takes_the_fastest_pass_and_aims_at_the_target():
    w = ScriptedWorkers(compute_ns=LOOPS_TARGET_NS // 10 + 1)
    assert calibrate(w, PAYLOADS, timeout_s=1) == {0: 10, 1: 10}
    assert not any("loops" in h for h in w.headers)  # single passes, nothing kept
    assert loops_for(0) == protocol.MAX_LOOPS and loops_for(10**12) == 1
    assert loops_for(LOOPS_TARGET_NS) == 1 and loops_for(LOOPS_TARGET_NS - 1) == 2
    with pytest.raises(ValueError):
        Limits(loops={0: 0})
    with pytest.raises(ValueError):
        Limits(loops={0: protocol.MAX_LOOPS + 1})
