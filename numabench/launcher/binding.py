"""How an instance is bound to its CPUs and memory: numactl, taskset, the worker itself, or not
at all (`none`: the unpinned baseline, threads still counted).

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

BINDERS = ("auto", "numactl", "taskset", "self", "none")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
OMP_RUNTIMES = ("gnu", "intel")
# Variables that place OpenMP threads: a value the user set for any of them is kept, never mixed.
PLACEMENT_VARS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "KMP_BLOCKTIME")
# Where run_cpu (torch.backends.xeon) looks for libiomp5.so, plus this interpreter's prefix
# (the `intel-openmp` wheel installs it into <prefix>/lib).
_IOMP_DIRS = ("{prefix}/lib", "$CONDA_PREFIX/lib", "$VIRTUAL_ENV/lib", "~/.local/lib", "/usr/local/lib",
              "/usr/local/lib64", "/usr/lib", "/usr/lib64")
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

    name: str  # "numactl" | "taskset" | "self" | "none"
    path: str | None
    binds_memory: bool
    warnings: tuple[str, ...] = ()
    binds_cpus: bool = True  # False for "none": workers keep the launcher's whole affinity

    def bound(self, inst: InstancePlan) -> dict[str, list[int]]:
        """What this binder really binds for `inst` (results record it beside what was asked)."""
        return {"cpus": list(inst.cpus) if self.binds_cpus else [],
                "memory_nodes": list(inst.memory_nodes) if self.binds_memory else []}

    def describe(self, inst: InstancePlan) -> str:
        """One instance's binding for launch.log: never a memory node that was not bound."""
        cpus = f"cpus {list(inst.cpus)}" if self.binds_cpus else f"cpus not bound (plan: {list(inst.cpus)})"
        if self.binds_memory and inst.memory_nodes:
            mem = f"memory nodes {list(inst.memory_nodes)}"
        elif inst.memory_nodes:
            mem = f"memory not bound (plan: nodes {list(inst.memory_nodes)}; first touch applies)"
        else:
            mem = "memory not bound"
        return f"{cpus}, {mem}"


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
    if prefer == "none":  # asked for: the unpinned baseline binds nothing, by design
        return Binder("none", None, binds_memory=False, binds_cpus=False)
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
    if prefer in ("taskset", "self") and probe_node is not None:
        # Asked for by name: still say what it cannot do, so no one reads the plan's memory
        # nodes as bound.
        lost.append(f"--binder {prefer} pins CPUs only: memory is not bound to the instances' "
                    "nodes (first touch applies); use --binder numactl or auto to bind memory")
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
    """The command prefix that pins one instance (empty when the worker pins itself, or for
    `none`, which pins nothing)."""
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


@dataclass(frozen=True)
class Threading:
    """How OpenMP threads run inside an instance: which runtime, and whether each thread is bound
    to its own CPU of the instance."""

    runtime: str = "gnu"  # gnu: the framework's own (libgomp for PyTorch wheels); intel: libiomp5
    pin: bool = True
    iomp: str | None = None  # libiomp5.so to preload when runtime is intel

    def record(self) -> dict[str, object]:
        return {"omp_runtime": self.runtime, "pin_threads": self.pin, "iomp": self.iomp}


def find_iomp() -> str | None:
    """libiomp5.so to LD_PRELOAD (as torch.backends.xeon.run_cpu does), or None."""
    import sys

    for d in _IOMP_DIRS:
        d = os.path.expanduser(os.path.expandvars(d.format(prefix=sys.prefix)))
        if "$" in d:  # the variable is unset
            continue
        path = os.path.join(d, "libiomp5.so")
        if os.path.isfile(path):
            return path
    return None


def prepare_threading(runtime: str = "gnu", pin: bool = True) -> Threading:
    """Refuse an Intel runtime that is not installed before any worker starts."""
    if runtime not in OMP_RUNTIMES:
        raise NumabenchError(f"unknown OpenMP runtime {runtime!r}; choose one of {', '.join(OMP_RUNTIMES)}")
    iomp = find_iomp() if runtime == "intel" else None
    if runtime == "intel" and iomp is None:
        raise NumabenchError("--omp-runtime intel: libiomp5.so not found; install it with "
                             "`pip install intel-openmp` (into this environment) or use --omp-runtime gnu")
    return Threading(runtime, pin, iomp)


def thread_placement_env(inst: InstancePlan, threading: Threading) -> dict[str, str]:
    """The OpenMP variables that bind an instance's threads one per CPU (pure).

    Place lists name real CPU numbers: numactl/taskset only restrict the affinity mask, the
    runtime still speaks OS CPU ids. Bound only when there is one thread per CPU: with fewer
    threads than CPUs (SMT siblings given, or threads asked below the CPU count) a per-CPU list
    would stack threads on siblings of one core, so the OS keeps placing them.
    """
    env: dict[str, str] = {}
    one_each = threading.pin and inst.threads == len(inst.cpus)
    if threading.runtime == "intel":
        env["KMP_BLOCKTIME"] = "1"  # as run_cpu: idle threads sleep after 1 ms, not 200
        if one_each:
            procs = ",".join(str(c) for c in inst.cpus)
            env["KMP_AFFINITY"] = f"granularity=fine,proclist=[{procs}],explicit"
    elif one_each:
        env["OMP_PROC_BIND"] = "close"
        env["OMP_PLACES"] = ",".join(f"{{{c}}}" for c in inst.cpus)
    return env


def worker_env(base: dict[str, str], inst: InstancePlan, preload: str | None = None,
               threading: Threading | None = None, set_threads: bool = True
               ) -> tuple[dict[str, str], tuple[str, ...], dict[str, str]]:
    """Environment of one worker: thread counts, thread placement and library preloads.

    A thread variable the user already set is kept (they may know better) but warned about,
    never silently overridden; one placement variable set by the user keeps numabench from
    setting any (a half-set placement is worse than either). Returns (env, warnings,
    variables numabench set). `threading` None: counts and allocator only. `set_threads` False:
    neither counts nor placement (the framework's defaults; the allocator is still preloaded).
    """
    env = dict(base)
    warnings: list[str] = []
    applied: dict[str, str] = {}
    for var in THREAD_VARS if set_threads else ():
        want = str(inst.threads)
        if var in base and base[var] != want:
            warnings.append(f"instance {inst.id}: {var}={base[var]} is set in the environment and kept; "
                            f"the plan asks for {want} threads (unset it to let numabench set it)")
        elif var not in base:
            env[var] = want
            applied[var] = want
    preloads = [preload] if preload else []
    if threading is not None:
        placement = thread_placement_env(inst, threading) if set_threads else {}
        users = sorted(v for v in PLACEMENT_VARS if v in base)
        if users and placement:
            warnings.append(f"instance {inst.id}: {', '.join(f'{v}={base[v]}' for v in users)} "
                            f"set in the environment and kept; numabench sets none of "
                            f"{', '.join(sorted(placement))} (unset them to let numabench bind threads)")
        else:
            env.update(placement)
            applied.update(placement)
        if threading.iomp and threading.iomp not in base.get("LD_PRELOAD", "").split(":"):
            preloads.insert(0, threading.iomp)
    if preloads:
        joined = ":".join(preloads)
        env["LD_PRELOAD"] = f"{joined}:{base['LD_PRELOAD']}" if base.get("LD_PRELOAD") else joined
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
