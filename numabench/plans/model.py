"""Plans: which CPUs, memory nodes, threads, batch share and sequence range each instance gets.

A Plan is pure data. The planner builds one from a Machine, YAML reads and writes it, the
launcher executes it. Validation against a machine lives in `plans.validate`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

PLAN_VERSION = 1
_LAST_STEP = re.compile(r"(\.?[^.\[]+|\[\d+\])$")


@dataclass(frozen=True)
class SeqRange:
    """Inclusive range of sequence lengths an instance serves (smart dispatching)."""

    min: int
    max: int | None  # None = no upper bound

    def contains(self, seq: int) -> bool:
        return seq >= self.min and (self.max is None or seq <= self.max)


@dataclass(frozen=True)
class InstancePlan:
    id: int
    cpus: tuple[int, ...]  # sorted Linux CPU numbers this instance is bound to
    memory_nodes: tuple[int, ...]  # NUMA node ids for memory binding; () = no binding
    threads: int  # framework intra-op threads (== len(cpus) unless asked otherwise)
    batch: int  # this instance's share of the global batch (split mode) or shard size
    seq_range: SeqRange | None = None
    kind: str | None = None  # core kind the CPUs come from, for display


@dataclass(frozen=True)
class PlanSource:
    """Where a plan was read from, so errors can say 'plan.yaml:12: instances[1].cpus'."""

    name: str  # file path, or "<string>"
    lines: tuple[tuple[str, int], ...] = ()  # (field path, 1-based line)

    def where(self, path: str) -> str:
        """'name:line: path', using the closest enclosing field that has a line."""
        lines = dict(self.lines)
        probe = path
        while probe:
            if probe in lines:
                return f"{self.name}:{lines[probe]}: {path}"
            probe = _LAST_STEP.sub("", probe)  # instances[1].cpus -> instances[1] -> instances
        return f"{self.name}: {path}" if path else self.name


@dataclass(frozen=True)
class Plan:
    instances: tuple[InstancePlan, ...]
    batch: int  # global batch: sum of the instances' shares
    smt: bool = False
    name: str | None = None
    description: str | None = None
    version: int = PLAN_VERSION
    # Set by load_plan; not part of the plan's value (load(dump(p)) == p).
    source: PlanSource | None = field(default=None, compare=False, repr=False)

    def where(self, path: str) -> str:
        """How errors name a field: with file and line when the plan came from YAML."""
        return self.source.where(path) if self.source else path

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(sorted(c for i in self.instances for c in i.cpus))

    def instance(self, instance_id: int) -> InstancePlan:
        for i in self.instances:
            if i.id == instance_id:
                return i
        raise KeyError(f"plan has no instance {instance_id}")


def split_batch(batch: int, parts: int) -> tuple[int, ...]:
    """Split a batch as evenly as possible, larger shares first: 8 over 3 -> (3, 3, 2)."""
    if parts <= 0:
        raise ValueError("cannot split a batch over zero instances")
    base, extra = divmod(batch, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))
