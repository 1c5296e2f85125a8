"""Shared test fixtures. Topology: the real-machine trees from ../shared, unpacked once; one
cache folder per session for the ONNX exports and weight files."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

# ../shared beside the repository root (CI clones the repo with shared/ next to it).
SHARED = Path(__file__).resolve().parents[2] / "shared"
TOPOLOGY_FIXTURES = SHARED / "fixtures" / "topology"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can import sysfs_tree


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """XDG_CACHE_HOME for the whole session: the ONNX cache ($XDG_CACHE_HOME/numabench/onnx) and
    the weights cache are filled once per session (bert-tiny exported once, then hits), never
    read from or left in the user's ~/.cache, and shared by the run's xdist workers. Tests about the
    cache itself still give their own folder (--cache-dir, monkeypatch.setenv)."""
    old = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # One folder for all xdist workers of this run (the caches lock each entry, as they do for
    # two launches at once): bert-tiny's weights and ONNX files are built once per run, not per worker.
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdg-cache"
    folder.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    # matplotlib keeps its font cache there too: keep using the built one (a rebuild costs seconds).
    if "MPLCONFIGDIR" not in os.environ and os.path.isdir(os.path.join(old, "matplotlib")):
        mp.setenv("MPLCONFIGDIR", os.path.join(old, "matplotlib"))
    mp.setenv("XDG_CACHE_HOME", str(folder))
    # A daemon started without its own runtime folder never meets the user's, or another xdist
    # worker's (tests that start one still give their own).
    mp.setenv("NUMABENCH_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    yield folder
    mp.undo()


@pytest.fixture(scope="session")
def topology_fixture_dir() -> Path:
    if not TOPOLOGY_FIXTURES.is_dir():
        pytest.skip(f"real-machine topology fixtures not found at {TOPOLOGY_FIXTURES} "
                    "(../shared is absent in this checkout)")
    return TOPOLOGY_FIXTURES


@pytest.fixture(scope="session")
def topology_roots(topology_fixture_dir, tmp_path_factory) -> dict[str, Path]:
    """Tarball stem (e.g. "32amd64-4s2n4c-cgroup2") → the unpacked filesystem root.

    The folder inside a tarball may be named differently from the tarball, so the root is the
    tarball's single top-level folder, whatever its name.
    """
    # 35,000 small files: on tmpfs half a second, on this VM's shared disk 3 to 25 s
    shm = Path("/dev/shm")
    base = (Path(tempfile.mkdtemp(prefix="numabench-test-fixtures-", dir=shm))
            if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path_factory.mktemp("topology-fixtures"))
    try:
        tarballs = sorted(topology_fixture_dir.glob("*/*.tar.bz2"))
        yield {t.name.removesuffix(".tar.bz2"): _unpack(t, base) for t in tarballs}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _unpack(tarball: Path, base: Path) -> Path:
    dest = base / tarball.name.removesuffix(".tar.bz2")
    dest.mkdir()
    # tar(1) unpacks the 35,000 files of all fixtures in about a second; tarfile takes 20 s
    tar_cmd = shutil.which("tar")
    if tar_cmd is None or subprocess.run([tar_cmd, "-xjf", str(tarball), "-C", str(dest), "--no-same-owner"],
                                         capture_output=True).returncode:
        shutil.rmtree(dest)
        dest.mkdir()
        with tarfile.open(tarball) as tar:
            try:
                tar.extractall(dest, filter="tar")
            except TypeError:  # Python without extraction filters
                tar.extractall(dest)  # trusted test data
    tops = os.listdir(dest)
    assert len(tops) == 1, f"{tarball} should unpack to one folder, got {sorted(tops)}"
    return dest / tops[0]


@pytest.fixture(scope="session")
def article_tree(tmp_path_factory) -> Path:
    """The reference article's c5.metal as a sysfs tree: 2 sockets x 24 cores x 2 threads
    (node0 = CPUs 0-23,48-71, node1 = 24-47,72-95)."""
    from sysfs_tree import write_sysfs_tree

    return write_sysfs_tree(tmp_path_factory.mktemp("article"), sockets=2, cores_per_node=24,
                            threads_per_core=2)


def pytest_configure(config):
    # A shell starts background jobs with SIGINT ignored, and an ignored signal stays ignored in
    # every program they exec: the Ctrl-C tests' launchers would never see it. Take it back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line("markers", "ray: runs on a Ray test cluster (tests/test_cluster.py); "
                                       "skipped where Ray is not installed")


# The longest files (seconds each on the 2-vCPU dev VM under the parallel suite), handed out
# first: with --dist loadfile a long file that starts last is the suite's tail (test_cluster.py,
# 34 s, began at 90 s of 124). Longest-first packing ends the workers together. Order inside a
# file is kept.
LONGEST_FIRST = ("test_launch.py", "test_onnxruntime.py", "test_shared_weights.py", "test_serve.py",
                 "test_cluster.py", "test_tune.py", "test_serve_hardening.py", "test_compare.py",
                 "test_serve_weights.py", "test_baselines.py", "test_report.py", "test_sweep.py",
                 "test_worker_pytorch.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Files whose tests import torch in the test process itself (an ONNX export, a weights build,
# transformers' AutoTokenizer): 4-5 CPU-seconds per xdist worker that imports it. Under
# --dist loadfile they are one work unit, so one worker imports torch once for all of them.
TORCH_IN_PROCESS = frozenset({"test_onnxruntime.py", "test_shared_weights.py", "test_text_tokens.py"})


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None  # xdist's own scheduler for any other --dist
    from xdist.scheduler import LoadFileScheduling

    class TorchFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "torch-in-process" if os.path.basename(path) in TORCH_IN_PROCESS else path

    return TorchFilesTogether(config, log)
