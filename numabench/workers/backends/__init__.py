"""Inference backends behind one small interface, importable without any framework.

A backend loads one model at one precision on a fixed number of threads, then runs batches of
token ids. The worker owns everything else (protocol, timing, tokenizing, warm-up), so a new
backend (ONNX Runtime is next) only implements `load`, `run` and `info` and registers here.
"""
from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from numabench.errors import NumabenchError

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = frozenset({"pytorch", "noop"})
RESERVED_BACKENDS = frozenset({"onnxruntime"})  # named in the design, not implemented yet

# Which precisions each backend runs, and the options it accepts (name -> type), so the launcher
# can refuse a bad combination before it starts any process.
SUPPORTED_PRECISIONS: Mapping[str, frozenset[str]] = {
    "pytorch": frozenset(PRECISIONS),
    "noop": frozenset(PRECISIONS),  # precision is recorded, not used: noop computes nothing
}
BACKEND_OPTIONS: Mapping[str, Mapping[str, type]] = {
    "pytorch": {},
    "noop": {"compute_ns": int, "spin": bool},
}
if TYPE_CHECKING:  # numpy starts BLAS threads on import: the worker imports it after pinning
    import numpy as np

_MODULES = {"pytorch": "numabench.workers.backends.pytorch", "noop": "numabench.workers.backends.noop"}


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

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """After load: {"threads": int, "model": {hidden_size, layers, parameters, vocab_size,
        max_positions, ...}} with what the framework actually runs."""


def check_backend(backend: str, precision: str, options: Mapping[str, Any] | None = None) -> None:
    """Raise NumabenchError for an unknown backend or precision, or a combination not supported."""
    if backend in RESERVED_BACKENDS:
        raise NumabenchError(
            f"backend {backend!r} is not implemented yet; available: {', '.join(sorted(BACKENDS))}")
    if backend not in BACKENDS:
        raise NumabenchError(
            f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    if precision not in PRECISIONS:
        raise NumabenchError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision not in SUPPORTED_PRECISIONS[backend]:
        raise NumabenchError(
            f"backend {backend!r} does not support {precision}; it supports "
            f"{', '.join(p for p in PRECISIONS if p in SUPPORTED_PRECISIONS[backend])}")
    check_options(backend, options or {})


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


def create_backend(backend: str) -> Backend:
    """Instantiate a backend; its framework is imported here, not before."""
    if backend not in BACKENDS:
        check_backend(backend, PRECISIONS[0])  # raises with the right message
    module = importlib.import_module(_MODULES[backend])
    return module.BACKEND_CLASS()
