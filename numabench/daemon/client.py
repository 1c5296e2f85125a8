"""A small client for `numabench serve`.

    from numabench.daemon.client import Client
    with Client() as c:                          # finds the running daemon by its state file
        r = c.infer(input_ids=ids)               # ids: int array (batch, seq) or (seq,)
        r.instance, r.pool, r.queue_ns, r.compute_ns, r.output
        c.status()                               # the status document (dict)

One DEALER socket; requests may be pipelined with `send_infer` + `recv` (the load generator
does). Not thread-safe: use one Client per thread.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from numabench.daemon import wire
from numabench.daemon.endpoints import discover_endpoint
from numabench.errors import NumabenchError


class ServeError(NumabenchError):
    """The daemon answered with an error, or did not answer in time."""

    exit_code = 1


@dataclass
class Reply:
    """One REPLY. `status` is ok, busy or error; `header` holds every field the daemon sent."""

    status: str
    header: dict[str, Any]
    output: np.ndarray | None = None
    received_ns: int = field(default_factory=time.monotonic_ns)

    @property
    def ok(self) -> bool:
        return self.status == wire.OK

    @property
    def id(self) -> Any:
        return self.header.get("id")

    @property
    def reason(self) -> str | None:
        return self.header.get("reason")

    @property
    def instance(self) -> int | None:
        return self.header.get("instance")

    @property
    def pool(self) -> str | None:
        return self.header.get("pool")

    @property
    def queue_ns(self) -> int | None:
        return self.header.get("queue_ns")

    @property
    def compute_ns(self) -> int | None:
        return self.header.get("compute_ns")

    @property
    def worker_queue_ns(self) -> int | None:
        """Time the request waited inside the worker (sent → the worker started it)."""
        return self.header.get("worker_queue_ns")


class Client:
    def __init__(self, endpoint: str | None = None, timeout_s: float = 60.0,
                 context: zmq.Context | None = None, key_folder: str | os.PathLike | None = None):
        """`endpoint`: default the running daemon's (state file); a tcp:// one is reached with
        the owner's CURVE keys from the runtime folder, or from `key_folder` (daemon/auth.py)."""
        self.endpoint = discover_endpoint(endpoint)
        self.timeout_s = timeout_s
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.endpoint.startswith("tcp://"):
                from numabench.daemon import auth

                keys = auth.Keys(Path(key_folder)) if key_folder else auth.client_keys()
                auth.secure_client(self.sock, keys)  # the owner's CURVE keys
            self.sock.connect(self.endpoint)
        except BaseException:
            self.close()
            raise
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-{id(self):x}-"
        self._early: dict[Any, Reply] = {}  # replies received while waiting for another one

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- requests --------------------------------------------------------------------------

    def send_infer(self, input_ids: Any = None, attention_mask: Any = None,
                   texts: list[str] | None = None, want: str = "summary",
                   req_id: Any = None) -> Any:
        """Send one INFER without waiting; returns its id (match it with `recv`)."""
        header: dict[str, Any] = {"id": req_id if req_id is not None else self._next_id(),
                                  "want": want}
        arrays: dict[str, np.ndarray] = {}
        if texts is not None:
            header["texts"] = list(texts)
        if input_ids is not None:
            ids = np.asarray(input_ids)
            arrays["input_ids"] = ids[None, :] if ids.ndim == 1 else ids
            if attention_mask is not None:
                mask = np.asarray(attention_mask)
                arrays["attention_mask"] = mask[None, :] if mask.ndim == 1 else mask
        self.sock.send_multipart(wire.encode(wire.INFER, header, arrays), copy=False)
        return header["id"]

    def infer(self, input_ids: Any = None, attention_mask: Any = None,
              texts: list[str] | None = None, want: str = "summary",
              timeout_s: float | None = None) -> Reply:
        """Run one request and wait for its reply (ok, busy or error: check `reply.status`)."""
        rid = self.send_infer(input_ids, attention_mask, texts, want)
        return self.wait(rid, timeout_s)

    def recv(self, timeout_s: float | None = None) -> Reply | None:
        """The next reply, whatever its id; None on timeout."""
        if self._early:
            return self._early.pop(next(iter(self._early)))
        return self._recv_socket(self.timeout_s if timeout_s is None else timeout_s)

    def _recv_socket(self, timeout: float) -> Reply | None:
        if not self.sock.poll(max(int(timeout * 1000), 0), zmq.POLLIN):
            return None
        head, arrays = wire.decode(self.sock.recv_multipart(copy=False))
        # Copy: the frame's memory is only valid as long as the message is.
        out = arrays.get("output")
        return Reply(head.get("status", wire.ERROR), head, None if out is None else out.copy())

    def wait(self, rid: Any, timeout_s: float | None = None) -> Reply:
        if rid in self._early:
            return self._early.pop(rid)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            reply = self._recv_socket(left) if left > 0 else None
            if reply is None:
                raise ServeError(f"no reply from the daemon at {self.endpoint} within "
                                 f"{self.timeout_s if timeout_s is None else timeout_s:.0f} s")
            if reply.id == rid:
                return reply
            self._early[reply.id] = reply

    def _next_id(self) -> str:
        return f"{self._prefix}{next(self._ids)}"

    # --- control ---------------------------------------------------------------------------

    def command(self, msg_type: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a control command; returns the reply header, raises ServeError unless ok."""
        rid = self._next_id()
        self.sock.send_multipart(wire.encode(msg_type, {"id": rid, **fields}), copy=False)
        reply = self.wait(rid, timeout_s)
        if not reply.ok:
            raise ServeError(f"daemon: {reply.reason or reply.status}")
        return reply.header

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.command(wire.PING, timeout_s)

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.command(wire.STATUS, timeout_s)["daemon"]

    def stop(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Drain, stop the workers and the daemon; returns once it has stopped them."""
        return self.command(wire.STOP, timeout_s)

    def reload(self, plan: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Re-read the plan (the daemon's own file, or `plan`) and apply what changed."""
        fields = {"plan": os.path.abspath(plan)} if plan else {}
        return self.command(wire.RELOAD, timeout_s, **fields)
