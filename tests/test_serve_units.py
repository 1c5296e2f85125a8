"""serve's pure parts: pools and routing, bind checks, the state file."""
from __future__ import annotations

import os
import stat

import pytest

from numabench.daemon import endpoints
from numabench.daemon.pools import bucket_shapes, build_pools, least_loaded, route
from numabench.errors import NumabenchError
from numabench.plans import load_plan

SMART = """\
version: 1
batch: 3
instances:
- {id: 0, cpus: '0', memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 1, max: 32}}
- {id: 1, cpus: '1', memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 33, max: 384}}
- {id: 2, cpus: '2', memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 33, max: 384}}
- {id: 3, cpus: '3', memory_nodes: [0], threads: 1, batch: 1, seq_range: {min: 385, max: null}}
"""
PLAIN = """\
version: 1
batch: 2
instances:
- {id: 0, cpus: '0', memory_nodes: [0], threads: 1, batch: 1}
- {id: 1, cpus: '1', memory_nodes: [0], threads: 1, batch: 1}
"""


def test_pools_group_instances_by_range_and_route_by_length():
    pools = build_pools(load_plan(SMART), 512)
    assert [(p.name, p.instances, p.shapes) for p in pools] == [
        ("1-32", (0,), (32,)), ("33-384", (1, 2), (384,)), ("385-", (3,), (512,))]
    assert route(pools, 1).name == "1-32" and route(pools, 33).name == "33-384"
    assert route(pools, 512).name == "385-" and route(pools, 513) is None
    assert pools[1].pad_to(40) == 384


def test_bucket_padding_and_a_plan_without_ranges():
    pools = build_pools(load_plan(SMART), 512, pad="bucket")
    assert pools[1].shapes == (64, 128, 256, 384) and pools[1].pad_to(65) == 128
    (only,) = build_pools(load_plan(PLAIN), 512)
    assert only.name == "all" and only.instances == (0, 1)
    assert only.shapes == (8, 16, 32, 64, 128, 256, 512) and only.pad_to(9) == 16
    assert bucket_shapes(1, 100) == (8, 16, 32, 64, 100)
    with pytest.raises(NumabenchError, match="beyond"):
        build_pools(load_plan(SMART), 300)


def test_least_loaded_prefers_idle_then_least_served():
    assert least_loaded([(0, 1, 0), (1, 0, 9), (2, 0, 3)]) == 2
    assert least_loaded([]) is None


def test_bind_checks(tmp_path):
    private = tmp_path / "private"
    endpoints.make_private_dir(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert endpoints.check_bind(f"ipc://{private}/s.sock") == []
    assert endpoints.check_bind("tcp://127.0.0.1:5555") == []
    assert endpoints.check_bind("tcp://[::1]:5555") == []
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    for bad in (f"ipc://{shared}/s.sock", "tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555"):
        with pytest.raises(endpoints.EndpointError, match="allow-public-bind"):
            endpoints.check_bind(bad)
        assert endpoints.check_bind(bad, allow_public=True)  # allowed, with a warning
    for bad in ("ipc://relative.sock", "inproc://x", "nonsense", "tcp://127.0.0.1",
                "tcp://127.0.0.1:port"):
        with pytest.raises(endpoints.EndpointError):
            endpoints.check_bind(bad)


def test_state_file_is_private_and_discovered(tmp_path, monkeypatch):
    monkeypatch.setenv(endpoints.RUNTIME_ENV, str(tmp_path / "rt"))
    monkeypatch.delenv(endpoints.ENDPOINT_ENV, raising=False)
    with pytest.raises(endpoints.EndpointError, match="no running daemon"):
        endpoints.discover_endpoint()
    # A stale file naming a live pid that is not the daemon that wrote it (a reused pid).
    endpoints.write_state({"pid": os.getpid(), "pid_start": 1, "endpoint": "ipc:///x/serve.sock"})
    with pytest.raises(endpoints.EndpointError, match="not running"):
        endpoints.discover_endpoint()
    path = endpoints.write_state({"pid": os.getpid(), "endpoint": "ipc:///x/serve.sock",
                                  "pid_start": endpoints.process_start(os.getpid())})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert endpoints.discover_endpoint() == "ipc:///x/serve.sock"
    assert endpoints.discover_endpoint("tcp://127.0.0.1:1") == "tcp://127.0.0.1:1"
    endpoints.remove_state(os.getpid() + 1)  # not ours: kept
    assert path.exists()
    endpoints.remove_state(os.getpid())
    assert not path.exists()


def test_a_shared_runtime_folder_is_left_alone(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setenv(endpoints.RUNTIME_ENV, str(shared))
    private = endpoints.runtime_dir()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # never chmod-ed
    assert private.parent == shared and stat.S_IMODE(private.stat().st_mode) == 0o700
    assert endpoints.state_path().parent == private
    with pytest.raises(endpoints.EndpointError, match="port"):
        endpoints.check_bind("tcp://127.0.0.1")
