"""The pure parts of serve: restart policy (fake clock, ms), scheduler (injected clock), reload
diff, request checks."""
from __future__ import annotations

import numpy as np
import pytest

from numabench.daemon.reload import diff
from numabench.daemon.scheduler import Candidate, Request, Scheduler
from numabench.daemon.status import LatencyWindow
from numabench.daemon.supervisor import DeathRecord, InstanceState, RestartPolicy
from numabench.workers import requests


def test_backoff_doubles_then_caps_and_gives_up_within_the_window():
    policy = RestartPolicy(backoff_ms=500, backoff_max_ms=2000, window_ms=60_000, degraded_after=3,
                           max_restarts=5)
    rec = DeathRecord(policy)
    now = 1_000_000
    waits = []
    for _ in range(4):
        d = rec.died(now)
        waits.append(d.restart_at_ms - now)
        now += 10
    assert waits == [500, 1000, 2000, 2000]
    assert rec.degraded(now)
    assert rec.died(now).give_up  # the 5th death within 60 s


def test_deaths_outside_the_window_are_forgotten():
    rec = DeathRecord(RestartPolicy(backoff_ms=100, window_ms=1000, degraded_after=2, max_restarts=3))
    assert rec.died(0).restart_at_ms == 100
    assert rec.died(500).restart_at_ms == 700
    assert rec.degraded(500)
    assert not rec.degraded(2000)  # both deaths older than the window
    d = rec.died(5000)
    assert d.deaths_in_window == 1 and d.restart_at_ms == 5100 and not d.give_up


def test_states_say_what_is_alive_and_what_will_serve():
    assert {s for s in InstanceState if s.alive} == {InstanceState.STARTING, InstanceState.READY,
                                                     InstanceState.RETIRING}
    assert not InstanceState.FAILED.will_serve and InstanceState.RESTARTING.will_serve


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def req(pool="p", rows=1, seq=4, at=0, avoid=None) -> Request:
    ids = np.ones((rows, seq), np.int64)
    return Request([b"c"], None, "summary", ids, ids, pool, at, avoid=avoid)


def test_credits_bound_the_dispatches_in_flight_per_instance():
    s = Scheduler(queue_size=100, inflight=2, clock=Clock())
    s.set_pools(["p"])
    for _ in range(10):
        assert s.offer(req(), [Candidate(0, 0, 0)])
    got = s.assign("p", [Candidate(0, 0, 0), Candidate(1, 1, 0)])
    # instance 0 takes two (fewest in flight first), instance 1 one more: 2 credits each
    assert [i for i, _ in got] == [0, 1, 0]
    assert s.queued("p") == 7
    assert s.assign("p", [Candidate(0, 2, 5), Candidate(1, 2, 5)]) == []


def test_a_full_queue_is_busy_only_when_no_instance_has_a_credit():
    s = Scheduler(queue_size=1, inflight=1, clock=Clock())
    s.set_pools(["p"])
    assert s.offer(req(), [Candidate(0, 1, 0)])
    assert not s.offer(req(), [Candidate(0, 1, 0)])
    assert s.offer(req(), [Candidate(0, 0, 0)])


def test_a_retried_request_avoids_the_instance_it_died_on():
    clock = Clock()
    s = Scheduler(inflight=1, clock=clock)
    s.set_pools(["p"])
    r = req(avoid=0)
    clock.ns = 7
    s.requeue(r)
    assert r.queued_ns == 7
    assert s.assign("p", [Candidate(0, 0, 0), Candidate(1, 0, 9)]) == [(1, [r])]
    s.requeue(r)
    assert s.assign("p", [Candidate(0, 0, 0)]) == [(0, [r])]  # the only one left


def test_micro_batches_wait_for_company_until_max_wait():
    clock = Clock()
    s = Scheduler(max_batch=4, max_wait_ns=1000, inflight=1, clock=clock)
    s.set_pools(["p"])
    a, b = req(rows=1), req(rows=2)
    s.offer(a, [])
    s.offer(b, [])
    assert s.assign("p", [Candidate(0, 0, 0)]) == []
    assert s.next_wakeup_ns() == 1000
    clock.ns = 1001
    assert s.assign("p", [Candidate(0, 0, 0)]) == [(0, [a, b])]
    s.offer(req(rows=3), [])
    s.offer(req(rows=3), [])
    got = s.assign("p", [Candidate(0, 0, 0)])  # full: 3 + 3 > 4, goes at once
    assert len(got) == 1 and len(got[0][1]) == 1


def test_expired_and_orphaned_requests_are_handed_back():
    clock = Clock()
    s = Scheduler(clock=clock)
    s.set_pools(["p", "q"])
    s.offer(req("p"), [])
    s.offer(req("q"), [])
    clock.ns = 50
    assert len(s.expired(10)) == 2
    s.offer(req("q", at=50), [])
    assert len(s.set_pools(["p"])) == 1


def test_reload_diff_keeps_replaces_adds_and_removes():
    d = diff({0: "a", 1: "b", 2: "c"}, {0: "a", 1: "B", 3: "d"}, failed=frozenset())
    assert (d.kept, d.replaced, d.added, d.removed) == ((0,), (1,), (3,), (2,))
    assert d.stopped == (1, 2) and d.started == (1, 3)
    assert diff({0: "a"}, {0: "a"}, failed=frozenset({0})).replaced == (0,)


def test_latency_window_reports_a_recent_window_beside_the_last_n():
    w = LatencyWindow(size=100)
    for i in range(50):
        w.add(now_ns=i * 10**9, total_ns=10**6, worker_queue_ns=0)
    s = w.summary(now_ns=50 * 10**9, recent_s=20)
    assert s["count"] == 50 and s["recent"]["count"] == 20 and s["p50"] == 1.0


def test_request_checks_are_shared_and_name_the_problem():
    ids, mask = requests.check_arrays({"input_ids": np.ones(5, np.int32)}, vocab_size=10,
                                      max_positions=8, allow_1d=True)
    assert ids.shape == (1, 5) and ids.dtype == np.int64 and mask is None
    # the daemon queues requests as sent, widened only when dispatched
    small = {"input_ids": np.ones((2, 5), np.int8), "attention_mask": np.ones((2, 5), np.bool_)}
    ids, mask = requests.check_arrays(small, vocab_size=10, max_positions=8, widen=False)
    assert ids.dtype == np.int8 and mask.dtype == np.bool_
    with pytest.raises(requests.RequestError, match="vocabulary"):  # would wrap negative as int64
        requests.check_arrays({"input_ids": np.full((1, 2), 2**63, np.uint64)}, vocab_size=None,
                              max_positions=8, widen=False)
    for arrays, match in (({"input_ids": np.ones(5, np.int32)}, "batch, seq"),
                          ({"input_ids": np.ones((1, 9), np.int64)}, "positions"),
                          ({"input_ids": np.full((1, 3), 10)}, "vocabulary"),
                          ({"input_ids": np.ones((3, 3), np.int64)}, "rows"),
                          ({"x": np.ones(1)}, "unexpected"),
                          ({"input_ids": np.ones((1, 3), np.int64),
                            "attention_mask": np.ones((1, 2), np.int64)}, "attention_mask")):
        with pytest.raises(requests.RequestError, match=match):
            requests.check_arrays(arrays, vocab_size=10, max_positions=8, max_rows=2)
    with pytest.raises(requests.RequestError, match="texts"):
        requests.check_texts(["a", 3])
    with pytest.raises(requests.RequestError, match="limit"):
        requests.check_texts(["a"] * 3, max_rows=2)


def test_rollout_steps_keep_every_pool_serving():
    from numabench.daemon.reload import (
        DONE,
        NEXT,
        RETIRE,
        RETIRE_REMOVED,
        START,
        WAIT,
        RolloutView,
        next_step,
    )

    change = diff({0: "a", 1: "b", 2: "c"}, {0: "A", 1: "B", 3: "d"})
    assert (change.replaced, change.added, change.removed) == ((0, 1), (3,), (2,))
    old = frozenset({0, 1, 2})
    # The added instance warms up first; nothing old is touched meanwhile.
    assert next_step(change, None, (0, 1), RolloutView(starting=frozenset({3}), pending=frozenset({0, 1}),
                                                       old_alive=old)).action == WAIT
    # Then one replaced id at a time, make before break: take it, start its successor while the
    # old one serves, wait until the successor is ready, then retire the old one and wait for it.
    s = next_step(change, None, (0, 1), RolloutView(pending=frozenset({0, 1}), old_alive=old))
    assert (s.action, s.instance) == (NEXT, 0)
    s = next_step(change, 0, (1,), RolloutView(pending=frozenset({0, 1}), old_alive=old))
    assert (s.action, s.instance) == (START, 0)
    # Warming up (or restarting after a death in warm-up): the old one keeps serving.
    s = next_step(change, 0, (1,), RolloutView(starting=frozenset({0}), pending=frozenset({1}),
                                               old_alive=old))
    assert (s.action, s.instance) == (WAIT, 0)
    s = next_step(change, 0, (1,), RolloutView(pending=frozenset({1}), old_alive=old))
    assert (s.action, s.instance) == (RETIRE, 0)
    draining = RolloutView(pending=frozenset({1}), old_alive=old, old_retiring=frozenset({0}))
    assert next_step(change, 0, (1,), draining).action == WAIT
    s = next_step(change, 0, (1,), RolloutView(pending=frozenset({1}), old_alive=frozenset({1, 2})))
    assert (s.action, s.instance) == (NEXT, 1)
    # Removed instances retire last; done once none runs.
    assert next_step(change, 1, (), RolloutView(old_alive=frozenset({2}))).action == RETIRE_REMOVED
    assert next_step(change, 1, (), RolloutView()).action == DONE
