"""numabench on a Ray cluster: sweeps, fleet launches and serving across hosts (docs/cluster.md).

Ray schedules; numabench measures. Every host runs numabench's own code on its own topology
(read, plan, bind and launch locally); Ray only places whole-host work, carries the results
documents back and tells us when a host is gone. A host takes part by advertising the custom
resource `numabench_host: 1`; each sweep point, fleet member or daemon claims that whole unit, so
two numabench runs never share a host.

Ray is optional (the `numabench[ray]` extra): nothing here imports it at module level, and
`require_ray` turns its absence into an error that says what to install.
"""
from __future__ import annotations

from numabench.cluster.connect import HOST_RESOURCE, RayUnavailable, connect, require_ray

__all__ = ["HOST_RESOURCE", "RayUnavailable", "connect", "require_ray"]
