"""The planner: a pure function from a Machine and a PlanRequest to a Plan.

Policies (documented for users in docs/plans.md):

- Cores, not CPUs: each core contributes its lowest usable CPU, or all its usable CPUs with SMT,
  and a core never goes to two instances.
- Order: node → package → L3 → cluster → CPU. Instance ids follow that order.
- A group stays inside one NUMA node unless it needs more cores than a node has; then it takes
  whole nodes and binds memory to all of them. Inside a node a group avoids straddling an L3.
- Groups are spread over nodes round-robin (node0, node1, node0, ...) so memory bandwidth is
  shared evenly; `--nodes` restricts the nodes used.
- Leftover cores: "idle" keeps them unused; "spread" hands each node's spare cores one by one to
  that node's groups, first groups first.
- Batch: split evenly, larger shares first (8 over 3 -> 3, 3, 2); a batch smaller than the number
  of instances is refused.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from numabench.errors import PlanError
from numabench.plans.model import InstancePlan, Plan, SeqRange, split_batch
from numabench.topology.cpulist import format_cpulist
from numabench.topology.model import (
    KIND_EFFICIENCY,
    KIND_PERFORMANCE,
    KIND_UNIFORM,
    Core,
    Machine,
)

LEFTOVER_POLICIES = ("idle", "spread")
KIND_ANY = "any"  # mix core kinds inside instances (only when asked)
KIND_MIXED = "mixed"  # InstancePlan.kind of an instance holding several kinds
CORE_KIND_CHOICES = (KIND_PERFORMANCE, KIND_EFFICIENCY, KIND_UNIFORM, KIND_ANY)
GROUP_BY = ("socket", "node")

# Preferred kind when the request does not name one: fastest cores first.
_KIND_PREFERENCE = (KIND_PERFORMANCE, KIND_UNIFORM, KIND_EFFICIENCY)


@dataclass(frozen=True)
class DispatchTier:
    """Smart dispatch: requests up to `max_seq` tokens go to `instances` groups of `cores`."""

    max_seq: int | None  # None = no upper bound (the last tier)
    cores: int | None  # None = one whole NUMA node per instance
    instances: int = 1


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; every field is optional and checked by make_plan."""

    instances: int | None = None
    cores_per_instance: int | None = None
    batch: int | None = None  # global batch; None = one sample per instance
    smt: bool = False
    nodes: tuple[int, ...] | None = None  # restrict to these NUMA nodes
    cpus: tuple[int, ...] | None = None  # restrict to these CPUs
    core_kind: str | None = None  # None = the fastest kind present; "any" mixes kinds
    leftover: str = "idle"
    group_by: str | None = None  # "socket" or "node": one instance per package / node
    tiers: tuple[DispatchTier, ...] = ()  # smart dispatch; exclusive with the fields above
    name: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class _Unit:
    """One core as the planner uses it: the core and the CPUs it contributes."""

    core: Core
    cpus: tuple[int, ...]
    order: tuple  # sort key: node → package → L3 → cluster → CPU


@dataclass(frozen=True)
class _Block:
    """The candidate cores of one NUMA node, in order."""

    node: int | None
    units: tuple[_Unit, ...]


# ---- entry point --------------------------------------------------------------------------


def make_plan(machine: Machine, request: PlanRequest) -> Plan:
    """Build a plan, or raise PlanError saying what cannot be done and what to try instead."""
    _check_request(request)
    blocks = _candidate_blocks(machine, request)
    seq_ranges: list[SeqRange | None]
    if request.tiers:
        groups, seq_ranges = _dispatch_groups(blocks, request.tiers)
    elif request.group_by:
        groups = _groups_by(blocks, request)
        seq_ranges = [None] * len(groups)
    else:
        groups = _equal_groups(blocks, request)
        seq_ranges = [None] * len(groups)

    shares = _batch_shares(request.batch, len(groups))
    hybrid = any(c.kind != KIND_UNIFORM for c in machine.cores)
    instances = []
    for i, (group, seq, share) in enumerate(zip(groups, seq_ranges, shares)):
        cpus = tuple(sorted(c for u in group for c in u.cpus))
        instances.append(InstancePlan(
            id=i,
            cpus=cpus,
            memory_nodes=_memory_nodes(machine, group, i),
            threads=len(cpus),
            batch=share,
            seq_range=seq,
            kind=_kind_label(group) if hybrid else None,
        ))
    return Plan(instances=tuple(instances), batch=sum(shares), smt=request.smt,
                name=request.name, description=request.description)


# ---- request checks -----------------------------------------------------------------------


def plannable_cores(machine: Machine) -> int:
    """How many physical cores a request without restrictions may use here: the usable cores of
    the fastest kind present (a hybrid machine's E-cores are not mixed in by default)."""
    return sum(len(b.units) for b in _candidate_blocks(machine, PlanRequest()))


def _check_request(r: PlanRequest) -> None:
    for flag, value in (("--instances", r.instances), ("--cores-per-instance", r.cores_per_instance),
                        ("--batch", r.batch)):
        if value is not None and value < 1:
            raise PlanError(f"{flag} must be at least 1, not {value}")
    if r.leftover not in LEFTOVER_POLICIES:
        raise PlanError(f"--leftover must be one of {', '.join(LEFTOVER_POLICIES)}, not {r.leftover!r}")
    if r.core_kind is not None and r.core_kind not in CORE_KIND_CHOICES:
        raise PlanError(f"--core-kind must be one of {', '.join(CORE_KIND_CHOICES)}, not {r.core_kind!r}")
    if r.group_by is not None and r.group_by not in GROUP_BY:
        raise PlanError(f"group_by must be one of {', '.join(GROUP_BY)}, not {r.group_by!r}")
    if r.tiers and (r.instances or r.cores_per_instance or r.group_by):
        raise PlanError("smart dispatch sets its own instances and cores per tier: "
                        "drop --instances / --cores-per-instance")
    if r.leftover == "spread" and r.cores_per_instance is not None:
        raise PlanError("--leftover spread changes group sizes, which contradicts "
                        "--cores-per-instance: give --instances alone, or use --leftover idle")
    if not (r.tiers or r.group_by or r.instances or r.cores_per_instance):
        raise PlanError("say how to split the machine: --instances N, --cores-per-instance K "
                        "or --preset NAME")
    for i, tier in enumerate(r.tiers):
        if tier.instances < 1 or (tier.cores is not None and tier.cores < 1):
            raise PlanError(f"dispatch tier {i}: cores and instances must be at least 1")
        if tier.max_seq is None and i != len(r.tiers) - 1:
            raise PlanError(f"dispatch tier {i} has no max_seq, so only the last tier may")


# ---- candidate cores ----------------------------------------------------------------------


def _candidate_blocks(machine: Machine, r: PlanRequest) -> list[_Block]:
    """The cores the request may use, grouped by NUMA node, each in planner order."""
    usable = machine.usable_set
    allowed = set(usable)
    if r.cpus is not None:
        unusable = sorted(set(r.cpus) - usable)
        if unusable:
            raise PlanError(f"--cpus names CPUs that are not usable here: {_cpulist(unusable)} "
                            f"(usable: {_cpulist(machine.cpus_usable)})")
        allowed = set(r.cpus)
    if r.nodes is not None:
        _check_nodes(machine, r.nodes)

    units = []
    for core in machine.cores:
        cpus = tuple(c for c in core.cpus if c in allowed)
        if not cpus or (r.nodes is not None and core.node not in r.nodes):
            continue
        if not r.smt:
            cpus = cpus[:1]  # the physical CPU: the lowest usable one
        order = (_none_first(core.node), core.package, _none_first(core.l3),
                 _none_first(core.cluster), cpus[0])
        units.append(_Unit(core, cpus, order))
    if not units:
        raise PlanError("no usable cores match the request (check --nodes, --cpus and the "
                        "machine's usable CPUs with `numabench topology`)")

    units = _filter_kind(units, r.core_kind)
    units.sort(key=lambda u: u.order)
    blocks: list[_Block] = []
    for u in units:
        if blocks and blocks[-1].node == u.core.node:
            blocks[-1] = _Block(u.core.node, blocks[-1].units + (u,))
        else:
            blocks.append(_Block(u.core.node, (u,)))
    return blocks


def _check_nodes(machine: Machine, nodes: Sequence[int]) -> None:
    known = {n.id: n for n in machine.nodes}
    for nid in nodes:
        if nid not in known:
            raise PlanError(f"--nodes: NUMA node {nid} does not exist here "
                            f"(nodes: {_cpulist(known)})")
        if known[nid].memory_only:
            raise PlanError(f"--nodes: NUMA node {nid} has memory only, no CPUs to run on")
        if not any(c in machine.usable_set for c in known[nid].cpus):
            raise PlanError(f"--nodes: NUMA node {nid} has no usable CPUs "
                            "(offline, or outside this process's affinity / cgroup)")


def _filter_kind(units: list[_Unit], kind: str | None) -> list[_Unit]:
    present = {u.core.kind for u in units}
    if kind == KIND_ANY:
        return units
    if kind is None:
        kind = next(k for k in _KIND_PREFERENCE if k in present)
    elif kind not in present:
        raise PlanError(f"--core-kind {kind}: no usable {kind} cores here "
                        f"(kinds present: {', '.join(sorted(present))})")
    return [u for u in units if u.core.kind == kind]


# ---- equal groups (--instances / --cores-per-instance) ------------------------------------


def _equal_groups(blocks: list[_Block], r: PlanRequest) -> list[list[_Unit]]:
    sizes = [len(b.units) for b in blocks]
    total, biggest = sum(sizes), max(sizes)
    n, k = r.instances, r.cores_per_instance
    if n is not None and n > total:
        raise PlanError(f"{n} instances need at least {n} cores; only {total} usable cores match "
                        f"the request: use --instances {total} or fewer")
    if k is None:
        ideal = total // n
        if ideal > biggest:  # each instance needs more than a node: whole nodes
            return _whole_node_groups(blocks, n, len(blocks) // n, r.leftover)
        # the largest equal size for which n groups fit without straddling a node
        k = next(k for k in range(ideal, 0, -1) if sum(s // k for s in sizes) >= n)
    elif k > biggest:
        per = _nodes_per_group(sizes, k)
        fit = len(blocks) // per
        if n is not None and n > fit:
            raise PlanError(f"{n} instances of {k} cores need {n * per} whole NUMA nodes; "
                            f"only {len(blocks)} have usable cores: use --instances {fit}")
        return _whole_node_groups(blocks, n or fit, per, "idle")
    else:
        fit = sum(s // k for s in sizes)
        if n is not None and n > fit:
            raise PlanError(f"{n} instances of {k} cores do not fit without straddling NUMA "
                            f"nodes (usable cores per node: {_node_sizes(blocks)}); at most "
                            f"{fit} fit: use --instances {fit} or fewer cores per instance")
        n = n or fit

    counts = _round_robin(n, [s // k for s in sizes])
    groups = []
    for block, count in zip(blocks, counts):
        if count == 0:
            continue
        group_sizes = split_batch(len(block.units), count) if r.leftover == "spread" else [k] * count
        groups.extend(_fill(block.units, group_sizes))
    return sorted(groups, key=lambda g: g[0].order)


def _round_robin(n: int, capacities: list[int]) -> list[int]:
    """How many groups each node gets: one per node in turn while it has room."""
    counts = [0] * len(capacities)
    placed = 0
    while placed < n:
        for i, cap in enumerate(capacities):
            if placed < n and counts[i] < cap:
                counts[i] += 1
                placed += 1
    return counts


def _nodes_per_group(sizes: list[int], k: int) -> int:
    """Whole nodes per group for k cores (k larger than a node); nodes must be alike."""
    if k > sum(sizes):
        raise PlanError(f"{k} cores per instance, but only {sum(sizes)} usable cores match the "
                        f"request: use --cores-per-instance {sum(sizes)} or fewer")
    if len(set(sizes)) > 1:
        raise PlanError(f"{k} cores per instance is more than one NUMA node holds, so each "
                        f"instance takes whole nodes, but nodes have different numbers of usable "
                        f"cores ({', '.join(map(str, sizes))}): use --instances instead")
    if k % sizes[0]:
        raise PlanError(f"{k} cores per instance is more than one NUMA node holds ({sizes[0]} "
                        f"usable cores), so each instance takes whole nodes: use a multiple of "
                        f"{sizes[0]}")
    return k // sizes[0]


def _whole_node_groups(blocks: list[_Block], n: int, per: int, leftover: str) -> list[list[_Unit]]:
    """n groups of consecutive whole nodes; spare nodes idle, or one each to the first groups."""
    counts = split_batch(len(blocks), n) if leftover == "spread" else [per] * n
    groups, start = [], 0
    for count in counts:
        groups.append([u for b in blocks[start:start + count] for u in b.units])
        start += count
    return groups


def _fill(units: Sequence[_Unit], group_sizes: Sequence[int]) -> list[list[_Unit]]:
    """Carve groups out of one node's cores, keeping each inside one L3 where it fits."""
    free = list(units)
    groups = []
    for size in group_sizes:
        group = _take(free, size)
        free = [u for u in free if u not in group]
        groups.append(group)
    return groups


def _take(free: list[_Unit], size: int) -> list[_Unit]:
    """The first L3 domain (in order) with room for the group, else the first free cores."""
    by_l3: dict = {}
    for u in free:
        by_l3.setdefault(u.core.l3, []).append(u)
    for domain in by_l3.values():
        if len(domain) >= size:
            return domain[:size]
    return free[:size]


# ---- one instance per socket / per node --------------------------------------------------


def _groups_by(blocks: list[_Block], r: PlanRequest) -> list[list[_Unit]]:
    units = [u for b in blocks for u in b.units]
    key = (lambda u: u.core.package) if r.group_by == "socket" else (lambda u: u.core.node)
    groups: dict = {}
    for u in units:
        groups.setdefault(key(u), []).append(u)
    result = sorted(groups.values(), key=lambda g: g[0].order)
    what = "socket" if r.group_by == "socket" else "NUMA node"
    if r.instances is not None and r.instances != len(result):
        raise PlanError(f"one instance per {what} gives {len(result)} instances, "
                        f"not --instances {r.instances}")
    if r.cores_per_instance is not None and any(len(g) != r.cores_per_instance for g in result):
        raise PlanError(f"one instance per {what} gives {'/'.join(str(len(g)) for g in result)} "
                        f"cores per instance, not --cores-per-instance {r.cores_per_instance}")
    return result


# ---- smart dispatch -----------------------------------------------------------------------


def _dispatch_groups(blocks: list[_Block], tiers: Sequence[DispatchTier]
                     ) -> tuple[list[list[_Unit]], list[SeqRange]]:
    """Place each tier's groups first-fit in node order: a group of K cores goes to the first
    node with K free cores; a whole-node group to the first node still entirely free."""
    free = [list(b.units) for b in blocks]
    groups: list[list[_Unit]] = []
    ranges: list[SeqRange] = []
    low = 1
    for tier in tiers:
        if tier.max_seq is not None and tier.max_seq < low:
            raise PlanError(f"dispatch tiers must have increasing max_seq: {tier.max_seq} "
                            f"comes after a tier ending at {low - 1}")
        seq = SeqRange(low, tier.max_seq)
        label = f"tier ≤{tier.max_seq}" if tier.max_seq is not None else f"tier >{low - 1}"
        for _ in range(tier.instances):
            if tier.cores is None:
                i = next((i for i, f in enumerate(free) if len(f) == len(blocks[i].units)), None)
                if i is None:
                    raise PlanError(f"smart dispatch {label} wants a whole NUMA node, but every "
                                    "node already serves another tier")
                group = free[i]
            else:
                i = next((i for i, f in enumerate(free) if len(f) >= tier.cores), None)
                if i is None:
                    raise PlanError(f"smart dispatch {label} wants {tier.cores} cores inside one "
                                    f"NUMA node; no node has that many free (free per node: "
                                    f"{', '.join(str(len(f)) for f in free)})")
                group = _take(free[i], tier.cores)
            free[i] = [u for u in free[i] if u not in group]
            groups.append(group)
            ranges.append(seq)
        if tier.max_seq is not None:
            low = tier.max_seq + 1
    return groups, ranges


# ---- instance fields ----------------------------------------------------------------------


def _batch_shares(batch: int | None, n: int) -> tuple[int, ...]:
    if batch is None:
        return (1,) * n
    if batch < n:
        raise PlanError(f"batch {batch} cannot be split over {n} instances (each needs at least "
                        f"one sample): use --instances {batch} or fewer, or --batch {n} or more")
    return split_batch(batch, n)


def _memory_nodes(machine: Machine, group: Sequence[_Unit], instance: int) -> tuple[int, ...]:
    """The instance's own node(s), refused when one of them cannot hold its memory."""
    nodes = tuple(sorted({u.core.node for u in group if u.core.node is not None}))
    for nid in nodes:
        node = machine.node(nid)
        if node.memory_bytes == 0:
            raise PlanError(f"instance {instance} runs on NUMA node {nid}, which has no memory "
                            "to bind to: leave that node out with --nodes")
        if machine.nodes_usable and nid not in machine.nodes_usable:
            raise PlanError(f"instance {instance} runs on NUMA node {nid}, but this process may "
                            f"not allocate memory there (allowed memory nodes: "
                            f"{_cpulist(machine.nodes_usable)}): leave it out with --nodes")
    return nodes


def _kind_label(group: Sequence[_Unit]) -> str:
    kinds = {u.core.kind for u in group}
    return kinds.pop() if len(kinds) == 1 else KIND_MIXED


# ---- small helpers ------------------------------------------------------------------------


def _none_first(value: int | None) -> int:
    return -1 if value is None else value


def _node_sizes(blocks: list[_Block]) -> str:
    return ", ".join(f"node{b.node}: {len(b.units)}" for b in blocks)


def _cpulist(values) -> str:
    return format_cpulist(values)
