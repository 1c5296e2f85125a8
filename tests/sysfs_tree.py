"""Write small, self-consistent sysfs/proc trees for topology tests.

The trees mimic what a Linux kernel shows under /sys/devices/system/{cpu,node} and /proc, so
that `numabench.topology.read_machine(root)` can be exercised without real hardware. Only the
files the reader looks at are written; no symlinks are created.

Layout of the generated machine: sockets × nodes_per_socket × cores_per_node cores, each with
threads_per_core threads (hybrid: one socket, one node, P-cores with threads_per_core threads then
single-threaded E-cores). CPU numbering:

- "interleaved" (Intel style): the first thread of every core is numbered 0..ncores-1, then the
  second threads, and so on; so siblings are i and i + ncores (2 × 24 × 2 gives node0 = 0-23,48-71).
- "adjacent": a core's threads are consecutive CPUs (0,1), (2,3), ...

Node cpumaps list every CPU of the node, offline ones included (as real kernels do); topology
lists only ever name online CPUs, and offline CPUs have no topology/ folder.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["cpulist", "cpumask", "write_sysfs_tree"]


def cpulist(cpus) -> str:
    """Format CPU numbers as a kernel cpulist ("0-3,8")."""
    cpus = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def cpumask(cpus, nbits: int) -> str:
    """Format CPU numbers as a kernel hex mask: 32-bit words, most significant first."""
    value = 0
    for c in cpus:
        value |= 1 << c
    words = max(1, (nbits + 31) // 32)
    return ",".join(f"{(value >> (32 * w)) & 0xFFFFFFFF:08x}" for w in reversed(range(words)))


def _expand(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def write_sysfs_tree(
    root,
    *,
    sockets: int = 1,
    nodes_per_socket: int = 1,
    cores_per_node: int = 2,
    threads_per_core: int = 1,
    numbering: str = "interleaved",
    offline=(),
    allowed_cpus: str | None = None,
    cgroup_cpus: str | None = None,
    cgroup_mems: str | None = None,
    memory_only_nodes: int = 0,
    node_memory_bytes: int = 16 << 30,
    hybrid: tuple[int, int] | None = None,
    node_ids=None,
    flags=("avx2", "avx512f"),
) -> Path:
    """Write a fake machine under `root` and return `root` as a Path. See the module docstring."""
    if numbering not in ("interleaved", "adjacent"):
        raise ValueError(f"numbering must be 'interleaved' or 'adjacent', not {numbering!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    # --- the core list: (socket, cpu-node index, threads, kind) ------------------------------
    if hybrid is not None:
        p_cores, e_cores = hybrid
        sockets, nodes_per_socket = 1, 1
        core_specs = [(0, 0, threads_per_core, "P")] * p_cores + [(0, 0, 1, "E")] * e_cores
    else:
        core_specs = [
            (s, s * nodes_per_socket + n, threads_per_core, "")
            for s in range(sockets)
            for n in range(nodes_per_socket)
            for _ in range(cores_per_node)
        ]
    ncores = len(core_specs)
    n_cpu_nodes = sockets * nodes_per_socket

    # --- CPU numbers of each core -------------------------------------------------------------
    core_cpus: list[list[int]] = [[] for _ in range(ncores)]
    if numbering == "adjacent":
        nxt = 0
        for i, (_, _, threads, _) in enumerate(core_specs):
            core_cpus[i] = list(range(nxt, nxt + threads))
            nxt += threads
    else:
        nxt = 0
        for t in range(max(spec[2] for spec in core_specs) if core_specs else 0):
            for i, (_, _, threads, _) in enumerate(core_specs):
                if t < threads:
                    core_cpus[i].append(nxt)
                    nxt += 1
    all_cpus = sorted(c for cpus in core_cpus for c in cpus)
    ncpus = len(all_cpus)
    offline = set(offline)
    online = [c for c in all_cpus if c not in offline]
    online_set = set(online)

    # --- node ids -----------------------------------------------------------------------------
    n_nodes = n_cpu_nodes + memory_only_nodes
    if node_ids is None:
        ids = list(range(n_nodes))
    else:
        ids = list(node_ids)
        if len(ids) != n_nodes:
            raise ValueError(f"node_ids needs {n_nodes} ids (CPU nodes then memory-only nodes)")
    node_cpus: dict[int, list[int]] = {nid: [] for nid in ids}
    for i, (_, nidx, _, _) in enumerate(core_specs):
        node_cpus[ids[nidx]].extend(core_cpus[i])

    def socket_of_node(k: int) -> int | None:
        return k // nodes_per_socket if k < n_cpu_nodes else None

    # --- /sys/devices/system/cpu ----------------------------------------------------------------
    cpu_dir = root / "sys/devices/system/cpu"
    everything = cpulist(all_cpus)
    _write(cpu_dir / "possible", everything)
    _write(cpu_dir / "present", everything)
    _write(cpu_dir / "online", cpulist(online))
    _write(cpu_dir / "offline", cpulist(offline & set(all_cpus)))
    _write(cpu_dir / "kernel_max", str(max(ncpus, 1) - 1))
    _write(cpu_dir / "isolated", "")

    for i, (sock, _nidx, _, kind) in enumerate(core_specs):
        pkg_cpus = [c for j, s in enumerate(core_specs) if s[0] == sock for c in core_cpus[j]]
        pkg_online = [c for c in pkg_cpus if c in online_set]
        siblings = [c for c in core_cpus[i] if c in online_set]
        for cpu in core_cpus[i]:
            d = cpu_dir / f"cpu{cpu}"
            d.mkdir(parents=True, exist_ok=True)
            if cpu != 0:  # like real kernels, cpu0 often has no online file
                _write(d / "online", "0" if cpu in offline else "1")
            if cpu in offline:
                continue
            topo = d / "topology"
            _write(topo / "core_id", str(i))
            _write(topo / "physical_package_id", str(sock))
            _write(topo / "die_id", "0")
            for name, cpus in (("core_cpus", siblings), ("thread_siblings", siblings),
                               ("package_cpus", pkg_online), ("core_siblings", pkg_online),
                               ("die_cpus", pkg_online)):
                _write(topo / f"{name}_list", cpulist(cpus))
                _write(topo / name, cpumask(cpus, ncpus))
            cache = d / "cache"
            for idx, (level, ctype, shared) in enumerate(
                ((1, "Data", siblings), (1, "Instruction", siblings), (2, "Unified", siblings),
                 (3, "Unified", pkg_online))):
                _write(cache / f"index{idx}/level", str(level))
                _write(cache / f"index{idx}/type", ctype)
                _write(cache / f"index{idx}/shared_cpu_list", cpulist(shared))
                _write(cache / f"index{idx}/shared_cpu_map", cpumask(shared, ncpus))
            if hybrid is not None:
                freq = 5000000 if kind == "P" else 3800000
                _write(d / "cpufreq/cpuinfo_max_freq", str(freq))

    if hybrid is not None:
        p = [c for i, s in enumerate(core_specs) if s[3] == "P" for c in core_cpus[i]]
        e = [c for i, s in enumerate(core_specs) if s[3] == "E" for c in core_cpus[i]]
        _write(root / "sys/devices/cpu_core/cpus", cpulist(c for c in p if c in online_set))
        _write(root / "sys/devices/cpu_atom/cpus", cpulist(c for c in e if c in online_set))

    # --- /sys/devices/system/node -----------------------------------------------------------------
    node_dir = root / "sys/devices/system/node"
    _write(node_dir / "possible", cpulist(ids))
    _write(node_dir / "online", cpulist(ids))
    _write(node_dir / "has_cpu", cpulist(ids[:n_cpu_nodes]))
    _write(node_dir / "has_memory", cpulist(ids))
    for k, nid in enumerate(ids):
        d = node_dir / f"node{nid}"
        _write(d / "cpulist", cpulist(node_cpus[nid]))
        _write(d / "cpumap", cpumask(node_cpus[nid], ncpus))
        kb = node_memory_bytes // 1024
        _write(d / "meminfo", f"Node {nid} MemTotal:       {kb} kB\n"
                              f"Node {nid} MemFree:        {kb // 2} kB\n")
        row = []
        for k2 in range(n_nodes):
            if k2 == k:
                row.append(10)
            elif socket_of_node(k) is not None and socket_of_node(k) == socket_of_node(k2):
                row.append(12)
            else:
                row.append(21)
        _write(d / "distance", " ".join(map(str, row)))

    # --- /proc --------------------------------------------------------------------------------
    proc = root / "proc"
    blocks = []
    for i, (sock, _, _, _) in enumerate(core_specs):
        for cpu in core_cpus[i]:
            if cpu in online_set:
                blocks.append((cpu, sock, i))
    blocks.sort()
    _write(proc / "cpuinfo", "\n".join(
        f"processor\t: {cpu}\nvendor_id\t: GenuineIntel\nmodel name\t: Fake CPU @ 2.00GHz\n"
        f"physical id\t: {sock}\ncore id\t\t: {core}\nflags\t\t: fpu sse sse2 {' '.join(flags)}\n"
        for cpu, sock, core in blocks))
    allowed = allowed_cpus if allowed_cpus is not None else everything
    _write(proc / "self/status",
           "Name:\tpython3\nState:\tR (running)\n"
           f"Cpus_allowed:\t{cpumask(_expand(allowed), ncpus)}\n"
           f"Cpus_allowed_list:\t{allowed}\n"
           f"Mems_allowed_list:\t{cpulist(ids)}\n")
    cg = "/" if cgroup_cpus is None and cgroup_mems is None else "/numabench.slice/job"
    _write(proc / "self/cgroup", f"0::{cg}\n")
    _write(proc / "self/mounts",
           "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
           "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n"
           "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n")
    if cg != "/":
        cgdir = root / "sys/fs/cgroup" / cg.lstrip("/")
        _write(cgdir / "cpuset.cpus.effective",
               cgroup_cpus if cgroup_cpus is not None else cpulist(online))
        _write(cgdir / "cpuset.mems.effective",
               cgroup_mems if cgroup_mems is not None else cpulist(ids))
        _write(cgdir / "cpu.max", "max 100000")
    return root
