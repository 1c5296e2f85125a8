"""Parse `lscpu -p` output into a Machine: a cross-check for sysfs and a fallback for CPUs
without topology files.

Expected: `LC_ALL=C lscpu -a -p=CPU,CORE,SOCKET,NODE,ONLINE`; the default `lscpu -p` column set
works too, since columns are taken from the `# CPU,Core,...` header. lscpu's Core column is a
label that restarts in every socket: a core is the (socket, core) pair, never Core alone.
"""
from __future__ import annotations

from numabench.errors import TopologyError
from numabench.topology.cpulist import MAX_CPUS
from numabench.topology.model import Core, Machine, Node, Package

DEFAULT_COLUMNS = ("CPU", "CORE", "SOCKET", "NODE", "ONLINE")


def _header(lines: list[str]) -> tuple[str, ...]:
    for line in lines:
        body = line.lstrip("#").strip()
        if line.startswith("#") and body.upper().startswith("CPU,"):
            return tuple(c.strip().upper() for c in body.split(","))
    return DEFAULT_COLUMNS


def _number(value: str, column: str, lineno: int, where: str) -> int | None:
    value = value.strip()
    if value in ("", "-"):
        return None  # offline CPUs and missing NUMA show "-" or nothing
    if not value.isascii() or not value.isdigit():  # int() would also take "1_0", "-1", "١"
        raise TopologyError(f"{where}:{lineno}: {column} {value[:40]!r} is not a number")
    if len(value) > 9 or int(value) >= MAX_CPUS:
        raise TopologyError(f"{where}:{lineno}: {column} {value[:40]} is beyond the kernel's "
                            f"limit of {MAX_CPUS} CPUs")
    return int(value)


def parse_lscpu(text: str, *, source: str = "lscpu") -> Machine:
    """Parse `lscpu -p` text. Raises TopologyError naming the line for garbage."""
    lines = text.splitlines()
    columns = _header(lines)
    if "CPU" not in columns:
        raise TopologyError(f"{source}: no CPU column in the lscpu header")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        values = line.split(",")
        if len(values) < len(columns):
            values += [""] * (len(columns) - len(values))
        row = dict(zip(columns, values))
        cpu = _number(row["CPU"], "CPU", lineno, source)
        if cpu is None:
            raise TopologyError(f"{source}:{lineno}: no CPU number")
        online = row.get("ONLINE", "Y").strip().upper() not in ("N", "NO")
        rows.append((cpu, online, *(
            _number(row[c], c, lineno, source) if c in row else None
            for c in ("CORE", "SOCKET", "NODE"))))
    if not rows:
        raise TopologyError(f"{source}: no CPU lines (expected `lscpu -p` output)")

    online_rows = sorted(r for r in rows if r[1])
    online = tuple(r[0] for r in online_rows)
    by_socket: dict[int | None, list[int]] = {}
    by_core: dict[tuple, list[int]] = {}
    by_node: dict[int, list[int]] = {}
    for cpu, _, core, socket, node in online_rows:
        by_socket.setdefault(socket, []).append(cpu)
        # A CPU without a Core value is a core of its own.
        by_core.setdefault((socket, core) if core is not None else ("cpu", cpu), []).append(cpu)
        if node is not None:
            by_node.setdefault(node, []).append(cpu)
    socket_order = sorted(by_socket, key=lambda s: by_socket[s][0])
    pkg_index = {s: i for i, s in enumerate(socket_order)}
    node_of = {cpu: n for n, cpus in by_node.items() for cpu in cpus}
    socket_of = {r[0]: r[3] for r in online_rows}
    core_id_of = {r[0]: r[2] for r in online_rows}
    packages = tuple(
        Package(index=i, id=s, cpus=tuple(by_socket[s]),
                nodes=tuple(sorted({node_of[c] for c in by_socket[s] if c in node_of})))
        for i, s in enumerate(socket_order))
    cores = tuple(sorted(
        (Core(cpus=tuple(cpus), package=pkg_index[socket_of[cpus[0]]], node=node_of.get(cpus[0]),
              core_id=core_id_of[cpus[0]])
         for cpus in by_core.values()), key=lambda c: c.cpus[0]))
    nodes = tuple(Node(id=n, cpus=tuple(by_node[n]), memory_bytes=None) for n in sorted(by_node))
    return Machine(cpus_online=online, cpus_usable=online, packages=packages, nodes=nodes,
                   cores=cores, nodes_usable=tuple(n.id for n in nodes), source=source)
