"""Where the coordinator runs: off the workers' cores when the plan leaves any.

The coordinator wakes for every request; on a worker's core it steals that worker's time and
its wake-ups land in the middle of compute. `coordinator_placement` (pure) picks the usable
CPUs the plan leaves free, preferring whole free cores over SMT siblings of a worker's CPU;
`pin_threads` (I/O) applies it to every thread of this process (sched_setaffinity acts on one
thread: ZeroMQ's I/O thread and any framework pool must move too) and returns how to undo it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from numabench.topology.model import Machine


@dataclass(frozen=True)
class CoordinatorPlacement:
    """The CPUs the coordinator is given, and what it shares them with."""

    cpus: tuple[int, ...]
    shares_cpus_with_workers: bool  # no free CPU: it runs on the workers' CPUs (not pinned)
    shares_cores_with_workers: bool  # free CPUs are SMT siblings of workers' CPUs
    warning: str | None = None

    def record(self) -> dict[str, object]:
        return {"cpus": list(self.cpus), "pinned": not self.shares_cpus_with_workers,
                "shares_cpus_with_workers": self.shares_cpus_with_workers,
                "shares_cores_with_workers": self.shares_cores_with_workers}


def coordinator_placement(machine: Machine, worker_cpus: Iterable[int]) -> CoordinatorPlacement:
    """Free usable CPUs on cores no worker touches; else free SMT siblings; else the workers' own."""
    taken = frozenset(worker_cpus)
    usable = machine.usable_set
    free = sorted(usable - taken)
    if not free:
        return CoordinatorPlacement(
            tuple(sorted(usable)), True, True,
            "every usable CPU runs a worker: the coordinator shares their CPUs (it sleeps between "
            "replies; leave a core free, e.g. fewer --instances or --cpus, to keep it off them)")
    own_core = [c for c in free if not (set(_core_cpus(machine, c)) & taken)]
    if own_core:
        return CoordinatorPlacement(tuple(own_core), False, False)
    return CoordinatorPlacement(
        tuple(free), False, True,
        f"the coordinator runs on CPU(s) {free}, SMT siblings of workers' CPUs: it shares their cores")


def io_thread_cpus(machine: Machine, where: CoordinatorPlacement,
                   instance_cpus: Iterable[int]) -> tuple[int, ...] | None:
    """Where an instance's ZeroMQ threads go: the coordinator's CPUs on the instance's NUMA
    node(s), else all of the coordinator's; None (stay on the instance's CPUs) when the
    coordinator has no CPU of its own. They wake for every message, like the coordinator."""
    if where.shares_cpus_with_workers:
        return None
    nodes = {_node_of(machine, c) for c in instance_cpus}
    near = tuple(c for c in where.cpus if _node_of(machine, c) in nodes)
    return near or where.cpus


def _node_of(machine: Machine, cpu: int) -> int | None:
    core = machine.core_of(cpu)
    return core.node if core is not None else None


def _core_cpus(machine: Machine, cpu: int) -> tuple[int, ...]:
    core = machine.core_of(cpu)
    return core.cpus if core is not None else (cpu,)


def thread_ids(task_dir: str = "/proc/self/task") -> list[int]:
    try:
        return [int(t) for t in os.listdir(task_dir)]
    except OSError:
        return [0]


def pin_threads(cpus: Iterable[int]) -> Callable[[], None]:
    """Pin every thread of this process to `cpus`; returns a function that restores each thread's
    previous affinity (threads started meanwhile get the main thread's previous one)."""
    target = set(cpus)
    original = os.sched_getaffinity(0)
    before: dict[int, set[int]] = {}
    for tid in thread_ids():
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, target)
        except OSError:  # the thread ended, or the kernel refused: leave it as it was
            before.pop(tid, None)

    def restore() -> None:
        for tid in thread_ids():
            try:
                os.sched_setaffinity(tid, before.get(tid, original))
            except OSError:
                pass

    return restore


@dataclass(frozen=True)
class CoreUse:
    """How much of the machine's usable physical cores a set of CPUs covers."""

    used: int  # usable physical cores with at least one of the CPUs
    usable: int  # usable physical cores of the machine

    @property
    def idle(self) -> int:
        return self.usable - self.used

    def flag(self) -> str | None:
        """The dry-run's and the report's mark for a split that leaves cores idle, or None."""
        if self.idle <= 0:
            return None
        return f"leaves {self.idle} of {self.usable} usable physical cores idle"


def core_use(machine: Machine, cpus: Iterable[int]) -> CoreUse:
    """Cores, not CPUs: an SMT sibling adds no core, and 32 one-core instances on 48 cores
    leave 16 idle (pure)."""
    usable = machine.usable_cores()
    taken = set(cpus)
    return CoreUse(sum(1 for c in usable if taken & set(c.cpus)), len(usable))
