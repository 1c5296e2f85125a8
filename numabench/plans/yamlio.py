"""Plans as versioned YAML documents: load (with file:line in every error) and dump.

The loader walks yaml.compose's node tree rather than yaml.safe_load's plain values, so each field
keeps the line it was written on; validate_plan uses those lines to point at the bad field.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from numabench.errors import PlanError
from numabench.fileio import FileReadError, read_text
from numabench.plans.model import (
    PLAN_VERSION,
    InstancePlan,
    Plan,
    PlanSource,
    SeqRange,
    split_batch,
)
from numabench.topology.cpulist import format_cpulist, parse_cpulist

PLAN_KEYS = ("version", "name", "description", "batch", "smt", "instances")
INSTANCE_KEYS = ("id", "cpus", "memory_nodes", "threads", "batch", "seq_range", "kind")
SEQ_RANGE_KEYS = ("min", "max")

_MISSING = object()


def load_plan(source: str | os.PathLike, *, name: str | None = None) -> Plan:
    """Read a plan from a file path or from YAML text.

    A Path, or a one-line string ending in .yaml/.yml or naming an existing file, is read as a
    file; any other string is YAML text. `name` overrides how errors name the document.
    """
    if is_path(source):
        path = Path(source)
        text = read_yaml_file(path, "plan")
        name = name or str(path)
    else:
        text, name = str(source), name or "<string>"
    return YamlReader(name).plan(compose(text, name))


def read_yaml_file(path: str | os.PathLike, what: str, error: type[PlanError] = PlanError) -> str:
    """The text of a plan, preset or experiment file; any read failure is `error` naming it."""
    try:
        return read_text(path, what, allow_empty=False)
    except FileReadError as e:
        raise error(str(e)) from None


def compose(text: str, name: str, error: type[PlanError] = PlanError):
    """The YAML node tree of `text` (nodes keep their lines); invalid YAML raises `error` at its line."""
    depth = _flow_depth(text)
    if depth > MAX_FLOW_DEPTH:  # PyYAML's scanner slows quadratically with flow nesting
        raise error(f"not valid YAML: brackets nested {depth} deep (at most {MAX_FLOW_DEPTH})",
                    where=name)
    try:
        return yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise error(f"not valid YAML: {getattr(e, 'problem', None) or e}", where=where) from None
    except RecursionError:  # thousands of nested brackets
        raise error("not valid YAML: nested too deeply", where=name) from None


MAX_FLOW_DEPTH = 100
_BRACKETS = re.compile(r"[\[\]{}]")


def _flow_depth(text: str) -> int:
    """The deepest [ / { nesting (quotes ignored: a rough count that only has to be an
    upper bound for real documents, which nest a few levels)."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def dump_plan(plan: Plan) -> str:
    """The plan as YAML text that load_plan reads back to an equal Plan."""
    doc: dict[str, Any] = {"version": plan.version}
    if plan.name is not None:
        doc["name"] = plan.name
    if plan.description is not None:
        doc["description"] = plan.description
    doc["batch"] = plan.batch
    doc["smt"] = plan.smt
    doc["instances"] = [_dump_instance(i) for i in plan.instances]
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def _dump_instance(i: InstancePlan) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": i.id,
        "cpus": format_cpulist(i.cpus),
        "memory_nodes": list(i.memory_nodes),
        "threads": i.threads,
        "batch": i.batch,
    }
    if i.seq_range is not None:
        out["seq_range"] = {"min": i.seq_range.min, "max": i.seq_range.max}
    if i.kind is not None:
        out["kind"] = i.kind
    return out


def is_path(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    text = str(source)
    return "\n" not in text and (text.endswith((".yaml", ".yml")) or os.path.isfile(text))


class YamlReader:
    """Reads a composed YAML node tree, recording each field's line so errors name it.

    Public: presets (plans.presets) and experiments (experiments.spec) read their documents with
    it; `document` reads the versioned head every numabench document starts with."""

    error: type[PlanError] = PlanError  # what `fail` raises: each kind of document has its own

    def __init__(self, name: str):
        self.name = name
        self.lines: dict[str, int] = {}

    def fail(self, path: str, message: str) -> PlanError:
        return self.error(message, where=PlanSource(self.name, tuple(self.lines.items())).where(path))

    # -- structure ---------------------------------------------------------------------------

    def document(self, root, known: tuple[str, ...], version: int, what: str) -> dict[str, Any]:
        """The top-level mapping of a versioned document (a plan, an experiment), version checked."""
        if root is None:
            raise self.fail("", f"the {what} is empty")
        doc = self.mapping(root, "", known)
        if "version" not in doc:
            raise self.fail("", f"missing 'version' (this numabench reads version {version})")
        found = self.integer(doc["version"], "version")
        if found != version:
            raise self.fail("version", f"unsupported {what} version {found}; this numabench reads "
                                       f"version {version}")
        return doc

    def mapping(self, node, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        """The entries of a mapping node, by key, each still a node; unknown keys refused."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(path, f"expected a mapping, got {describe_node(node)}")
        entries: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child = f"{path}.{key}" if path else str(key)
            self.lines[child] = key_node.start_mark.line + 1
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(child, f"unknown key {key!r}{hint}; known keys: {', '.join(known)}")
            if key in entries:
                raise self.fail(child, f"key {key!r} given twice")
            entries[key] = value_node
        return entries

    def axis(self, node, path: str, read, *, auto: bool = False,
             empty: str = "an empty list gives nothing to run; give at least one value"):
        """One value or a list of distinct values (each read by `read`), as a tuple; "auto"
        where allowed. Experiments and tune specs read their axes with it."""
        if auto and isinstance(node, yaml.ScalarNode) and node.value == "auto":
            return "auto"
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                raise self.fail(path, empty)
            values = []
            for k, item in enumerate(node.value):
                self.lines[f"{path}[{k}]"] = item.start_mark.line + 1
                value = read(item, f"{path}[{k}]")
                if value in values:
                    raise self.fail(f"{path}[{k}]", f"{value!r} is listed twice")
                values.append(value)
            return tuple(values)
        if isinstance(node, yaml.MappingNode):
            raise self.fail(path, f"expected a value or a list of values, got {describe_node(node)}")
        return (read(node, path),)

    def choice(self, node, path: str, choices: Sequence[str], what: str) -> str:
        value = self.string(node, path)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(path, f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")
        return value

    def scalar(self, node, path: str):
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(path, f"expected a single value, got {describe_node(node)}")
        try:
            return yaml.SafeLoader("").construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # a bad !!tag value
            raise self.fail(path, f"cannot read the value {node.value[:40]!r} "
                                  f"({node.tag}): {str(e).splitlines()[0][:80]}") from None

    def integer(self, node, path: str, *, minimum: int | None = None, maximum: int | None = None,
                allow_none: bool = False):
        value = self.scalar(node, path)
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer, got {value!r} ({type_name(value)})")
        if minimum is not None and value < minimum:
            raise self.fail(path, f"must be at least {minimum}, not {value}")
        if maximum is not None and value > maximum:
            raise self.fail(path, f"must be at most {maximum}, not {value}")
        return value

    def string(self, node, path: str):
        value = self.scalar(node, path)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {value!r} ({type_name(value)})")
        return value

    def boolean(self, node, path: str) -> bool:
        value = self.scalar(node, path)
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r} ({type_name(value)})")
        return value

    def int_list(self, node, path: str, what: str) -> tuple[int, ...]:
        """A CPU or node list: a cpulist string ("0-11,48-59"), one integer, or a YAML list.

        A YAML list keeps duplicates (sorted) so validation can report a CPU named twice.
        """
        if isinstance(node, yaml.SequenceNode):
            values = []
            for k, item in enumerate(node.value):
                self.lines[f"{path}[{k}]"] = item.start_mark.line + 1
                values.append(self.integer(item, f"{path}[{k}]", minimum=0))
            return tuple(sorted(values))
        value = self.scalar(node, path)
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise self.fail(path, f"{what} numbers are not negative: {value}")
            return (value,)
        if isinstance(value, str):
            try:
                return parse_cpulist(value)
            except ValueError:
                pass
        raise self.fail(path, f"expected a list of {what} numbers (like \"0-11,48-59\" or "
                              f"[0, 1]), got {value!r} ({type_name(value)})")

    # -- documents ---------------------------------------------------------------------------

    def plan(self, root) -> Plan:
        doc = self.document(root, PLAN_KEYS, PLAN_VERSION, "plan")
        if "instances" not in doc:
            raise self.fail("", "missing 'instances' (a list, one entry per instance)")
        seq = doc["instances"]
        if not isinstance(seq, yaml.SequenceNode):
            raise self.fail("instances", f"expected a list of instances, got {describe_node(seq)}")
        if not seq.value:
            raise self.fail("instances", "a plan needs at least one instance")
        instances = []
        for k, item in enumerate(seq.value):
            self.lines[f"instances[{k}]"] = item.start_mark.line + 1
            instances.append(self.instance(item, f"instances[{k}]", k))

        batch = self.integer(doc["batch"], "batch", minimum=1) if "batch" in doc else None
        instances = self.fill_batch(instances, batch)
        if batch is None:
            batch = sum(i.batch for i in instances)
        return Plan(
            instances=tuple(instances),
            batch=batch,
            smt=self.boolean(doc["smt"], "smt") if "smt" in doc else False,
            name=self.string(doc["name"], "name") if "name" in doc else None,
            description=self.string(doc["description"], "description") if "description" in doc else None,
            version=PLAN_VERSION,
            source=PlanSource(self.name, tuple(self.lines.items())),
        )

    def instance(self, node, path: str, index: int) -> InstancePlan:
        d = self.mapping(node, path, INSTANCE_KEYS)
        if "cpus" not in d:
            raise self.fail(path, "missing 'cpus' (like \"0-11\")")
        cpus = self.int_list(d["cpus"], f"{path}.cpus", "CPU")
        if not cpus:
            raise self.fail(f"{path}.cpus", "an instance needs at least one CPU")
        seq_range = None
        if "seq_range" in d and not _is_null(d["seq_range"]):
            seq_range = self.seq_range(d["seq_range"], f"{path}.seq_range")
        return InstancePlan(
            id=self.integer(d["id"], f"{path}.id", minimum=0) if "id" in d else index,
            cpus=cpus,
            memory_nodes=self.int_list(d["memory_nodes"], f"{path}.memory_nodes", "node")
            if "memory_nodes" in d else (),
            # threads default to one per CPU, the planner's choice
            threads=self.integer(d["threads"], f"{path}.threads", minimum=1)
            if "threads" in d else len(cpus),
            batch=self.integer(d["batch"], f"{path}.batch", minimum=1) if "batch" in d else _MISSING,
            seq_range=seq_range,
            kind=self.string(d["kind"], f"{path}.kind") if "kind" in d else None,
        )

    def seq_range(self, node, path: str) -> SeqRange:
        d = self.mapping(node, path, SEQ_RANGE_KEYS)
        low = self.integer(d["min"], f"{path}.min", minimum=1) if "min" in d else 1
        high = self.integer(d["max"], f"{path}.max", allow_none=True) if "max" in d else None
        if high is not None and high < low:
            raise self.fail(f"{path}.max", f"max {high} is below min {low}")
        return SeqRange(low, high)

    def fill_batch(self, instances: list[InstancePlan], batch: int | None) -> list[InstancePlan]:
        """Shares may be omitted everywhere: then the plan's batch (or 1 each) is split evenly."""
        missing = [k for k, i in enumerate(instances) if i.batch is _MISSING]
        if not missing:
            return instances
        if len(missing) != len(instances):
            raise self.fail(f"instances[{missing[0]}]", "missing 'batch': give every instance a "
                            "batch share, or none (then the plan's batch is split evenly)")
        if batch is not None and batch < len(instances):
            raise self.fail("batch", f"batch {batch} cannot be split over {len(instances)} "
                                     "instances (each needs at least one sample)")
        shares = split_batch(batch, len(instances)) if batch is not None else (1,) * len(instances)
        return [replace(i, batch=s) for i, s in zip(instances, shares)]


def _is_null(node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def describe_node(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


def type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            type(None): "null"}.get(type(value), type(value).__name__)
