"""Instance states and the restart policy, pure: no processes, no clock of its own.

The event loop (server.py) reports deaths with the time in milliseconds; the policy answers when
to restart, or that the instance is given up, and whether its pool is degraded. Tests drive it
with a fake clock.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class InstanceState(str, enum.Enum):
    """Where one instance stands (the value is what `status` shows)."""

    PENDING = "pending"        # a reload's successor, waiting for its turn
    STARTING = "starting"      # process started, not READY yet
    READY = "ready"            # takes dispatches
    RETIRING = "retiring"      # a reload removed or replaced it: finishes its work, then STOP
    RESTARTING = "restarting"  # died; a new process starts after the backoff
    FAILED = "failed"          # died too often: given up
    STOPPED = "stopped"        # exited on purpose

    @property
    def alive(self) -> bool:
        """A process is (or should be) running."""
        return self in (InstanceState.STARTING, InstanceState.READY, InstanceState.RETIRING)

    @property
    def will_serve(self) -> bool:
        """Counts as a working member of its pool (ready now, or soon)."""
        return self in (InstanceState.PENDING, InstanceState.STARTING, InstanceState.READY,
                        InstanceState.RESTARTING)


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff from `backoff_ms` to `backoff_max_ms`; within `window_ms`,
    `degraded_after` deaths mark the pool degraded and `max_restarts` give the instance up."""

    backoff_ms: int = 500
    backoff_max_ms: int = 10_000
    window_ms: int = 60_000
    degraded_after: int = 3
    max_restarts: int = 8


@dataclass(frozen=True)
class Decision:
    """What to do after a death: restart at `restart_at_ms`, or give up (`restart_at_ms` None)."""

    deaths_in_window: int
    restart_at_ms: int | None

    @property
    def give_up(self) -> bool:
        return self.restart_at_ms is None


@dataclass
class DeathRecord:
    """One instance's recent deaths, judged by a RestartPolicy."""

    policy: RestartPolicy
    deaths: deque = field(default_factory=deque)  # ms

    def _trim(self, now_ms: int) -> None:
        while self.deaths and now_ms - self.deaths[0] > self.policy.window_ms:
            self.deaths.popleft()

    def died(self, now_ms: int) -> Decision:
        self.deaths.append(now_ms)
        self._trim(now_ms)
        n = len(self.deaths)
        if n >= self.policy.max_restarts:
            return Decision(n, None)
        backoff = min(self.policy.backoff_ms * 2 ** (n - 1), self.policy.backoff_max_ms)
        return Decision(n, now_ms + backoff)

    def recent(self, now_ms: int) -> int:
        return sum(1 for t in self.deaths if now_ms - t <= self.policy.window_ms)

    def degraded(self, now_ms: int) -> bool:
        return self.recent(now_ms) >= self.policy.degraded_after
