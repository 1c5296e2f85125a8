"""Facts about this live system and Python environment: processes, numactl, allocators, OpenMP, versions.

None of these are in a captured tree, so `numabench system --root TREE` leaves them out.
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import importlib.util
import os
import platform
import sys
import time

from numabench.launcher import binding
from numabench.system import noise
from numabench.system.model import Fact

PACKAGES = ("numabench", "torch", "transformers", "onnxruntime", "numpy", "pyzmq", "psutil", "intel-openmp")


def busiest(cpus: tuple[int, ...], interval_s: float = 0.5) -> Fact:
    """Other processes' CPU time on `cpus` over a short interval (the same rule as a run's window)."""
    start = noise.snapshot(cpus)
    time.sleep(interval_s)
    record, warnings = noise.compare(start, noise.snapshot(cpus), cpus)
    top = [o for o in record["other_processes"] if o["on_plan_cpus_s"] > 0][:5]
    value = ", ".join(f"{o['name']} ({o['pid']}) {o['share']:.0%}" for o in top) or "none busy"
    data = {"interval_s": interval_s, "processes": top, "thresholds": record["thresholds"]}
    if not warnings:
        return Fact("busiest other processes", value, "ok", data=data)
    return Fact("busiest other processes", value, "warn",
                why=f"over {interval_s:g} s, {len(warnings)} other process(es) used more than "
                    f"{noise.OTHER_SHARE:.0%} of a CPU on these CPUs",
                fix="stop them, or plan around their CPUs (--cpus)", data=data)


def numactl(cpus: tuple[int, ...], nodes: tuple[int, ...], n_nodes: int) -> Fact:
    """numactl on PATH, and whether the kernel lets it bind memory (containers drop CAP_SYS_NICE)."""
    b = binding.detect_binder("auto", probe_cpu=cpus[0] if cpus else 0,
                              probe_node=nodes[0] if nodes else None)
    data = {"binder": b.name, "path": b.path, "binds_memory": b.binds_memory, "notes": list(b.warnings)}
    if b.name == "numactl" and b.binds_memory:
        return Fact("numactl", f"{b.path}, memory binding permitted", "ok", data=data)
    verdict = "warn" if n_nodes > 1 else "ok"
    single = " (one NUMA node here: memory binding changes nothing)" if n_nodes <= 1 else ""
    if b.name == "numactl":
        return Fact("numactl", f"{b.path}, memory binding refused{single}", verdict,
                    why="memory lands where it is first touched, not on each instance's node",
                    fix="grant CAP_SYS_NICE (docker run --cap-add SYS_NICE) or run outside the container",
                    data=data)
    return Fact("numactl", f"not found; binding with {b.name}{single}", verdict,
                why="CPUs are pinned but memory is not bound to each instance's node",
                fix="apt-get install numactl (dnf install numactl)", data=data)


def allocators() -> Fact:
    found = {name: binding.find_allocator(name) for name in binding.ALLOCATORS if name != "default"}
    value = ", ".join(f"{n}: {p or 'not found'}" for n, p in found.items())
    missing = [n for n, p in found.items() if not p]
    fix = ("to compare with --allocator: apt-get install " +
           " ".join(binding.ALLOCATOR_PACKAGES[n] for n in missing)) if missing else ""
    return Fact("allocators", value, "ok", fix=fix, data={k: v for k, v in found.items()})


def openmp() -> Fact:
    """OpenMP runtimes beside torch's libraries and in this environment (intel-openmp's libiomp5)."""
    dirs = []
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(os.path.join(list(spec.submodule_search_locations)[0], "lib"))
    dirs.append(os.path.join(sys.prefix, "lib"))
    found = sorted({p for d in dirs for pat in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*")
                    for p in glob.glob(os.path.join(d, pat))})
    kinds = sorted({os.path.basename(p).split(".so")[0].split("-")[0] for p in found})
    value = ", ".join(found) or "none found beside torch"
    return Fact("OpenMP runtimes", value, "ok" if found else "unknown",
                why="libiomp5 and libgomp loaded together in one process oversubscribe cores"
                if len(kinds) > 1 else "", data={"paths": found, "kinds": kinds})


def versions() -> Fact:
    got = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            got[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return Fact("versions", ", ".join(f"{k} {v}" for k, v in got.items()), "ok", data=got)


def read_environment(cpus: tuple[int, ...], nodes: tuple[int, ...], n_nodes: int,
                     interval_s: float = 0.5) -> list[Fact]:
    from numabench.system.facts import guarded

    return [f for name, r in (
        ("busiest other processes", lambda: busiest(cpus, interval_s)),
        ("numactl", lambda: numactl(cpus, nodes, n_nodes)),
        ("allocators", allocators),
        ("OpenMP runtimes", openmp),
        ("versions", versions),
    ) for f in guarded(name, r)]

