"""The status document as text for `numabench status`."""
from __future__ import annotations

from typing import Any


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_status(doc: dict[str, Any]) -> str:
    lines = [
        f"numabench serve: {doc['state']} (pid {doc['pid']}, up {doc['uptime_s']:.0f} s) on {doc['endpoint']}",
        f"model {doc['model']} ({doc['backend']}, {doc['precision']}); plan "
        f"{doc['plan'].get('file') or '(planned)'}; logs in {doc['run_dir']}",
    ]
    if doc.get("metrics_port"):
        lines.append(f"metrics: http://127.0.0.1:{doc['metrics_port']}/metrics")
    loop = doc.get("loop_cpus")
    lines.append(f"clients: {doc.get('auth', '?')}; event loop on "
                 f"{'CPUs ' + ','.join(map(str, loop)) if loop else 'any CPU (the plan leaves none free)'}"
                 f"; in flight per instance: {doc.get('options', {}).get('inflight', '?')}")
    rejected = doc.get("rejected") or {}
    if rejected:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))
    faults = doc.get("faults") or {}
    if faults:
        lines.append("internal errors (logged; serving went on): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    lines += ["", f"{'pool':<12} {'seq':>9} {'pad to':<16} {'inst':<8} {'queue':>7} {'served':>8} "
                  f"{'busy':>6} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
                  f"{'60s p99':>8}"]
    for p in doc["pools"]:
        shapes = ",".join(str(s) for s in p["shapes"])
        inst = ",".join(str(i) for i in p["instances"])
        lat = p["latency_ms"]
        name = p["name"] + (" DEGRADED" if p["degraded"] else "")
        lines.append(f"{name:<12} {p['seq_min']:>4}-{p['seq_max']:<4} {shapes:<16} {inst:<8} "
                     f"{p['queued']:>3}/{p['queue_limit']:<3} {p['served']:>8} {p['busy']:>6} "
                     f"{p['errors']:>6} {_ms(lat['p50']):>8} {_ms(lat['p90']):>8} {_ms(lat['p99']):>8} "
                     f"{_ms(lat.get('recent', {}).get('p99')):>8}")
    lines += ["", f"{'inst':>4} {'pool':<10} {'state':<10} {'pid':>8} {'cpus':<12} {'load':>4} "
                  f"{'served':>8} {'errors':>6} {'restarts':>8}  last exit"]
    for i in doc["instances"]:
        cpus = ",".join(str(c) for c in i["cpus"])
        if len(cpus) > 12:
            cpus = cpus[:11] + "…"
        lines.append(f"{i['id']:>4} {i['pool']:<10} {i['state']:<10} {i['pid'] or '-':>8} {cpus:<12} "
                     f"{i['load']:>4} {i['served']:>8} {i['errors']:>6} {i['restarts']:>8}  "
                     f"{i['last_exit'] or ''}")
    return "\n".join(lines)
