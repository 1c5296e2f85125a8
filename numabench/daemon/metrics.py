"""Prometheus text endpoint (prometheus-client), off unless --metrics-port is given.

The HTTP server runs in prometheus-client's own thread. It reads two things only: the latest
DaemonStatus (a frozen object the event loop replaces whole, so a scrape never sees a half
update) and the latency histogram (thread-safe). Series are built from the snapshot at each
scrape, so instances and pools a reload removed disappear with it, and counters come from the
daemon's totals, which a reload does not reset.
"""
from __future__ import annotations

from numabench.daemon.status import DaemonStatus
from numabench.errors import NumabenchError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class _SnapshotCollector:
    def __init__(self) -> None:
        self.snapshot: DaemonStatus | None = None

    def describe(self) -> list:
        return []  # built per scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.snapshot
        if s is None:
            return
        requests = CounterMetricFamily("numabench_requests", "Requests answered, by pool and "
                                       "status (ok, busy, error)", labels=["pool", "status"])
        for p in s.pools:
            for status, n in (("ok", p.served), ("busy", p.busy), ("error", p.errors)):
                requests.add_metric([p.name, status], n)
        yield requests
        rejected = CounterMetricFamily("numabench_rejected", "Requests refused before reaching a "
                                       "pool, by reason", labels=["reason"])
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        faults = CounterMetricFamily("numabench_internal_errors", "Exceptions the event loop's "
                                     "guard caught (the daemon carried on), by where",
                                     labels=["where"])
        for where, n in sorted(s.faults.items()):
            faults.add_metric([where], n)
        yield faults
        queued = GaugeMetricFamily("numabench_pool_queued", "Requests waiting", labels=["pool"])
        degraded = GaugeMetricFamily("numabench_pool_degraded", "1 when the pool is degraded",
                                     labels=["pool"])
        for p in s.pools:
            queued.add_metric([p.name], p.queued)
            degraded.add_metric([p.name], 1 if p.degraded else 0)
        yield queued
        yield degraded
        ready = GaugeMetricFamily("numabench_instance_ready", "1 when the instance is ready",
                                  labels=["instance", "pool"])
        inflight = GaugeMetricFamily("numabench_instance_inflight", "Dispatches in flight",
                                     labels=["instance"])
        restarts = CounterMetricFamily("numabench_instance_restarts", "Restarts of the instance",
                                       labels=["instance"])
        served = CounterMetricFamily("numabench_instance_served", "Requests served by the instance",
                                     labels=["instance"])
        for i in s.instances:
            ready.add_metric([str(i.id), i.pool], 1 if i.state == "ready" else 0)
            inflight.add_metric([str(i.id)], i.load)
            restarts.add_metric([str(i.id)], i.restarts)
            served.add_metric([str(i.id)], i.served)
        yield from (ready, inflight, restarts, served)


class Metrics:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        try:
            import prometheus_client as pc
        except ImportError:
            raise NumabenchError("--metrics-port needs prometheus-client: pip install "
                                 "'numabench[serve]' (or prometheus-client)") from None
        self.registry = pc.CollectorRegistry()
        self.collector = _SnapshotCollector()
        self.registry.register(self.collector)
        self.latency = pc.Histogram("numabench_request_latency_seconds", "Arrival to reply, "
                                    "served requests", ["pool"], buckets=LATENCY_BUCKETS,
                                    registry=self.registry)
        self._pools: set[str] = set()
        try:
            self.server, self.thread = pc.start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise NumabenchError(f"--metrics-port {port}: cannot listen on {host}: {e}") from None
        self.port = self.server.server_address[1]

    def served(self, pool: str, latency_s: float) -> None:
        self._pools.add(pool)
        self.latency.labels(pool).observe(latency_s)

    def refresh(self, snapshot: DaemonStatus) -> None:
        self.collector.snapshot = snapshot
        names = {p.name for p in snapshot.pools}
        for gone in self._pools - names:  # a reload removed the pool: drop its series
            try:
                self.latency.remove(gone)
            except KeyError:
                pass
        self._pools &= names

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
