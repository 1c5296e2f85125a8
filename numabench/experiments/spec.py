"""Experiment documents: a versioned YAML sweep description, read with file:line in every error.

The reader reuses the plan loader's node walker (numabench.plans.yamlio), so an experiment
error names the file, the line and the field just as a plan error does:

    experiment.yaml:7: seq[1]: expected an integer, got 'long' (string)
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from numabench.errors import NumabenchError, PlanError
from numabench.plans.model import PlanSource
from numabench.plans.yamlio import YamlReader, compose, describe_node, read_yaml_file, type_name

EXPERIMENT_VERSION = 1
KINDS = ("core-scaling", "batch-scaling", "smt", "grid")
MODES = ("split", "throughput")  # the launcher's modes (kept here so reading YAML stays light)
AUTO = "auto"

COMMON_KEYS = ("version", "kind", "name", "description", "model", "backend", "precision", "seq",
               "batch", "mode", "iterations", "duration", "warmup", "repetitions", "seed",
               "backend_options")
KIND_KEYS = {
    # one instance at batch b on 1 .. all physical cores (the article's Figure 6)
    "core-scaling": ("cores", "smt"),
    # a total batch B over N instances of C/N cores (Figures 7-9); cores = C, the total
    "batch-scaling": ("instances", "cores", "smt"),
    # every point twice: physical cores, then the same cores plus their SMT siblings
    "smt": ("instances", "cores_per_instance"),
    # the product of every axis given
    "grid": ("instances", "cores_per_instance", "smt"),
}
ALL_KEYS = COMMON_KEYS + ("instances", "cores", "cores_per_instance", "smt")
KIND_HELP = {
    "core-scaling": "one instance on 1..all cores; use 'cores'",
    "batch-scaling": "N instances share 'cores' (default: all); use 'instances' and 'cores'",
    "smt": "compares smt off and on itself; use 'instances' and 'cores_per_instance'",
    "grid": "use 'instances' and/or 'cores_per_instance'",
}
# Baselines run beside the pinned points of the launch kinds (docs/experiments.md): oob, the
# out-of-the-box single process (no binding, no thread settings); unpinned, every split again
# with --binder none. `binder` sets how the (pinned) points are bound, over `sweep --binder`.
BASELINES = ("oob", "unpinned")
BASELINE_KINDS = ("core-scaling", "batch-scaling", "smt", "grid")
BINDER_CHOICES = ("auto", "numactl", "taskset", "self", "none")  # launcher.binding.BINDERS
ALL_KEYS += ("baseline", "binder")
# Bounds that catch typos while reading, before anything expands or runs.
MAX_REPETITIONS = 100
MAX_POINTS = 1000  # days of measuring at a minute a point
MAX_ITERATIONS = 1_000_000_000
MAX_DURATION_S = 7 * 24 * 3600.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@=, -]{0,99}$")

DEFAULTS = {"model": "bert-base-cased", "backend": "pytorch", "precision": "fp32", "seq": 128,
            "batch": 8, "mode": "split", "warmup": 3, "repetitions": 1, "seed": 0}


class ExperimentError(PlanError):
    """An experiment document, or one of its points, is invalid. `where` is 'file:line: field'."""


@dataclass(frozen=True)
class Experiment:
    """A sweep as written: axes (tuples of values, or "auto"), and what every run does."""

    kind: str
    name: str
    models: tuple[str, ...] = (DEFAULTS["model"],)
    backends: tuple[str, ...] = (DEFAULTS["backend"],)
    precisions: tuple[str, ...] = (DEFAULTS["precision"],)
    seqs: tuple[int, ...] = (DEFAULTS["seq"],)
    batches: tuple[int, ...] = (DEFAULTS["batch"],)
    instances: tuple[int, ...] | str | None = None  # None: not given; "auto": powers of two
    cores: tuple[int, ...] | str | None = None
    cores_per_instance: tuple[int, ...] | None = None
    smt: tuple[bool, ...] = (False,)
    mode: str = DEFAULTS["mode"]
    iterations: int | None = None
    duration_s: float | None = None
    warmup: int = DEFAULTS["warmup"]
    repetitions: int = DEFAULTS["repetitions"]
    seed: int = DEFAULTS["seed"]
    backend_options: tuple[tuple[str, Any], ...] = ()
    baselines: tuple[str, ...] = ()  # of BASELINES
    binder: str | None = None  # None: the command line's --binder
    description: str | None = None
    version: int = EXPERIMENT_VERSION
    source: PlanSource | None = field(default=None, compare=False, repr=False)

    def where(self, path: str = "") -> str:
        return self.source.where(path) if self.source else (path or self.name)


def load_experiment(source: str | os.PathLike, *, name: str | None = None) -> Experiment:
    """Read an experiment from a file path or YAML text (a str with a newline is text)."""
    if isinstance(source, os.PathLike) or "\n" not in str(source):
        path = Path(source)
        text = read_yaml_file(path, "experiment", ExperimentError)
        return parse_experiment(text, name=name or str(path), default_name=path.stem)
    return parse_experiment(str(source), name=name or "<string>", default_name="experiment")


def parse_experiment(text: str, *, name: str = "<string>", default_name: str = "experiment") -> Experiment:
    return _ExperimentReader(name).experiment(compose(text, name, ExperimentError), default_name)


class _ExperimentReader(YamlReader):
    def fail(self, path: str, message: str) -> ExperimentError:
        return ExperimentError(message, where=PlanSource(self.name, tuple(self.lines.items())).where(path))

    def choice(self, node, path: str, choices: tuple[str, ...], what: str) -> str:
        value = self.string(node, path)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(path, f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")
        return value

    def axis(self, node, path: str, read, *, auto: bool = False):
        """One value or a list of values (each read by `read`); "auto" where allowed."""
        return super().axis(node, path, read, auto=auto,
                            empty="an empty list gives no points; give at least one value")

    def positive(self, node, path: str) -> int:
        return self.integer(node, path, minimum=1)

    def text(self, node, path: str) -> str:
        value = self.string(node, path)
        if not value:
            raise self.fail(path, "expected a non-empty string")
        return value

    def number(self, node, path: str) -> float:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number of seconds, got {value!r} ({type_name(value)})")
        if not (math.isfinite(value) and 0 < value <= MAX_DURATION_S):
            raise self.fail(path, f"must be a positive number of seconds, at most "
                                  f"{MAX_DURATION_S:.0f} (a week), not {value}")
        return float(value)

    def experiment(self, root, default_name: str) -> Experiment:
        from numabench.workers.backends import BACKENDS, PRECISIONS, check_options
        from numabench.workers.models import resolve_model

        doc = self.document(root, ALL_KEYS, EXPERIMENT_VERSION, "experiment")
        if "kind" not in doc:
            raise self.fail("", f"missing 'kind' (one of {', '.join(KINDS)})")
        kind = self.choice(doc["kind"], "kind", KINDS, "kind")
        allowed = COMMON_KEYS + KIND_KEYS[kind] + (("baseline", "binder") if kind in BASELINE_KINDS else ())
        for key in doc:
            if key not in allowed:
                raise self.fail(key, f"{key!r} does not apply to kind {kind} ({KIND_HELP[kind]})")

        out: dict[str, Any] = {"kind": kind, "version": EXPERIMENT_VERSION}
        out["name"] = self.text(doc["name"], "name") if "name" in doc else default_name
        if not _SAFE_NAME.match(out["name"]):
            # it names the default output folder (results/<name>): it must stay inside it
            raise self.fail("name" if "name" in doc else "", f"name {out['name'][:60]!r} cannot be a "
                            "folder name: use letters, digits and . _ - (no / and no leading .)")
        if "description" in doc:
            out["description"] = self.string(doc["description"], "description")
        if "model" in doc:
            out["models"] = self.axis(doc["model"], "model", self.text)
            for k, m in enumerate(out["models"]):
                p = "model" if isinstance(doc["model"], yaml.ScalarNode) else f"model[{k}]"
                try:
                    resolve_model(m)
                except NumabenchError as e:
                    raise self.fail(p, str(e)) from None
        if "backend" in doc:
            out["backends"] = self.axis(doc["backend"], "backend",
                                        lambda n, p: self.choice(n, p, tuple(sorted(BACKENDS)), "backend"))
        if "precision" in doc:
            out["precisions"] = self.axis(doc["precision"], "precision",
                                          lambda n, p: self.choice(n, p, PRECISIONS, "precision"))
        if "seq" in doc:
            out["seqs"] = self.axis(doc["seq"], "seq", self.positive)
        if "batch" in doc:
            out["batches"] = self.axis(doc["batch"], "batch", self.positive)
        if "instances" in doc:
            out["instances"] = self.axis(doc["instances"], "instances", self.positive,
                                         auto=kind == "batch-scaling")
        if "cores" in doc:
            out["cores"] = self.axis(doc["cores"], "cores", self.positive, auto=True)
        if "cores_per_instance" in doc:
            out["cores_per_instance"] = self.axis(doc["cores_per_instance"], "cores_per_instance",
                                                  self.positive)
        if "smt" in doc:
            out["smt"] = self.axis(doc["smt"], "smt", self.boolean)
        if "baseline" in doc:
            out["baselines"] = self.axis(doc["baseline"], "baseline",
                                         lambda n, p: self.choice(n, p, BASELINES, "baseline"))
        if "binder" in doc:
            out["binder"] = self.choice(doc["binder"], "binder", BINDER_CHOICES, "binder")
            if out["binder"] == "none" and "unpinned" in out.get("baselines", ()):
                raise self.fail("binder", "binder none already runs every point unpinned: drop "
                                          "'unpinned' from baseline, or bind the points")
        if "mode" in doc:
            out["mode"] = self.choice(doc["mode"], "mode", MODES, "mode")
        if "iterations" in doc:
            out["iterations"] = self.integer(doc["iterations"], "iterations", minimum=1,
                                             maximum=MAX_ITERATIONS)
        if "duration" in doc:
            if "iterations" in doc:
                raise self.fail("duration", "give iterations or duration, not both")
            out["duration_s"] = self.number(doc["duration"], "duration")
        if "warmup" in doc:
            out["warmup"] = self.integer(doc["warmup"], "warmup", minimum=0)
        if "repetitions" in doc:
            out["repetitions"] = self.integer(doc["repetitions"], "repetitions", minimum=1,
                                              maximum=MAX_REPETITIONS)
        if "seed" in doc:
            out["seed"] = self.integer(doc["seed"], "seed", minimum=0, maximum=2**32 - 1)
        if "backend_options" in doc:
            node = doc["backend_options"]
            if not isinstance(node, yaml.MappingNode):
                raise self.fail("backend_options", f"expected a mapping like {{compute_ns: 1000}}, "
                                                   f"got {describe_node(node)}")
            options = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                self.lines[f"backend_options.{key}"] = key_node.start_mark.line + 1
                options[key] = self.scalar(value_node, f"backend_options.{key}")
            for backend in out.get("backends", (DEFAULTS["backend"],)):
                try:
                    check_options(backend, options)
                except NumabenchError as e:
                    bad = next((k for k in options if k in str(e)), "")
                    raise self.fail(f"backend_options.{bad}" if bad else "backend_options", str(e)) from None
            out["backend_options"] = tuple(sorted(options.items()))
        return Experiment(**out, source=PlanSource(self.name, tuple(self.lines.items())))
