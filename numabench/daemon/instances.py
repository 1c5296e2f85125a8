"""The daemon's mutable records: instances, their dispatches, pools, a reload being rolled out.

Plain data: the event loop (server.py) changes them, the pure parts read them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from numabench.daemon.pools import PoolSpec
from numabench.daemon.reload import ReloadDiff
from numabench.daemon.scheduler import Request
from numabench.daemon.status import LatencyWindow
from numabench.daemon.supervisor import DeathRecord, InstanceState
from numabench.plans.model import InstancePlan
from numabench.workers.config import WorkerConfig

S = InstanceState


@dataclass(eq=False)
class Dispatch:
    req: int
    instance: int
    requests: list[Request]
    target: int
    sent_ns: int


@dataclass(eq=False)
class Instance:
    plan: InstancePlan
    pool: str
    config: WorkerConfig
    deaths: DeathRecord
    state: InstanceState = S.PENDING
    pid: int | None = None
    inflight: dict[int, Dispatch] = field(default_factory=dict)  # sent, unanswered, in order
    served: int = 0
    errors: int = 0
    restarts: int = 0
    restart_at_ms: int = 0
    started_at: float = 0.0
    stop_sent_at: float | None = None  # monotonic s: a retiring worker that ignores STOP is killed
    last_exit: str | None = None
    last_error: str | None = None
    busy_ns: int = 0
    ready_once: bool = False
    # The worker key: its process-group key and ZeroMQ identity. The instance id, except for a
    # reload's successor started while its predecessor (which holds the id) still serves.
    key: int = -1

    def __post_init__(self) -> None:
        if self.key < 0:
            self.key = self.plan.id

    @property
    def id(self) -> int:
        return self.plan.id

    def fold_into(self, successor: Instance) -> None:
        """Move this (exited) predecessor's counts to its successor: a reload resets nothing."""
        successor.served += self.served
        successor.errors += self.errors
        successor.restarts += self.restarts
        successor.busy_ns += self.busy_ns
        self.served = self.errors = self.restarts = self.busy_ns = 0


@dataclass(eq=False)
class Pool:
    spec: PoolSpec
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    served: int = 0
    busy: int = 0
    errors: int = 0


@dataclass(eq=False)
class Rollout:
    """A reload being applied: added ids starting, replaced ids swapped one at a time (the
    successor started beside its predecessor, which serves until the successor is ready)."""

    diff: ReloadDiff
    replace: deque  # ids still to swap
    old: dict[int, Instance]  # the running objects being replaced or removed
    current: int | None = None
