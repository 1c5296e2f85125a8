"""Every real-machine tree in ../shared/fixtures/topology is read as its ground truth says.

Ground truth: hwloc's expected lstopo output (.expected.console, or .expected.xml for two of
them) for the hwloc dumps, and the lscpu files captured beside the device-spr16-kvm tree. The
README table's counts are checked too.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pytest

from numabench.topology import (
    KIND_EFFICIENCY,
    KIND_PERFORMANCE,
    parse_cpulist,
    read_machine,
)

# README table: online CPUs, packages, NUMA nodes, cores, max threads/core, memory-only node ids,
# usable CPUs (None = all online).
README = {
    "32amd64-4s2n4c-cgroup2": (32, 4, 8, 32, 1, set(), set(range(6))),
    "memorysidecaches": (80, 2, 4, 40, 2, set(), None),
    "64amd64-4s2n4ca2co": (64, 4, 8, 32, 2, set(), None),
    "20em64t-hybrid-1p6c2t+2ca4co1t": (20, 1, 1, 14, 2, set(), None),
    "128arm-2pa2n8cluster4co": (128, 2, 4, 128, 1, set(), None),
    "16em64t-4s2c2t-offlines": (12, 4, 1, 7, 2, set(), None),
    "fakeheteromemtiers": (6, 1, 7, 6, 1, {4, 6, 8, 9}, None),
    "48amd64-4pa2n6c-sparse": (48, 4, 8, 48, 1, set(), None),
    "nvidia-dgx-gb10": (20, 1, 1, 20, 1, set(), None),
}
HWLOC = sorted(README)


# --- hwloc ground truth ----------------------------------------------------------------------


@dataclass
class Truth:
    pus: set[int] = field(default_factory=set)
    packages: dict[frozenset, int] = field(default_factory=dict)  # cpus → P#
    # node P# → CPUs of the object it hangs from (shared by every node attached there)
    node_parent_cpus: dict[int, frozenset] = field(default_factory=dict)
    cores: set[frozenset] = field(default_factory=set)
    l3: set[frozenset] = field(default_factory=set)
    l2: set[frozenset] = field(default_factory=set)
    performance: set[int] = field(default_factory=set)  # CPUs of the most efficient-ranked kind
    efficiency: set[int] = field(default_factory=set)
    allowed: set[int] | None = None
    allowed_nodes: set[int] | None = None


_LINE = re.compile(r"^( *)([A-Za-z0-9]+)[^ ]* L#\d+(?: \((?:P#(\d+))?(.*)\))?")


def truth_from_console(text: str) -> Truth:
    t = Truth()
    stack: list[tuple[int, dict]] = [(-1, {"type": "Machine", "p": None, "kids": [], "line": ""})]
    for line in text.splitlines():
        if line.startswith(("depth", "Special", " depth")):
            break
        m = _LINE.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        obj = {"type": m.group(2), "p": int(m.group(3)) if m.group(3) else None, "kids": [],
               "line": line}
        while stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1]["kids"].append(obj)
        stack.append((indent, obj))

    def pus(o) -> frozenset:
        if o["type"] == "PU":
            return frozenset({o["p"]})
        return frozenset().union(*(pus(k) for k in o["kids"])) if o["kids"] else frozenset()

    def walk(o, cpu_parent):
        # Memory-side caches hold NUMANodes but no CPUs: a node's CPUs are those of the nearest
        # ancestor that is not one.
        holder = cpu_parent if o["type"] == "MemCache" else o
        for k in o["kids"]:
            if k["type"] == "Package":
                t.packages[pus(k)] = k["p"]
            elif k["type"] == "Core":
                t.cores.add(pus(k))
                kind = re.search(r"cpukind=(\d+)", k["line"])
                if kind:
                    (t.performance if kind.group(1) == "1" else t.efficiency).update(pus(k))
            elif k["type"] == "L3Cache":
                t.l3.add(pus(k))
            elif k["type"] == "L2Cache":
                t.l2.add(pus(k))
            elif k["type"] == "NUMANode":
                t.node_parent_cpus[k["p"]] = pus(holder)
            walk(k, holder)

    root = stack[0][1]
    t.pus = set(pus(root))
    walk(root, root)
    return t


def hwloc_bitmap(text: str) -> set[int]:
    value = 0
    for word in text.split(","):
        value = (value << 32) | int(word, 16)
    return {b for b in range(value.bit_length()) if value >> b & 1}


def truth_from_xml(text: str) -> Truth:
    t = Truth()
    root = ET.fromstring(text).find("object")
    t.pus = hwloc_bitmap(root.get("complete_cpuset"))
    t.allowed = hwloc_bitmap(root.get("allowed_cpuset"))
    t.allowed_nodes = hwloc_bitmap(root.get("allowed_nodeset"))
    for o in root.iter("object"):
        cpus = frozenset(hwloc_bitmap(o.get("complete_cpuset")))
        if o.get("type") == "Package":
            t.packages[cpus] = int(o.get("os_index"))
        elif o.get("type") == "Core":
            t.cores.add(cpus)
        elif o.get("type") == "L3Cache":
            t.l3.add(cpus)
        elif o.get("type") == "NUMANode":
            t.node_parent_cpus[int(o.get("os_index"))] = cpus
    kinds = sorted(ET.fromstring(text).iter("cpukind"),
                   key=lambda k: int(k.get("forced_efficiency", k.get("efficiency", "0"))))
    if len(kinds) == 2:
        t.efficiency = hwloc_bitmap(kinds[0].get("cpuset"))
        t.performance = hwloc_bitmap(kinds[1].get("cpuset"))
    return t


@pytest.fixture(scope="module")
def truths(topology_fixture_dir) -> dict[str, Truth]:
    out = {}
    for name in HWLOC:
        console = topology_fixture_dir / "hwloc" / f"{name}.expected.console"
        if console.exists():
            out[name] = truth_from_console(console.read_text())
        else:
            out[name] = truth_from_xml((topology_fixture_dir / "hwloc" / f"{name}.expected.xml").read_text())
    return out


def test_every_fixture_is_covered(topology_roots):
    assert set(topology_roots) == set(README) | {"device-spr16-kvm"}


@pytest.mark.parametrize("name", HWLOC)
def test_hwloc_fixture_matches_ground_truth(name, topology_roots, truths):
    m = read_machine(topology_roots[name])
    t = truths[name]
    online, npkg, nnodes, ncores, tpc, memory_only, usable = README[name]

    # CPUs: hwloc lists online PUs only.
    assert set(m.cpus_online) == t.pus and len(m.cpus_online) == online
    assert set(m.cpus_usable) == (usable if usable is not None else t.pus)
    if t.allowed is not None:
        assert set(m.cpus_usable) == t.allowed

    # Packages: CPU sets, their physical ids as labels, ordered by lowest CPU, indexed in order.
    # (hwloc drops what the cgroup hides entirely: there the ground truth is a subset.)
    restricted = t.allowed is not None
    pkgs = {frozenset(p.cpus): p.id for p in m.packages}
    assert (t.packages.items() <= pkgs.items()) if restricted else (pkgs == t.packages)
    assert len(m.packages) == npkg
    assert [p.cpus[0] for p in m.packages] == sorted(p.cpus[0] for p in m.packages)
    assert [p.index for p in m.packages] == list(range(npkg))

    # Nodes: kernel ids; CPUs = those of the object hwloc hangs the node from, except that where
    # several nodes share one object, only one of them holds the CPUs (the rest are memory-only).
    ids = [n.id for n in m.nodes]
    assert (set(t.node_parent_cpus) <= set(ids)) if restricted else (ids == sorted(t.node_parent_cpus))
    assert len(m.nodes) == nnodes
    shown = [n for n in m.nodes if n.id in t.node_parent_cpus]
    for n in shown:
        assert not n.cpus or frozenset(n.cpus) == t.node_parent_cpus[n.id], n
    assert all(n.memory_bytes and n.memory_bytes > 0 for n in m.nodes)
    for cpus in set(t.node_parent_cpus.values()):
        holders = [n for n in shown if t.node_parent_cpus[n.id] == cpus and n.cpus]
        assert len(holders) == (1 if cpus else 0)
    assert {n.id for n in m.nodes if n.memory_only} == memory_only
    if t.allowed_nodes is not None:
        assert set(m.nodes_usable) == t.allowed_nodes
    else:
        assert [n.id for n in m.nodes] == list(m.nodes_usable)

    # Cores as CPU sets (the cgroup XML only shows the allowed cores).
    ours = {frozenset(c.cpus) for c in m.cores}
    if name == "64amd64-4s2n4ca2co":
        # hwloc splits each Bulldozer compute unit into two Cores by core_id; the kernel's
        # thread_siblings pair them, and the README (32 cores x 2 threads) follows the kernel:
        # each of our cores is one compute unit = one hwloc L2 = two hwloc Cores.
        assert ours == t.l2
        assert all(sum(1 for h in t.cores if h <= c) == 2 for c in ours)
    elif restricted:
        assert t.cores <= ours
    else:
        assert ours == t.cores
    assert len(m.cores) == ncores and m.threads_per_core == tpc
    for c in m.cores:
        assert c.cpus[0] in m.packages[c.package].cpus
        assert c.node is not None and set(c.cpus) <= set(m.node(c.node).cpus)
        assert c.l3 is None or set(c.cpus) <= set(m.l3_domains[c.l3])

    # L3 domains as CPU sets, where hwloc shows L3 caches.
    if t.l3:
        l3 = {frozenset(d) for d in m.l3_domains}
        assert (t.l3 <= l3) if restricted else (l3 == t.l3)

    # Core kinds.
    if t.performance:
        assert {x for c in m.cores if c.kind == KIND_PERFORMANCE for x in c.cpus} == t.performance
        assert {x for c in m.cores if c.kind == KIND_EFFICIENCY for x in c.cpus} == t.efficiency
    else:
        assert m.kinds == ("uniform",)
    assert not m.warnings, m.warnings


def test_offline_cpus_fixture(topology_roots):
    m = read_machine(topology_roots["16em64t-4s2c2t-offlines"])
    assert not {2, 5, 13, 14} & set(m.cpus_online)
    assert m.node(0).cpus == m.cpus_online  # node0's cpumap names offline CPUs too; dropped


def test_sparse_node_ids_and_distances(topology_roots):
    m = read_machine(topology_roots["48amd64-4pa2n6c-sparse"])
    assert [n.id for n in m.nodes] == [0, 1, 2, 33, 34, 45, 72, 73]
    assert all(len(n.distances) == 8 and n.distances[i] == 10 for i, n in enumerate(m.nodes))
    assert m.packages[1].nodes == (2, 33)


def test_cgroup_fixture_limits_cpus_and_mems(topology_roots):
    m = read_machine(topology_roots["32amd64-4s2n4c-cgroup2"])
    assert m.cpus_usable == (0, 1, 2, 3, 4, 5)
    assert m.nodes_usable == (0, 1, 2, 3, 4, 5)
    assert [len(c.usable_cpus(m.usable_set)) for c in m.usable_cores()] == [1] * 6


def test_bulldozer_siblings_with_different_core_ids(topology_roots):
    m = read_machine(topology_roots["64amd64-4s2n4ca2co"])
    assert m.cores[0].cpus == (0, 1)
    # Raw core_ids repeat across packages: the CPU set, not core_id, identifies a core.
    assert len({c.core_id for c in m.cores}) < len(m.cores)


def test_arm_clusters_and_odd_package_ids(topology_roots):
    m = read_machine(topology_roots["128arm-2pa2n8cluster4co"])
    assert [p.id for p in m.packages] == [36, 8442]
    assert len(m.clusters) == 32 and all(len(c) == 4 for c in m.clusters)
    assert {c.cluster for c in m.cores} == set(range(32))
    assert "asimddp" in m.flags


def test_sub_numa_clustering_l3_spans_nodes(topology_roots):
    m = read_machine(topology_roots["memorysidecaches"])
    assert len(m.l3_domains) == 2
    assert all(len(p.nodes) == 2 for p in m.packages)
    assert {"avx512f", "avx512_vnni"} <= m.flags


# --- captured device-spr16-kvm: lscpu files beside it ----------------------------------------


def test_captured_spr_matches_its_lscpu(topology_roots):
    root = topology_roots["device-spr16-kvm"]
    p_text = (root / "lscpu_p.txt").read_text()
    # Independent reading of the captured `lscpu -p`: cores are (socket, core) pairs.
    cores: dict[tuple, set] = {}
    sockets: dict[str, set] = {}
    nodes: dict[str, set] = {}
    for line in p_text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cpu, core, socket, node = line.split(",")[:4]
        cores.setdefault((socket, core), set()).add(int(cpu))
        sockets.setdefault(socket, set()).add(int(cpu))
        nodes.setdefault(node, set()).add(int(cpu))
    summary = (root / "lscpu.txt").read_text()
    field_of = dict(re.findall(r"^([^:\n]+):\s+(.*)$", summary, re.MULTILINE))

    m = read_machine(root, lscpu_text=p_text)
    assert not m.warnings, m.warnings
    assert len(m.cpus_online) == int(field_of["CPU(s)"])
    assert m.cpus_online == parse_cpulist(field_of["On-line CPU(s) list"])
    assert m.cpus_usable == m.cpus_online
    assert {frozenset(c.cpus) for c in m.cores} == {frozenset(s) for s in cores.values()}
    assert {frozenset(p.cpus) for p in m.packages} == {frozenset(s) for s in sockets.values()}
    assert {frozenset(n.cpus) for n in m.nodes} == {frozenset(s) for s in nodes.values()}
    assert m.node(0).cpus == parse_cpulist(field_of["NUMA node0 CPU(s)"])
    assert m.threads_per_core == int(field_of["Thread(s) per core"])
    assert len(m.packages) == int(field_of["Socket(s)"])
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_vnni", "avx512_bf16"} <= m.flags
    assert m.flags <= set(field_of["Flags"].split())
    assert m.model_name == field_of["Model name"]


def test_captured_spr_lscpu_e_agrees(topology_roots):
    root = topology_roots["device-spr16-kvm"]
    m = read_machine(root)
    rows = [line.split() for line in (root / "lscpu_e.txt").read_text().splitlines()[1:] if line.strip()]
    for cpu, node, socket, _core, _, online in rows:
        assert online == "yes" and int(cpu) in m.cpus_online
        c = m.core_of(int(cpu))
        assert c.node == int(node) and m.packages[c.package].id == int(socket)
