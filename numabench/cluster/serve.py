"""`numabench serve --ray ADDRESS`: one numabench daemon per host behind one front end.

Each host runs a `HostDaemon` Ray actor (claiming the whole host) that plans on its own topology
and runs numabench's own daemon (`daemon.server.Daemon`) in a thread, bound to an ipc socket in
a private folder on that host: the daemon never listens on the network. The actor relays the
requests it is given to that socket with numabench's `Client`.

The front end runs where `serve --ray` was started. It speaks the daemon's own client protocol
(docs/serve.md) on its bind endpoint, so `numabench client`/`status`/`stop` and `Client` work
against it unchanged, and forwards each INFER as a Ray actor call, which carries it between
hosts (Ray's own transport and authentication: nothing numabench opens to the network). It
routes by sequence length: only hosts whose pools serve the request's length qualify, and among
them the one with the fewest requests in flight. A host is full when its in-flight requests reach
its instances plus its daemon's queue; when every qualifying host is full (or answered busy) the
client gets `busy` at once (load shedding). A host whose actor dies is removed, and each of its
in-flight requests is retried once on another host.

Why not Ray Serve: it would put an HTTP proxy and its own replica scheduler in front of the
daemon, whose requests are ZeroMQ frames of raw arrays routed by sequence length to pinned,
warm instances; the daemon already batches, queues and sheds, so the front end only needs to pick
a host, which is a few lines here rather than a second serving stack to install on every host.
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from numabench.cluster.connect import HOST_RESOURCE
from numabench.errors import NumabenchError

log = logging.getLogger("numabench.serve.cluster")

ACTOR_THREADS = 64  # concurrent relays per host actor (each blocks on its daemon's reply)
POLL_MS = 5


# --- routing, pure ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HostLoad:
    """What the front end knows of one host when routing a request."""

    key: str  # Ray node id
    ranges: tuple[tuple[int, int], ...]  # its pools' inclusive sequence ranges
    inflight: int
    capacity: int  # in flight at most: its instances plus its daemon's queue


def serves(h: HostLoad, seq: int | None) -> bool:
    return seq is None or any(lo <= seq <= hi for lo, hi in h.ranges)


def pick_host(hosts: Sequence[HostLoad], seq: int | None, tried: frozenset[str] = frozenset()
              ) -> tuple[str, str | None]:
    """("ok", host) | ("busy", None) | ("none", None): the least loaded host that serves `seq`
    (None: unknown until tokenized, any host) and has room, not counting those already tried."""
    able = [h for h in hosts if serves(h, seq)]
    if not able:
        return "none", None
    room = [h for h in able if h.key not in tried and h.inflight < h.capacity]
    if not room:
        return "busy", None
    return "ok", min(room, key=lambda h: (h.inflight / h.capacity, h.inflight, h.key)).key


# --- the per-host actor ----------------------------------------------------------------------

class HostDaemon:
    """A numabench daemon on this host (the actor claims the host's `numabench_host` unit)."""

    def __init__(self, plan_args: dict[str, Any], plan_text: str | None, opts):
        from numabench.cluster.hosts import this_host
        from numabench.daemon import endpoints
        from numabench.daemon.server import Daemon
        from numabench.plans import plan_for_launch
        from numabench.topology import read_machine

        machine = read_machine("/")
        self.host = this_host(machine)
        self.dir = Path(tempfile.mkdtemp(prefix="numabench-serve-"))  # 0700: private
        # This daemon's state file and socket live in its own folder, apart from any daemon
        # a user runs on this host by hand.
        os.environ[endpoints.RUNTIME_ENV] = str(self.dir)
        if plan_text is not None:
            (self.dir / "plan.yaml").write_text(plan_text)
            plan_args = {**plan_args, "plan_file": str(self.dir / "plan.yaml")}
        plan = plan_for_launch(machine, **plan_args)
        self.endpoint = f"ipc://{self.dir}/serve.sock"
        self.daemon = Daemon(plan, replace(opts, bind=self.endpoint, run_dir=self.dir / "run",
                                           metrics_port=None), machine=machine)
        self.error: str | None = None
        self.local = threading.local()
        self.thread = threading.Thread(target=self._run, name="numabench-daemon", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as e:  # reported by wait_ready / status
            self.error = f"{type(e).__name__}: {e}"

    def _client(self):
        from numabench.daemon.client import Client

        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = Client(self.endpoint, timeout_s=self.daemon.opts.request_timeout_s + 30)
        return c

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until every instance is ready; the host and what it serves."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.error or not self.thread.is_alive():
                raise NumabenchError(f"the daemon on {self.host.short} stopped: {self.error or 'exited'}")
            if self.daemon.endpoint:
                doc = self._client().status(timeout_s=10)
                if doc["state"] == "serving":
                    return {"host": self.host.to_dict(), "pools": [
                        (p["seq_min"], p["seq_max"]) for p in doc["pools"]],
                        "capacity": len(doc["instances"]) + doc["options"].get("queue_size", 0) * len(doc["pools"])}
            if time.monotonic() > deadline:
                raise NumabenchError(f"the daemon on {self.host.short} was not ready within {timeout_s:.0f} s")
            time.sleep(0.05)

    def infer(self, header: dict[str, Any], arrays: dict[str, Any]):
        """Relay one INFER to this host's daemon; (reply header, output array or None)."""
        c = self._client()
        rid = c.send_infer(input_ids=arrays.get("input_ids"), attention_mask=arrays.get("attention_mask"),
                           texts=header.get("texts"), want=header.get("want", "summary"))
        r = c.wait(rid)
        head = {k: v for k, v in r.header.items() if k not in ("id", "type", "v", "arrays")}
        return head, r.output

    def status(self) -> dict[str, Any]:
        return {"host": self.host.to_dict(), "daemon": self._client().status(timeout_s=10)}

    def stop(self) -> None:
        from numabench.daemon.client import Client

        if self.thread.is_alive() and self.daemon.endpoint:
            with Client(self.endpoint, timeout_s=60) as c:
                c.stop()
        self.thread.join(timeout=30)
        if not self.thread.is_alive():  # stopped cleanly: its socket, state file and logs go
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


# --- the front end ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Host:
    actor: Any
    info: dict[str, Any]
    ranges: tuple[tuple[int, int], ...]
    capacity: int
    inflight: int = 0
    served: int = 0

    @property
    def key(self) -> str:
        return self.info["node_id"]


@dataclass(eq=False)
class _Pending:
    envelope: list[bytes]
    rid: Any
    header: dict[str, Any]
    arrays: dict[str, Any]
    seq: int | None
    host: str
    tried: set[str] = field(default_factory=set)
    retried: bool = False


class FrontEnd:
    def __init__(self, ray, hosts: list[_Host], bind: str, opts, plan_args: dict[str, Any]):
        import zmq

        self.ray, self.hosts = ray, {h.key: h for h in hosts}
        self.opts, self.plan_args, self.started = opts, plan_args, time.monotonic()
        self.pending: dict[Any, _Pending] = {}  # object ref -> request
        self.removed: list[dict[str, Any]] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, opts.max_request_bytes)
        self.sock.setsockopt(zmq.SNDHWM, opts.send_hwm)  # a client that never reads stays bounded
        self.authenticator = None
        if bind.startswith("tcp://"):  # the same CURVE keys as a local daemon (daemon/auth.py)
            from numabench.daemon import auth

            keys = auth.ensure_keys()
            self.authenticator = auth.start_authenticator(self.ctx, keys)
            auth.secure_server(self.sock, keys)
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = f"{bind[:-2]}:{self.sock.bind_to_random_port(bind[:-2])}"
        else:
            self.sock.bind(bind)
        self.endpoint = bind
        self.stopping = False
        self.stop_waiters: list[tuple[list[bytes], Any]] = []

    def close(self) -> None:
        self.sock.close(0)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()

    def loads(self) -> list[HostLoad]:
        return [HostLoad(h.key, h.ranges, h.inflight, h.capacity) for h in self.hosts.values()]

    def reply(self, envelope, rid, status: str, header=None, arrays=None) -> None:
        from numabench.daemon import wire

        self.sock.send_multipart(envelope + wire.encode(
            wire.REPLY, {"id": rid, "status": status, **(header or {})}, arrays), copy=False)

    def step(self) -> None:
        import zmq

        if self.sock.poll(POLL_MS, zmq.POLLIN):
            for _ in range(256):  # a burst, then look at the replies
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.on_client(frames)
        if self.pending:
            done, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in done:
                self.on_done(ref, self.pending.pop(ref))

    def on_client(self, frames) -> None:
        from numabench.daemon import wire

        envelope, body = [frames[0].bytes], frames[1:]
        if len(body) > 1 and len(body[0]) == 0:  # a REQ client's delimiter
            envelope, body = [frames[0].bytes, b""], body[1:]
        try:
            head, arrays = wire.decode(body)
        except wire.ProtocolError as e:
            self.reply(envelope, None, wire.ERROR, {"reason": f"malformed message: {e}"})
            return
        rid, kind = head.get("id"), head["type"]
        if kind == wire.INFER:
            if self.stopping:
                return self.reply(envelope, rid, wire.ERROR, {"reason": "the front end is stopping"})
            ids = arrays.get("input_ids")
            seq = None if ids is None else int(ids.shape[-1])
            # Copy: the frames' memory is only valid as long as the message is.
            req = _Pending(envelope, rid, {k: head[k] for k in ("want", "texts") if k in head},
                           {k: v.copy() for k, v in arrays.items()}, seq, host="")
            self.dispatch(req)
        elif kind == wire.STATUS:
            self.reply(envelope, rid, wire.OK, {"daemon": self.status()})
        elif kind == wire.PING:
            self.reply(envelope, rid, wire.OK, {"pid": os.getpid(), "state": "serving"})
        elif kind == wire.STOP:
            self.stop_waiters.append((envelope, rid))
            self.stopping = True
        else:
            self.reply(envelope, rid, wire.ERROR, {"reason": f"{kind} is not supported by the cluster "
                                                             "front end (INFER, STATUS, PING, STOP)"})

    def dispatch(self, req: _Pending) -> None:
        from numabench.daemon import wire

        what, key = pick_host(self.loads(), req.seq, frozenset(req.tried))
        if what == "none":
            ranges = sorted({r for h in self.hosts.values() for r in h.ranges})
            reason = (f"no host serves {req.seq} tokens (hosts serve {', '.join(f'{a}-{b}' for a, b in ranges)})"
                      if self.hosts else "no host is left to serve")
            return self.reply(req.envelope, req.rid, wire.ERROR, {"reason": reason})
        if what == "busy":
            return self.reply(req.envelope, req.rid, wire.BUSY, {
                "reason": f"every host serving {req.seq or 'these'} tokens is busy "
                          f"({len(req.tried) or 'none'} tried)"})
        h = self.hosts[key]
        req.host = key
        req.tried.add(key)
        h.inflight += 1
        self.pending[h.actor.infer.remote(req.header, req.arrays)] = req

    def on_done(self, ref, req: _Pending) -> None:
        from numabench.daemon import wire

        h = self.hosts.get(req.host)
        if h is not None:
            h.inflight -= 1
        try:
            head, output = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:  # the host (or its actor) is gone
            self.remove(req.host, f"{type(e).__name__}")
            if req.retried:
                return self.reply(req.envelope, req.rid, wire.ERROR, {
                    "reason": "the hosts serving this request died twice"})
            req.retried = True
            return self.dispatch(req)
        except self.ray.exceptions.RayError as e:
            return self.reply(req.envelope, req.rid, wire.ERROR, {"reason": f"relay failed: {e}"})
        if head.get("status") == wire.BUSY:  # that host's pool is full: another may have room
            return self.dispatch(req)
        if h is not None and head.get("status") == wire.OK:
            h.served += 1
        head.update(host=h.info if h else {"node_id": req.host}, retried=req.retried or head.get("retried", False))
        self.reply(req.envelope, req.rid, head.pop("status", wire.ERROR), head,
                   {"output": output} if output is not None else None)

    def remove(self, key: str, why: str) -> None:
        h = self.hosts.pop(key, None)
        if h is not None:
            log.warning("host %s removed: %s", key[:8], why)
            self.removed.append({**h.info, "why": why})

    def status(self) -> dict[str, Any]:
        hosts = []
        for h in self.hosts.values():
            try:
                d = self.ray.get(h.actor.status.remote(), timeout=10)["daemon"]
            except self.ray.exceptions.RayError as e:
                d = {"state": f"unreachable ({type(e).__name__})"}
            hosts.append({"host": h.info, "inflight": h.inflight, "capacity": h.capacity,
                          "served": h.served, "ranges": [list(r) for r in h.ranges], "daemon": d})
        # Shaped like one daemon's status (so `numabench status` renders it), each pool and
        # instance prefixed with its host; the per-host documents are under "hosts".
        def tag(x: dict[str, Any], d: dict[str, Any], key: str) -> dict[str, Any]:
            return {**d, key: f"{x['host']['hostname']}/{x['host']['node_id'][:6]}:{d[key]}"}

        o = self.opts
        return {"pid": os.getpid(), "endpoint": self.endpoint, "front_end": "ray",
                "state": "stopping" if self.stopping else ("serving" if hosts else "failed"),
                "uptime_s": round(time.monotonic() - self.started, 1),
                "model": o.workload.model, "backend": o.workload.backend,
                "precision": o.workload.precision,
                "plan": {"file": self.plan_args.get("plan_file"), "name": None},
                "run_dir": f"(on each of {len(hosts)} hosts)", "metrics_port": None,
                "hosts": hosts, "removed": self.removed,
                "pools": [tag(x, p, "name") for x in hosts for p in x["daemon"].get("pools", [])],
                "instances": [tag(x, i, "pool") for x in hosts for i in x["daemon"].get("instances", [])]}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cluster_serve(address: str, hosts: int | None, plan_args: dict[str, Any], opts,
                      bind: str | None = None, on_ready=None) -> int:
    """Start a daemon on each of `hosts` hosts (default all), serve until STOP, Ctrl-C or
    SIGTERM; every host daemon is stopped before this returns. `on_ready(front_end)` is called
    once all hosts serve (tests, embedding)."""
    from numabench.cluster.connect import connect, host_count
    from numabench.daemon import endpoints, wire

    plan_file = plan_args.get("plan_file")
    plan_text = Path(plan_file).read_text() if plan_file else None
    bind = bind or endpoints.default_endpoint()
    endpoints.check_bind(bind, opts.allow_public_bind)
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    front = None
    try:
        with connect(address) as ray:
            have = host_count(ray)
            n = have if hosts is None else hosts
            if n < 1 or n > have:
                raise NumabenchError(f"--hosts {n}: the cluster has {have} host(s) advertising "
                                     f"{HOST_RESOURCE!r}; choose 1 to {have}")
            cls = ray.remote(num_cpus=0, resources={HOST_RESOURCE: 1}, max_restarts=0,
                             max_concurrency=ACTOR_THREADS)(HostDaemon)
            actors = [cls.remote(plan_args, plan_text, opts) for _ in range(n)]
            try:
                front = _start_front(ray, actors, bind, opts, plan_args)
                # The state file lets `numabench client/status/stop` find the front end, unless
                # a daemon of this user's already owns it (then they need --endpoint).
                other = endpoints.read_state()
                state = None if other and endpoints.pid_alive(other.get("pid")) else endpoints.write_state(
                    {"pid": os.getpid(), "endpoint": front.endpoint, "front_end": "ray", "hosts": n})
                log.info("front end listening on %s (numabench client/status/stop%s)", front.endpoint,
                         "" if state else f" with --endpoint {front.endpoint}")
                if on_ready:
                    on_ready(front)
                try:
                    while not (front.stopping and not front.pending):
                        front.step()
                finally:
                    if state is not None:
                        endpoints.remove_state(os.getpid(), state)
            finally:  # also on Ctrl-C: every host daemon drains and stops its workers
                _stop_all(ray, actors)
                for envelope, rid in (front.stop_waiters if front else ()):
                    front.reply(envelope, rid, wire.OK, {"pid": os.getpid()})
    except KeyboardInterrupt:
        log.info("interrupted: host daemons stopped")
    finally:
        if front is not None:
            front.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return 0


def _start_front(ray, actors, bind: str, opts, plan_args: dict[str, Any]) -> FrontEnd:
    try:
        ready = ray.get([a.wait_ready.remote(opts.ready_timeout_s) for a in actors])
    except ray.exceptions.RayTaskError as e:
        raise NumabenchError(f"a host daemon did not start: {str(e.cause) if e.cause else e}") from None
    except ray.exceptions.RayError as e:
        raise NumabenchError(f"a host daemon did not start: {type(e).__name__}: {e}") from None
    log.info("%d hosts serving: %s", len(ready),
             ", ".join(f"{r['host']['hostname']}/{r['host']['node_id'][:8]}" for r in ready))
    return FrontEnd(ray, [_Host(a, r["host"], tuple(tuple(x) for x in r["pools"]), max(r["capacity"], 1))
                          for a, r in zip(actors, ready)], bind, opts, plan_args)


def _stop_all(ray, actors) -> None:
    """Each host daemon drains and stops its workers; then the actors go."""
    refs = [a.stop.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=60)
    for a in actors:
        ray.kill(a)
