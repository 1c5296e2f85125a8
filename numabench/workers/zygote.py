"""The fork server: one process imports the framework once, then forks the workers.

Every exec'd worker imports torch and transformers itself: seconds of CPU each, N times at once
on the cores being measured, and ~230 MB of private memory each (interpreter objects, relocated
library data) that no weights sharing can reach. Forked from this process, the workers share
those pages copy-on-write and start in a fraction of a second.

Protocol (JSON lines): the launcher writes {"op": "fork", "instance", "config", "env", "log"}
on stdin and reads {"op": "forked", "instance", "pid"}; whenever a worker ends, the server
writes {"op": "exit", "pid", "code"} (code as Popen's returncode: negative for a signal).
{"op": "build_weights", "model", "seed", "path", "log"} forks a child that writes the model's
weights cache file (shared_weights.build_file) and exits 0, or 1 with its traceback in the log:
on a cache miss the launcher need not import torch as well (4-5 CPU-seconds). On
EOF, SIGTERM, SIGHUP or SIGINT the server stops its workers (SIGTERM, a grace period, SIGKILL)
and exits; the workers also get SIGTERM from the kernel when it dies.

What the server must never do, so that forking stays safe: run a framework operation (an
OpenMP pool started here would hang every child's first parallel region), open a ZeroMQ
context, or start a Python thread. It imports, and it forks. Only the standard library is
imported at the top, as in the worker.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import time

from numabench.workers import worker as worker_mod

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
GRACE_S = 5.0


def preimport(backend: str, model: str | None) -> None:
    """Import what the workers will import, without running anything."""
    import numpy  # noqa: F401
    import zmq  # noqa: F401

    from numabench.workers import protocol, requests  # noqa: F401
    from numabench.workers.backends import create_backend  # noqa: F401

    if backend == "pytorch":  # (an ONNX Runtime worker given its prepared file imports no torch)
        import torch

        from numabench.workers import models
        from numabench.workers.backends import pytorch  # noqa: F401

        if model:  # the model's classes (transformers imports them lazily), on the meta device
            try:
                with torch.device("meta"):
                    models.build_pytorch_model(models.resolve_model(model), 0, weights=False)
            except Exception as e:  # noqa: BLE001 - the worker loads it (and reports) itself
                print(f"fork server: model classes not preloaded: {type(e).__name__}: {e}",
                      file=sys.stderr, flush=True)
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401

        from numabench.workers.backends import onnxruntime as _ort  # noqa: F401


def _build_weights(req: dict, inherited: list[int]) -> int:
    """In the forked child: write the weights cache file, then exit (never a worker)."""
    from pathlib import Path

    from numabench.workers import models
    from numabench.workers.backends import shared_weights

    _detach(req, inherited)
    worker_mod.set_parent_death_signal()  # a stopped server's build is not finished alone
    shared_weights.build_file(models.resolve_model(req["model"]), req["seed"], Path(req["path"]))
    return 0


def _detach(req: dict, inherited: list[int]) -> None:
    """A forked child's own session, default signals, and its log as stdout/stderr."""
    os.setsid()  # its own process group, as start_new_session gives an exec'd worker
    signal.set_wakeup_fd(-1)
    for sig in (*STOP_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    fd = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for f in (fd, null, *inherited):
        try:
            os.close(f)
        except OSError:
            pass
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _child(req: dict, server_pid: int, inherited: list[int]) -> int:
    """In the forked child: become a worker exactly as an exec'd one would start."""
    _detach(req, inherited)
    os.environ.clear()
    os.environ.update({**req["env"], "NUMABENCH_PARENT_PID": str(server_pid)})
    # no gc.unfreeze(): a full collection would then write to every inherited object's page
    return worker_mod.main(["--config", json.dumps(req["config"])])


class Server:
    def __init__(self) -> None:
        self.children: set[int] = set()
        self.out = sys.stdout
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def say(self, obj: dict) -> None:
        try:
            self.out.write(json.dumps(obj) + "\n")
            self.out.flush()
        except OSError:  # the launcher is gone (broken pipe): nobody to tell, stopping goes on
            pass

    def fork(self, req: dict) -> None:
        pid = os.fork()
        if pid == 0:
            code = 3 if req["op"] == "fork" else 1
            try:
                inherited = [self.wake_r, self.wake_w]
                code = (_child(req, os.getppid(), inherited) if req["op"] == "fork"
                        else _build_weights(req, inherited))
            except BaseException:  # noqa: BLE001 - a child must never return into the server loop
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.children.add(pid)
        self.say({"op": "forked", "instance": req.get("instance"), "pid": pid})

    def request(self, line: bytes) -> None:
        """One line from the launcher; anything but a well-formed request is answered, not obeyed."""
        try:
            req = json.loads(line)
            ok = isinstance(req, dict) and isinstance(req.get("log"), str) and (
                (req.get("op") == "fork" and isinstance(req.get("config"), dict)
                 and isinstance(req.get("env"), dict)
                 and all(isinstance(k, str) and isinstance(v, str) for k, v in req["env"].items()))
                or (req.get("op") == "build_weights" and isinstance(req.get("model"), str)
                    and type(req.get("seed")) is int and isinstance(req.get("path"), str)))
        except ValueError:
            ok = False
        if not ok:
            self.say({"op": "refused", "message": f"not a fork or build request: {line[:200]!r}"})
            return
        self.fork(req)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.say({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    def stop(self) -> None:
        for pid in list(self.children):
            _killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.children):
            _killpg(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        stopping = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda s, f: stopping.append(s))
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # only to wake select via the fd
        stdin = sys.stdin.buffer.raw
        buf = b""
        try:
            while not stopping:
                try:
                    ready, _, _ = select.select([stdin, self.wake_r], [], [], 1.0)
                except InterruptedError:
                    continue
                if self.wake_r in ready:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                self.reap()
                if stdin in ready:
                    chunk = os.read(stdin.fileno(), 65536)
                    if not chunk:
                        return 0
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        self.request(line)
            return 0
        finally:
            self.stop()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))
    parent = os.getppid()
    worker_mod.set_parent_death_signal()
    if os.getppid() != parent or os.environ.get("NUMABENCH_PARENT_PID", str(parent)) != str(parent):
        return worker_mod.EXIT_ORPHANED
    worker_mod.set_process_name("numabench-fork")
    p = argparse.ArgumentParser(prog="python -m numabench.workers.zygote")
    p.add_argument("--backend", required=True)
    p.add_argument("--model")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        preimport(args.backend, args.model)
    except Exception as e:  # noqa: BLE001 - said on the protocol: the launcher falls back to exec
        print(json.dumps({"op": "failed", "message": f"{type(e).__name__}: {e}"}), flush=True)
        return 3
    gc.collect()
    gc.freeze()  # the collector then leaves the inherited objects (and their pages) alone
    print(json.dumps({"op": "ready", "pid": os.getpid(), "import_s": round(time.monotonic() - t0, 3),
                      "threads": len(worker_mod.task_ids())}), flush=True)
    return Server().run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
