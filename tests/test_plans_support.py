"""Machines for planner tests, built directly as dataclasses (no sysfs), plus shared fixtures.

`build_machine` mirrors tests/sysfs_tree.py's layout: sockets × nodes_per_socket × cores_per_node
cores with threads_per_core threads, "interleaved" numbering (siblings i and i + total cores).
"""
from __future__ import annotations

from pathlib import Path

from numabench.topology.model import Core, Machine, Node, Package

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "topology"


def build_machine(*, sockets=1, nodes_per_socket=1, cores_per_node=2, threads_per_core=1,
                  l3_per_node=1, memory_only_nodes=0, hybrid=None, usable=None,
                  nodes_usable=None, node_memory=16 << 30, memoryless_cpu_nodes=(),
                  offline=()) -> Machine:
    """A Machine as a reader would build it.

    hybrid=(p, e): one socket, one node, p performance cores with threads_per_core threads then e
    single-thread efficiency cores. usable: the usable CPUs (default: all online).
    """
    if hybrid:
        specs = [(0, 0, threads_per_core, "performance")] * hybrid[0] + \
                [(0, 0, 1, "efficiency")] * hybrid[1]
    else:
        specs = [(s, s * nodes_per_socket + n, threads_per_core, "uniform")
                 for s in range(sockets) for n in range(nodes_per_socket)
                 for _ in range(cores_per_node)]
    n_cpu_nodes = 1 if hybrid else sockets * nodes_per_socket
    per_l3 = max(1, (len(specs) // n_cpu_nodes) // l3_per_node)
    cpus_of: list[list[int]] = [[] for _ in specs]
    nxt = 0
    for t in range(max(s[2] for s in specs)):
        for i, s in enumerate(specs):
            if t < s[2]:
                cpus_of[i].append(nxt)
                nxt += 1
    offline = set(offline)
    cores = []
    for i, (sock, nidx, _, kind) in enumerate(specs):
        online = tuple(c for c in cpus_of[i] if c not in offline)
        if online:
            cores.append(Core(cpus=online, package=sock, node=nidx, l3=i // per_l3,
                              kind=kind, core_id=i))
    cores.sort(key=lambda c: c.cpus[0])
    online = tuple(sorted(c for core in cores for c in core.cpus))
    nodes = []
    for nid in range(n_cpu_nodes + memory_only_nodes):
        cpus = tuple(sorted(c for core in cores if core.node == nid for c in core.cpus))
        memory = 0 if nid in memoryless_cpu_nodes else node_memory
        nodes.append(Node(nid, cpus, memory))
    packages = tuple(
        Package(p, p, tuple(sorted(c for core in cores if core.package == p for c in core.cpus)),
                tuple(sorted({core.node for core in cores if core.package == p})))
        for p in range(1 if hybrid else sockets))
    l3s: dict[int, list[int]] = {}
    for core in cores:
        l3s.setdefault(core.l3, []).extend(core.cpus)
    return Machine(
        cpus_online=online,
        cpus_usable=tuple(sorted(usable)) if usable is not None else online,
        packages=packages,
        nodes=tuple(nodes),
        cores=tuple(cores),
        nodes_usable=tuple(nodes_usable) if nodes_usable is not None
        else tuple(n.id for n in nodes),
        l3_domains=tuple(tuple(sorted(v)) for _, v in sorted(l3s.items())),
    )


def article_machine() -> Machine:
    """2 sockets × 24 cores with SMT: node0 = 0-23,48-71, node1 = 24-47,72-95."""
    return build_machine(sockets=2, cores_per_node=24, threads_per_core=2)


def fixture_tarballs() -> list[Path]:
    return sorted(FIXTURES.glob("*/*.tar.bz2")) if FIXTURES.is_dir() else []


def test_article_machine_matches_the_article():
    m = article_machine()
    assert m.node(0).cpus == tuple(range(24)) + tuple(range(48, 72))
    assert m.node(1).cpus == tuple(range(24, 48)) + tuple(range(72, 96))
    assert len(m.cores) == 48 and m.cores[0].cpus == (0, 48)


def test_hybrid_machine_kinds():
    m = build_machine(hybrid=(6, 8), threads_per_core=2)
    assert len(m.cores) == 14
    assert m.cores[0].cpus == (0, 14) and m.cores[0].kind == "performance"
    assert m.cores[-1].kind == "efficiency" and len(m.cpus_online) == 20
