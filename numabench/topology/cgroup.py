"""The process's cgroup limits: cpuset CPUs and memory nodes, and the cpu.max quota.

The cgroup is found as the kernel shows it: /proc/self/cgroup (or the older /proc/self/cpuset)
names the path, /proc/self/mountinfo (else /proc/self/mounts) where each hierarchy is mounted
and which of its folders. A v1 cpuset mounted with `noprefix`, or as the legacy `cpuset`
filesystem, names its files `cpus` and `mems` instead of `cpuset.cpus` and `cpuset.mems`. Mount points are
absolute paths inside the tree, so they are resolved under the root prefix.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from numabench.errors import TopologyError
from numabench.fileio import FileReadError, read_text
from numabench.topology.cpulist import parse_cpulist


@dataclass(frozen=True)
class CgroupLimits:
    cpus: tuple[int, ...] | None = None  # None = no cpuset limit found
    mems: tuple[int, ...] | None = None
    quota: float | None = None  # cpu.max / cfs quota in CPUs; None = unlimited or unknown


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    options: frozenset[str]
    root: str = "/"  # the hierarchy's folder mounted there (mountinfo; a container's own cgroup)


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def parse_mounts(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            mounts.append(Mount(_unescape(parts[1]), parts[2], frozenset(parts[3].split(","))))
    return mounts


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo: `id parent dev root point options [tags] - fstype source super-options`.
    Options are the mount's and the superblock's together (cgroup v1 puts `cpuset` and
    `noprefix` in the latter)."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        parts, rest = head.split(), tail.split()
        if not sep or len(parts) < 6 or not rest:
            continue
        options = set(parts[5].split(","))
        if len(rest) >= 3:
            options |= set(rest[2].split(","))
        mounts.append(Mount(_unescape(parts[4]), rest[0], frozenset(options), _unescape(parts[3])))
    return mounts


def parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """(v2 path or None, v1 controller → path) from /proc/self/cgroup text."""
    v2 = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                v1[c] = path
    return v2, v1


def _read(root: Path, rel: str, warnings: list[str]) -> str | None:
    p = root / rel.lstrip("/")
    if not p.exists():
        return None
    try:
        return read_text(p, "cgroup file", errors="replace")
    except FileReadError as e:
        warnings.append(f"{e}; assuming no cgroup limit there")
        return None


def _chain(mount_point: str, cgroup_path: str, mount_root: str = "/") -> list[str]:
    """The cgroup's folder and its ancestors up to the mount point, deepest first. A mount of
    a subtree (mountinfo root /docker/abc) holds the cgroup /docker/abc/x at <point>/x."""
    path = posixpath.normpath("/" + cgroup_path.strip())
    root = posixpath.normpath("/" + mount_root.strip())
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    rel = path.lstrip("/")
    parts = [p for p in rel.split("/") if p and p != ".."]
    return [posixpath.join(mount_point, *parts[:i]) for i in range(len(parts), -1, -1)]


def _first_list(root: Path, dirs: list[str], names: tuple[str, ...], warnings: list[str]):
    """The first cpuset file found walking up from the cgroup (effective values inherit down)."""
    for d in dirs:
        for name in names:
            rel = posixpath.join(d, name)
            text = _read(root, rel, warnings)
            if text is None:
                continue
            if not text.strip():  # an empty v1 cpuset means "not configured here"
                continue
            try:
                return parse_cpulist(text)
            except ValueError as e:
                raise TopologyError(f"{root / rel.lstrip('/')}: {e}") from None
    return None


def _quota_v2(root: Path, dirs: list[str], warnings: list[str]) -> float | None:
    quotas = []
    for d in dirs:  # every ancestor's limit applies
        text = _read(root, posixpath.join(d, "cpu.max"), warnings)
        if text is None:
            continue
        parts = text.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quotas.append(int(parts[0]) / int(parts[1]))
            except (ValueError, ZeroDivisionError):
                warnings.append(f"{root / d.lstrip('/')}/cpu.max: unreadable value {text.strip()!r}")
    return min(quotas) if quotas else None


def _quota_v1(root: Path, dirs: list[str], warnings: list[str]) -> float | None:
    quotas = []
    for d in dirs:
        q = _read(root, posixpath.join(d, "cpu.cfs_quota_us"), warnings)
        p = _read(root, posixpath.join(d, "cpu.cfs_period_us"), warnings)
        if q is None or p is None:
            continue
        try:
            qv, pv = int(q), int(p)
        except ValueError:
            continue
        if qv > 0 and pv > 0:
            quotas.append(qv / pv)
    return min(quotas) if quotas else None


def read_cgroup_limits(root: Path, warnings: list[str]) -> CgroupLimits:
    """Limits of the process whose /proc/self lies under `root`; missing files mean no limit."""
    info_text = _read(root, "proc/self/mountinfo", warnings)
    if info_text is not None and info_text.strip():
        mounts = parse_mountinfo(info_text)
    else:
        mounts_text = _read(root, "proc/self/mounts", warnings) or _read(root, "proc/mounts", warnings)
        if mounts_text is None:
            return CgroupLimits()
        mounts = parse_mounts(mounts_text)
    cgroup_text = _read(root, "proc/self/cgroup", warnings)
    v2_path, v1 = parse_proc_cgroup(cgroup_text) if cgroup_text is not None else (None, {})
    if cgroup_text is None:
        # Older kernels (and some captures) only have /proc/self/cpuset: the cpuset's path.
        cpuset_text = _read(root, "proc/self/cpuset", warnings)
        if cpuset_text is not None and cpuset_text.strip():
            v1 = {"cpuset": cpuset_text.strip()}
            v2_path = cpuset_text.strip()

    cpus = mems = quota = None
    # A v1 cpuset hierarchy; batch schedulers on HPC clusters often mount it with `noprefix`
    # (files `cpus`, `mems`) or as the legacy `cpuset` filesystem, which has no prefix either.
    v1_cpuset = next((m for m in mounts if (m.fstype == "cgroup" and "cpuset" in m.options)
                      or m.fstype == "cpuset"), None)
    if v1_cpuset is not None and "cpuset" not in v1:
        cpuset_text = _read(root, "proc/self/cpuset", warnings)
        if cpuset_text is not None and cpuset_text.strip():
            v1 = {**v1, "cpuset": cpuset_text.strip()}
    v1_cpu = next((m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options), None)
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if v1_cpuset is not None and "cpuset" in v1:
        dirs = _chain(v1_cpuset.point, v1["cpuset"], v1_cpuset.root)
        prefix = "" if v1_cpuset.fstype == "cpuset" or "noprefix" in v1_cpuset.options else "cpuset."
        cpus = _first_list(root, dirs, (f"{prefix}effective_cpus", f"{prefix}cpus"), warnings)
        mems = _first_list(root, dirs, (f"{prefix}effective_mems", f"{prefix}mems"), warnings)
    elif v2 is not None and v2_path is not None:
        dirs = _chain(v2.point, v2_path, v2.root)
        cpus = _first_list(root, dirs, ("cpuset.cpus.effective",), warnings)
        mems = _first_list(root, dirs, ("cpuset.mems.effective",), warnings)
    if v1_cpu is not None and "cpu" in v1:
        quota = _quota_v1(root, _chain(v1_cpu.point, v1["cpu"], v1_cpu.root), warnings)
    elif v2 is not None and v2_path is not None:
        quota = _quota_v2(root, _chain(v2.point, v2_path, v2.root), warnings)
    return CgroupLimits(cpus=cpus, mems=mems, quota=quota)
