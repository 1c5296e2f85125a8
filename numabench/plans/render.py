"""A plan as a table, read against the machine (which node each instance's CPUs sit on)."""
from __future__ import annotations

from numabench.plans.model import Plan
from numabench.topology.cpulist import format_cpulist
from numabench.topology.model import Machine

HEADERS = ("instance", "cpus", "cores", "cpu nodes", "memory", "threads", "batch", "seq range",
           "kind")


def render_plan(plan: Plan, machine: Machine) -> str:
    rows = []
    used_cores: set[tuple[int, ...]] = set()
    for inst in plan.instances:
        cores = {c.cpus for c in map(machine.core_of, inst.cpus) if c is not None}
        used_cores |= cores
        nodes = {c.node for c in map(machine.core_of, inst.cpus) if c is not None and c.node is not None}
        seq = "" if inst.seq_range is None else (
            f"{inst.seq_range.min}-{inst.seq_range.max}" if inst.seq_range.max is not None
            else f"{inst.seq_range.min}-")
        rows.append((str(inst.id), format_cpulist(inst.cpus), str(len(cores)),
                     format_cpulist(nodes) or "-", format_cpulist(inst.memory_nodes) or "-",
                     str(inst.threads), str(inst.batch), seq, inst.kind or ""))

    # drop columns that say nothing for this plan
    keep = [k for k in range(len(HEADERS)) if k < 7 or any(r[k] for r in rows)]
    table = [tuple(HEADERS[k] for k in keep)] + [tuple(r[k] for k in keep) for r in rows]
    widths = [max(len(row[k]) for row in table) for k in range(len(keep))]
    lines = []
    title = plan.name or "plan"
    if plan.description:
        title += f": {plan.description}"
    lines.append(title)
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    usable = len(machine.usable_cores())
    count = len(plan.instances)
    plural = "s" if count != 1 else ""
    lines.append(f"{count} instance{plural} on {len(used_cores)} of {usable} usable cores"
                 f" ({usable - len(used_cores)} idle), {len(plan.cpus)} CPUs"
                 f"{' with SMT siblings' if plan.smt else ''}; batch {plan.batch}")
    return "\n".join(lines) + "\n"
