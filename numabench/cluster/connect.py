"""Joining (or starting) the Ray cluster a command runs on, and always leaving it cleanly."""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from numabench.errors import NumabenchError

HOST_RESOURCE = "numabench_host"
# `--ray local`: a one-host cluster for this run only, kept small (it shares the machine it measures).
LOCAL_OBJECT_STORE_BYTES = 100 << 20
START_HINT = (f"start one with `ray start --head --resources='{{\"{HOST_RESOURCE}\": 1}}'` on the "
              f"head host and `ray start --address HEAD:6379 --resources='{{\"{HOST_RESOURCE}\": 1}}'` "
              "on every other host (docs/cluster.md), or use --ray local")


class RayUnavailable(NumabenchError):
    """Ray is not installed, or no cluster answers at the address given."""


class ClusterInterrupted(NumabenchError):
    exit_code = 130


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs Ray, which is not installed: pip install 'numabench[ray]' "
                             "(or pip install ray) on this host and on every cluster host") from None
    return ray


def host_count(ray) -> int:
    """Alive hosts advertising the numabench host resource."""
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(HOST_RESOURCE))


def on_this_node(ray) -> dict:
    """Ray options that keep a small coordinating actor (a barrier, a tracker) on the driver's
    node: it must outlive any host that fails, and the driver's node is the one that cannot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}


@contextlib.contextmanager
def connect(address: str) -> Iterator[object]:
    """The `ray` module, connected to `address` for the duration of the block.

    `local` starts a one-host cluster (this machine) and shuts it down afterwards, also on
    Ctrl-C; `auto` or HOST:PORT joins a running cluster and leaves it running. When this
    process is already connected (a test's cluster, an embedding program) that connection is
    used and left as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  configure_logging=True)
    local = address == "local"
    try:
        _init(ray, address, common)
    except KeyboardInterrupt:  # Ctrl-C while Ray starts: take down whatever it started
        _shutdown(ray, local)
        raise ClusterInterrupted(f"interrupted while connecting to Ray (--ray {address})") from None
    except BaseException:
        _shutdown(ray, local)
        raise
    try:
        if not host_count(ray):
            raise RayUnavailable(f"--ray {address}: the cluster has no host advertising the "
                                 f"{HOST_RESOURCE!r} resource; " + START_HINT)
        yield ray
    except KeyboardInterrupt:  # outside a sweep's or launch's own handling (which say more)
        raise ClusterInterrupted("interrupted; the work sent to the cluster was stopped") from None
    finally:
        _shutdown(ray, local)


def _shutdown(ray, local: bool) -> None:
    """Leave the cluster; with `local`, make sure every process Ray started here is gone (its
    agents can outlive an interrupted start or shutdown, orphaned)."""
    import psutil

    started = psutil.Process().children(recursive=True) if local else []
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=5)
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _init(ray, address: str, common: dict) -> None:
    if address == "local":
        # address="local": a new instance even where a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=min(os.cpu_count() or 1, 2), resources={HOST_RESOURCE: 1},
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    else:
        try:
            ray.init(address=address, **{k: v for k, v in common.items() if k != "include_dashboard"})
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayUnavailable(f"--ray {address}: no Ray cluster answers there ({str(e).splitlines()[0]}); "
                                 + START_HINT) from None
