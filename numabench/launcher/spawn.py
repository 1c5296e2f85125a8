"""One way to start an instance, for `launch`, `sweep` and `serve` alike.

The plan instance and the workload become a `WorkerConfig` (what the worker reads), the binder
becomes a command prefix, and `binding.worker_env` the environment; the process group starts it
with its own log. Nothing else starts a worker.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from numabench.launcher import binding
from numabench.launcher.procs import ProcessGroup
from numabench.plans.model import InstancePlan
from numabench.workers.config import WarmupSpec, WorkerConfig


@dataclass(frozen=True)
class Started:
    """What starting one instance did: its pid, the variables numabench set, its warnings."""

    instance: int
    pid: int
    argv: tuple[str, ...]
    variables_set: Mapping[str, str]
    warnings: tuple[str, ...]


def worker_config(inst: InstancePlan, *, endpoint: str, model: str, backend: str, precision: str,
                  seed: int, pin_self: bool, timeout_s: float,
                  warmup_shapes: Iterable[tuple[int, int]], warmup_iterations: int,
                  options: Mapping[str, Any] | None = None, set_threads: bool = True,
                  io_cpus: tuple[int, ...] | None = None) -> WorkerConfig:
    """The config of the worker that runs `inst` (its seed offset by the instance id, so
    instances draw different random inputs from one run seed). `set_threads` False: threads 0,
    the framework keeps its own default count."""
    return WorkerConfig(
        instance=inst.id, endpoint=endpoint, model=model, backend=backend, precision=precision,
        threads=inst.threads if set_threads else 0, cpus=tuple(inst.cpus), pin_self=pin_self,
        warmup=WarmupSpec(shapes=tuple((int(b), int(s)) for b, s in warmup_shapes),
                          iterations=warmup_iterations),
        seed=seed + inst.id, options=dict(options or {}), timeout_s=timeout_s, io_cpus=io_cpus)


def start_instance(group: ProcessGroup, binder: binding.Binder, inst: InstancePlan,
                   config: WorkerConfig, preload: str | None = None,
                   base_env: Mapping[str, str] | None = None,
                   threading: binding.Threading | None = None, set_threads: bool = True) -> Started:
    """Bind and start one worker process in `group` (its log: the group's instance log).
    `threading`: OpenMP runtime and thread binding (None: thread counts only); `set_threads`
    False: no thread variable at all (the out-of-the-box baseline)."""
    env, warnings, applied = binding.worker_env(dict(os.environ if base_env is None else base_env),
                                                inst, preload, threading, set_threads=set_threads)
    argv = binding.bind_prefix(binder, inst) + [
        sys.executable, "-m", "numabench.workers", "--config", config.to_json()]
    proc = group.start(inst.id, argv, env)
    return Started(inst.id, proc.pid, tuple(argv), applied, tuple(warnings))
