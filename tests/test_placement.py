"""Where the coordinator runs (launcher/placement.py): pure choice, then the real pinning."""
from __future__ import annotations

import os
import threading

import pytest

from numabench.launcher.placement import coordinator_placement, io_thread_cpus, pin_threads
from numabench.topology.model import Core, Machine, Node, Package


def machine(cores: list[tuple[int, ...]]) -> Machine:
    cpus = tuple(sorted(c for core in cores for c in core))
    return Machine(cpus_online=cpus, cpus_usable=cpus, packages=(Package(0, 0, cpus, (0,)),),
                   nodes=(Node(0, cpus, None),), cores=tuple(Core(c, 0, 0) for c in cores),
                   nodes_usable=(0,))


def test_free_cores_are_preferred_over_smt_siblings_of_workers():
    m = machine([(0, 4), (1, 5), (2, 6), (3, 7)])
    p = coordinator_placement(m, [0, 1, 2])  # core (3, 7) is free; 4, 5, 6 are workers' siblings
    assert p.cpus == (3, 7) and not p.shares_cores_with_workers and p.warning is None
    assert p.record() == {"cpus": [3, 7], "pinned": True, "shares_cpus_with_workers": False,
                          "shares_cores_with_workers": False}


def test_only_siblings_left_is_said():
    p = coordinator_placement(machine([(0, 2), (1, 3)]), [0, 1])
    assert p.cpus == (2, 3) and p.shares_cores_with_workers and not p.shares_cpus_with_workers
    assert "SMT siblings" in p.warning


def test_every_cpu_given_to_workers_is_said_and_not_pinned():
    p = coordinator_placement(machine([(0,), (1,)]), [0, 1])
    assert p.shares_cpus_with_workers and p.record()["pinned"] is False
    assert "every usable CPU runs a worker" in p.warning


def test_io_threads_go_to_the_coordinators_cpus_on_the_instances_node():
    cpus = tuple(range(8))
    m = Machine(cpus_online=cpus, cpus_usable=cpus, packages=(Package(0, 0, cpus, (0, 1)),),
                nodes=(Node(0, cpus[:4], None), Node(1, cpus[4:], None)),
                cores=tuple(Core((c,), 0, 0 if c < 4 else 1) for c in cpus), nodes_usable=(0, 1))
    where = coordinator_placement(m, [0, 1, 2, 4, 5])  # free: 3 on node 0; 6, 7 on node 1
    assert where.cpus == (3, 6, 7)
    assert io_thread_cpus(m, where, [0, 1]) == (3,)
    assert io_thread_cpus(m, where, [4]) == (6, 7)
    assert io_thread_cpus(m, coordinator_placement(m, [0, 1, 2, 3]), [0]) == (4, 5, 6, 7)  # none near
    every = coordinator_placement(m, cpus)
    assert io_thread_cpus(m, every, [0]) is None  # no free CPU: they stay with the worker


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable CPUs")
def test_pin_threads_moves_every_thread_and_restores_them():
    before = os.sched_getaffinity(0)
    target = {min(before)}
    seen: dict[str, set[int]] = {}
    go, done = threading.Event(), threading.Event()

    def other():  # a thread started before pinning (like ZeroMQ's I/O thread) must move too
        go.wait()
        seen["other"] = os.sched_getaffinity(0)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    restore = pin_threads(target)
    try:
        assert os.sched_getaffinity(0) == target
        go.set()
        done.wait(10)
        assert seen["other"] == target
    finally:
        restore()
        t.join()
    assert os.sched_getaffinity(0) == before
