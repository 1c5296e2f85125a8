"""One way to start an instance, for `launch`, `sweep` and `serve` alike.

The plan instance and the workload become a `WorkerConfig` (what the worker reads), the binder
becomes a command prefix, and `binding.worker_env` the environment; the process group starts it
with its own log. Nothing else starts a worker.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError
from numabench.launcher import binding, forkserver
from numabench.launcher.procs import ProcessGroup
from numabench.plans.model import InstancePlan
from numabench.workers.config import WarmupSpec, WorkerConfig

START_METHODS = ("fork", "exec")


@dataclass(frozen=True)
class Started:
    """What starting one instance did: its pid, the variables numabench set, its warnings."""

    instance: int
    pid: int
    argv: tuple[str, ...]
    variables_set: Mapping[str, str]
    warnings: tuple[str, ...]
    forked_by: int | None = None  # the fork server's pid; None: exec'd
    fork_error: str | None = None  # why it was exec'd although forking was asked for


def worker_config(inst: InstancePlan, *, endpoint: str, model: str, backend: str, precision: str,
                  seed: int, pin_self: bool, timeout_s: float,
                  warmup_shapes: Iterable[tuple[int, int]], warmup_iterations: int,
                  options: Mapping[str, Any] | None = None, set_threads: bool = True,
                  io_cpus: tuple[int, ...] | None = None, tokenizer: bool = False) -> WorkerConfig:
    """The config of the worker that runs `inst` (its seed offset by the instance id, so
    instances draw different random inputs from one run seed). `set_threads` False: threads 0,
    the framework keeps its own default count."""
    return WorkerConfig(
        instance=inst.id, endpoint=endpoint, model=model, backend=backend, precision=precision,
        threads=inst.threads if set_threads else 0, cpus=tuple(inst.cpus), pin_self=pin_self,
        warmup=WarmupSpec(shapes=tuple((int(b), int(s)) for b, s in warmup_shapes),
                          iterations=warmup_iterations),
        seed=seed + inst.id, options=dict(options or {}), timeout_s=timeout_s, io_cpus=io_cpus,
        tokenizer=tokenizer)


@dataclass(frozen=True)
class ForkPlan:
    """Start workers from fork servers (workers/zygote.py): what the servers import, and the
    CPUs each server binds to (the union over the instances it will fork, by memory nodes)."""

    backend: str
    model: str
    cpus_by_nodes: Mapping[tuple[int, ...], tuple[int, ...]]
    timeout_s: float = 300.0
    new_servers: bool = True  # False: only servers already running fork; others are exec'd

    @classmethod
    def for_instances(cls, instances: Iterable[InstancePlan], backend: str, model: str,
                      timeout_s: float = 300.0) -> ForkPlan:
        by: dict[tuple[int, ...], set[int]] = {}
        for inst in instances:
            by.setdefault(tuple(sorted(inst.memory_nodes)), set()).update(inst.cpus)
        return cls(backend, model, {k: tuple(sorted(v)) for k, v in by.items()}, timeout_s)


def check_start(start: str) -> None:
    """Refuse an unknown start method before anything starts."""
    if start not in START_METHODS:
        raise NumabenchError(f"--start must be one of {', '.join(START_METHODS)}, not {start!r}")


def why_exec(start: str, env: Mapping[str, str], framework_defaults: bool = False) -> str | None:
    """Why workers must be exec'd (None: they may be forked): asked for, the out-of-the-box
    baseline, or placement variables the user set, which the framework reads when it loads (a
    fork server did long before)."""
    if start == "exec":
        return "--start exec"
    if framework_defaults:
        return "the out-of-the-box baseline: the framework reads the environment itself"
    users = sorted(v for v in binding.PLACEMENT_VARS if v in env)
    return f"{', '.join(users)} set in the environment is read when the framework loads" if users else None


def start_instance(group: ProcessGroup, binder: binding.Binder, inst: InstancePlan,
                   config: WorkerConfig, preload: str | None = None,
                   base_env: Mapping[str, str] | None = None,
                   threading: binding.Threading | None = None, set_threads: bool = True,
                   fork: ForkPlan | None = None) -> Started:
    """Bind and start one worker process in `group` (its log: the group's instance log).
    `threading`: OpenMP runtime and thread binding (None: thread counts only); `set_threads`
    False: no thread variable at all (the out-of-the-box baseline). `fork`: fork it from the
    group's fork server for its memory nodes (started on first use); when that server cannot
    start or fork, the worker is exec'd and `fork_error` says why."""
    env, warnings, applied = binding.worker_env(dict(os.environ if base_env is None else base_env),
                                                inst, preload, threading, set_threads=set_threads)
    fork_error = None
    if fork is not None:
        try:
            server = fork_server(group, binder, inst, env, fork)
        except forkserver.ForkServerError as e:
            server, fork_error = None, str(e)
        if server is not None:
            # Its parent read OMP_PLACES/KMP_AFFINITY at import: the worker binds its own CPUs
            # and threads; its memory policy it inherits from the server (numactl --membind).
            placement = {v for v in forkserver.PLACES if v in applied}
            # (ONNX Runtime binds its own threads, from the worker's options; noop has none.)
            forked = replace(config, pin_self=binder.binds_cpus,
                             pin_threads=bool(placement) and binder.binds_cpus and config.backend == "pytorch")
            try:
                proc = group.start_forked(inst.id, server, forked.to_dict(),
                                          {k: v for k, v in env.items() if k not in placement})
            except forkserver.ForkServerError as e:
                fork_error = str(e)
            else:
                return Started(inst.id, proc.pid, (), {k: v for k, v in applied.items() if k not in placement},
                               tuple(warnings), forked_by=server.pid)
    argv = binding.bind_prefix(binder, inst) + [
        sys.executable, "-m", "numabench.workers", "--config", config.to_json()]
    proc = group.start(inst.id, argv, env)
    return Started(inst.id, proc.pid, tuple(argv), applied, tuple(warnings), fork_error=fork_error)


def fork_server(group: ProcessGroup, binder: binding.Binder, inst: InstancePlan,
                env: Mapping[str, str], fork: ForkPlan) -> forkserver.ForkServer | None:
    """The group's server for this instance's memory nodes and load-time environment (None:
    there is none and the plan allows no new one)."""
    nodes = tuple(sorted(inst.memory_nodes))
    key = forkserver.server_key(nodes if binder.binds_memory else (), env)
    server = group.servers.get(key)
    if server is None and fork.new_servers:
        group.run_dir.mkdir(parents=True, exist_ok=True)
        cpus = (fork.cpus_by_nodes.get(nodes, inst.cpus) if binder.binds_memory
                else tuple(sorted({c for cs in fork.cpus_by_nodes.values() for c in cs} | set(inst.cpus))))
        where = replace(inst, id=-1, cpus=cpus)
        argv = forkserver.server_argv(binding.bind_prefix(binder, where), fork.backend, fork.model)
        log = group.run_dir / f"fork-server-{len(group.servers)}.log"
        server = forkserver.ForkServer(argv, forkserver.server_env(env), log, fork.timeout_s)
        group.servers[key] = server
    return server


def weights_builder(group: ProcessGroup, binder: binding.Binder, inst: InstancePlan, fork: ForkPlan,
                    preload: str | None = None, threading: binding.Threading | None = None,
                    set_threads: bool = True) -> Callable[[Any, int, Path], str | None]:
    """For a weights cache miss (shared_weights.Builder): the fork server `inst` will be forked
    from (started now if need be, then reused by start_instance: same key) writes the file in a
    child, so the launcher or daemon never imports torch for it. None from the callable: no
    server (exec'd workers, or it failed to start or to build); the caller builds it itself."""
    def build(spec: Any, seed: int, path: Path) -> str | None:
        env, _, _ = binding.worker_env(dict(os.environ), inst, preload, threading, set_threads=set_threads)
        try:
            server = fork_server(group, binder, inst, env, fork)
        except forkserver.ForkServerError:
            return None  # start_instance tries again, and says why workers are exec'd
        if server is None:
            return None
        return server.build_weights(fork.model, seed, path, group.run_dir / "weights-build.log", fork.timeout_s)
    return build
