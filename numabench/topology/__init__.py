"""Read the machine: packages, NUMA nodes, cores (as CPU sets) and what this process may use.

    from numabench.topology import read_machine
    m = read_machine()              # the live system
    m = read_machine("/captured")   # a captured or generated tree: every fact from the tree
"""
from __future__ import annotations

import dataclasses
import os

from numabench.topology.cpulist import format_cpulist, parse_cpulist, parse_cpumask
from numabench.topology.lscpu import parse_lscpu
from numabench.topology.model import (
    CORE_KINDS,
    JSON_SCHEMA_VERSION,
    KIND_EFFICIENCY,
    KIND_PERFORMANCE,
    KIND_UNIFORM,
    Core,
    Machine,
    Node,
    Package,
)
from numabench.topology.render import render_machine
from numabench.topology.serialize import machine_from_dict, machine_to_dict
from numabench.topology.sysfs import read_sysfs

__all__ = [
    "CORE_KINDS", "JSON_SCHEMA_VERSION", "KIND_EFFICIENCY", "KIND_PERFORMANCE", "KIND_UNIFORM",
    "Core", "Machine", "Node", "Package", "compare_with_lscpu", "format_cpulist",
    "machine_from_dict", "machine_to_dict", "parse_cpulist", "parse_cpumask", "parse_lscpu",
    "read_machine", "render_machine",
]


def _sets(groups, common: set[int]) -> set[tuple[int, ...]]:
    return {t for g in groups if (t := tuple(c for c in g if c in common))}


def compare_with_lscpu(m: Machine, ref: Machine) -> list[str]:
    """Disagreements between a sysfs Machine and a parsed lscpu Machine, as warnings."""
    out = []
    if m.cpus_online != ref.cpus_online:
        out.append(f"lscpu disagrees on online CPUs: sysfs {format_cpulist(m.cpus_online)}, "
                   f"lscpu {format_cpulist(ref.cpus_online)}")
    common = set(m.cpus_online) & set(ref.cpus_online)
    for what, ours, theirs in (
        ("cores", [c.cpus for c in m.cores], [c.cpus for c in ref.cores]),
        ("packages", [p.cpus for p in m.packages], [p.cpus for p in ref.packages]),
        ("NUMA nodes", [n.cpus for n in m.nodes], [n.cpus for n in ref.nodes]),
    ):
        if what == "NUMA nodes" and not ref.nodes:
            continue  # lscpu printed no Node column
        a, b = _sets(ours, common), _sets(theirs, common)
        if a != b:
            only = sorted(a - b)[:3]
            out.append(f"lscpu disagrees on {what}: sysfs has "
                       f"{', '.join('{' + format_cpulist(s) + '}' for s in only)} "
                       f"({len(a - b)} of {len(a)} differ)")
    ref_node = {c: n.id for n in ref.nodes for c in n.cpus}
    mismatched = sorted(c for core in m.cores for c in core.cpus
                        if c in ref_node and core.node is not None and ref_node[c] != core.node)
    if mismatched:
        out.append(f"lscpu disagrees on the NUMA node ids of CPUs {format_cpulist(mismatched)}")
    return out


def read_machine(root: str | os.PathLike = "/", *, lscpu_text: str | None = None,
                 lscpu_source: str | None = None) -> Machine:
    """Read the machine under `root` ("/" = the live system and this process's affinity).

    With `lscpu_text` (`lscpu -p` output), CPUs without sysfs topology files are filled in from it
    and every disagreement with sysfs is added to Machine.warnings.
    Raises TopologyError, naming the file, where the tree cannot be read.
    """
    ref = parse_lscpu(lscpu_text, source=lscpu_source or "lscpu") if lscpu_text is not None else None
    m = read_sysfs(root, fallback=ref)
    if ref is None:
        return m
    extra = compare_with_lscpu(m, ref)
    return dataclasses.replace(m, warnings=tuple(dict.fromkeys(m.warnings + tuple(extra))))
