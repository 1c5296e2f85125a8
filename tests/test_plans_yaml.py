"""YAML plans: round trips, and every refusal naming file:line and field."""
from __future__ import annotations

import textwrap

import pytest
from test_plans_support import article_machine, build_machine

from numabench.errors import PlanError
from numabench.plans import (
    InstancePlan,
    Plan,
    PlanRequest,
    SeqRange,
    dump_plan,
    load_plan,
    load_preset,
    make_plan,
    parse_preset,
    render_plan,
    validate_plan,
)

GOOD = """\
version: 1
name: hand-written
batch: 8
instances:
  - id: 0
    cpus: 0-11
    memory_nodes: [0]
    threads: 12
    batch: 4
  - id: 1
    cpus: 24-35
    memory_nodes: [1]
    threads: 12
    batch: 4
"""


def bad(text: str, machine=None, *, match: str) -> PlanError:
    """Load (and validate) `text`; it must be refused with a message matching `match`."""
    with pytest.raises(PlanError, match=match) as info:
        validate_plan(load_plan(textwrap.dedent(text), name="plan.yaml"), machine or article_machine())
    return info.value


def test_good_plan_loads_and_validates():
    p = load_plan(GOOD)
    validate_plan(p, article_machine())
    assert p.instances[1] == InstancePlan(1, tuple(range(24, 36)), (1,), 12, 4)
    assert p.name == "hand-written" and p.batch == 8 and not p.smt


@pytest.mark.parametrize("request_", [
    PlanRequest(instances=4, batch=8), PlanRequest(instances=2, smt=True, batch=3),
    PlanRequest(instances=1), PlanRequest(cores_per_instance=5, leftover="idle")])
def test_round_trip_of_generated_plans(request_):
    p = make_plan(article_machine(), request_)
    assert load_plan(dump_plan(p)) == p


def test_round_trip_keeps_every_field():
    p = Plan(instances=(
        InstancePlan(0, (0,), (0,), 1, 2, SeqRange(1, 32), "performance"),
        InstancePlan(7, (1, 2, 5), (), 2, 1, SeqRange(33, None), "mixed")),
        batch=3, smt=True, name="all: fields", description="quotes ' and \" and # too")
    assert load_plan(dump_plan(p)) == p


def test_round_trip_of_smart_dispatch_and_hybrid():
    p = make_plan(article_machine(), load_preset("smart-dispatch"))
    assert load_plan(dump_plan(p)) == p
    h = make_plan(build_machine(hybrid=(4, 4)), PlanRequest(instances=2, core_kind="any"))
    assert load_plan(dump_plan(h)) == h


def test_load_from_a_file_names_it_in_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(GOOD.replace("cpus: 24-35", "cpus: 24-35,200"))
    with pytest.raises(PlanError) as info:
        validate_plan(load_plan(f), article_machine())
    assert str(info.value).startswith(f"{f}:11: instances[1].cpus: CPU 200 is not usable")


def test_omitted_fields_take_documented_defaults():
    p = load_plan("version: 1\nbatch: 8\ninstances:\n  - cpus: 0-3\n  - cpus: [4, 5]\n  - cpus: 6\n")
    assert [i.id for i in p.instances] == [0, 1, 2]
    assert [i.threads for i in p.instances] == [4, 2, 1]
    assert [i.batch for i in p.instances] == [3, 3, 2]
    assert [i.memory_nodes for i in p.instances] == [(), (), ()]


# ---- each refusal, with its message ---------------------------------------------------------


def test_cpu_not_usable():
    e = bad(GOOD.replace("cpus: 24-35", "cpus: 24-35,99"),
            match=r"^plan.yaml:11: instances\[1\].cpus: CPU 99 is not usable on this machine: "
                  r"it is offline or does not exist \(usable CPUs: 0-95\)$")
    assert e.where == "plan.yaml:11: instances[1].cpus"


def test_cpu_outside_the_cgroup():
    m = build_machine(sockets=2, cores_per_node=24, threads_per_core=2, usable=range(12))
    bad(GOOD, m, match=r"plan.yaml:11: instances\[1\].cpus: CPU 24 is not usable on this "
                       r"machine: it is online but outside this process's affinity / cgroup")


def test_cpu_used_twice():
    bad(GOOD.replace("cpus: 24-35", "cpus: 11-22"),
        match=r"^plan.yaml:11: instances\[1\].cpus: CPU 11 is used twice: by instance 0 and "
              r"instance 1$")
    bad(GOOD.replace("cpus: 0-11", "cpus: [3, 4, 3]").replace("threads: 12\n    batch: 4\n  - id: 1",
                                                          "threads: 2\n    batch: 4\n  - id: 1"),
        match=r"plan.yaml:6: instances\[0\].cpus: CPU 3 is used twice in this instance")


def test_core_shared_through_smt_siblings():
    bad(GOOD.replace("cpus: 24-35", "cpus: 48-59"),
        match=r"plan.yaml:11: instances\[1\].cpus: CPUs 0 and 48 are SMT siblings of one core")


def test_node_with_no_memory_missing_or_not_allowed():
    bad(GOOD.replace("memory_nodes: [1]", "memory_nodes: [1, 7]"),
        match=r"^plan.yaml:12: instances\[1\].memory_nodes: NUMA node 7 does not exist on this "
              r"machine \(nodes: 0-1\)$")
    bad(GOOD, build_machine(sockets=2, cores_per_node=24, threads_per_core=2,
                            memoryless_cpu_nodes=(1,)),
        match=r"plan.yaml:12: instances\[1\].memory_nodes: NUMA node 1 has no memory to bind to")
    bad(GOOD, build_machine(sockets=2, cores_per_node=24, threads_per_core=2, nodes_usable=(0,)),
        match=r"plan.yaml:12: instances\[1\].memory_nodes: NUMA node 1's memory is not allowed")


def test_more_threads_than_cpus():
    bad(GOOD.replace("threads: 12\n    batch: 4\n", "threads: 13\n    batch: 4\n", 1),
        match=r"^plan.yaml:8: instances\[0\].threads: threads 13 for 12 CPUs: use 1 to 12 threads")


def test_batch_shares_that_do_not_add_up():
    bad(GOOD.replace("batch: 8", "batch: 9"),
        match=r"^plan.yaml:3: batch: batch shares add up to 8 \(4 \+ 4\), but the plan's batch is 9$")


def test_unknown_key_suggests_the_closest():
    bad(GOOD.replace("memory_nodes: [1]", "memroy_nodes: [1]"),
        match=r"^plan.yaml:12: instances\[1\].memroy_nodes: unknown key 'memroy_nodes' \(did you "
              r"mean 'memory_nodes'\?\)")
    bad(GOOD.replace("batch: 8", "bach: 8"), match=r"^plan.yaml:3: bach: unknown key 'bach' \(did "
                                                   r"you mean 'batch'\?\)")


def test_wrong_types():
    bad(GOOD.replace("threads: 12", "threads: twelve", 1),
        match=r"^plan.yaml:8: instances\[0\].threads: expected an integer, got 'twelve' \(string\)$")
    bad(GOOD.replace("cpus: 0-11", "cpus: {first: 0}"),
        match=r"plan.yaml:6: instances\[0\].cpus: expected a single value, got a mapping")
    bad(GOOD.replace("cpus: 0-11", "cpus: zero"),
        match=r"plan.yaml:6: instances\[0\].cpus: expected a list of CPU numbers")
    bad(GOOD.replace("batch: 8", "batch: true"),
        match=r"plan.yaml:3: batch: expected an integer, got True \(boolean\)")
    bad(GOOD.replace("instances:", "instances: 3\nx:").split("\n  - id: 0")[0],
        match=r"plan.yaml:\d+: x: unknown key")
    bad("version: 1\ninstances: 3\n", match=r"plan.yaml:2: instances: expected a list of instances")


def test_unsupported_or_missing_version():
    bad(GOOD.replace("version: 1", "version: 2"),
        match=r"^plan.yaml:1: version: unsupported plan version 2; this numabench reads version 1$")
    bad(GOOD.replace("version: 1\n", ""), match=r"^plan.yaml: missing 'version'")


def test_seq_ranges_overlapping_unordered_or_partial():
    def with_ranges(a: str, b: str) -> str:
        return (GOOD.replace("batch: 4\n  - id: 1", f"batch: 4\n    seq_range: {a}\n  - id: 1")
                + f"    seq_range: {b}\n")

    load_plan(with_ranges("{min: 1, max: 32}", "{min: 33}"))  # fine
    validate_plan(load_plan(with_ranges("{max: 32}", "{min: 33, max: null}")), article_machine())
    bad(with_ranges("{min: 1, max: 64}", "{min: 33}"),
        match=r"^plan.yaml:16: instances\[1\].seq_range: seq_range 33- overlaps 1-64$")
    bad(with_ranges("{min: 33, max: 64}", "{min: 1, max: 32}"),
        match=r"plan.yaml:16: instances\[1\].seq_range: seq_range 1-32 comes after 33-64")
    bad(with_ranges("{min: 10, max: 5}", "{min: 33}"),
        match=r"plan.yaml:10: instances\[0\].seq_range.max: max 5 is below min 10")
    bad(GOOD + "    seq_range: {min: 1}\n",
        match=r"plan.yaml:5: instances\[0\]: some instances have a seq_range and this one has none")


def test_duplicate_instance_ids_and_empty_plans():
    bad(GOOD.replace("id: 1", "id: 0"),
        match=r"plan.yaml:10: instances\[1\].id: instance id 0 is also used by instances\[0\]")
    bad("", match="plan.yaml: the plan is empty")
    bad("version: 1\ninstances: []\n", match="plan.yaml:2: instances: a plan needs at least one")
    bad("version: 1\ninstances: [\n", match=r"plan.yaml:\d+: not valid YAML")


def test_validate_without_a_source_names_the_field():
    p = Plan(instances=(InstancePlan(0, (500,), (0,), 1, 1),), batch=1)
    with pytest.raises(PlanError, match=r"^instances\[0\].cpus: CPU 500 is not usable"):
        validate_plan(p, article_machine())


def test_render_plan_shows_each_instance():
    m = article_machine()
    text = render_plan(make_plan(m, load_preset("smart-dispatch")), m)
    assert "seq range" in text and "385-" in text
    assert "3 instances on 48 of 48 usable cores (0 idle)" in text


def test_preset_files_are_read_and_checked():
    req = parse_preset("name: mine\ntiers:\n  - {max_seq: 64, cores: 2, instances: 2}\n"
                       "  - {cores: node}\n")
    p = make_plan(build_machine(sockets=2, cores_per_node=4), req)
    assert [i.seq_range for i in p.instances] == [SeqRange(1, 64)] * 2 + [SeqRange(65, None)]
    assert [i.cpus for i in p.instances] == [(0, 1), (2, 3), (4, 5, 6, 7)]
    with pytest.raises(PlanError, match=r"<preset>:4: tiers\[0\].cors: unknown key 'cors' "
                                        r"\(did you mean 'cores'\?\)"):
        parse_preset("tiers:\n  - max_seq: 3\n    cores: 2\n    cors: 1\n")
    with pytest.raises(PlanError, match=r"<preset>:2: tiers\[0\].cores: must be at least 1"):
        parse_preset("tiers:\n  - {cores: 0}\n")
    with pytest.raises(PlanError, match="unknown preset 'nope'"):
        load_preset("nope")
