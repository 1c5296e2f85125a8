"""Who the hosts are: facts each host reports about itself, and the machine type they share (or not)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from numabench.topology.model import Machine


@dataclass(frozen=True)
class HostInfo:
    """One cluster host as it describes itself. `node_id` is Ray's: host names and addresses
    can repeat (several simulated hosts on one test machine), node ids never do."""

    node_id: str
    hostname: str
    address: str
    machine_type: str

    @property
    def short(self) -> str:
        return f"{self.hostname}/{self.node_id[:8]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_type(machine: Machine) -> str:
    """What makes two hosts' results comparable: CPU model and the shape the planner sees."""
    nodes = [n for n in machine.nodes if n.cpus]
    return (f"{machine.model_name or 'unknown CPU'}; {len(machine.packages)} package(s), "
            f"{len(nodes)} NUMA node(s), {len(machine.usable_cores())} usable cores, "
            f"{machine.threads_per_core} thread(s)/core")


def mixed_types_warning(types: list[str]) -> str | None:
    """A warning naming the machine types when the hosts are not all alike, else None."""
    counts = Counter(types)
    if len(counts) < 2:
        return None
    listed = "; ".join(f"{n} x [{t}]" for t, n in counts.most_common())
    return (f"the cluster's hosts are of {len(counts)} machine types ({listed}): points run on "
            "different hardware; compare results of the same machine type only")


def this_host(machine: Machine) -> HostInfo:
    """Called on a host, inside a Ray task or actor."""
    import socket

    import ray

    return HostInfo(node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                    address=ray.util.get_node_ip_address(), machine_type=machine_type(machine))


def _describe_host():
    from numabench.topology import read_machine

    machine = read_machine("/")
    return this_host(machine), machine


def probe_hosts(ray) -> list[tuple[HostInfo, Machine]]:
    """Every alive numabench host's description and topology, read on that host."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from numabench.cluster.connect import HOST_RESOURCE

    probe = ray.remote(num_cpus=0, max_retries=0)(_describe_host)
    nodes = [n["NodeID"] for n in ray.nodes()
             if n.get("Alive") and n.get("Resources", {}).get(HOST_RESOURCE)]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in nodes]
    return list(ray.get(refs, timeout=120))
