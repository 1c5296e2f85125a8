"""A readable summary of a Machine: packages → nodes → cores with their SMT siblings."""
from __future__ import annotations

from numabench.topology.cpulist import format_cpulist
from numabench.topology.model import KIND_UNIFORM, Machine


def _size(n: int | None) -> str:
    if n is None:
        return "memory unknown"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _list(cpus) -> str:
    return format_cpulist(cpus) or "none"


def render_machine(m: Machine) -> str:
    usable = m.usable_set
    ucores = m.usable_cores()
    out = [f"Machine: {m.model_name or 'unknown CPU'}  (read from {m.source})"]
    out.append(f"CPUs: {len(m.cpus_online)} online ({_list(m.cpus_online)}), "
               f"{len(m.cpus_usable)} usable ({_list(m.cpus_usable)})")
    out.append(f"Cores: {len(m.cores)} ({len(ucores)} usable), up to {m.threads_per_core} "
               f"thread(s) per core; kinds: {', '.join(m.kinds) or 'none'}")
    out.append(f"Packages: {len(m.packages)}; NUMA nodes: {len(m.nodes)} "
               f"(usable for memory: {_list(m.nodes_usable)}); L3 domains: {len(m.l3_domains)}")
    out.append(f"Flags: {' '.join(sorted(m.flags)) or 'none of note'}")
    if m.cgroup_cpu_quota is not None:
        out.append(f"cgroup cpu.max quota: {m.cgroup_cpu_quota:g} CPUs")
    nodes_usable = set(m.nodes_usable)
    for p in m.packages:
        pid = "?" if p.id is None else p.id
        out.append(f"Package {p.index} (id {pid}): CPUs {_list(p.cpus)}")
        pcores = [c for c in m.cores if c.package == p.index]
        for node_id in sorted({c.node for c in pcores}, key=lambda n: (n is None, n or 0)):
            ncores = [c for c in pcores if c.node == node_id]
            if node_id is None:
                out.append("  no NUMA node:")
            else:
                n = m.node(node_id)
                mem_note = "" if node_id in nodes_usable else ", not usable for memory"
                out.append(f"  Node {n.id}: {_size(n.memory_bytes)}{mem_note}; CPUs {_list(n.cpus)}; "
                           f"{len(ncores)} cores, {sum(1 for c in ncores if c in ucores)} usable")
            for c in ncores:
                got = c.usable_cpus(usable)
                state = ("usable" if len(got) == len(c.cpus) else
                         "not usable" if not got else f"usable: {_list(got)}")
                extra = [] if c.kind == KIND_UNIFORM else [c.kind]
                if c.l3 is not None and len(m.l3_domains) > 1:
                    extra.append(f"L3 {c.l3}")
                cpus = ",".join(map(str, c.cpus))
                out.append(f"    core {cpus:<12} {state}" + (f"  [{', '.join(extra)}]" if extra else ""))
    memory_only = [n for n in m.nodes if n.memory_only]
    if memory_only:
        out.append("Memory-only nodes (no CPUs):")
        for n in memory_only:
            note = "" if n.id in nodes_usable else ", not usable"
            out.append(f"  Node {n.id}: {_size(n.memory_bytes)}{note}")
    if m.warnings:
        out.append("Warnings:")
        out.extend(f"  - {w}" for w in m.warnings)
    return "\n".join(out)
