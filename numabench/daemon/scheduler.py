"""Queues, micro-batching and credit-based dispatch, pure: the clock is injected, nothing is sent.

Each pool has a bounded FIFO. An instance holds `inflight` credits (default 2): it may have that
many dispatches sent and unanswered, so a worker always finds its next input waiting in its
socket instead of idling for a round trip. `assign` picks, for the head of a pool's queue, the
instance with a free credit that has fewest dispatches in flight (then fewest served, then lowest
id), avoiding the instance a retried request died on where another is available.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class Request:
    """One accepted INFER, unpadded; `queued_ns` restarts when a retry puts it back."""

    envelope: list[bytes]
    rid: Any
    want: str
    ids: np.ndarray  # (rows, seq), any integer type: widened to int64 only when dispatched
    mask: np.ndarray | None  # None: every position counts
    pool: str
    arrived_ns: int
    queued_ns: int = 0
    retried: bool = False
    avoid: int | None = None  # the instance it was on when that one died
    answered: bool = False  # its one reply is sent (the loop's guard answers the others)

    def __post_init__(self) -> None:
        self.queued_ns = self.queued_ns or self.arrived_ns

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True)
class Candidate:
    """An instance that could take a dispatch: how many it has in flight, how many it served."""

    instance: int
    inflight: int
    served: int


@dataclass
class Scheduler:
    queue_size: int = 64
    max_batch: int = 1  # rows per dispatch
    max_wait_ns: int = 2_000_000
    inflight: int = 2  # credits per instance
    clock: Callable[[], int] = time.monotonic_ns
    queues: dict[str, deque] = field(default_factory=dict)

    def set_pools(self, names: Iterable[str]) -> list[Request]:
        """Keep the queues of `names` (new ones empty); returns the requests of dropped pools."""
        names = list(names)
        orphans = [r for name, q in self.queues.items() if name not in names for r in q]
        self.queues = {name: self.queues.get(name, deque()) for name in names}
        return orphans

    def queued(self, pool: str) -> int:
        return len(self.queues.get(pool, ()))

    def has_credit(self, candidates: Sequence[Candidate]) -> bool:
        return any(c.inflight < self.inflight for c in candidates)

    def offer(self, r: Request, candidates: Sequence[Candidate]) -> bool:
        """Queue `r`; False (busy) when its pool's queue is full and no instance has a credit."""
        q = self.queues[r.pool]
        if len(q) >= self.queue_size and not self.has_credit(candidates):
            return False
        q.append(r)
        return True

    def requeue(self, r: Request) -> None:
        """Put a retried request at the head of its pool's queue."""
        r.queued_ns = self.clock()
        self.queues[r.pool].appendleft(r)

    def _batch(self, q: deque, stopping: bool) -> list[Request] | None:
        if self.max_batch <= 1:
            return [q.popleft()]
        taken, rows, full = [], 0, False
        for r in q:
            if taken and rows + r.rows > self.max_batch:
                full = True
                break
            taken.append(r)
            rows += r.rows
        full = full or rows >= self.max_batch
        if not full and not stopping and self.clock() - q[0].queued_ns < self.max_wait_ns:
            return None  # wait a little for company
        for _ in taken:
            q.popleft()
        return taken

    def assign(self, pool: str, candidates: Sequence[Candidate], stopping: bool = False
               ) -> list[tuple[int, list[Request]]]:
        """Take dispatches off `pool`'s queue while some candidate has a credit:
        [(instance, requests)]. `candidates`: the pool's ready instances."""
        q = self.queues.get(pool)
        load = {c.instance: c for c in candidates}
        out: list[tuple[int, list[Request]]] = []
        while q:
            free = [c for c in load.values() if c.inflight < self.inflight]
            if not free:
                break
            batch = self._batch(q, stopping)
            if batch is None:
                break
            avoid = {r.avoid for r in batch}
            pick = min([c for c in free if c.instance not in avoid] or free,
                       key=lambda c: (c.inflight, c.served, c.instance))
            load[pick.instance] = Candidate(pick.instance, pick.inflight + 1, pick.served + 1)
            out.append((pick.instance, batch))
        return out

    def expired(self, timeout_ns: int) -> list[Request]:
        """Requests that waited in a queue longer than `timeout_ns` (removed)."""
        now = self.clock()
        out = []
        for q in self.queues.values():
            while q and now - q[0].queued_ns > timeout_ns:
                out.append(q.popleft())
        return out

    def next_wakeup_ns(self) -> int | None:
        """When a waiting micro-batch is due (None: nothing waits for company)."""
        if self.max_batch <= 1:
            return None
        due = [q[0].queued_ns + self.max_wait_ns for q in self.queues.values() if q]
        return min(due) if due else None

    def drain(self) -> list[Request]:
        out = [r for q in self.queues.values() for r in q]
        for q in self.queues.values():
            q.clear()
        return out
