"""A group of worker processes: start, watch, stop. Nothing is left behind.

Each worker runs in its own session (process group), so a terminal's Ctrl-C reaches only the
coordinator, which then stops the workers in order: SIGTERM, a grace period, SIGKILL. Workers
also ask the kernel for SIGTERM when their parent dies, covering a coordinator killed with -9.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from numabench.launcher.forkserver import Forked, ForkServer

HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# The launcher's pid, for a worker to tell a live parent from an adoptive one (init, a subreaper):
# a worker started just after its launcher died would otherwise wait for requests forever.
PARENT_ENV = "NUMABENCH_PARENT_PID"


@dataclass(frozen=True)
class Exited:
    instance: int
    returncode: int
    cause: str | None = None  # what we know beyond the code (a forked worker whose server died)

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            text = f"killed by {name}"
        else:
            text = f"exited with code {self.returncode}"
        return f"{text} ({self.cause})" if self.cause else text


class ProcessGroup:
    """Worker processes keyed by instance id, each logging to run_dir/instance-<id>.log."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.procs: dict[int, subprocess.Popen | Forked] = {}
        self._logs: dict[int, object] = {}
        self.servers: dict[tuple, ForkServer] = {}  # fork servers, stopped after their workers

    def log_path(self, instance: int) -> Path:
        return self.run_dir / f"instance-{instance}.log"

    def start(self, instance: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self._new_log(instance, "$ " + " ".join(argv))
        self._logs[instance] = log
        return self._register(instance, lambda: subprocess.Popen(
            argv, env={**env, PARENT_ENV: str(os.getpid())}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))

    def start_forked(self, instance: int, server: ForkServer, config: dict, env: dict[str, str]) -> Forked:
        """Have `server` fork the instance's worker (it writes run_dir/instance-<id>.log itself)."""
        self._new_log(instance, f"$ forked by fork server {server.pid}").close()
        return self._register(instance, lambda: server.fork(instance, config, env, self.log_path(instance)))

    def _new_log(self, instance: int, first_line: str):
        """The instance's log, opened for appending with `first_line` written and flushed."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self._logs.pop(instance, None)
        if previous is not None:  # a restart (serve): the old process's log handle is done
            previous.close()
        log = open(self.log_path(instance), "ab")
        log.write((first_line + "\n").encode())
        log.flush()
        return log

    def _register(self, instance: int, start):
        # A stop signal landing after the fork, before the child is registered, would leave a
        # child this group does not know and so never stops: hold the signals until then. An
        # exec'd child inherits the mask; the worker unblocks them first thing (workers/worker.py).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            proc = self.procs[instance] = start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return proc

    def exited(self) -> list[Exited]:
        """Workers that have ended, in instance order."""
        return [e for i in sorted(self.procs) if (e := self.ended(i)) is not None]

    def tail(self, instance: int, lines: int = 15) -> str:
        try:
            with open(self.log_path(instance), "rb") as f:
                return b"".join(deque(f, maxlen=lines)).decode(errors="replace").rstrip()
        except OSError:
            return "(no log)"

    def pid(self, instance: int) -> int | None:
        proc = self.procs.get(instance)
        return None if proc is None else proc.pid

    def poll(self, instance: int) -> int | None:
        """The instance's exit code once it has ended (and is reaped), else None."""
        proc = self.procs.get(instance)
        return None if proc is None else proc.poll()

    def wait(self, instance: int, timeout_s: float) -> int | None:
        """Wait up to timeout_s for the instance to end; its exit code, or None if it runs on."""
        proc = self.procs.get(instance)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def ended(self, instance: int, timeout_s: float = 0.0) -> Exited | None:
        """How the instance ended, waiting up to timeout_s; None while it runs on."""
        code = self.wait(instance, timeout_s) if timeout_s > 0 else self.poll(instance)
        if code is None:
            return None
        return Exited(instance, code, getattr(self.procs[instance], "cause", None))

    def kill(self, instance: int, timeout_s: float = 5.0) -> int | None:
        """SIGKILL the instance's process group (a frozen worker too) and reap it; its exit code."""
        proc = self.procs.get(instance)
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
        return self.wait(instance, timeout_s)

    def alive(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every live worker's process group, wait up to grace_s, then SIGKILL."""
        for p in self.procs.values():
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            left = deadline - time.monotonic()
            try:
                p.wait(timeout=max(left, 0.01))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            # Kill the whole group even when the leader is gone: children may linger.
            _signal_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                pass
        for log in self._logs.values():
            log.close()
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    def wait_all(self, timeout_s: float) -> bool:
        """Wait for every worker to exit by itself; True when all did in time."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                return False
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _signal_group(p: subprocess.Popen | Forked, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass
