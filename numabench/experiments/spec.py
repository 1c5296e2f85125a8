"""Experiment documents: a versioned YAML sweep description, read with file:line in every error.

The reader reuses the plan loader's node walker (numabench.plans.yamlio), so an experiment
error names the file, the line and the field just as a plan error does:

    experiment.yaml:7: seq[1]: expected an integer, got 'long' (string)
"""
from __future__ import annotations

import hashlib
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
KINDS = ("core-scaling", "batch-scaling", "smt", "grid", "dispatch")
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
ALL_KEYS = COMMON_KEYS + ("instances", "cores", "cores_per_instance", "smt") + (
    "plans", "lengths", "rate", "requests", "pad", "queue_size", "inflight")  # the last: dispatch
KIND_HELP = {
    "core-scaling": "one instance on 1..all cores; use 'cores'",
    "batch-scaling": "N instances share 'cores' (default: all); use 'instances' and 'cores'",
    "smt": "compares smt off and on itself; use 'instances' and 'cores_per_instance'",
    "grid": "use 'instances' and/or 'cores_per_instance'",
    "dispatch": "serves a request stream to 'plans'; see docs/experiments.md",
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


# ---- kind: dispatch ---------------------------------------------------------------------------
# An open-loop stream of requests of mixed lengths, served by `numabench serve` under two or more
# plans on the same cores (numabench.experiments.dispatch runs it; docs/experiments.md).

DISPATCH_KEYS = ("version", "kind", "name", "description", "model", "backend", "precision",
                 "plans", "lengths", "rate", "duration", "requests", "pad", "warmup",
                 "repetitions", "seed", "backend_options", "queue_size", "inflight")
PADS = ("max", "bucket")  # serve --pad
DISTRIBUTIONS = ("uniform", "lognormal")
PLAN_ENTRY_KEYS = ("name", "preset", "file", "instances", "cores_per_instance", "smt")
LENGTH_KEYS = ("distribution", "min", "max", "median", "sigma", "file", "texts")
DEFAULT_DISPATCH_DURATION_S = 30.0
MAX_RATE = 100_000.0  # requests/s: beyond it a typo, not a measurement
MAX_REQUESTS = 1_000_000  # per point, counted before anything runs
MAX_SIGMA = 10.0
_PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}$")  # it names point files


@dataclass(frozen=True)
class PlanChoice:
    """One plan of a dispatch experiment: a preset (built-in or file), a plan file, or a
    planner shape (instances / cores_per_instance: one uniform pool)."""

    name: str
    preset: str | None = None
    file: str | None = None  # absolute
    instances: int | None = None
    cores_per_instance: int | None = None
    smt: bool = False

    def describe(self) -> str:
        if self.preset:
            return f"preset {self.preset}"
        if self.file:
            return f"plan {self.file}"
        shape = [f"{self.instances} instances"] if self.instances else []
        shape += [f"{self.cores_per_instance} cores each"] if self.cores_per_instance else []
        return ", ".join(shape) + (" +SMT" if self.smt else "")


@dataclass(frozen=True)
class LengthMix:
    """Request lengths in tokens: `uniform` or `lognormal` over [min, max], `file` (one length a
    line, drawn at random) or `texts` (one text a line, tokenized with the model's tokenizer)."""

    distribution: str  # uniform | lognormal | file | texts
    min: int | None = None
    max: int | None = None
    median: float | None = None  # lognormal
    sigma: float | None = None  # lognormal: of the log
    file: str | None = None  # file, texts: absolute path
    digest: str | None = None  # file, texts: of the content (an edited file reruns on --resume)
    values: tuple[int, ...] = field(default=(), repr=False)  # file (texts: once tokenized)

    def to_dict(self) -> dict[str, Any]:
        d = {"distribution": self.distribution, "min": self.min, "max": self.max}
        if self.distribution == "lognormal":
            d.update(median=self.median, sigma=self.sigma)
        if self.file:
            d.update(file=self.file, digest=self.digest)
        return d


@dataclass(frozen=True)
class DispatchSpec:
    plans: tuple[PlanChoice, ...]
    lengths: LengthMix
    rates: tuple[float, ...]  # offered requests/s, Poisson arrivals
    pads: tuple[str, ...] = ("max",)
    duration_s: float | None = DEFAULT_DISPATCH_DURATION_S  # seconds of arrivals per point...
    requests: int | None = None  # ... or this many requests per point
    queue_size: int | None = None  # serve --queue-size (None: serve's default)
    inflight: int | None = None  # serve --inflight


def length_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of a lengths file's entries: blank lines and # comments skipped."""
    return [(n + 1, line.strip()) for n, line in enumerate(text.splitlines())
            if line.strip() and not line.lstrip().startswith("#")]


class _DispatchReader(YamlReader):
    """The dispatch kind's own keys (the common ones are read by _ExperimentReader)."""

    base_dir: Path = Path(".")

    def finite(self, node, path: str, what: str, *, low: float, high: float) -> float:
        value = self.scalar(node, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"expected a number ({what}), got {value!r} ({type_name(value)})")
        if not (math.isfinite(value) and low < value <= high):
            raise self.fail(path, f"must be a finite number above {low:g} and at most {high:g} "
                                  f"({what}), not {value}")
        return float(value)

    def path_in(self, node, path: str) -> Path:
        value = self.string(node, path)
        if not value:
            raise self.fail(path, "expected a file name")
        p = Path(value).expanduser()
        return (p if p.is_absolute() else self.base_dir / p).resolve()

    def dispatch_spec(self, doc, out: dict[str, Any]) -> DispatchSpec:
        from numabench.workers.models import resolve_model

        for key in ("model", "backend", "precision"):
            if key in doc and len(out[key + "s"]) > 1:
                raise self.fail(key, "a dispatch experiment serves one model, backend and "
                                     "precision: give one value (compare others in another experiment)")
        for key in ("plans", "lengths", "rate"):
            if key not in doc:
                raise self.fail("", f"missing {key!r}: a dispatch experiment needs plans (two or "
                                    "more), lengths (the request-length mix) and rate (requests/s)")
        spec = resolve_model(out.get("models", (DEFAULTS["model"],))[0])
        plans = self.plan_choices(doc["plans"])
        lengths = self.length_mix(doc["lengths"], spec.max_positions, spec.has_tokenizer)
        rates = self.axis(doc["rate"], "rate",
                          lambda n, p: self.finite(n, p, "requests/s", low=0.0, high=MAX_RATE))
        pads = (self.axis(doc["pad"], "pad", lambda n, p: self.choice(n, p, PADS, "pad"))
                if "pad" in doc else ("max",))
        duration, requests = out.pop("duration_s", None), None
        if "requests" in doc:
            if "duration" in doc:
                raise self.fail("requests", "give requests or duration, not both")
            requests = self.integer(doc["requests"], "requests", minimum=1, maximum=MAX_REQUESTS)
        elif duration is None:
            duration = DEFAULT_DISPATCH_DURATION_S
        if duration is not None and max(rates) * duration > MAX_REQUESTS:
            raise self.fail("duration" if "duration" in doc else "rate",
                            f"rate {max(rates):g}/s for {duration:g} s is about "
                            f"{max(rates) * duration:.0f} requests a point, more than "
                            f"{MAX_REQUESTS}; lower the rate or the duration")
        if duration is not None and min(rates) * duration < 1:
            raise self.fail("rate", f"rate {min(rates):g}/s for {duration:g} s expects less than one "
                                    "request a point; raise the rate or the duration")
        queue = (self.integer(doc["queue_size"], "queue_size", minimum=1, maximum=1_000_000)
                 if "queue_size" in doc else None)
        inflight = (self.integer(doc["inflight"], "inflight", minimum=1, maximum=64)
                    if "inflight" in doc else None)
        return DispatchSpec(plans=plans, lengths=lengths, rates=rates, pads=pads,
                            duration_s=duration, requests=requests, queue_size=queue,
                            inflight=inflight)

    def plan_choices(self, node) -> tuple[PlanChoice, ...]:
        if not isinstance(node, yaml.SequenceNode) or len(node.value) < 2:
            got = describe_node(node) if not isinstance(node, yaml.SequenceNode) else \
                f"{len(node.value)} plan{'s' if len(node.value) != 1 else ''}"
            raise self.fail("plans", f"expected a list of two or more plans to compare, got {got} "
                                     "(e.g. [{preset: smart-dispatch}, {name: uniform, instances: 6}])")
        plans: list[PlanChoice] = []
        for k, item in enumerate(node.value):
            path = f"plans[{k}]"
            self.lines[path] = item.start_mark.line + 1
            if isinstance(item, yaml.ScalarNode):  # a preset name or a plan file
                value = self.text(item, path)
                d = {"file" if value.endswith((".yaml", ".yml")) else "preset": item}
            else:
                d = self.mapping(item, path, PLAN_ENTRY_KEYS)
            given = [key for key in ("preset", "file") if key in d]
            shape = [key for key in ("instances", "cores_per_instance") if key in d]
            if len(given) + bool(shape) != 1:
                raise self.fail(path, "give exactly one of preset, file, or instances / "
                                      "cores_per_instance (one uniform pool)")
            kw: dict[str, Any] = {}
            if "preset" in d:
                from numabench.plans.presets import BUILTIN_PRESETS

                preset = self.text(d["preset"], f"{path}.preset")
                if preset not in BUILTIN_PRESETS:
                    file = self.path_in(d["preset"], f"{path}.preset")
                    if not file.is_file():
                        raise self.fail(f"{path}.preset", f"unknown preset {preset!r}: use one of "
                                        f"{', '.join(BUILTIN_PRESETS)} or a preset YAML file")
                    preset = str(file)
                kw["preset"] = preset
            if "file" in d:
                file = self.path_in(d["file"], f"{path}.file")
                if not file.is_file():
                    raise self.fail(f"{path}.file", f"plan file {file} does not exist (relative "
                                                    "names are read beside the experiment file)")
                kw["file"] = str(file)
            for key in shape:
                kw[key] = self.integer(d[key], f"{path}.{key}", minimum=1, maximum=100_000)
            if "smt" in d:
                if not shape:
                    raise self.fail(f"{path}.smt", "smt applies to instances / cores_per_instance "
                                                   "(a preset or plan file says it itself)")
                kw["smt"] = self.boolean(d["smt"], f"{path}.smt")
            if "name" in d:
                name = self.text(d["name"], f"{path}.name")
            else:
                name = Path(kw.get("file") or kw.get("preset") or "").stem or (
                    f"uniform-{kw.get('instances') or ''}x{kw.get('cores_per_instance') or ''}".rstrip("x-"))
            if not _PLAN_NAME.match(name):
                raise self.fail(f"{path}.name" if "name" in d else path,
                                f"plan name {name[:50]!r} names the point files: use up to 40 "
                                "letters, digits and . _ + - (give one with name:)")
            if any(p.name == name for p in plans):
                raise self.fail(f"{path}.name" if "name" in d else path,
                                f"two plans are named {name!r}; give each its own name:")
            plans.append(PlanChoice(name=name, **kw))
        return tuple(plans)

    def length_mix(self, node, max_positions: int | None, has_tokenizer: bool | None) -> LengthMix:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail("lengths", "expected a mapping: {distribution: uniform|lognormal, min: "
                                       f"N, max: N}}, {{file: lengths.txt}} or {{texts: texts.txt}}; "
                                       f"got {describe_node(node)}")
        d = self.mapping(node, "lengths", LENGTH_KEYS)
        sources = [key for key in ("distribution", "file", "texts") if key in d]
        if len(sources) != 1:
            raise self.fail("lengths", "give exactly one of distribution (with min and max), file "
                                       "(one length a line) or texts (one text a line)")
        limit = max_positions or 1_000_000
        if "texts" in d or "file" in d:
            key = sources[0]
            extra = [k for k in d if k != key]
            if extra:
                raise self.fail(f"lengths.{extra[0]}", f"{extra[0]!r} applies to a distribution, "
                                                       f"not to lengths from a {key} file")
            path = self.path_in(d[key], f"lengths.{key}")
            from numabench.fileio import FileReadError, read_text

            try:
                text = read_text(path, "lengths file" if key == "file" else "texts file")
            except FileReadError as e:
                raise self.fail(f"lengths.{key}", str(e)) from None
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            lines = length_lines(text) if key == "file" else [(0, t) for t in text.splitlines() if t.strip()]
            if not lines:
                raise self.fail(f"lengths.{key}", f"{path}: no lengths in it (one per line)"
                                if key == "file" else f"{path}: no non-empty lines (one text a line)")
            if key == "texts":
                if has_tokenizer is False:
                    raise self.fail("lengths.texts", "texts need a model with a tokenizer; this "
                                    "model has none (use minilm, a local folder or a hub id, or "
                                    "give lengths as a distribution or a file of lengths)")
                return LengthMix("texts", file=str(path), digest=digest)
            values = []
            for n, line in lines:
                if not re.fullmatch(r"\d{1,9}", line) or not 1 <= int(line) <= limit:
                    raise self.fail("lengths.file", f"{path}:{n}: {line[:40]!r} is not a length "
                                    f"of 1 to {limit} tokens (one integer a line)")
                values.append(int(line))
            return LengthMix("file", min=min(values), max=max(values), file=str(path),
                             digest=digest, values=tuple(values))
        dist = self.choice(d["distribution"], "lengths.distribution", DISTRIBUTIONS, "distribution")
        for key in ("min", "max"):
            if key not in d:
                raise self.fail("lengths", f"missing {key!r}: a {dist} distribution needs min and "
                                           "max (tokens)")
        low = self.integer(d["min"], "lengths.min", minimum=1, maximum=limit)
        high = self.integer(d["max"], "lengths.max", minimum=low, maximum=limit)
        if dist == "uniform":
            for key in ("median", "sigma"):
                if key in d:
                    raise self.fail(f"lengths.{key}", f"{key!r} applies to lognormal, not uniform")
            return LengthMix("uniform", min=low, max=high)
        median = (self.finite(d["median"], "lengths.median", "tokens", low=0.0, high=float(high))
                  if "median" in d else math.sqrt(low * high))
        if median < low:
            raise self.fail("lengths.median", f"median {median:g} is below min {low}")
        sigma = (self.finite(d["sigma"], "lengths.sigma", "of log lengths", low=0.0, high=MAX_SIGMA)
                 if "sigma" in d else 1.0)
        return LengthMix("lognormal", min=low, max=high, median=median, sigma=sigma)


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
    dispatch: DispatchSpec | None = None  # kind dispatch only
    source: PlanSource | None = field(default=None, compare=False, repr=False)

    def where(self, path: str = "") -> str:
        return self.source.where(path) if self.source else (path or self.name)


def load_experiment(source: str | os.PathLike, *, name: str | None = None) -> Experiment:
    """Read an experiment from a file path or YAML text (a str with a newline is text)."""
    if isinstance(source, os.PathLike) or "\n" not in str(source):
        path = Path(source)
        text = read_yaml_file(path, "experiment", ExperimentError)
        return parse_experiment(text, name=name or str(path), default_name=path.stem,
                                base_dir=path.parent)
    return parse_experiment(str(source), name=name or "<string>", default_name="experiment")


def parse_experiment(text: str, *, name: str = "<string>", default_name: str = "experiment",
                     base_dir: str | os.PathLike | None = None) -> Experiment:
    """`base_dir`: where relative file names inside the document are found (default: here)."""
    reader = _ExperimentReader(name)
    reader.base_dir = Path(base_dir) if base_dir is not None else Path(".")
    return reader.experiment(compose(text, name, ExperimentError), default_name)


class _ExperimentReader(_DispatchReader):
    error = ExperimentError

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
        allowed = (DISPATCH_KEYS if kind == "dispatch" else COMMON_KEYS + KIND_KEYS[kind]
                   + (("baseline", "binder") if kind in BASELINE_KINDS else ()))
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
        if kind == "dispatch":
            out["dispatch"] = self.dispatch_spec(doc, out)
        return Experiment(**out, source=PlanSource(self.name, tuple(self.lines.items())))
