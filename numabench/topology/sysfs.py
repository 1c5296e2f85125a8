"""Read a Machine from sysfs and procfs under a root prefix.

Every path is built from `root`, so captured trees and generated fixtures read exactly like the
live system. Only named files are read; nothing is walked (captured trees hold symlink loops).

Error policy (documented in docs/topology-json.md):
- no CPU information at all, or garbage in a CPU list or mask → TopologyError naming the file;
- a missing or unreadable optional file → a warning in Machine.warnings and a documented fallback.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from numabench.errors import TopologyError
from numabench.fileio import FileReadError, read_text
from numabench.topology import cgroup as cg
from numabench.topology.cpulist import format_cpulist, parse_cpulist, parse_cpumask
from numabench.topology.model import (
    KIND_EFFICIENCY,
    KIND_PERFORMANCE,
    KIND_UNIFORM,
    Core,
    Machine,
    Node,
    Package,
)

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"

# CPU flags that change which inference kernels run fast (x86 and ARM spellings).
_FLAG_NAMES = frozenset({
    "avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "avx_ne_convert", "avx_ifma",
    "asimd", "asimddp", "asimdhp", "asimdfhm", "sve", "sve2", "i8mm", "bf16", "svebf16",
    "svei8mm", "sme", "sme2",
})
_FLAG_PREFIXES = ("avx512", "amx")

# Frequencies or capacities within this ratio are one core kind (Turbo Boost Max 3.0 gives a
# few favoured cores a ~5% higher max frequency; they are not a different kind of core).
_KIND_GAP = 1.10


def inference_flags(flags) -> frozenset[str]:
    return frozenset(f for f in flags if f in _FLAG_NAMES or f.startswith(_FLAG_PREFIXES))


@dataclass
class _Tree:
    """File access under a root prefix, collecting warnings."""

    root: Path
    warnings: list[str] = field(default_factory=list)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def show(self, rel: str) -> str:
        """A path as the user should see it in messages."""
        return str(self.path(rel))

    def read(self, rel: str, *, required: bool = False) -> str | None:
        """Text of a file; None if it is missing (or unreadable, with a warning)."""
        p = self.path(rel)
        if not p.exists():
            if required:
                raise TopologyError(f"{p}: missing")
            return None
        try:  # odd bytes are replaced: the parsers then refuse them, naming the file
            return read_text(p, "sysfs file", errors="replace")
        except FileReadError as e:
            if required:
                raise TopologyError(str(e)) from None
            self.warnings.append(f"{e}; ignored")
            return None

    def cpus(self, rel: str, *, mask: bool = False, required: bool = False) -> tuple[int, ...] | None:
        """A CPU list (or hex mask) file; garbage is an error naming the file."""
        text = self.read(rel, required=required)
        if text is None:
            return None
        try:
            return parse_cpumask(text) if mask else parse_cpulist(text)
        except ValueError as e:
            raise TopologyError(f"{self.path(rel)}: {e}") from None

    def integer(self, rel: str) -> int | None:
        text = self.read(rel)
        if text is None:
            return None
        try:
            return int(text.replace("\x00", "").strip())
        except ValueError:
            self.warnings.append(f"{self.path(rel)}: not an integer ({text.strip()[:40]!r}); ignored")
            return None

    def listdir(self, rel: str) -> list[str] | None:
        try:
            return os.listdir(self.path(rel))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TopologyError(f"{self.path(rel)}: cannot list ({e.strerror or e})") from None


def _numbered(names, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}(\d+)$")
    return sorted(int(m.group(1)) for n in names or () if (m := pattern.match(n)))


# --- CPUs ------------------------------------------------------------------------------------


def _online_cpus(t: _Tree) -> tuple[int, ...]:
    names = t.listdir(CPU_DIR)
    if names is None:
        raise TopologyError(f"{t.show(CPU_DIR)}: missing — no sysfs CPU information under "
                            f"{t.root} (is it a filesystem root with sys/ and proc/?)")
    present = _numbered(names, "cpu")
    listed = t.cpus(f"{CPU_DIR}/online")
    if listed is None and not present:
        raise TopologyError(f"{t.show(CPU_DIR)}: no cpuN folders and no 'online' file")
    # Old kernels have no cpu/online: per-CPU `online` files decide (missing = online).
    candidates = listed if listed is not None else present
    online = []
    for cpu in candidates:
        flag = t.read(f"{CPU_DIR}/cpu{cpu}/online")
        if flag is not None and flag.strip() == "0":
            if listed is not None:
                t.warnings.append(f"{t.show(f'{CPU_DIR}/cpu{cpu}/online')} says offline but "
                                  f"{t.show(f'{CPU_DIR}/online')} lists cpu{cpu}; treated as offline")
            continue
        online.append(cpu)
    if not online:
        raise TopologyError(f"{t.show(CPU_DIR)}: no online CPUs")
    return tuple(online)


def _topology_set(t: _Tree, cpu: int, names: tuple[str, ...]) -> tuple[int, ...] | None:
    """First of several topology files that exists: `*_list` as lists, others as masks."""
    for name in names:
        rel = f"{CPU_DIR}/cpu{cpu}/topology/{name}"
        cpus = t.cpus(rel, mask=not name.endswith("_list"))
        if cpus is not None:
            return cpus
    return None


_CORE_FILES = ("core_cpus_list", "thread_siblings_list", "core_cpus", "thread_siblings")
_PACKAGE_FILES = ("package_cpus_list", "core_siblings_list", "package_cpus", "core_siblings")
_DIE_FILES = ("die_cpus_list", "die_cpus")
_CLUSTER_FILES = ("cluster_cpus_list", "cluster_cpus")


def _group(online: tuple[int, ...], sets: dict[int, tuple[int, ...]], what: str,
           warnings: list[str]) -> list[tuple[int, ...]]:
    """Partition online CPUs into the groups each CPU names (restricted to online CPUs).

    CPUs whose files disagree (A names B but B does not name A) are merged, with a warning, so
    that the result is always a partition.
    """
    parent = {c: c for c in online}

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    onl = set(online)
    for cpu, members in sets.items():
        for m in members:
            if m in onl:
                parent[find(m)] = find(cpu)
    groups: dict[int, list[int]] = {}
    for c in online:
        groups.setdefault(find(c), []).append(c)
    result = sorted((tuple(sorted(g)) for g in groups.values()), key=lambda g: g[0])
    for g in result:
        claims = {tuple(sorted(set(sets.get(c, (c,))) & onl | {c})) for c in g}
        if len(claims) > 1:
            warnings.append(f"{what} files disagree for CPUs {format_cpulist(g)}; merged")
    return result


def _index_of(groups: list[tuple[int, ...]]) -> dict[int, int]:
    return {c: i for i, g in enumerate(groups) for c in g}


# --- nodes -----------------------------------------------------------------------------------


def _meminfo_total(t: _Tree, rel: str) -> int | None:
    text = t.read(rel)
    if text is None:
        t.warnings.append(f"{t.show(rel)}: missing; node memory unknown")
        return None
    m = re.search(r"MemTotal:\s*(\d+)\s*kB", text)
    if not m:
        t.warnings.append(f"{t.show(rel)}: no 'MemTotal: N kB' line; node memory unknown")
        return None
    return int(m.group(1)) * 1024


def _read_nodes(t: _Tree, online: tuple[int, ...]) -> list[Node]:
    names = t.listdir(NODE_DIR)
    ids = _numbered(names, "node")
    if not ids:
        # Kernels without CONFIG_NUMA have no node folder: one node 0 holding everything.
        t.warnings.append(f"{t.show(NODE_DIR)}: no NUMA nodes; assuming a single node 0")
        return [Node(id=0, cpus=online, memory_bytes=_meminfo_total(t, "proc/meminfo"),
                     distances=(10,))]
    onl = set(online)
    nodes = []
    for nid in ids:
        base = f"{NODE_DIR}/node{nid}"
        cpus = t.cpus(f"{base}/cpulist")
        if cpus is None:
            cpus = t.cpus(f"{base}/cpumap", mask=True)
        if cpus is None:
            t.warnings.append(f"{t.show(base)}: no cpulist or cpumap; node treated as having no CPUs")
            cpus = ()
        distances: tuple[int, ...] = ()
        text = t.read(f"{base}/distance")
        if text is not None:
            try:
                distances = tuple(int(x) for x in text.split())
            except ValueError:
                t.warnings.append(f"{t.show(base + '/distance')}: not a list of integers; ignored")
            if distances and len(distances) != len(ids):
                t.warnings.append(f"{t.show(base + '/distance')}: {len(distances)} entries for "
                                  f"{len(ids)} nodes; ignored")
                distances = ()
        nodes.append(Node(id=nid, cpus=tuple(c for c in cpus if c in onl),
                          memory_bytes=_meminfo_total(t, f"{base}/meminfo"), distances=distances))
    # A CPU belongs to one node; a tree that says otherwise is broken, and guessing which node
    # is right would silently lose the other one.
    owner: dict[int, int] = {}
    for node in nodes:
        for cpu in node.cpus:
            if cpu in owner:
                raise TopologyError(
                    f"{t.show(f'{NODE_DIR}/node{owner[cpu]}/cpulist')} and "
                    f"{t.show(f'{NODE_DIR}/node{node.id}/cpulist')} both list CPU {cpu}: a CPU "
                    f"belongs to one NUMA node (nodes {owner[cpu]} and {node.id})")
            owner[cpu] = node.id
    return nodes


# --- core kinds ------------------------------------------------------------------------------


def _rank_groups(values: dict[int, float]) -> dict[int, str] | None:
    """Kinds from a per-CPU number (capacity, frequency): the top cluster is performance."""
    distinct = sorted(set(values.values()))
    if not distinct or distinct[0] <= 0:
        return None
    top_start = distinct[0]
    for lo, hi in itertools.pairwise(distinct):
        if hi / lo > _KIND_GAP:
            top_start = hi
    if top_start == distinct[0]:
        return None  # all alike
    return {c: KIND_PERFORMANCE if v >= top_start else KIND_EFFICIENCY for c, v in values.items()}


def _core_kinds(t: _Tree, online: tuple[int, ...]) -> tuple[dict[int, str], str]:
    """Per-CPU kind and where it came from. Sources, best first (see docs/topology-json.md)."""
    p = t.cpus("sys/devices/cpu_core/cpus")
    e = t.cpus("sys/devices/cpu_atom/cpus")
    if p is not None and e is not None:
        kinds = {c: KIND_PERFORMANCE for c in p} | {c: KIND_EFFICIENCY for c in e}
        return {c: kinds.get(c, KIND_UNIFORM) for c in online}, "cpu_core/cpu_atom"
    for rel, label in (("cpu_capacity", "cpu_capacity"), ("cpufreq/base_frequency", "base frequency"),
                       ("cpufreq/cpuinfo_max_freq", "max frequency")):
        values = {}
        for cpu in online:
            v = t.integer(f"{CPU_DIR}/cpu{cpu}/{rel}")
            if v is None:
                break
            values[cpu] = float(v)
        else:
            kinds = _rank_groups(values)
            if kinds is not None:
                return kinds, label
            if label == "cpu_capacity":
                break  # equal capacities are authoritative: frequencies would only add noise
    return {c: KIND_UNIFORM for c in online}, ""


# --- caches, flags, process ------------------------------------------------------------------


def _l3_set(t: _Tree, cpu: int) -> tuple[int, ...] | None:
    base = f"{CPU_DIR}/cpu{cpu}/cache"
    for idx in _numbered(t.listdir(base), "index"):
        level = t.read(f"{base}/index{idx}/level")
        if level is None or level.strip() != "3":
            continue
        kind = (t.read(f"{base}/index{idx}/type") or "Unified").strip()
        if kind == "Instruction":
            continue
        cpus = t.cpus(f"{base}/index{idx}/shared_cpu_list")
        if cpus is None:
            cpus = t.cpus(f"{base}/index{idx}/shared_cpu_map", mask=True)
        return cpus
    return None


def parse_cpuinfo(text: str) -> tuple[frozenset[str], str]:
    """Inference flags common to every processor, and the model name, from /proc/cpuinfo text."""
    common: set[str] | None = None
    model = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags = set(value.split())
            common = flags if common is None else common & flags
        elif key == "model name" and not model:
            model = value.strip()
    return inference_flags(common or ()), model


def _live_flags() -> tuple[frozenset[str], str]:
    try:
        import cpuinfo  # py-cpuinfo: slow (it may spawn processes), so only a fallback

        info = cpuinfo.get_cpu_info()
    except Exception:  # noqa: BLE001 - a fallback that must never break reading the machine
        return frozenset(), ""
    return inference_flags(info.get("flags", ())), info.get("brand_raw", "")


def parse_status(text: str) -> dict[str, str]:
    """Key → value of /proc/<pid>/status."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _process_limits(t: _Tree, live: bool) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """Allowed CPUs and memory nodes of the process; None where unknown (= no limit)."""
    rel = "proc/self/status"
    text = t.read(rel)
    status = parse_status(text) if text is not None else {}
    cpus = mems = None
    try:
        if "Cpus_allowed_list" in status:
            cpus = parse_cpulist(status["Cpus_allowed_list"])
        elif "Cpus_allowed" in status:
            cpus = parse_cpumask(status["Cpus_allowed"])
        if "Mems_allowed_list" in status:
            mems = parse_cpulist(status["Mems_allowed_list"])
        elif "Mems_allowed" in status:
            mems = parse_cpumask(status["Mems_allowed"])
    except ValueError as e:
        raise TopologyError(f"{t.path(rel)}: {e}") from None
    if live:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    return cpus, mems


# --- the machine -----------------------------------------------------------------------------


def read_sysfs(root: str | os.PathLike = "/", fallback: Machine | None = None) -> Machine:
    """Read the machine under `root` ("/" = the live system, with the live affinity).

    `fallback` (parsed lscpu output) supplies cores and packages of CPUs without topology files.
    """
    root_path = Path(root)
    live = root_path.resolve() == Path("/")
    t = _Tree(root_path)
    online = _online_cpus(t)

    # Topology sets per online CPU. CPUs without a topology folder are filled in later.
    core_sets, pkg_sets, die_sets, cluster_sets = {}, {}, {}, {}
    pkg_ids: dict[int, int] = {}
    core_ids: dict[int, int] = {}
    missing = []
    for cpu in online:
        core = _topology_set(t, cpu, _CORE_FILES)
        if core is None:
            missing.append(cpu)
            continue
        core_sets[cpu] = core
        pkg = _topology_set(t, cpu, _PACKAGE_FILES)
        if pkg is not None:
            pkg_sets[cpu] = pkg
        die = _topology_set(t, cpu, _DIE_FILES)
        if die is not None:
            die_sets[cpu] = die
        cluster = _topology_set(t, cpu, _CLUSTER_FILES)
        if cluster is not None:
            cluster_sets[cpu] = cluster
        pid = t.integer(f"{CPU_DIR}/cpu{cpu}/topology/physical_package_id")
        if pid is not None:
            pkg_ids[cpu] = pid
        cid = t.integer(f"{CPU_DIR}/cpu{cpu}/topology/core_id")
        if cid is not None:
            core_ids[cpu] = cid
    # Packages from physical_package_id where no package list exists (ids are labels, but within
    # one machine the same id means the same package).
    for cpu in core_sets:
        if cpu not in pkg_sets and cpu in pkg_ids:
            pkg_sets[cpu] = tuple(c for c, p in pkg_ids.items() if p == pkg_ids[cpu])

    nodes = _read_nodes(t, online)
    kinds, _ = _core_kinds(t, online)
    l3_sets = {}
    for cpu in online:
        s = _l3_set(t, cpu)
        if s is not None:
            l3_sets[cpu] = s

    flags, model = frozenset(), ""
    cpuinfo_text = t.read("proc/cpuinfo")
    if cpuinfo_text is not None:
        flags, model = parse_cpuinfo(cpuinfo_text)
    elif live:
        flags, model = _live_flags()
    else:
        t.warnings.append(f"{t.show('proc/cpuinfo')}: missing; CPU flags unknown")

    allowed_cpus, allowed_mems = _process_limits(t, live)
    limits = cg.read_cgroup_limits(t.root, t.warnings)
    isolated = t.cpus(f"{CPU_DIR}/isolated") or ()
    nohz_full = t.cpus(f"{CPU_DIR}/nohz_full") or ()

    return assemble(
        online=online, core_sets=core_sets, pkg_sets=pkg_sets, die_sets=die_sets,
        cluster_sets=cluster_sets, pkg_ids=pkg_ids, core_ids=core_ids, missing=missing,
        nodes=nodes, kinds=kinds, l3_sets=l3_sets, flags=flags, model=model,
        allowed_cpus=allowed_cpus, allowed_mems=allowed_mems, limits=limits,
        isolated=isolated, nohz_full=nohz_full, source=str(root), warnings=t.warnings,
        fallback=fallback)


def assemble(*, online, core_sets, pkg_sets, die_sets, cluster_sets, pkg_ids, core_ids, missing,
             nodes, kinds, l3_sets, flags, model, allowed_cpus, allowed_mems, limits, isolated,
             nohz_full, source, warnings, fallback=None) -> Machine:
    """Build the Machine from per-CPU facts. `fallback` (an lscpu Machine) fills CPUs that have
    no topology files."""
    warnings = list(warnings)
    if missing:
        if fallback is not None:
            for cpu in missing:
                fb_core = fallback.core_of(cpu)
                if fb_core is None:
                    continue
                core_sets[cpu] = fb_core.cpus
                pkg_sets[cpu] = fallback.packages[fb_core.package].cpus
                if fallback.packages[fb_core.package].id is not None:
                    pkg_ids[cpu] = fallback.packages[fb_core.package].id
            still = [c for c in missing if c not in core_sets]
            warnings.append(f"CPUs {format_cpulist(missing)} have no topology files; "
                            f"taken from lscpu" + (f" except {format_cpulist(still)}" if still else ""))
        else:
            still = missing
        if still:
            if fallback is None:
                warnings.append(f"CPUs {format_cpulist(still)} have no topology files; "
                                "each is treated as its own core (give --lscpu to fill them in)")
            for cpu in still:
                core_sets[cpu] = (cpu,)

    cores_g = _group(online, core_sets, "core sibling", warnings)
    # CPUs with no package information at all go together into one package.
    no_pkg = [c for c in online if c not in pkg_sets]
    if no_pkg:
        if len(no_pkg) != len(online):
            warnings.append(f"CPUs {format_cpulist(no_pkg)} have no package information; "
                            "grouped as one package")
        for c in no_pkg:
            pkg_sets[c] = tuple(no_pkg)
    for g in cores_g:  # a core never straddles packages
        for c in g[1:]:
            pkg_sets[c] = tuple(set(pkg_sets[c]) | {g[0]})
    pkgs_g = _group(online, pkg_sets, "package", warnings)
    pkg_of = _index_of(pkgs_g)

    node_of = {c: n.id for n in nodes for c in n.cpus}
    unplaced = [c for c in online if c not in node_of]
    if unplaced:
        warnings.append(f"CPUs {format_cpulist(unplaced)} are in no NUMA node")

    l3_g = _group([c for c in online if c in l3_sets], l3_sets, "L3 shared_cpu", warnings) \
        if l3_sets else []
    l3_of = _index_of(l3_g)

    # Dies matter only where a package holds several; clusters only where one holds several cores.
    dies_g = _group(online, die_sets, "die", warnings) if len(die_sets) == len(online) else []
    if not any(sum(1 for d in dies_g if d[0] in p) > 1 for p in pkgs_g):
        dies_g = []
    die_of = _index_of(dies_g)
    clusters_g = (_group(online, cluster_sets, "cluster", warnings)
                  if len(cluster_sets) == len(online) else [])
    core_of_cpu = _index_of(cores_g)
    if not any(len({core_of_cpu[c] for c in cl}) > 1 for cl in clusters_g):
        clusters_g = []
    cluster_of = _index_of(clusters_g)

    cores = tuple(
        Core(cpus=g, package=pkg_of[g[0]], node=node_of.get(g[0]), l3=l3_of.get(g[0]),
             cluster=cluster_of.get(g[0]), die=die_of.get(g[0]),
             kind=kinds.get(g[0], KIND_UNIFORM), core_id=core_ids.get(g[0]))
        for g in cores_g)
    packages = tuple(
        Package(index=i, id=pkg_ids.get(g[0]), cpus=g,
                nodes=tuple(sorted({node_of[c] for c in g if c in node_of})))
        for i, g in enumerate(pkgs_g))

    usable = set(online)
    if allowed_cpus is not None:
        usable &= set(allowed_cpus)
    if limits.cpus is not None:
        usable &= set(limits.cpus)
    if not usable:
        warnings.append("no usable CPU: affinity, online CPUs and cgroup cpuset do not intersect")
    node_ids = [n.id for n in nodes]
    mems = {n.id for n in nodes if n.memory_bytes != 0}
    if allowed_mems is not None:
        mems &= set(allowed_mems)
    if limits.mems is not None:
        mems &= set(limits.mems)
    nodes_usable = tuple(n for n in node_ids if n in mems)

    usable_cores = sum(1 for c in cores if any(x in usable for x in c.cpus))
    if limits.quota is not None and limits.quota < usable_cores:
        warnings.append(f"cgroup cpu.max allows {limits.quota:g} CPUs of time but {usable_cores} "
                        "cores are usable: instances on all cores will be throttled")
    for label, cpus in (("isolated", isolated), ("nohz_full", nohz_full)):
        if cpus:
            inside = sorted(set(cpus) & usable)
            warnings.append(f"CPUs {format_cpulist(cpus)} are {label}" + (
                f" (usable ones: {format_cpulist(inside)}; the scheduler does not balance them)"
                if inside else ""))

    return Machine(
        cpus_online=tuple(online), cpus_usable=tuple(sorted(usable)), packages=packages,
        nodes=tuple(nodes), cores=cores, nodes_usable=nodes_usable, l3_domains=tuple(l3_g),
        flags=frozenset(flags), model_name=model, source=source, cgroup_cpu_quota=limits.quota,
        cpus_isolated=tuple(isolated), cpus_nohz_full=tuple(nohz_full),
        warnings=tuple(dict.fromkeys(warnings)), dies=tuple(dies_g), clusters=tuple(clusters_g))
