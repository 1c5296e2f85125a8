"""The stable JSON document for a Machine (see docs/topology-json.md). Bump
JSON_SCHEMA_VERSION on any incompatible change; adding keys is compatible."""
from __future__ import annotations

from numabench.errors import TopologyError
from numabench.topology.model import JSON_SCHEMA_VERSION, Core, Machine, Node, Package


def machine_to_dict(m: Machine) -> dict:
    usable = m.usable_set
    usable_nodes = set(m.nodes_usable)
    return {
        "version": JSON_SCHEMA_VERSION,
        "source": m.source,
        "model_name": m.model_name,
        "cpus": {
            "online": list(m.cpus_online),
            "usable": list(m.cpus_usable),
            "isolated": list(m.cpus_isolated),
            "nohz_full": list(m.cpus_nohz_full),
        },
        "packages": [
            {"index": p.index, "id": p.id, "cpus": list(p.cpus), "nodes": list(p.nodes)}
            for p in m.packages
        ],
        "nodes": [
            {"id": n.id, "cpus": list(n.cpus), "memory_bytes": n.memory_bytes,
             "distances": list(n.distances), "memory_only": n.memory_only,
             "usable": n.id in usable_nodes}
            for n in m.nodes
        ],
        "nodes_usable": list(m.nodes_usable),
        "cores": [
            {"cpus": list(c.cpus), "usable_cpus": list(c.usable_cpus(usable)),
             "package": c.package, "node": c.node, "l3": c.l3, "cluster": c.cluster,
             "die": c.die, "kind": c.kind, "core_id": c.core_id}
            for c in m.cores
        ],
        "l3_domains": [list(d) for d in m.l3_domains],
        "dies": [list(d) for d in m.dies],
        "clusters": [list(d) for d in m.clusters],
        "flags": sorted(m.flags),
        "cgroup_cpu_quota": m.cgroup_cpu_quota,
        "warnings": list(m.warnings),
    }


def _ints(value) -> tuple[int, ...]:
    return tuple(int(x) for x in value)


def machine_from_dict(d: dict) -> Machine:
    """Inverse of machine_to_dict; derived keys (usable_cpus, memory_only, usable) are ignored."""
    try:
        version = d["version"]
        if version != JSON_SCHEMA_VERSION:
            raise TopologyError(f"topology document version {version!r} is not supported "
                                f"(this numabench reads version {JSON_SCHEMA_VERSION})")
        cpus = d["cpus"]
        quota = d.get("cgroup_cpu_quota")
        return Machine(
            cpus_online=_ints(cpus["online"]),
            cpus_usable=_ints(cpus["usable"]),
            packages=tuple(Package(index=int(p["index"]), id=p["id"], cpus=_ints(p["cpus"]),
                                   nodes=_ints(p["nodes"])) for p in d["packages"]),
            nodes=tuple(Node(id=int(n["id"]), cpus=_ints(n["cpus"]),
                             memory_bytes=n["memory_bytes"],
                             distances=_ints(n.get("distances", ()))) for n in d["nodes"]),
            cores=tuple(Core(cpus=_ints(c["cpus"]), package=int(c["package"]), node=c["node"],
                             l3=c.get("l3"), cluster=c.get("cluster"), die=c.get("die"),
                             kind=c.get("kind", "uniform"), core_id=c.get("core_id"))
                        for c in d["cores"]),
            nodes_usable=_ints(d["nodes_usable"]),
            l3_domains=tuple(_ints(x) for x in d.get("l3_domains", ())),
            flags=frozenset(d.get("flags", ())),
            model_name=d.get("model_name", ""),
            source=d.get("source", ""),
            cgroup_cpu_quota=float(quota) if quota is not None else None,
            cpus_isolated=_ints(cpus.get("isolated", ())),
            cpus_nohz_full=_ints(cpus.get("nohz_full", ())),
            warnings=tuple(d.get("warnings", ())),
            dies=tuple(_ints(x) for x in d.get("dies", ())),
            clusters=tuple(_ints(x) for x in d.get("clusters", ())),
        )
    except TopologyError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TopologyError(f"not a numabench topology document: {type(e).__name__}: {e}") from None
