"""The daemon's public status: frozen facts the event loop hands out, and the latency windows
behind them. `status`, the STATUS reply and the Prometheus collector read only these.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from numabench.results import PERCENTILE_MIN_SAMPLES, percentile

LATENCY_WINDOW = 10_000  # per pool: percentiles over the latest requests...
RECENT_S = 60.0  # ...and over those answered in the last minute


@dataclass
class LatencyWindow:
    """The last `size` served requests of a pool: (answered at ns, total ns, worker queue ns)."""

    size: int = LATENCY_WINDOW
    samples: deque = field(default_factory=deque)

    def add(self, now_ns: int, total_ns: int, worker_queue_ns: int) -> None:
        self.samples.append((now_ns, total_ns, worker_queue_ns))
        if len(self.samples) > self.size:
            self.samples.popleft()

    def summary(self, now_ns: int, recent_s: float = RECENT_S) -> dict[str, Any]:
        cut = now_ns - int(recent_s * 1e9)
        recent = [s for s in self.samples if s[0] >= cut]
        return {**_pcts([s[1] for s in self.samples]),
                "recent": {"window_s": recent_s, **_pcts([s[1] for s in recent])},
                "worker_queue": _pcts([s[2] for s in self.samples])}


def _pcts(values: list[int]) -> dict[str, Any]:
    lat = sorted(values)
    return {"count": len(lat), **{
        f"p{q}": (round(percentile(lat, q) / 1e6, 3) if lat and len(lat) >= n else None)
        for q, n in PERCENTILE_MIN_SAMPLES.items()}}


@dataclass(frozen=True)
class PoolStatus:
    name: str
    seq_min: int
    seq_max: int
    shapes: tuple[int, ...]
    instances: tuple[int, ...]
    queued: int
    queue_limit: int
    served: int
    busy: int
    errors: int
    degraded: bool
    ready: int  # instances ready now
    latency_ms: Mapping[str, Any]


@dataclass(frozen=True)
class InstanceStatus:
    id: int
    pool: str
    state: str
    pid: int | None
    cpus: tuple[int, ...]
    memory_nodes: tuple[int, ...]
    threads: int
    load: int  # dispatches in flight
    served: int
    errors: int
    restarts: int
    busy_s: float
    last_exit: str | None
    last_error: str | None
    # A reload's swap: the pid of the other process of this id (the successor warming up beside
    # the predecessor shown, or the predecessor still draining beside the successor shown).
    swap_pid: int | None = None


@dataclass(frozen=True)
class DaemonStatus:
    pid: int
    endpoint: str
    state: str
    started: str
    uptime_s: float
    plan: Mapping[str, Any]
    model: str
    backend: str
    precision: str
    weights: Mapping[str, str]  # shared weights file per memory-node set (empty: not shared)
    options: Mapping[str, Any]
    run_dir: str
    metrics_port: int | None
    auth: str  # "curve" (tcp) or "ipc-0600"
    loop_cpus: tuple[int, ...] | None  # where the event loop runs (None: not pinned)
    replies: Mapping[str, int]  # by status, any message type, since start (never reset)
    rejected: Mapping[str, int]  # by reason, since start
    faults: Mapping[str, int]  # internal errors the event loop's guard caught, by where
    pools: tuple[PoolStatus, ...]
    instances: tuple[InstanceStatus, ...]

    def to_doc(self) -> dict[str, Any]:
        """The STATUS reply's `daemon` document (JSON types only)."""
        return _jsonable(asdict(self))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
