"""The planner: worked examples on the article's machine and others, and properties over many
generated machines."""
from __future__ import annotations

import itertools

import pytest
from test_plans_support import article_machine, build_machine

from numabench.errors import PlanError
from numabench.plans import (
    DispatchTier,
    PlanRequest,
    SeqRange,
    dump_plan,
    load_plan,
    load_preset,
    make_plan,
    validate_plan,
)
from numabench.topology.model import Machine


def plan(machine, **kw):
    return make_plan(machine, PlanRequest(**kw))


# ---- worked examples -----------------------------------------------------------------------


def test_article_four_instances_of_twelve_cores_node_local():
    p = plan(article_machine(), instances=4, batch=8)
    assert [i.cpus for i in p.instances] == [tuple(range(a, a + 12)) for a in (0, 12, 24, 36)]
    assert [i.memory_nodes for i in p.instances] == [(0,), (0,), (1,), (1,)]
    assert [i.threads for i in p.instances] == [12] * 4
    assert [i.batch for i in p.instances] == [2] * 4 and p.batch == 8
    assert [i.id for i in p.instances] == [0, 1, 2, 3]


def test_article_two_instances_with_smt_take_whole_cores():
    p = plan(article_machine(), instances=2, smt=True)
    assert p.instances[0].cpus == tuple(range(24)) + tuple(range(48, 72))
    assert p.instances[1].cpus == tuple(range(24, 48)) + tuple(range(72, 96))
    assert [i.threads for i in p.instances] == [48, 48] and p.smt


def test_one_instance_larger_than_a_node_takes_whole_nodes():
    p = plan(article_machine(), instances=1)
    assert p.instances[0].cpus == tuple(range(48)) and p.instances[0].memory_nodes == (0, 1)


def test_batch_8_over_3_is_3_3_2():
    p = plan(build_machine(cores_per_node=3), instances=3, batch=8)
    assert [i.batch for i in p.instances] == [3, 3, 2]


def test_batch_smaller_than_instances_is_refused_with_a_suggestion():
    with pytest.raises(PlanError, match=r"batch 2 cannot be split over 4 instances.*--instances 2"):
        plan(article_machine(), instances=4, batch=2)


def test_default_batch_is_one_sample_per_instance():
    p = plan(article_machine(), instances=4)
    assert [i.batch for i in p.instances] == [1] * 4 and p.batch == 4


def test_groups_never_straddle_a_node_when_they_fit():
    # 3 groups of 16 would straddle; 12-core groups fit, and the rest stays idle
    p = plan(article_machine(), instances=3)
    assert [len(i.cpus) for i in p.instances] == [12, 12, 12]
    assert [i.memory_nodes for i in p.instances] == [(0,), (0,), (1,)]


def test_leftover_spread_gives_spare_cores_to_the_first_groups_of_their_node():
    m = build_machine(cores_per_node=10)
    assert [len(i.cpus) for i in plan(m, instances=3).instances] == [3, 3, 3]
    p = plan(m, instances=3, leftover="spread")
    assert [len(i.cpus) for i in p.instances] == [4, 3, 3]
    assert sorted(p.cpus) == list(range(10))


def test_groups_are_spread_over_nodes_round_robin():
    p = plan(article_machine(), instances=2, cores_per_instance=4)
    assert [i.cpus for i in p.instances] == [(0, 1, 2, 3), (24, 25, 26, 27)]


def test_cores_per_instance_derives_instances():
    p = plan(article_machine(), cores_per_instance=16)
    assert [i.cpus for i in p.instances] == [tuple(range(16)), tuple(range(24, 40))]


def test_cores_per_instance_larger_than_a_node_takes_whole_nodes():
    m = build_machine(sockets=4, cores_per_node=4)
    p = plan(m, cores_per_instance=8)
    assert [i.memory_nodes for i in p.instances] == [(0, 1), (2, 3)]
    with pytest.raises(PlanError, match="use a multiple of 4"):
        plan(m, cores_per_instance=6)


def test_instances_and_cores_per_instance_are_checked_against_each_other():
    assert len(plan(article_machine(), instances=4, cores_per_instance=12).instances) == 4
    with pytest.raises(PlanError, match=r"5 instances of 12 cores do not fit.*at most 4 fit"):
        plan(article_machine(), instances=5, cores_per_instance=12)


def test_too_many_instances_is_refused():
    with pytest.raises(PlanError, match=r"3 instances need at least 3 cores; only 2"):
        plan(build_machine(cores_per_node=2), instances=3)


def test_nothing_asked_is_refused():
    with pytest.raises(PlanError, match="--instances N, --cores-per-instance K"):
        plan(article_machine())


def test_nodes_restrict():
    p = plan(article_machine(), instances=2, nodes=(1,))
    assert [i.cpus for i in p.instances] == [tuple(range(24, 36)), tuple(range(36, 48))]
    with pytest.raises(PlanError, match="NUMA node 5 does not exist"):
        plan(article_machine(), instances=2, nodes=(5,))


def test_cpus_restrict_and_siblings_become_the_physical_cpu():
    p = plan(article_machine(), instances=2, cpus=tuple(range(48, 56)))
    assert [i.cpus for i in p.instances] == [(48, 49, 50, 51), (52, 53, 54, 55)]
    with pytest.raises(PlanError, match="--cpus names CPUs that are not usable here: 200"):
        plan(article_machine(), instances=1, cpus=(200,))


def test_offline_cpus_are_never_used():
    m = build_machine(cores_per_node=4, threads_per_core=2, offline=(1, 5))
    p = plan(m, instances=3, smt=True)
    assert not {1, 5} & set(p.cpus)
    assert [i.cpus for i in p.instances] == [(0, 4), (2, 6), (3, 7)]


def test_cgroup_limited_machine_uses_only_allowed_cpus():
    m = build_machine(sockets=2, cores_per_node=4, usable=range(6))
    p = plan(m, instances=4, batch=8)
    assert [i.cpus for i in p.instances] == [(0,), (1,), (4,), (5,)]
    assert [i.memory_nodes for i in p.instances] == [(0,), (0,), (1,), (1,)]


def test_memory_binds_only_to_allowed_nodes_with_memory():
    with pytest.raises(PlanError, match="may not allocate memory there.*--nodes"):
        plan(build_machine(sockets=2, nodes_usable=(0,)), instances=2)
    with pytest.raises(PlanError, match="node 1, which has no memory"):
        plan(build_machine(sockets=2, memoryless_cpu_nodes=(1,)), instances=2)
    p = plan(build_machine(sockets=2, nodes_usable=(0,)), instances=2, nodes=(0,))
    assert [i.memory_nodes for i in p.instances] == [(0,), (0,)]


def test_memory_only_nodes_never_supply_cpus():
    m = build_machine(sockets=2, memory_only_nodes=2)
    p = plan(m, instances=2)
    assert [i.memory_nodes for i in p.instances] == [(0,), (1,)]
    with pytest.raises(PlanError, match="node 3 has memory only"):
        plan(m, instances=1, nodes=(3,))


def test_hybrid_uses_performance_cores_by_default_and_never_mixes():
    m = build_machine(hybrid=(6, 8), threads_per_core=2)
    p = plan(m, instances=2)
    assert [i.cpus for i in p.instances] == [(0, 1, 2), (3, 4, 5)]
    assert {i.kind for i in p.instances} == {"performance"}
    e = plan(m, instances=2, core_kind="efficiency")
    assert [i.cpus for i in e.instances] == [(6, 7, 8, 9), (10, 11, 12, 13)]
    mixed = plan(m, instances=1, core_kind="any")
    assert len(mixed.instances[0].cpus) == 14 and mixed.instances[0].kind == "mixed"
    with pytest.raises(PlanError, match="no usable uniform cores"):
        plan(m, instances=1, core_kind="uniform")


def test_uniform_machines_have_no_kind_in_the_plan():
    assert plan(article_machine(), instances=2).instances[0].kind is None


def test_l3_straddling_is_avoided_where_possible():
    m = build_machine(cores_per_node=8, l3_per_node=2)  # L3s: cores 0-3, 4-7
    p = plan(m, cores_per_instance=3)
    assert [i.cpus for i in p.instances] == [(0, 1, 2), (4, 5, 6)]


def test_spread_with_cores_per_instance_is_refused():
    with pytest.raises(PlanError, match="contradicts --cores-per-instance"):
        plan(article_machine(), cores_per_instance=4, leftover="spread")


# ---- presets -------------------------------------------------------------------------------


def test_presets_on_the_article_machine():
    m = article_machine()
    per_socket = make_plan(m, load_preset("per-socket"))
    assert [i.memory_nodes for i in per_socket.instances] == [(0,), (1,)]
    assert [len(i.cpus) for i in per_socket.instances] == [24, 24]
    assert len(make_plan(m, load_preset("per-node")).instances) == 2
    latency = make_plan(m, load_preset("latency"))
    assert len(latency.instances) == 12 and {len(i.cpus) for i in latency.instances} == {4}
    throughput = make_plan(m, load_preset("throughput"))
    assert len(throughput.instances) == 48 and throughput.cpus == tuple(range(48))


def test_per_socket_on_a_sub_numa_machine_binds_both_nodes():
    m = build_machine(sockets=2, nodes_per_socket=2, cores_per_node=2)
    p = make_plan(m, load_preset("per-socket"))
    assert [i.memory_nodes for i in p.instances] == [(0, 1), (2, 3)]


def test_smart_dispatch_on_the_article_machine():
    p = make_plan(article_machine(), load_preset("smart-dispatch"))
    assert [i.cpus for i in p.instances] == [tuple(range(8)), tuple(range(8, 24)),
                                             tuple(range(24, 48))]
    assert [i.seq_range for i in p.instances] == [SeqRange(1, 32), SeqRange(33, 384),
                                                  SeqRange(385, None)]
    assert [i.memory_nodes for i in p.instances] == [(0,), (0,), (1,)]


def test_smart_dispatch_that_does_not_fit_is_refused():
    req = PlanRequest(tiers=(DispatchTier(32, 8), DispatchTier(None, None)))
    with pytest.raises(PlanError, match="wants 8 cores inside one NUMA node"):
        make_plan(build_machine(cores_per_node=4), req)
    with pytest.raises(PlanError, match="wants a whole NUMA node"):
        make_plan(build_machine(cores_per_node=8), req)


def test_per_node_checks_instances():
    from dataclasses import replace

    with pytest.raises(PlanError, match="gives 2 instances, not --instances 3"):
        make_plan(article_machine(), replace(load_preset("per-node"), instances=3))


# ---- properties over generated machines ----------------------------------------------------


def generated_machines():
    for sockets, nps, cpn, tpc, l3, usable_every in itertools.product(
            (1, 2), (1, 2), (1, 3, 4), (1, 2), (1, 2), (1, 3)):
        m = build_machine(sockets=sockets, nodes_per_socket=nps, cores_per_node=cpn,
                          threads_per_core=tpc, l3_per_node=l3)
        if usable_every > 1:  # a restricted affinity: every third CPU
            m = build_machine(sockets=sockets, nodes_per_socket=nps, cores_per_node=cpn,
                              threads_per_core=tpc, l3_per_node=l3,
                              usable=m.cpus_online[::usable_every])
        yield m
    yield build_machine(hybrid=(2, 4), threads_per_core=2)
    yield build_machine(sockets=2, memory_only_nodes=2, cores_per_node=3)


def check_plan_properties(m: Machine, p, *, all_cores: bool = False) -> None:
    """No CPU twice, every CPU usable, node-local whenever a group fits in a node."""
    cpus = [c for i in p.instances for c in i.cpus]
    assert len(cpus) == len(set(cpus)), "a CPU is in two instances"
    assert set(cpus) <= m.usable_set, "a CPU is not usable"
    owners = {}
    for inst in p.instances:
        for c in inst.cpus:
            owners.setdefault(m.core_of(c).cpus, set()).add(inst.id)
    assert all(len(v) == 1 for v in owners.values()), "a core is shared"
    used_kinds = {m.core_of(c).kind for c in cpus}
    biggest = max(sum(1 for c in m.usable_cores() if c.node == n.id and c.kind in used_kinds)
                  for n in m.nodes)
    for inst in p.instances:
        nodes = {m.core_of(c).node for c in inst.cpus}
        assert set(inst.memory_nodes) == nodes
        if len({m.core_of(c).cpus for c in inst.cpus}) <= biggest:
            assert len(nodes) == 1, f"instance {inst.id} straddles nodes {nodes} but fits one"
    assert load_plan(dump_plan(p)) == p
    validate_plan(p, m)
    if all_cores:
        kinds = {c.kind for c in m.usable_cores()}
        if len(kinds) == 1:
            phys = {m.physical_cpu(c) for c in m.usable_cores()}
            assert phys <= set(cpus)


@pytest.mark.parametrize("m", list(generated_machines()))
def test_properties_over_generated_machines(m):
    kind = "performance" if "performance" in m.kinds else m.kinds[0]  # the default kind
    cores = [c for c in m.usable_cores() if c.kind == kind]
    total = len(cores)
    per_node = [sum(1 for c in cores if c.node == n.id) for n in m.nodes]
    per_node = [k for k in per_node if k]
    alike = len(set(per_node)) == 1
    for n in range(1, total + 1):
        for leftover in ("idle", "spread"):
            p = plan(m, instances=n, leftover=leftover)
            # spread uses every core when every node hosts a group (alike nodes, n >= nodes)
            everything = n == 1 or (leftover == "spread" and alike and n >= len(per_node))
            check_plan_properties(m, p, all_cores=everything)
            assert len(p.instances) == n
    check_plan_properties(m, plan(m, cores_per_instance=1), all_cores=True)
    check_plan_properties(m, plan(m, instances=1, smt=True), all_cores=True)
    check_plan_properties(m, make_plan(m, load_preset("per-node")), all_cores=True)


def test_more_cores_per_instance_than_the_machine_has():
    with pytest.raises(PlanError, match="4 cores per instance, but only 2 usable cores match the "
                                        "request: use --cores-per-instance 2 or fewer"):
        make_plan(build_machine(cores_per_node=2), load_preset("latency"))
