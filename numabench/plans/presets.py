"""Presets: named plan requests for the reference article's setups, written as small YAML documents.

A preset is a PlanRequest in YAML. The built-in ones live here; `--preset FILE.yaml` reads the
same format, so a site can describe its own smart-dispatch tiers:

    name: smart-dispatch
    tiers:                      # sequence-length tiers, shortest first
      - {max_seq: 32, cores: 8}       # requests up to 32 tokens: 8 cores
      - {max_seq: 384, cores: 16}     # 33..384 tokens: 16 cores
      - {max_seq: null, cores: node}  # longer: a whole NUMA node
"""
from __future__ import annotations

import os
from dataclasses import replace

import yaml

from numabench.errors import PlanError
from numabench.plans.planner import DispatchTier, PlanRequest
from numabench.plans.yamlio import YamlReader, compose, is_path, read_yaml_file

BUILTIN_PRESETS: dict[str, str] = {
    "per-socket": """
name: per-socket
description: one instance per socket, memory bound to the socket's node(s)
group_by: socket
""",
    "per-node": """
name: per-node
description: one instance per NUMA node, memory bound to that node
group_by: node
""",
    "latency": """
name: latency
description: small instances of 4 cores each, for low per-request latency
cores_per_instance: 4
""",
    "throughput": """
name: throughput
description: one instance per core, for the most samples per second
cores_per_instance: 1
""",
    "smart-dispatch": """
name: smart-dispatch
description: "short sequences on small instances, long ones on a whole node"
tiers:
  - {max_seq: 32, cores: 8}
  - {max_seq: 384, cores: 16}
  - {max_seq: null, cores: node}
""",
}

PRESET_KEYS = ("name", "description", "group_by", "instances", "cores_per_instance", "smt",
               "core_kind", "leftover", "tiers")
TIER_KEYS = ("max_seq", "cores", "instances")


def load_preset(name_or_path: str | os.PathLike) -> PlanRequest:
    """A built-in preset by name, or a preset YAML file."""
    key = str(name_or_path)
    if key in BUILTIN_PRESETS:
        return parse_preset(BUILTIN_PRESETS[key], name=f"<preset {key}>")
    if is_path(name_or_path) or os.path.exists(key):
        return parse_preset(read_yaml_file(key, "preset"), name=key)
    raise PlanError(f"unknown preset {key!r}: use one of {', '.join(BUILTIN_PRESETS)} "
                    "or a preset YAML file")


def parse_preset(text: str, *, name: str = "<preset>") -> PlanRequest:
    r = YamlReader(name)
    root = compose(text, name)
    if root is None:
        raise PlanError("the preset is empty", where=name)
    d = r.mapping(root, "", PRESET_KEYS)
    req = PlanRequest(
        name=r.string(d["name"], "name") if "name" in d else None,
        description=r.string(d["description"], "description") if "description" in d else None,
        group_by=r.string(d["group_by"], "group_by") if "group_by" in d else None,
        instances=r.integer(d["instances"], "instances", minimum=1) if "instances" in d else None,
        cores_per_instance=r.integer(d["cores_per_instance"], "cores_per_instance", minimum=1)
        if "cores_per_instance" in d else None,
        smt=r.boolean(d["smt"], "smt") if "smt" in d else False,
        core_kind=r.string(d["core_kind"], "core_kind") if "core_kind" in d else None,
        leftover=r.string(d["leftover"], "leftover") if "leftover" in d else "idle",
    )
    if "tiers" in d:
        req = replace(req, tiers=_tiers(r, d["tiers"]))
    return req


def _tiers(r: YamlReader, node) -> tuple[DispatchTier, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise r.fail("tiers", "expected a non-empty list of tiers")
    tiers = []
    for k, item in enumerate(node.value):
        path = f"tiers[{k}]"
        r.lines[path] = item.start_mark.line + 1
        d = r.mapping(item, path, TIER_KEYS)
        if "cores" not in d:
            raise r.fail(path, "missing 'cores' (a number of cores, or 'node')")
        cores_value = r.scalar(d["cores"], f"{path}.cores")
        if cores_value == "node":
            cores = None
        else:
            cores = r.integer(d["cores"], f"{path}.cores", minimum=1)
        tiers.append(DispatchTier(
            max_seq=r.integer(d["max_seq"], f"{path}.max_seq", minimum=1, allow_none=True)
            if "max_seq" in d else None,
            cores=cores,
            instances=r.integer(d["instances"], f"{path}.instances", minimum=1)
            if "instances" in d else 1,
        ))
    return tuple(tiers)
