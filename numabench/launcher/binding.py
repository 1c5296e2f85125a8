"""How an instance is bound to its CPUs and memory: numactl, taskset, or the worker itself.

`detect_binder` probes the system once (I/O); everything else is pure: it turns a plan instance
into a command prefix and an environment.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass

from numabench.errors import LaunchError, NumabenchError
from numabench.plans.model import InstancePlan, Plan

BINDERS = ("auto", "numactl", "taskset", "self")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
ALLOCATORS = ("default", "jemalloc", "tcmalloc")
# Where distributions put the allocators (Debian/Ubuntu multiarch, RHEL, conda/pip envs).
_ALLOCATOR_GLOBS = {
    "jemalloc": ["/usr/lib/*/libjemalloc.so*", "/usr/lib64/libjemalloc.so*", "/usr/lib/libjemalloc.so*",
                 "{prefix}/lib/libjemalloc.so*"],
    "tcmalloc": ["/usr/lib/*/libtcmalloc.so*", "/usr/lib64/libtcmalloc.so*", "/usr/lib/libtcmalloc.so*",
                 "{prefix}/lib/libtcmalloc.so*"],
}


@dataclass(frozen=True)
class Binder:
    """The binding method in use and what it cannot do."""

    name: str  # "numactl" | "taskset" | "self"
    path: str | None
    binds_memory: bool
    warnings: tuple[str, ...] = ()


def _numactl_membind_works(numactl: str, cpu: int, node: int) -> tuple[bool, str]:
    """Containers without CAP_SYS_NICE refuse set_mempolicy: probe once with a real bind."""
    try:
        r = subprocess.run([numactl, f"--physcpubind={cpu}", f"--membind={node}", "--", "true"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, r.stderr.strip()


def detect_binder(prefer: str = "auto", probe_cpu: int = 0, probe_node: int | None = 0,
                  path: str | None = None) -> Binder:
    """Pick numactl when it works, else taskset, else the worker pins itself; say what was lost."""
    if prefer not in BINDERS:
        raise LaunchError(f"unknown binder {prefer!r}; choose one of {', '.join(BINDERS)}")
    numactl = shutil.which("numactl", path=path)
    taskset = shutil.which("taskset", path=path)
    lost: list[str] = []
    if prefer in ("auto", "numactl"):
        if numactl:
            if probe_node is None:
                return Binder("numactl", numactl, binds_memory=False,
                              warnings=("the plan binds no memory node; memory follows first touch",))
            ok, why = _numactl_membind_works(numactl, probe_cpu, probe_node)
            if ok:
                return Binder("numactl", numactl, binds_memory=True)
            lost.append(f"numactl refused memory binding ({why or 'no reason given'}); "
                        "memory is not bound to the instances' nodes (first touch applies)")
        elif prefer == "numactl":
            raise LaunchError("numactl was asked for but is not on PATH; install it "
                              "(apt-get install numactl) or use --binder auto")
        else:
            lost.append("numactl not found on PATH: CPUs are pinned but memory is not bound to "
                        "the instances' nodes (install numactl to bind memory)")
    if prefer in ("auto", "numactl", "taskset") and taskset:
        return Binder("taskset", taskset, binds_memory=False, warnings=tuple(lost))
    if prefer == "taskset":
        raise LaunchError("taskset was asked for but is not on PATH; use --binder auto")
    if prefer == "auto":
        lost.append("taskset not found either: each worker pins itself with sched_setaffinity "
                    "before importing the framework")
    return Binder("self", None, binds_memory=False, warnings=tuple(lost))


ALLOCATOR_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libgoogle-perftools4"}  # Debian/Ubuntu


def prepare_binding(plan: Plan, binder: str = "auto", allocator: str = "default",
                    path: str | None = None) -> tuple[Binder, str | None]:
    """The binder for a plan (probed on its first instance) and the allocator to preload.

    Raises before any worker starts when the allocator asked for is not installed.
    """
    first = plan.instances[0]
    found = detect_binder(binder, probe_cpu=first.cpus[0],
                          probe_node=first.memory_nodes[0] if first.memory_nodes else None, path=path)
    preload = find_allocator(allocator)
    if allocator != "default" and preload is None:
        raise NumabenchError(f"--allocator {allocator}: library not found; install it (Debian/Ubuntu: "
                             f"apt-get install {ALLOCATOR_PACKAGES[allocator]}) or use --allocator default")
    return found, preload


def bind_prefix(binder: Binder, inst: InstancePlan) -> list[str]:
    """The command prefix that pins one instance (empty when the worker pins itself)."""
    cpus = ",".join(str(c) for c in inst.cpus)
    if binder.name == "numactl":
        cmd = [binder.path or "numactl", f"--physcpubind={cpus}"]
        if binder.binds_memory and inst.memory_nodes:
            cmd.append(f"--membind={','.join(str(n) for n in inst.memory_nodes)}")
        return cmd + ["--"]
    if binder.name == "taskset":
        return [binder.path or "taskset", "-c", cpus]
    return []


def find_allocator(name: str) -> str | None:
    """Path of an installed allocator library to LD_PRELOAD, or None."""
    if name == "default":
        return None
    if name not in _ALLOCATOR_GLOBS:
        raise LaunchError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    import sys

    for pattern in _ALLOCATOR_GLOBS[name]:
        hits = sorted(glob.glob(pattern.format(prefix=sys.prefix)))
        if hits:
            return hits[0]
    return None


def worker_env(base: dict[str, str], inst: InstancePlan, preload: str | None = None
               ) -> tuple[dict[str, str], tuple[str, ...], dict[str, str]]:
    """Environment of one worker: thread counts and allocator preload.

    A thread variable the user already set is kept (they may know better) but warned about,
    never silently overridden. Returns (env, warnings, variables numabench set).
    """
    env = dict(base)
    warnings: list[str] = []
    applied: dict[str, str] = {}
    for var in THREAD_VARS:
        want = str(inst.threads)
        if var in base and base[var] != want:
            warnings.append(f"instance {inst.id}: {var}={base[var]} is set in the environment and kept; "
                            f"the plan asks for {want} threads (unset it to let numabench set it)")
        elif var not in base:
            env[var] = want
            applied[var] = want
    if preload:
        env["LD_PRELOAD"] = f"{preload}:{base['LD_PRELOAD']}" if base.get("LD_PRELOAD") else preload
        applied["LD_PRELOAD"] = env["LD_PRELOAD"]
    return env, tuple(warnings), applied


def cpu_governors(cpus: tuple[int, ...], root: str = "/") -> dict[int, str]:
    """Frequency governor per CPU where readable (VMs often expose none)."""
    out = {}
    for c in cpus:
        p = os.path.join(root, f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor")
        try:
            with open(p) as f:
                out[c] = f.read().strip()
        except OSError:
            pass
    return out
