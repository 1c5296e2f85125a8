"""Plans: which CPUs, memory nodes, threads, batch share and sequence range each instance gets."""
from numabench.plans.launchplan import DEFAULT_BATCH, plan_for_launch
from numabench.plans.model import (
    PLAN_VERSION,
    InstancePlan,
    Plan,
    PlanSource,
    SeqRange,
    split_batch,
)
from numabench.plans.planner import DispatchTier, PlanRequest, make_plan, plannable_cores
from numabench.plans.presets import BUILTIN_PRESETS, load_preset, parse_preset
from numabench.plans.render import render_plan
from numabench.plans.validate import validate_plan
from numabench.plans.yamlio import dump_plan, load_plan

__all__ = [
    "BUILTIN_PRESETS",
    "DEFAULT_BATCH",
    "PLAN_VERSION",
    "DispatchTier",
    "InstancePlan",
    "Plan",
    "PlanRequest",
    "PlanSource",
    "SeqRange",
    "dump_plan",
    "load_plan",
    "load_preset",
    "make_plan",
    "plannable_cores",
    "parse_preset",
    "plan_for_launch",
    "render_plan",
    "split_batch",
    "validate_plan",
]
