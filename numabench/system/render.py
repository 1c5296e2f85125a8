"""The report as a table: one line per fact, then why and the fix under the ones that need action."""
from __future__ import annotations

from numabench.system.model import SystemReport

_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "unknown": "?"}


def render_report(report: SystemReport) -> str:
    width = max((len(f.name) for f in report.facts), default=10)
    head = f"system: {report.root}, judged for CPUs {_cpus(report.cpus)}"
    lines = [head, ""]
    for f in report.facts:
        lines.append(f"{_MARK[f.verdict]:<5} {f.name:<{width}}  {f.value}")
        if f.verdict != "ok" or f.fix:
            pad = " " * (6 + width + 2)
            if f.why:
                lines.append(f"{pad}why: {f.why}")
            if f.fix:
                lines.append(f"{pad}fix: {f.fix}")
    counts = {v: sum(f.verdict == v for f in report.facts) for v in ("ok", "warn", "fail", "unknown")}
    lines += ["", "verdict: " + report.verdict + " (" + ", ".join(f"{n} {v}" for v, n in counts.items() if n) + ")"]
    return "\n".join(lines)


def _cpus(cpus) -> str:
    from numabench.topology.cpulist import format_cpulist

    return format_cpulist(sorted(cpus)) if cpus else "none"
