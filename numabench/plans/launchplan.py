"""The plan a launch (or serve) runs: a YAML plan file, or the planner's answer to the command
line's shape, restrictions and preset."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from numabench.errors import NumabenchError
from numabench.plans.model import Plan
from numabench.plans.planner import PlanRequest, make_plan
from numabench.plans.presets import load_preset
from numabench.plans.validate import validate_plan
from numabench.plans.yamlio import load_plan
from numabench.topology.model import Machine

DEFAULT_BATCH = 8


def plan_for_launch(machine: Machine, plan_file: str | None = None, instances: int | None = None,
                    cores_per_instance: int | None = None, batch: int | None = None,
                    smt: bool = False, preset: str | None = None, nodes: tuple[int, ...] | None = None,
                    cpus: tuple[int, ...] | None = None, core_kind: str | None = None,
                    leftover: str | None = None) -> Plan:
    """The plan a launch runs: a validated YAML plan, or one made by the planner.

    Without a batch, each instance gets an equal share of at least DEFAULT_BATCH in all:
    DEFAULT_BATCH rounded up to a multiple of the instance count.
    """
    for flag, value in (("--instances", instances), ("--cores-per-instance", cores_per_instance),
                        ("--batch", batch)):
        if value is not None and value < 1:  # 0 would read as "not given" below
            raise NumabenchError(f"{flag} must be at least 1 (got {value})")
    shape = {"instances": instances, "cores_per_instance": cores_per_instance, "smt": smt or None,
             "nodes": nodes, "cpus": cpus, "core_kind": core_kind, "leftover": leftover}
    shape = {k: v for k, v in shape.items() if v is not None}
    if plan_file:
        clash = ["--" + k.replace("_", "-") for k in shape] + (["--preset"] if preset else [])
        if clash:
            raise NumabenchError(f"{', '.join(clash)} cannot be combined with --plan: the plan "
                                 f"{plan_file} already fixes the instances")
        plan = load_plan(Path(plan_file))
        validate_plan(plan, machine)
        if batch is not None and batch != plan.batch:
            raise NumabenchError(f"--batch {batch} differs from the plan's batch {plan.batch} in "
                                 f"{plan_file}; edit the plan's batch shares or drop --batch")
        return plan
    request = dataclasses.replace(load_preset(preset) if preset else PlanRequest(), **shape)
    if not (request.instances or request.cores_per_instance or request.group_by or request.tiers):
        request = dataclasses.replace(request, instances=1)  # the baseline: one instance, all cores
    if batch is not None or request.batch is not None:
        return make_plan(machine, dataclasses.replace(request, batch=batch if batch is not None else request.batch))
    n = len(make_plan(machine, request).instances)
    return make_plan(machine, dataclasses.replace(request, batch=n * math.ceil(DEFAULT_BATCH / n)))
