"""The coordinator's end of the worker protocol: one ROUTER socket, every wait bounded.

A dead worker is noticed by its process exit (checked between short polls), not only by
silence, so a `kill -9` surfaces within a fraction of a second.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from numabench.errors import LaunchError
from numabench.launcher.procs import ProcessGroup
from numabench.workers import protocol

POLL_SLICE_MS = 50
RCVMORE, SNDMORE = zmq.RCVMORE, zmq.SNDMORE


class WorkerFailed(LaunchError):
    """An instance died or reported a fatal error; `instance` names it."""

    def __init__(self, instance: int, message: str):
        self.instance = instance
        super().__init__(message)


class Coordinator:
    def __init__(self, group: ProcessGroup, transport: str = "ipc", host: str = "127.0.0.1",
                 ipc_dir: str | None = None, handover: bool = False):
        """`ipc_dir`: where the private socket folder goes (default the temp folder);
        `handover`: a restarted worker (same identity) takes its predecessor's place (serve)."""
        if transport not in ("ipc", "tcp"):
            raise LaunchError(f"unknown transport {transport!r}; use ipc or tcp")
        self.group = group
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self._tmp = None
        try:
            self.sock.setsockopt(zmq.LINGER, 0)
            # Unroutable sends raise instead of vanishing: a message to a dead worker is an error.
            self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if handover:
                self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # recv() blocks at most one slice, then checks the workers are alive: one call per
            # message instead of poll + receive (the daemon polls this socket itself: unaffected).
            self.sock.setsockopt(zmq.RCVTIMEO, POLL_SLICE_MS)
            if transport == "ipc":
                # A private folder (0700) so no other user can connect to the socket.
                self._tmp = (tempfile.mkdtemp(prefix="c", dir=ipc_dir) if ipc_dir
                             else tempfile.mkdtemp(prefix="numabench-"))
                self.endpoint = f"ipc://{self._tmp}/coord.sock"
                self.sock.bind(self.endpoint)
            else:
                port = self.sock.bind_to_random_port(f"tcp://{host}")
                self.endpoint = f"tcp://{host}:{port}"
        except BaseException:
            # A context left open with its socket can hang the garbage collector in term().
            self.close()
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self._last_alive_check = 0.0
        self._identities: dict[int, bytes] = {}
        self._decoder = protocol.ResultDecoder()  # timed RESULTs without a JSON parse

    @property
    def socket(self) -> zmq.Socket:
        """The ROUTER socket, for callers that poll it in their own loop (serve)."""
        return self.sock

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- sending ---------------------------------------------------------------------------

    def send(self, instance: int, msg_type: str, header: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | protocol.PreparedArrays | None = None) -> None:
        self.send_frames(instance, protocol.encode(msg_type, header, arrays))

    def send_frames(self, instance: int, frames: list[Any]) -> None:
        """Send an already encoded message (e.g. from a protocol.RequestTemplate)."""
        sock = self.sock
        try:
            # Part by part rather than send_multipart (its checks cost more than the sends);
            # copy=True: for the small frames of a shard, copying beats zero-copy bookkeeping.
            # With ROUTER_MANDATORY an unroutable identity fails on the first part, nothing sent.
            sock.send(self._identity(instance), SNDMORE)
            for frame in frames[:-1]:
                sock.send(frame, SNDMORE)
            sock.send(frames[-1])
        except zmq.ZMQError as e:
            # Usually the worker has just died: name how, with its log, rather than the socket error.
            ended = self.group.ended(instance, 1.0)
            what = ended.describe() if ended is not None else f"cannot be reached ({e})"
            raise WorkerFailed(instance, self._failure_text(instance, what)) from None

    def _identity(self, instance: int) -> bytes:
        ident = self._identities.get(instance)
        if ident is None:
            ident = self._identities[instance] = protocol.identity(instance)
        return ident

    # --- receiving -------------------------------------------------------------------------

    def recv(self, timeout_s: float, watching: frozenset[int] | None = None,
             what: str = "a reply") -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
        """Next message from any worker. Raises WorkerFailed when a watched worker exits or
        sends a fatal ERROR, and LaunchError on timeout."""
        deadline = time.monotonic() + timeout_s
        sock, more = self.sock, self.sock.get
        while True:
            now = time.monotonic()
            # Reaping checks cost a syscall per worker: once per poll slice is prompt enough.
            if now - self._last_alive_check >= POLL_SLICE_MS / 1000:
                self._check_alive(watching)
                self._last_alive_check = now
            if now >= deadline:
                raise LaunchError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                  f"see the instance logs in {self.group.run_dir}")
            try:
                ident = sock.recv()  # waits at most POLL_SLICE_MS (RCVTIMEO)
            except zmq.Again:
                continue
            # The rest of a message is there once its first part is: these do not wait. The
            # header as bytes (no Frame object), array frames zero-copy.
            if not more(RCVMORE):
                continue  # an identity without a message: nothing a worker sends
            frames = [sock.recv()]
            while more(RCVMORE):
                frames.append(sock.recv(copy=False))
            instance = int(ident)
            header, arrays = self._decoder.decode(frames)
            if header["type"] == protocol.ERROR and header.get("fatal", True):
                raise WorkerFailed(instance, self._failure_text(
                    instance, f"reported: {header.get('message', 'unknown error')}"))
            return instance, header, arrays

    def _check_alive(self, watching: frozenset[int] | None) -> None:
        for e in self.group.exited():
            if watching is None or e.instance in watching:
                raise WorkerFailed(e.instance, self._failure_text(e.instance, e.describe()))

    def _failure_text(self, instance: int, what: str) -> str:
        log = self.group.log_path(instance)
        return (f"instance {instance} {what}\n--- last lines of {log} ---\n"
                f"{self.group.tail(instance)}")

    def wait_for(self, msg_type: str, instances: set[int], timeout_s: float,
                 on_message=None) -> dict[int, dict[str, Any]]:
        """Collect one `msg_type` message from each of `instances` (others are passed to
        on_message, e.g. HELLO for progress)."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(instances):
            missing = sorted(instances - set(got))
            inst, header, _ = self.recv(max(deadline - time.monotonic(), 0.0),
                                        watching=frozenset(instances),
                                        what=f"{msg_type} from instance(s) {missing}")
            if header["type"] == msg_type:
                got[inst] = header
            elif header["type"] == protocol.ERROR:
                raise WorkerFailed(inst, self._failure_text(inst, f"error: {header.get('message')}"))
            if on_message:
                on_message(inst, header)
        return got

    def stop_workers(self, instances: list[int], timeout_s: float = 10.0) -> None:
        """Ask workers to finish (STOP → BYE); the process group reaps them afterwards."""
        for i in instances:
            try:
                self.send(i, protocol.STOP)
            except WorkerFailed:
                pass
        deadline = time.monotonic() + timeout_s
        pending = set(instances)
        while pending and time.monotonic() < deadline:
            if self.poller.poll(POLL_SLICE_MS):
                frames = self.sock.recv_multipart(copy=False)
                try:
                    header, _ = protocol.decode(frames[1:])
                except protocol.ProtocolError:
                    continue
                if header["type"] == protocol.BYE:
                    pending.discard(int(bytes(frames[0].buffer).decode()))
            pending -= {e.instance for e in self.group.exited()}

