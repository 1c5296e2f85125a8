"""The launcher's side of a fork server (workers/zygote.py): start it, ask it for workers, learn
when they end. A forked worker is the server's child, not ours, so `Forked` stands in for the
`subprocess.Popen` a `ProcessGroup` keeps (pid, poll, wait); the exit codes come from the server.

One server per NUMA node set (its import's pages land there) and per environment the framework
reads at load (a preloaded allocator or OpenMP runtime): `server_key` says which. Anything the
server cannot do is a `ForkServerError`, and the caller starts exec'd workers instead.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError
from numabench.launcher.binding import PLACEMENT_VARS, THREAD_VARS

# Read by the framework once, at load: a server started with them serves only workers that want
# the same. The per-instance ones (counts, places) a forked worker sets for itself instead.
LOAD_TIME_VARS = ("LD_PRELOAD", "KMP_BLOCKTIME", "MALLOC_CONF", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
PLACES = tuple(v for v in PLACEMENT_VARS if v not in LOAD_TIME_VARS)  # one instance's CPUs each
PER_INSTANCE_VARS = THREAD_VARS + PLACES
# A worker whose server died before saying how it ended: PDEATHSIG sent it SIGTERM, and the
# server's stop SIGKILLs what outlives the grace period.
LOST = -int(signal.SIGTERM)


class ForkServerError(NumabenchError):
    pass


def server_key(memory_nodes: tuple[int, ...], env: Mapping[str, str]) -> tuple:
    """Which server may fork a worker: same memory nodes, same load-time environment."""
    return (tuple(sorted(memory_nodes)), tuple((v, env.get(v)) for v in LOAD_TIME_VARS))


def server_env(env: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment without what only that worker wants: the server's."""
    return {k: v for k, v in env.items() if k not in PER_INSTANCE_VARS}


class ForkServer:
    """One running fork server. `start` waits until it has imported the framework."""

    def __init__(self, argv: list[str], env: Mapping[str, str], log_path: Path, timeout_s: float):
        from numabench.launcher.procs import PARENT_ENV

        self.log_path = Path(log_path)
        self._exits: dict[int, int] = {}
        self._replies: deque[dict[str, Any]] = deque()
        self._buf = b""
        self._eof = False
        self._poller: Any = None
        log = open(self.log_path, "ab")
        try:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(argv, env={**env, PARENT_ENV: str(os.getpid())},
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        except OSError as e:
            raise ForkServerError(f"fork server did not start: {e}") from None
        finally:
            log.close()
        self.pid = self.proc.pid
        t0 = time.monotonic()
        hello = self._next_reply(timeout_s)
        self.start_s = time.monotonic() - t0
        if hello is None or hello.get("op") != "ready":
            why = (hello or {}).get("message") or ("no answer in time" if hello is None and not self._eof
                                                     else "it exited")
            self.close(grace_s=1.0)
            raise ForkServerError(f"fork server did not start: {why} (log: {self.log_path})")
        self.info = {"pid": self.pid, "import_s": hello.get("import_s"),
                     "threads_at_fork": hello.get("threads"), "start_s": round(self.start_s, 3)}

    # -- the pipe --

    def _pump(self, timeout_s: float) -> bool:
        """Read what the server said within timeout_s; False once it has closed its side."""
        if self._eof:
            return False
        fd = self.proc.stdout.fileno()
        if self._poller is None:  # poll, not select: a daemon's descriptors may pass 1024
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
        if not self._poller.poll(max(timeout_s, 0) * 1000):
            return True
        chunk = os.read(fd, 65536)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:  # something the framework printed: not ours to parse
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("op") == "exit" and isinstance(msg.get("pid"), int) and isinstance(msg.get("code"), int):
                self._exits[msg["pid"]] = msg["code"]
            else:
                self._replies.append(msg)
        return True

    def _next_reply(self, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while not self._replies:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(min(left, 0.5)):
                break
        return self._replies.popleft() if self._replies else None

    # -- workers --

    def _fork_child(self, req: dict[str, Any], timeout_s: float, what: str) -> int:
        """Send one request that forks a child; its pid, or ForkServerError."""
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise ForkServerError(f"fork server {self.pid} is gone: {e}") from None
        reply = self._next_reply(timeout_s)
        if reply is None or reply.get("op") != "forked" or not isinstance(reply.get("pid"), int):
            raise ForkServerError(f"fork server {self.pid} did not fork {what}: "
                                  f"{reply!r} (log: {self.log_path})")
        return reply["pid"]

    def fork(self, instance: int, config: Mapping[str, Any], env: Mapping[str, str], log_path: Path,
             timeout_s: float = 30.0) -> Forked:
        req = {"op": "fork", "instance": instance, "config": dict(config), "env": dict(env),
               "log": str(log_path)}
        return Forked(self, self._fork_child(req, timeout_s, f"instance {instance}"))

    def build_weights(self, model: str, seed: int, path: Path, log_path: Path,
                      timeout_s: float) -> str | None:
        """Have a child of this server (torch already imported) write the weights cache file;
        who built it, or None when it did not (the caller builds it itself: the same error, if
        any, then reaches the user from there; this one is in `log_path`)."""
        req = {"op": "build_weights", "model": model, "seed": seed, "path": str(path),
               "log": str(log_path)}
        try:
            pid = self._fork_child(req, 30.0, "a weights build")
        except ForkServerError:
            return None
        code = self.exit_code(pid, timeout_s)
        if code is None:  # still building after timeout_s: stop it, build here
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return None
        return f"fork server {self.pid}" if code == 0 else None

    def lost(self, pid: int) -> bool:
        """True when the server ended without saying how `pid` did (its code is LOST)."""
        return self._eof and pid not in self._exits

    def exit_code(self, pid: int, timeout_s: float = 0.0) -> int | None:
        deadline = time.monotonic() + timeout_s
        while pid not in self._exits:
            if not self._pump(max(0.0, min(deadline - time.monotonic(), 0.2))):
                return self._exits.get(pid, LOST)
            if time.monotonic() >= deadline:
                break
        return self._exits.get(pid)

    def close(self, grace_s: float = 5.0) -> None:
        """EOF on its stdin: the server stops its workers and exits; then SIGKILL if it lingers."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s + 1.0)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=5)
        while self._pump(0):  # the exits it reported on the way out
            pass
        self.proc.stdout.close()


class Forked:
    """A forked worker, as a ProcessGroup sees it (the subset of Popen it uses)."""

    def __init__(self, server: ForkServer, pid: int):
        self.server = server
        self.pid = pid
        self.returncode: int | None = None
        self.cause: str | None = None

    def poll(self) -> int | None:
        return self.wait(0.0, raise_=False)

    def wait(self, timeout: float | None = None, raise_: bool = True) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, 1e9 if timeout is None else timeout)
            if self.returncode is not None and self.server.lost(self.pid):
                self.cause = f"its fork server {self.server.pid} ended first"
        if self.returncode is None and raise_:
            raise subprocess.TimeoutExpired(f"fork server {self.server.pid} worker {self.pid}", timeout)
        return self.returncode


def server_argv(prefix: list[str], backend: str, model: str) -> list[str]:
    return prefix + [sys.executable, "-m", "numabench.workers.zygote", "--backend", backend, "--model", model]
