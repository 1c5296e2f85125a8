"""Starting numabench's command line as a real process and watching it (the signal and clean-up
tests of test_launch.py and test_failure_honesty.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil


def start_cli(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "numabench.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(path: Path, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {path}: "
                         f"{path.read_text() if path.exists() else '(missing)'}")


def descendants(pid: int) -> list[psutil.Process]:
    """Every process below `pid` (its workers), empty once it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_all_gone(procs: list[psutil.Process], timeout: float = 10) -> None:
    """Every one of `procs` ends within `timeout` (nothing left behind)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
