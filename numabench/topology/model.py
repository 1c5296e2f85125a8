"""Frozen facts about a machine's CPUs and memory.

Everything here is data: readers (sysfs, lscpu) build a Machine, planners read it. A core, a
package and a node are identified by the set of CPUs they hold; the kernel's numeric ids are
kept as labels only (they repeat across packages, have gaps and can be -1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Core kinds. "uniform" on machines where all cores are alike.
KIND_UNIFORM = "uniform"
KIND_PERFORMANCE = "performance"
KIND_EFFICIENCY = "efficiency"
CORE_KINDS = (KIND_UNIFORM, KIND_PERFORMANCE, KIND_EFFICIENCY)

JSON_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Core:
    """One physical core: the online CPUs that share it (SMT siblings), sorted."""

    cpus: tuple[int, ...]
    package: int  # index into Machine.packages (not physical_package_id)
    node: int | None  # NUMA node id (the kernel's, as numactl wants it); None if unknown
    l3: int | None = None  # index into Machine.l3_domains
    cluster: int | None = None  # index of the cluster (ARM) the core belongs to, if known
    die: int | None = None  # index of the die, if the kernel exposes more than one per package
    kind: str = KIND_UNIFORM
    core_id: int | None = None  # the kernel's label, informational only

    def usable_cpus(self, usable: frozenset[int] | set[int]) -> tuple[int, ...]:
        return tuple(c for c in self.cpus if c in usable)


@dataclass(frozen=True)
class Package:
    index: int  # position in Machine.packages, ordered by lowest CPU
    id: int | None  # physical_package_id, a label (may be odd, e.g. 36 and 8442, or -1)
    cpus: tuple[int, ...]
    nodes: tuple[int, ...]  # NUMA node ids with CPUs in this package


@dataclass(frozen=True)
class Node:
    id: int  # the kernel's NUMA node id (sparse: 0, 1, 33, 72 ... are all possible)
    cpus: tuple[int, ...]  # online CPUs; empty for memory-only nodes
    memory_bytes: int | None  # MemTotal of the node, None when unreadable
    distances: tuple[int, ...] = ()  # SLIT row, aligned with Machine.nodes order

    @property
    def memory_only(self) -> bool:
        return not self.cpus


@dataclass(frozen=True)
class Machine:
    """What the process may use on this machine, as facts."""

    cpus_online: tuple[int, ...]
    cpus_usable: tuple[int, ...]  # affinity ∩ online ∩ cgroup cpuset
    packages: tuple[Package, ...]
    nodes: tuple[Node, ...]  # all NUMA nodes, memory-only ones included, ordered by id
    cores: tuple[Core, ...]  # ordered by lowest CPU
    nodes_usable: tuple[int, ...]  # memory nodes the process may allocate on
    l3_domains: tuple[tuple[int, ...], ...] = ()  # CPU sets sharing one L3
    flags: frozenset[str] = frozenset()  # inference-relevant CPU flags (avx512*, amx*, vnni)
    model_name: str = ""
    source: str = "/"  # root prefix the facts were read from, or "lscpu:<file>"
    cgroup_cpu_quota: float | None = None  # cpu.max quota in CPUs, None = unlimited/unknown
    cpus_isolated: tuple[int, ...] = ()
    cpus_nohz_full: tuple[int, ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Index targets of Core.die / Core.cluster: CPU sets, ordered by lowest CPU.
    dies: tuple[tuple[int, ...], ...] = ()
    clusters: tuple[tuple[int, ...], ...] = ()

    # --- derived views (pure) -------------------------------------------------------------

    @property
    def usable_set(self) -> frozenset[int]:
        return frozenset(self.cpus_usable)

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"NUMA node {node_id} does not exist on this machine")

    def usable_cores(self) -> tuple[Core, ...]:
        """Cores with at least one usable CPU."""
        u = self.usable_set
        return tuple(c for c in self.cores if any(x in u for x in c.cpus))

    def physical_cpu(self, core: Core) -> int:
        """The CPU used for a core when SMT is off: its lowest usable CPU."""
        cpus = core.usable_cpus(self.usable_set)
        if not cpus:
            raise ValueError(f"core {list(core.cpus)} has no usable CPU")
        return cpus[0]

    def core_of(self, cpu: int) -> Core | None:
        for c in self.cores:
            if cpu in c.cpus:
                return c
        return None

    @property
    def threads_per_core(self) -> int:
        return max((len(c.cpus) for c in self.cores), default=1)

    @property
    def smt(self) -> bool:
        return self.threads_per_core > 1

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({c.kind for c in self.cores}))
