"""The worker's configuration: one frozen dataclass, written by the launcher, read by the worker.

`launch` and `serve` build a WorkerConfig (launcher/spawn.py) and pass it as JSON on the worker's
command line; the worker validates it with `from_dict` before it imports anything heavy. Standard
library only: this module is imported before the worker pins itself.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from numabench.errors import NumabenchError

log = logging.getLogger("numabench.worker")


class ConfigError(NumabenchError):
    """The worker's --config is invalid."""


@dataclass(frozen=True)
class WarmupSpec:
    shapes: tuple[tuple[int, int], ...] = ()
    iterations: int = 1


@dataclass(frozen=True)
class WorkerConfig:
    instance: int
    endpoint: str
    model: str
    backend: str = "pytorch"
    precision: str = "fp32"
    threads: int = 1  # 0: leave the framework's own default (the out-of-the-box baseline)
    cpus: tuple[int, ...] | None = None
    pin_self: bool = False
    warmup: WarmupSpec = WarmupSpec()
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    timeout_s: float = 600.0
    # CPUs for ZeroMQ's background threads (None: the worker's own). Every message wakes them;
    # on a CPU the plan leaves free they no longer preempt the compute thread.
    io_cpus: tuple[int, ...] | None = None
    # A worker forked from a fork server binds its framework threads one per CPU itself, after
    # warm-up: OMP_PLACES was read when its parent imported torch (exec'd workers get it set).
    pin_threads: bool = False
    # Load the model's tokenizer: the run sends texts (launch --text). Serve tokenizes in the
    # daemon, and ids need none: loading one costs seconds of start-up per worker.
    tokenizer: bool = False

    @classmethod
    def from_dict(cls, raw: Any) -> WorkerConfig:
        """Validate a decoded --config. Unknown keys are logged, not refused (newer launchers)."""
        from numabench.workers.backends import check_backend

        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            log.warning("ignoring unknown config keys: %s", ", ".join(unknown))
        for key in ("instance", "endpoint", "model"):
            if key not in raw:
                raise ConfigError(f"config has no {key!r}")
        instance = _int(raw, "instance", minimum=0)
        endpoint = raw["endpoint"]
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ConfigError(f"endpoint must be a ZeroMQ endpoint like ipc:///path, got {endpoint!r}")
        model = raw["model"]
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string, got {model!r}")
        backend = raw.get("backend", cls.backend)
        precision = raw.get("precision", cls.precision)
        options = raw.get("options") or {}
        try:
            check_backend(backend, precision, options)
        except NumabenchError as e:
            raise ConfigError(str(e)) from None
        cpus = raw.get("cpus")
        if cpus is not None:
            if not isinstance(cpus, list) or not cpus or not all(_is_int(c) and c >= 0 for c in cpus):
                raise ConfigError(f"cpus must be a non-empty list of CPU numbers or null, got {cpus!r}")
            cpus = tuple(sorted(set(cpus)))
        io_cpus = raw.get("io_cpus")
        if io_cpus is not None:
            if not isinstance(io_cpus, list) or not io_cpus or not all(_is_int(c) and c >= 0 for c in io_cpus):
                raise ConfigError(f"io_cpus must be a non-empty list of CPU numbers or null, got {io_cpus!r}")
            io_cpus = tuple(sorted(set(io_cpus)))
        pin_self, pin_threads, tokenizer = (_bool(raw, k) for k in ("pin_self", "pin_threads", "tokenizer"))
        for key, on in (("pin_self", pin_self), ("pin_threads", pin_threads)):
            if on and cpus is None:
                raise ConfigError(f"{key} needs cpus")
        timeout_s = raw.get("timeout_s", cls.timeout_s)
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a positive number, got {timeout_s!r}")
        return cls(
            instance=instance, endpoint=endpoint, model=model, backend=backend,
            precision=precision, threads=_int(raw, "threads", minimum=0, default=1), cpus=cpus,
            pin_self=pin_self, warmup=_warmup(raw.get("warmup")),
            seed=_int(raw, "seed", minimum=0, default=0), options=dict(options),
            timeout_s=float(timeout_s), io_cpus=io_cpus, pin_threads=pin_threads, tokenizer=tokenizer)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `from_dict` reads back (round-trips)."""
        return {
            "instance": self.instance, "endpoint": self.endpoint, "model": self.model,
            "backend": self.backend, "precision": self.precision, "threads": self.threads,
            "cpus": list(self.cpus) if self.cpus is not None else None, "pin_self": self.pin_self,
            "warmup": {"shapes": [list(s) for s in self.warmup.shapes],
                       "iterations": self.warmup.iterations},
            "seed": self.seed, "options": dict(self.options), "timeout_s": self.timeout_s,
            "io_cpus": list(self.io_cpus) if self.io_cpus is not None else None,
            "pin_threads": self.pin_threads, "tokenizer": self.tokenizer,
        }

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(raw: Mapping[str, Any], key: str, minimum: int, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _warmup(raw: Any) -> WarmupSpec:
    if raw is None:
        return WarmupSpec()
    if not isinstance(raw, dict):
        raise ConfigError(f"warmup must be an object {{shapes, iterations}}, got {raw!r}")
    shapes = raw.get("shapes", [])
    if not isinstance(shapes, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(_is_int(d) and d > 0 for d in s)
            for s in shapes):
        raise ConfigError(f"warmup.shapes must be a list of [batch, seq] pairs, got {shapes!r}")
    return WarmupSpec(shapes=tuple((b, s) for b, s in shapes),
                      iterations=_int(raw, "iterations", minimum=0, default=1))
