"""Prometheus text endpoint (prometheus-client), off unless --metrics-port is given.

The HTTP server runs in prometheus-client's own thread and only reads its metric objects; the
event loop updates them (they are thread-safe), so daemon state is never read concurrently.
"""
from __future__ import annotations

from typing import Any

from numabench.errors import NumabenchError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        try:
            import prometheus_client as pc
        except ImportError:
            raise NumabenchError("--metrics-port needs prometheus-client: pip install "
                                 "'numabench[serve]' (or prometheus-client)") from None
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("numabench_requests", "Requests answered, by pool and status "
                                   "(ok, busy, error)", ["pool", "status"], registry=r)
        self.latency = pc.Histogram("numabench_request_latency_seconds", "Arrival to reply, "
                                    "served requests", ["pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.queued = pc.Gauge("numabench_pool_queued", "Requests waiting", ["pool"], registry=r)
        self.degraded = pc.Gauge("numabench_pool_degraded", "1 when the pool is degraded", ["pool"],
                                 registry=r)
        self.up = pc.Gauge("numabench_instance_ready", "1 when the instance is ready",
                           ["instance", "pool"], registry=r)
        self.restarts = pc.Gauge("numabench_instance_restarts", "Restarts of the instance",
                                 ["instance"], registry=r)
        self.served = pc.Gauge("numabench_instance_served", "Requests served by the instance",
                               ["instance"], registry=r)
        try:
            self.server, self.thread = pc.start_http_server(port, addr=host, registry=r)
        except OSError as e:
            raise NumabenchError(f"--metrics-port {port}: cannot listen on {host}: {e}") from None
        self.port = self.server.server_address[1]

    def request(self, pool: str, status: str, latency_s: float | None = None) -> None:
        self.requests.labels(pool, status).inc()
        if latency_s is not None:
            self.latency.labels(pool).observe(latency_s)

    def refresh(self, daemon: Any) -> None:
        for name, pool in daemon.pools.items():
            self.queued.labels(name).set(len(pool.queue))
            self.degraded.labels(name).set(1 if daemon._degraded(pool) else 0)
        for inst in daemon.instances.values():
            self.up.labels(str(inst.id), inst.pool).set(1 if inst.state == "ready" else 0)
            self.restarts.labels(str(inst.id)).set(inst.restarts)
            self.served.labels(str(inst.id)).set(inst.served)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
