"""`numabench system`: what on this machine makes a measurement noisy or a binding fail, and the fix.

Readers take a root prefix (a captured tree works like `/`); live-only facts (processes, numactl,
allocators, OpenMP, versions) are read only for the live system. `tune`/`reset` set and restore the
knobs that can be set; `noise` records what else ran during a measuring window.
"""
from __future__ import annotations

import os
from pathlib import Path

from numabench.system.facts import cpus_file, read_facts
from numabench.system.model import Fact, SystemReport, worst
from numabench.system.render import render_report

__all__ = ["Fact", "SystemReport", "read_system", "render_report", "worst"]


def read_system(root: str | os.PathLike = "/", cpus: tuple[int, ...] | None = None,
                interval_s: float = 0.5) -> SystemReport:
    """Judge the machine under `root` for `cpus` (default: the CPUs this process may use)."""
    from numabench.errors import NumabenchError
    from numabench.topology import read_machine

    root_p = Path(root)
    live = str(root_p.resolve()) == "/"
    facts: list[Fact] = []
    try:
        m = read_machine(root_p)
        online, usable, nodes, n_nodes = m.cpus_online, m.cpus_usable, m.nodes_usable, len(m.nodes)
        facts.append(Fact("usable CPUs", f"{_fmt(usable)} of {len(online)} online", "ok" if usable else "fail",
                          why="" if usable else "affinity, online CPUs and the cgroup cpuset do not intersect",
                          data={"usable": list(usable), "online": list(online), "nodes_usable": list(nodes)}))
    except NumabenchError as e:  # a broken tree still gets every other fact
        online = cpus_file(root_p, "sys/devices/system/cpu/online") or ()
        usable, nodes, n_nodes = online, (), 0
        facts.append(Fact("usable CPUs", "topology not readable", "unknown", why=str(e)))
    judged = tuple(sorted(cpus)) if cpus else tuple(usable)
    outside = sorted(set(judged) - set(usable)) if usable else []
    if outside:
        facts.append(Fact("asked CPUs", f"{_fmt(outside)} not usable here", "fail",
                          why="offline, or outside this process's affinity or cgroup cpuset",
                          fix="choose CPUs from the usable ones (numabench topology)"))
    facts += read_facts(root_p, judged, tuple(online))
    if live:
        from numabench.system.environment import read_environment

        facts += read_environment(judged, tuple(nodes), n_nodes, interval_s)
    return SystemReport(str(root_p), judged, tuple(facts))


def _fmt(cpus) -> str:
    from numabench.topology.cpulist import format_cpulist

    return format_cpulist(sorted(cpus)) if cpus else "none"
