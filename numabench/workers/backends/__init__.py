"""Inference backends behind one small interface, importable without any framework.

A backend loads one model at one precision on a fixed number of threads, then runs batches of
token ids. The worker owns everything else (protocol, timing, tokenizing, warm-up), so a new
backend only implements `load`, `run` and `info` and registers here. A backend that needs
work done once per run before any worker starts (the ONNX export) does it in `prepare_backend`,
which the launcher calls.
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from numabench.errors import NumabenchError

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = frozenset({"pytorch", "noop", "onnxruntime"})
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")

# Which precisions each backend runs, and the options it accepts (name -> type), so the launcher
# can refuse a bad combination before it starts any process.
SUPPORTED_PRECISIONS: Mapping[str, frozenset[str]] = {
    "pytorch": frozenset(PRECISIONS),
    "noop": frozenset(PRECISIONS),  # precision is recorded, not used: noop computes nothing
    "onnxruntime": frozenset({"fp32", "int8"}),
}
# Why a precision is refused, where there is more to say than "not supported".
UNSUPPORTED_WHY: Mapping[tuple[str, str], str] = {
    ("onnxruntime", "bf16"): (
        "bf16 on onnxruntime needs bfloat16 kernels for MatMul, Softmax and LayerNormalization in "
        "ONNX Runtime's CPU execution provider, which it does not have (its only bf16 path, "
        "mlas.enable_gemm_fastmath_arm64_bfloat16, is an Arm64 fp32-GEMM speed-up); use fp32 or "
        "int8 on onnxruntime, or --backend pytorch for bf16"),
}
BACKEND_OPTIONS: Mapping[str, Mapping[str, type]] = {
    # weights_path: the node's shared weights file (set by the launcher, shared_weights.py).
    "pytorch": {"weights_path": str},
    "noop": {"compute_ns": int, "spin": bool},
    # model_path: the prepared ONNX file (set by the launcher); cache_dir: where to export to
    # when there is none; opt_level: ONNX Runtime's graph optimization level.
    # pin_threads: bind each intra-op thread to its own CPU of the instance (set by the launcher).
    "onnxruntime": {"model_path": str, "cache_dir": str, "opt_level": str, "pin_threads": bool},
}
OPTION_CHOICES: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("onnxruntime", "opt_level"): ORT_OPT_LEVELS,
}
# Packages a backend needs at run time: (import name, pip requirement).
BACKEND_PACKAGES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "onnxruntime": (("onnxruntime", "onnxruntime"),),
}
if TYPE_CHECKING:  # numpy starts BLAS threads on import: the worker imports it after pinning
    import numpy as np

_MODULES = {"pytorch": "numabench.workers.backends.pytorch", "noop": "numabench.workers.backends.noop",
            "onnxruntime": "numabench.workers.backends.onnxruntime"}


class Backend(abc.ABC):
    """One loaded model. Call `load` once, then `run` any number of times from one thread."""

    name: ClassVar[str]

    @abc.abstractmethod
    def load(self, spec: Any, precision: str, threads: int, options: Mapping[str, Any],
             seed: int = 0) -> None:
        """Load `spec` (a models.ModelSpec) at `precision` on `threads` threads."""

    @abc.abstractmethod
    def run(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Run one batch: input_ids (int64, (batch, seq)) and attention_mask (same shape).

        Returns a float32 array: the model's last hidden state (batch, seq, hidden) or, for
        backends without a model, a (batch, seq) summary of the input.
        """

    def run_loops(self, arrays: Mapping[str, np.ndarray], loops: int
                  ) -> tuple[np.ndarray, list[int], list[int]]:
        """`loops` passes of the same batch back to back, each timed (time.monotonic_ns):
        (the last output, each pass's start, each pass's duration). A backend may time less
        than `run` does per pass (the forward alone: inputs set up once, the output converted
        once after the last pass), as a bare loop would."""
        return timed_passes(lambda: self.run(arrays), loops)

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """After load: {"threads": int, "model": {hidden_size, layers, parameters, vocab_size,
        max_positions, ...}} with what the framework actually runs."""


def timed_passes(call: Callable[[], Any], loops: int) -> tuple[Any, list[int], list[int]]:
    """Call `call` `loops` times back to back, two clock reads around each and nothing else
    between: (the last result, each call's start, each call's duration), monotonic ns."""
    import time

    now = time.monotonic_ns
    starts, computes = [0] * loops, [0] * loops
    for k in range(loops):
        t0 = now()
        out = call()
        starts[k], computes[k] = t0, now() - t0
    return out, starts, computes


def check_backend(backend: str, precision: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise NumabenchError for an unknown backend or precision, or a combination not supported."""
    if backend not in BACKENDS:
        raise NumabenchError(
            f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    if precision not in PRECISIONS:
        raise NumabenchError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision not in SUPPORTED_PRECISIONS[backend]:
        if (backend, precision) in UNSUPPORTED_WHY:
            raise NumabenchError(UNSUPPORTED_WHY[backend, precision])
        raise NumabenchError(
            f"backend {backend!r} does not support {precision}; it supports "
            f"{', '.join(p for p in PRECISIONS if p in SUPPORTED_PRECISIONS[backend])}")
    check_options(backend, options or {})
    missing = [pip for module, pip in BACKEND_PACKAGES.get(backend, ())
               if importlib.util.find_spec(module) is None]
    if missing:
        raise NumabenchError(f"backend {backend!r} needs {', '.join(missing)}: "
                             "pip install 'numabench[onnx]'")


def check_options(backend: str, options: Mapping[str, Any]) -> None:
    if not isinstance(options, Mapping):
        raise NumabenchError(f"backend options must be a mapping, not {type(options).__name__}")
    accepted = BACKEND_OPTIONS[backend]
    for key, value in options.items():
        if key not in accepted:
            raise NumabenchError(
                f"backend {backend!r} has no option {key!r}; it accepts: "
                f"{', '.join(sorted(accepted)) or 'none'}")
        want = accepted[key]
        # bool is an int in Python; refuse it where an int is meant, and vice versa.
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise NumabenchError(f"backend option {key!r} must be {want.__name__}, got {value!r}")
        if want is int and value < 0:  # counts and durations
            raise NumabenchError(f"backend option {key!r} cannot be negative, got {value!r}")
        choices = OPTION_CHOICES.get((backend, key))
        if choices is not None and value not in choices:
            raise NumabenchError(f"backend option {key!r} must be one of {', '.join(choices)}, "
                                 f"got {value!r}")


def create_backend(backend: str) -> Backend:
    """Instantiate a backend; its framework is imported here, not before."""
    if backend not in BACKENDS:
        check_backend(backend, PRECISIONS[0])  # raises with the right message
    module = importlib.import_module(_MODULES[backend])
    return module.BACKEND_CLASS()


_ORT_NOT_SHARED = (
    "onnxruntime does not share weights: each worker holds its own copy, because ONNX Runtime "
    "prepacks every MatMul weight into private memory, and turning prepacking off to map shared "
    "weights cost 19% of BERT-base's speed (docs/backends.md)")
# Whether `share_weights` shares anything, and what to say where it does not (or only in part).
SHARE_WEIGHTS_WHY: Mapping[tuple[str, str], str] = {
    ("pytorch", "int8"): (
        "int8 shares only the embeddings and LayerNorm weights: dynamic quantization repacks every "
        "Linear weight into private memory in each worker"),
    ("onnxruntime", "fp32"): _ORT_NOT_SHARED,
    ("onnxruntime", "int8"): _ORT_NOT_SHARED,
}


@dataclass(frozen=True)
class Preparation:
    """Work a backend did once per run, before any worker started."""

    options: dict[str, Any]  # added to every worker's options (e.g. the ONNX file's path)
    record: dict[str, Any]  # kept in the results document (environment.backend)
    warnings: list[str]
    # Added to the options of the workers bound to these memory nodes (the node's weights copy).
    node_options: Mapping[tuple[int, ...], dict[str, Any]] = field(default_factory=dict)
    temporary: tuple[str, ...] = ()  # files to remove at the end of the run (release_preparation)

    def options_for(self, memory_nodes: tuple[int, ...]) -> dict[str, Any]:
        return {**self.options, **self.node_options.get(tuple(sorted(memory_nodes)), {})}


def prepare_backend(backend: str, spec: Any, precision: str, options: Mapping[str, Any],
                    seed: int = 0, log: Callable[[str], None] | None = None, *,
                    share_weights: bool = False, node_sets: tuple[tuple[int, ...], ...] = ((),),
                    weights_dir: str | None = None, keep_weights: bool = False,
                    weights_cache_dir: str | None = None,
                    weights_builder: Callable[[Any, int, Path], str | None] | None = None
                    ) -> Preparation | None:
    """Once per run, in the launcher: onnxruntime exports (or reuses) its ONNX file and checks
    it against PyTorch on a check batch; pytorch with `share_weights` writes one weights file per
    set of memory nodes in `node_sets` (shared_weights.py). None when there is nothing to prepare.
    The caller removes `temporary` files with `release_preparation` when the run ends.
    `weights_builder`: builds a missing weights cache file elsewhere (shared_weights.Builder)."""
    if backend == "pytorch" and share_weights and not options.get("weights_path"):
        from numabench.workers.backends.shared_weights import prepare_shared_weights

        shared = prepare_shared_weights(spec, seed, node_sets, cache_dir=weights_cache_dir,
                                        copies_dir=weights_dir, keep=keep_weights, log=log,
                                        builder=weights_builder)
        why = SHARE_WEIGHTS_WHY.get((backend, precision))
        record = {"shared_weights": {**shared.record, "shared": "partly" if why else "all",
                                     **({"not_shared_why": why} if why else {})}}
        return Preparation(options={}, record=record,
                           warnings=list(shared.warnings) + ([why] if why else []),
                           node_options={n: {"weights_path": p} for n, p in shared.paths.items()},
                           temporary=shared.temporary)
    # Every run, whatever its backend, removes the tmpfs copies that killed runs left (they hold
    # RAM until someone does); prepare_shared_weights above does it for the runs that share.
    _remove_stale_weights_copies(weights_dir, log)
    if backend != "onnxruntime" or options.get("model_path"):
        return None
    from numabench.workers.backends.onnx_cache import prepare_onnx

    opt_level = options.get("opt_level", "all")
    prepared = prepare_onnx(spec, precision, options.get("cache_dir"), seed, opt_level, log)
    record, warnings = prepared.record(), prepared.warnings()
    why = SHARE_WEIGHTS_WHY.get((backend, precision)) if share_weights else None
    if why:
        record["shared_weights"] = {"shared": "none", "not_shared_why": why}
        warnings.append(why)
    return Preparation(options={"model_path": str(prepared.path)}, record=record,
                       warnings=warnings)


def _remove_stale_weights_copies(weights_dir: str | None, log: Callable[[str], None] | None) -> None:
    """Remove the tmpfs copies of killed runs; best effort: an unreadable folder is not this run's
    failure."""
    import contextlib

    from numabench.workers.backends import shared_weights as sw

    folder = Path(weights_dir) if weights_dir else sw.default_copies_dir()
    with contextlib.suppress(OSError):
        sw.remove_copies(sw.remove_stale_copies(folder, log))  # and the folder, when emptied


def release_preparation(prepared: Preparation | None) -> None:
    """Remove the files a preparation made for this run only (the tmpfs weights copies)."""
    if prepared is not None and prepared.temporary:
        from numabench.workers.backends.shared_weights import remove_copies

        remove_copies(prepared.temporary)
