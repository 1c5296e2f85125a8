"""Check a plan against a machine. Errors name the instance and field (and file:line from YAML)."""
from __future__ import annotations

from numabench.errors import PlanError
from numabench.plans.model import PLAN_VERSION, Plan
from numabench.topology.cpulist import format_cpulist
from numabench.topology.model import CORE_KINDS, Machine

_KINDS = CORE_KINDS + ("mixed",)


def validate_plan(plan: Plan, machine: Machine) -> None:
    """Raise PlanError for the first problem found; return None when the plan can run here."""
    if plan.version != PLAN_VERSION:
        raise PlanError(f"unsupported plan version {plan.version}; this numabench reads version "
                        f"{PLAN_VERSION}", where=plan.where("version"))
    if not plan.instances:
        raise PlanError("a plan needs at least one instance", where=plan.where("instances"))

    seen_ids: dict[int, int] = {}
    owner_of_cpu: dict[int, int] = {}  # cpu -> instance id
    owner_of_core: dict[tuple[int, ...], tuple[int, int]] = {}  # core -> (instance id, cpu)
    for k, inst in enumerate(plan.instances):
        path = f"instances[{k}]"
        if inst.id in seen_ids:
            raise PlanError(f"instance id {inst.id} is also used by instances[{seen_ids[inst.id]}]",
                            where=plan.where(f"{path}.id"))
        seen_ids[inst.id] = k
        _check_cpus(plan, machine, inst.cpus, f"{path}.cpus")
        for cpu in inst.cpus:
            if cpu in owner_of_cpu:
                raise PlanError(f"CPU {cpu} is used twice: by instance {owner_of_cpu[cpu]} and "
                                f"instance {inst.id}", where=plan.where(f"{path}.cpus"))
            owner_of_cpu[cpu] = inst.id
            core = machine.core_of(cpu)
            if core is None:
                continue
            other = owner_of_core.get(core.cpus)
            if other is not None and other[0] != inst.id:
                raise PlanError(f"CPUs {other[1]} and {cpu} are SMT siblings of one core, but are "
                                f"given to instance {other[0]} and instance {inst.id}: a core is "
                                "never shared between instances", where=plan.where(f"{path}.cpus"))
            owner_of_core.setdefault(core.cpus, (inst.id, cpu))
        if not 1 <= inst.threads <= len(inst.cpus):
            raise PlanError(f"threads {inst.threads} for {len(inst.cpus)} CPUs: use 1 to "
                            f"{len(inst.cpus)} threads (more threads than CPUs oversubscribes "
                            "the cores)", where=plan.where(f"{path}.threads"))
        if inst.batch < 1:
            raise PlanError(f"batch share {inst.batch}: each instance needs at least one sample",
                            where=plan.where(f"{path}.batch"))
        _check_memory_nodes(plan, machine, inst.memory_nodes, f"{path}.memory_nodes")
        if inst.kind is not None and inst.kind not in _KINDS:
            raise PlanError(f"unknown core kind {inst.kind!r} (one of {', '.join(_KINDS)})",
                            where=plan.where(f"{path}.kind"))

    total = sum(i.batch for i in plan.instances)
    if total != plan.batch:
        shares = " + ".join(str(i.batch) for i in plan.instances)
        raise PlanError(f"batch shares add up to {total} ({shares}), but the plan's batch is "
                        f"{plan.batch}", where=plan.where("batch"))
    _check_seq_ranges(plan)


def _check_cpus(plan: Plan, machine: Machine, cpus: tuple[int, ...], path: str) -> None:
    if not cpus:
        raise PlanError("an instance needs at least one CPU", where=plan.where(path))
    usable, online = machine.usable_set, set(machine.cpus_online)
    for cpu in cpus:
        if cpu in usable:
            continue
        if cpu in online:
            why = "it is online but outside this process's affinity / cgroup cpuset"
        else:
            why = "it is offline or does not exist"  # offline CPUs leave no trace to tell apart
        raise PlanError(f"CPU {cpu} is not usable on this machine: {why} (usable CPUs: "
                        f"{format_cpulist(machine.cpus_usable)})", where=plan.where(path))
    duplicates = sorted({c for c in cpus if cpus.count(c) > 1})
    if duplicates:
        raise PlanError(f"CPU {duplicates[0]} is used twice in this instance",
                        where=plan.where(path))


def _check_memory_nodes(plan: Plan, machine: Machine, nodes: tuple[int, ...], path: str) -> None:
    known = {n.id: n for n in machine.nodes}
    for nid in nodes:
        if nid not in known:
            raise PlanError(f"NUMA node {nid} does not exist on this machine (nodes: "
                            f"{format_cpulist(known)})", where=plan.where(path))
        if known[nid].memory_bytes == 0:
            raise PlanError(f"NUMA node {nid} has no memory to bind to", where=plan.where(path))
        if machine.nodes_usable and nid not in machine.nodes_usable:
            raise PlanError(f"NUMA node {nid}'s memory is not allowed for this process (allowed "
                            f"memory nodes: {format_cpulist(machine.nodes_usable)})",
                            where=plan.where(path))


def _check_seq_ranges(plan: Plan) -> None:
    """Ranges are all given or all absent, and in instance order; instances serving the same
    tier repeat the same range, distinct ranges never overlap."""
    ranged = [i.seq_range is not None for i in plan.instances]
    if any(ranged) and not all(ranged):
        k = ranged.index(False)
        raise PlanError("some instances have a seq_range and this one has none: give every "
                        "instance a range, or none", where=plan.where(f"instances[{k}]"))
    previous = None
    for k, inst in enumerate(plan.instances):
        r = inst.seq_range
        if r is None:
            continue
        path = f"instances[{k}].seq_range"
        if r.min < 1 or (r.max is not None and r.max < r.min):
            raise PlanError(f"seq_range {_fmt(r)} is empty or starts below 1", where=plan.where(path))
        clash = previous is not None and r != previous and (
            previous.max is None or r.min <= previous.max)
        if clash and r.min < previous.min:
            raise PlanError(f"seq_range {_fmt(r)} comes after {_fmt(previous)}: order instances "
                            "by sequence length", where=plan.where(path))
        if clash:
            raise PlanError(f"seq_range {_fmt(r)} overlaps {_fmt(previous)}", where=plan.where(path))
        previous = r


def _fmt(r) -> str:
    return f"{r.min}-{r.max}" if r.max is not None else f"{r.min}-"
