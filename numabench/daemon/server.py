"""`numabench serve`: the plan's instances kept warm, fed by client requests.

One thread, one event loop over two ROUTER sockets (zmq.Poller): the worker-facing one of the
launcher's Coordinator (workers' DEALERs connect to it, same protocol as `launch`) and a
client-facing one (docs/serve.md). Each instance has at most one dispatch in flight (a worker
computes one batch at a time); requests wait in a bounded queue per pool, and a full queue is
answered "busy" at once. Every request ends in exactly one REPLY: ok, busy or error.

Failures: a worker that exits is restarted with exponential backoff; its in-flight requests are
retried once on another instance of the pool, else answered with an error. An instance that
dies `degraded_after` times within `restart_window_s` marks its pool degraded; after
`max_restarts` deaths in the window it is given up ("failed").
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from numabench.daemon import endpoints, wire
from numabench.daemon.pools import PoolSpec, build_pools, least_loaded, route
from numabench.errors import NumabenchError
from numabench.launcher import binding, spawn
from numabench.launcher.coordinator import Coordinator, WorkerFailed
from numabench.launcher.procs import Exited, ProcessGroup
from numabench.plans.model import InstancePlan, Plan
from numabench.results import PERCENTILE_MIN_SAMPLES, percentile
from numabench.workers import protocol
from numabench.workers.config import WorkerConfig

log = logging.getLogger("numabench.serve")

WORKER_IDLE_TIMEOUT_S = 10 * 365 * 86400.0  # a warm worker may wait for requests indefinitely
CHECK_EVERY_S = 0.05  # process reaping and timers
LATENCY_WINDOW = 10_000  # per pool: percentiles over the latest requests
MAX_ID_CHARS = 200
MAX_TEXT_CHARS = 100_000

STARTING, READY, RESTARTING, FAILED, RETIRING, STOPPED, PENDING = (
    "starting", "ready", "restarting", "failed", "retiring", "stopped", "pending")


@dataclass(frozen=True)
class ServeOptions:
    model: str = "bert-base-cased"
    backend: str = "pytorch"
    precision: str = "fp32"
    seed: int = 0
    backend_options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1  # warm-up iterations per shape
    pad: str = "max"  # max | bucket (pools)
    bind: str | None = None  # default: ipc:// in the private runtime folder
    allow_public_bind: bool = False
    queue_size: int = 64  # per pool, waiting requests (not counting those in flight)
    max_batch: int = 1  # rows per dispatch; > 1 enables micro-batching
    max_wait_ms: float = 2.0  # micro-batching: how long the oldest request may wait for company
    max_rows: int = 64  # rows per request
    max_request_bytes: int = 64 << 20
    request_timeout_s: float = 120.0
    ready_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    grace_s: float = 5.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    restart_window_s: float = 60.0
    degraded_after: int = 3
    max_restarts: int = 8
    binder: str = "auto"
    allocator: str = "default"
    run_dir: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    path: str | None = None  # PATH for finding numactl / taskset


@dataclass(eq=False)
class Request:
    envelope: list[bytes]
    rid: Any
    want: str
    ids: np.ndarray  # (rows, seq) int64, unpadded
    mask: np.ndarray
    pool: str
    arrived_ns: int
    retried: bool = False
    avoid: int | None = None  # instance that died serving it

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq(self) -> int:
        return int(self.ids.shape[1])


@dataclass(eq=False)
class Dispatch:
    req: int
    instance: int
    requests: list[Request]
    target: int
    sent_ns: int


@dataclass(eq=False)
class Instance:
    plan: InstancePlan
    pool: str
    config: WorkerConfig
    state: str = STARTING
    pid: int | None = None
    inflight: Dispatch | None = None
    served: int = 0
    errors: int = 0
    restarts: int = 0
    deaths: deque = field(default_factory=deque)  # monotonic seconds
    restart_at: float = 0.0
    started_at: float = 0.0
    last_exit: str | None = None
    last_error: str | None = None
    busy_ns: int = 0
    ready_once: bool = False

    @property
    def id(self) -> int:
        return self.plan.id


@dataclass(eq=False)
class Pool:
    spec: PoolSpec
    queue: deque = field(default_factory=deque)
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    served: int = 0
    busy: int = 0
    errors: int = 0


def _describe_exit(instance: int, code: int) -> str:
    return Exited(instance, code).describe()


class Daemon:
    def __init__(self, plan: Plan, opts: ServeOptions, plan_file: str | None = None,
                 machine: Any = None):
        from numabench.workers.backends import check_backend
        from numabench.workers.models import resolve_model

        check_backend(opts.backend, opts.precision, opts.backend_options)
        self.spec = resolve_model(opts.model)
        for name, value, low in (("--queue-size", opts.queue_size, 0), ("--max-batch", opts.max_batch, 1),
                                 ("--max-rows", opts.max_rows, 1), ("--warmup", opts.warmup, 0)):
            if value < low:
                raise NumabenchError(f"{name} must be at least {low} (got {value})")
        self.opts = opts
        self.plan = plan
        self.plan_file = plan_file
        self.machine = machine
        self.max_positions = self.spec.max_positions
        self.vocab_size = self.spec.vocab_size
        self.pools: dict[str, Pool] = {}
        self.instances: dict[int, Instance] = {}
        self.pending_starts: list[Instance] = []
        self.retired: list[Instance] = []
        self.dispatches: dict[int, Dispatch] = {}
        self._next_req = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.stop_waiters: list[tuple[list[bytes], Any]] = []
        self.done = False
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.started_mono = time.monotonic()
        self.tokenizer: Any = None
        self.metrics: Any = None
        self.run_dir = Path(opts.run_dir or (Path("runs") / (
            f"serve-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")))
        self.endpoint = ""
        self.state_file: Path | None = None
        self.warnings: list[str] = []
        self._last_check = 0.0
        self._announced_ready = False
        self._pool_specs = build_pools(plan, self.max_positions, opts.pad)
        self.extra_options: dict[str, Any] | None = None  # from the backend's one-off preparation

    # --- setup -----------------------------------------------------------------------------

    def _make_instance(self, inst: InstancePlan, pool: PoolSpec) -> Instance:
        o = self.opts
        batches = sorted({1, o.max_batch})
        cfg = spawn.worker_config(
            inst, endpoint=self.coord.endpoint, model=o.model, backend=o.backend,
            precision=o.precision, seed=o.seed, pin_self=self.binder.name == "self",
            timeout_s=WORKER_IDLE_TIMEOUT_S,
            warmup_shapes=[(b, s) for s in pool.shapes for b in batches], warmup_iterations=o.warmup,
            options={**o.backend_options, **(self.extra_options or {})})
        return Instance(plan=inst, pool=pool.name, config=cfg)

    def _build(self, plan: Plan, specs: tuple[PoolSpec, ...]) -> dict[int, Instance]:
        by_id = {i.id: i for i in plan.instances}
        out = {}
        for spec in specs:
            for iid in spec.instances:
                out[iid] = self._make_instance(by_id[iid], spec)
        return out

    def _spawn(self, inst: Instance) -> None:
        started = spawn.start_instance(self.group, self.binder, inst.plan, inst.config, self.preload)
        for w in started.warnings:
            log.warning("%s", w)
        inst.pid = started.pid
        inst.state = STARTING
        inst.started_at = time.monotonic()
        log.info("instance %d: started pid %d (cpus %s, pool %s)", inst.id, started.pid,
                 list(inst.plan.cpus), inst.pool)

    def _check_existing(self, endpoint: str) -> bool:
        """True when this daemon should own the state file (no other live daemon does)."""
        doc = endpoints.read_state()
        if doc is None or not endpoints.pid_alive(doc.get("pid")) or doc.get("pid") == os.getpid():
            return True
        if doc.get("endpoint") == endpoint or self.opts.bind is None:
            raise NumabenchError(f"a daemon is already running (pid {doc.get('pid')}, "
                                 f"{doc.get('endpoint')}); stop it with `numabench stop` first")
        self.warnings.append(f"another daemon (pid {doc.get('pid')}) owns {endpoints.state_path()}: "
                             "clients need --endpoint to reach this one")
        return False

    def _open(self) -> None:
        o = self.opts
        endpoint = o.bind or endpoints.default_endpoint()
        self.warnings.extend(endpoints.check_bind(endpoint, o.allow_public_bind))
        own_state = self._check_existing(endpoint)
        self.binder, self.preload = binding.prepare_binding(self.plan, o.binder, o.allocator, o.path)
        self.warnings.extend(self.binder.warnings)
        # One ONNX export (or cache check) for all instances, before any worker starts.
        from numabench.workers.backends import prepare_backend

        prepared = prepare_backend(o.backend, self.spec, o.precision, o.backend_options, seed=o.seed,
                                   log=lambda msg: log.info("%s", msg))
        if prepared is not None:
            self.extra_options = prepared.options
            self.warnings.extend(prepared.warnings)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.group = ProcessGroup(self.run_dir)
        self.coord = Coordinator(self.group, "ipc")
        # A restarted worker reconnects with the same identity: let it take the old one over.
        self.coord.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.client = self.coord.ctx.socket(zmq.ROUTER)
        self.client.setsockopt(zmq.LINGER, 1000)
        self.client.setsockopt(zmq.MAXMSGSIZE, o.max_request_bytes)
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            port = self.client.bind_to_random_port(endpoint[:-2])
            endpoint = f"{endpoint[:-2]}:{port}"
        else:
            self.client.bind(endpoint)
        if endpoint.startswith("ipc://"):
            try:
                os.chmod(endpoint[len("ipc://"):], 0o600)
            except OSError:
                pass
        self.endpoint = endpoint
        self.poller = zmq.Poller()
        self.poller.register(self.coord.sock, zmq.POLLIN)
        self.poller.register(self.client, zmq.POLLIN)
        if self.spec.has_tokenizer:
            from numabench.workers.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.spec)
        if o.metrics_port is not None:
            from numabench.daemon.metrics import Metrics

            if not (o.metrics_host == "localhost" or endpoints.is_local_endpoint(
                    f"tcp://{o.metrics_host}:0")) and not o.allow_public_bind:
                raise NumabenchError(f"refusing to serve metrics on {o.metrics_host}: not a loopback "
                                     "address; pass --allow-public-bind to do it anyway")

            self.metrics = Metrics(o.metrics_port, o.metrics_host)
        if own_state:
            self.state_file = endpoints.write_state({
                "pid": os.getpid(), "endpoint": endpoint, "started": self.started.isoformat(),
                "plan": self.plan_file, "run_dir": str(self.run_dir.resolve()),
                "metrics_port": self.metrics.port if self.metrics else None})
        for w in self.warnings:
            log.warning("%s", w)
        self.pools = {s.name: Pool(s) for s in self._pool_specs}
        self.instances = self._build(self.plan, self._pool_specs)
        for inst in self.instances.values():
            self._spawn(inst)
        log.info("listening on %s; %d instances in %d pools (%s); logs in %s", endpoint,
                 len(self.instances), len(self.pools), ", ".join(self.pools), self.run_dir)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until STOP or SIGTERM/SIGINT; every worker is stopped before this returns."""
        old = {}
        if _main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            self._open()
            while not self.done:
                self._step()
        finally:
            self._close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            log.info("signal %d: draining, then stopping", signum)
            self._begin_stop()

    def _step(self) -> None:
        now = time.monotonic()
        for sock, _ in self.poller.poll(self._poll_timeout_ms(now)):
            handle = self._on_worker if sock is self.coord.sock else self._on_client
            for _ in range(1000):  # bounded: let the other socket and timers have a turn
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                handle(frames)
        now = time.monotonic()
        if now - self._last_check >= CHECK_EVERY_S:
            self._last_check = now
            self._check_processes()
            self._check_timers(now)
            if self.metrics:
                self.metrics.refresh(self)
        for pool in self.pools.values():
            self._pump(pool)
        if self.stopping:
            self._check_drained()

    def _poll_timeout_ms(self, now: float) -> int:
        timeout = CHECK_EVERY_S
        if self.opts.max_batch > 1:
            wait_ns = int(self.opts.max_wait_ms * 1e6)
            mono = time.monotonic_ns()
            for pool in self.pools.values():
                if pool.queue:
                    timeout = min(timeout, max(0.0, (pool.queue[0].arrived_ns + wait_ns - mono) / 1e9))
        return max(0, int(math.ceil(timeout * 1000)))

    # --- client messages -------------------------------------------------------------------

    def _reply(self, envelope: list[bytes], rid: Any, status: str, header: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None) -> None:
        head = {"id": rid, "status": status, **(header or {})}
        try:
            self.client.send_multipart(envelope + wire.encode(wire.REPLY, head, arrays), copy=False)
        except zmq.ZMQError as e:  # the client is gone: nothing to tell it
            log.debug("reply to a departed client dropped: %s", e)

    def _error(self, envelope: list[bytes], rid: Any, reason: str, **extra: Any) -> None:
        self._reply(envelope, rid, wire.ERROR, {"reason": reason, **extra})

    def _on_client(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        body = frames[1:]
        envelope = [ident]
        if len(body) > 1 and len(body[0]) == 0:  # a REQ client: keep its empty delimiter
            envelope, body = [ident, b""], body[1:]
        try:
            head, arrays = wire.decode(body)
        except wire.ProtocolError as e:
            self._error(envelope, None, f"malformed message: {e}")
            return
        rid = head.get("id")
        if not (rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool)
                                and len(str(rid)) <= MAX_ID_CHARS)):
            self._error(envelope, None, f"id must be a string or integer of at most {MAX_ID_CHARS} "
                                        "characters")
            return
        kind = head["type"]
        try:
            if kind == wire.INFER:
                self._on_infer(envelope, rid, head, arrays)
            elif kind == wire.STATUS:
                self._reply(envelope, rid, wire.OK, {"daemon": self.status()})
            elif kind == wire.PING:
                self._reply(envelope, rid, wire.OK, {"pid": os.getpid(), "state": self._state()})
            elif kind == wire.STOP:
                self.stop_waiters.append((envelope, rid))
                if not self.stopping:
                    log.info("STOP received: draining, then stopping")
                    self._begin_stop()
            elif kind == wire.RELOAD:
                self._reply(envelope, rid, wire.OK, self._reload(head.get("plan")))
            else:
                self._error(envelope, rid, f"a client sends {', '.join(sorted(wire.REQUESTS))}, "
                                           f"not {kind}")
        except NumabenchError as e:
            self._error(envelope, rid, str(e))

    def _on_infer(self, envelope: list[bytes], rid: Any, head: dict[str, Any],
                  arrays: dict[str, np.ndarray]) -> None:
        if self.stopping:
            self._error(envelope, rid, "the daemon is stopping")
            return
        want = head.get("want", "summary")
        if want not in wire.WANTS:
            raise NumabenchError(f"want must be one of {', '.join(wire.WANTS)}, got {want!r}")
        ids, mask = self._inputs(head, arrays)
        seq = int(ids.shape[1])
        spec = route([p.spec for p in self.pools.values()], seq)
        if spec is None:
            ranges = ", ".join(f"{p.spec.seq_min}-{p.spec.seq_max}" for p in self.pools.values())
            raise NumabenchError(f"no pool serves {seq} tokens (pools serve {ranges})")
        pool = self.pools[spec.name]
        if not self._pool_can_serve(pool):
            pool.errors += 1
            self._count("error", pool.spec.name)
            raise NumabenchError(f"pool {spec.name} is degraded: none of its instances is working")
        if len(pool.queue) >= self.opts.queue_size and not self._idle(pool):
            pool.busy += 1
            self._count("busy", pool.spec.name)
            self._reply(envelope, rid, wire.BUSY, {
                "reason": f"pool {spec.name} is full ({len(pool.queue)} requests waiting)",
                "pool": spec.name})
            return
        pool.queue.append(Request(envelope, rid, want, ids, mask, spec.name, time.monotonic_ns()))
        self._pump(pool)

    def _inputs(self, head: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
        """Validated (input_ids, attention_mask), int64 (rows, seq), from arrays or texts."""
        max_rows = self.opts.max_rows
        cap = self.max_positions
        texts = head.get("texts")
        if texts is not None:
            if arrays:
                raise NumabenchError("send either texts or input arrays, not both")
            if (not isinstance(texts, list) or not texts
                    or not all(isinstance(t, str) and len(t) <= MAX_TEXT_CHARS for t in texts)):
                raise NumabenchError(f"texts must be a non-empty list of strings of at most "
                                     f"{MAX_TEXT_CHARS} characters")
            if len(texts) > max_rows:
                raise NumabenchError(f"{len(texts)} texts exceed the limit of {max_rows} per request")
            if self.tokenizer is None:
                raise NumabenchError(f"model {self.opts.model!r} has no tokenizer; send input_ids")
            enc = self.tokenizer(texts, padding="longest", truncation=True,
                                 max_length=cap or 512, return_tensors="np")
            return (np.asarray(enc["input_ids"], dtype=np.int64),
                    np.asarray(enc["attention_mask"], dtype=np.int64))
        extra = sorted(set(arrays) - {"input_ids", "attention_mask"})
        if extra:
            raise NumabenchError(f"unexpected arrays {extra}; send input_ids[, attention_mask]")
        ids = arrays.get("input_ids")
        if ids is None:
            raise NumabenchError("INFER needs an input_ids array or texts")
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
            raise NumabenchError(f"input_ids must be a non-empty integer (rows, seq) array, got "
                                 f"{ids.dtype} {list(ids.shape)}")
        if ids.shape[0] > max_rows:
            raise NumabenchError(f"{ids.shape[0]} rows exceed the limit of {max_rows} per request")
        if cap is not None and ids.shape[1] > cap:
            raise NumabenchError(f"sequence length {ids.shape[1]} exceeds the model's {cap} positions")
        lo, hi = int(ids.min()), int(ids.max())
        vocab = self.vocab_size
        if lo < 0 or (vocab is not None and hi >= vocab):
            raise NumabenchError(f"token ids span [{lo}, {hi}], outside the vocabulary "
                                 f"[0, {vocab if vocab is not None else '?'})")
        mask = arrays.get("attention_mask")
        if mask is None:
            mask = np.ones(ids.shape, dtype=np.int64)
        else:
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != ids.shape or mask.dtype.kind not in "iub":
                raise NumabenchError(f"attention_mask must be integers shaped like input_ids "
                                     f"{list(ids.shape)}, got {mask.dtype} {list(mask.shape)}")
        return ids.astype(np.int64), mask.astype(np.int64)

    # --- dispatch --------------------------------------------------------------------------

    def _idle(self, pool: Pool) -> list[Instance]:
        return [self.instances[i] for i in pool.spec.instances
                if i in self.instances and self.instances[i].state == READY
                and self.instances[i].inflight is None]

    def _pool_can_serve(self, pool: Pool) -> bool:
        return any(self.instances[i].state in (STARTING, READY, RESTARTING, PENDING)
                   for i in pool.spec.instances if i in self.instances)

    def _take(self, pool: Pool) -> list[Request] | None:
        """The next dispatch's requests, or None to wait for a fuller micro-batch."""
        max_batch = self.opts.max_batch
        if max_batch <= 1:
            return [pool.queue.popleft()]
        taken, rows, full = [], 0, False
        for r in pool.queue:
            if taken and rows + r.rows > max_batch:
                full = True
                break
            taken.append(r)
            rows += r.rows
        full = full or rows >= max_batch
        waited_ns = time.monotonic_ns() - pool.queue[0].arrived_ns
        if not full and waited_ns < self.opts.max_wait_ms * 1e6 and not self.stopping:
            return None
        for _ in taken:
            pool.queue.popleft()
        return taken

    def _pump(self, pool: Pool) -> None:
        while pool.queue:
            idle = self._idle(pool)
            if not idle:
                return
            batch = self._take(pool)
            if batch is None:
                return
            avoid = {r.avoid for r in batch}
            preferred = [i for i in idle if i.id not in avoid] or idle
            iid = least_loaded([(i.id, 0, i.served) for i in preferred])
            self._send(self.instances[iid], pool, batch)

    def _send(self, inst: Instance, pool: Pool, batch: list[Request]) -> None:
        target = pool.spec.pad_to(max(r.seq for r in batch))
        rows = sum(r.rows for r in batch)
        # Pad with token 0 and attention_mask 0: padded positions are ignored by attention.
        ids = np.zeros((rows, target), dtype=np.int64)
        mask = np.zeros((rows, target), dtype=np.int64)
        row = 0
        for r in batch:
            ids[row:row + r.rows, :r.seq] = r.ids
            mask[row:row + r.rows, :r.seq] = r.mask
            row += r.rows
        self._next_req += 1
        d = Dispatch(self._next_req, inst.id, batch, target, time.monotonic_ns())
        try:
            self.coord.send(inst.id, protocol.RUN, {"req": d.req, "want": "outputs"},
                            {"input_ids": ids, "attention_mask": mask})
        except WorkerFailed as e:
            log.warning("%s", e)
            for r in reversed(batch):
                pool.queue.appendleft(r)
            # Usually the worker has just died and its exit is not reaped yet: name the real cause.
            proc = self.group.procs.get(inst.id)
            try:
                code = proc.wait(timeout=0.5) if proc is not None else None
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                self._on_exit(inst, _describe_exit(inst.id, code))
            else:
                self._kill(inst, "unreachable")
            return
        inst.inflight = d
        self.dispatches[d.req] = d

    # --- worker messages -------------------------------------------------------------------

    def _on_worker(self, frames: list[Any]) -> None:
        try:
            iid = int(frames[0].bytes.decode())
            head, arrays = protocol.decode(frames[1:])
        except (ValueError, UnicodeDecodeError, protocol.ProtocolError) as e:
            log.warning("malformed message from a worker: %s", e)
            return
        # A retiring instance keeps its identity until it exits; its successor waits (pending).
        inst = next((r for r in self.retired if r.id == iid and r.state == RETIRING), None)
        inst = inst or self.instances.get(iid)
        if inst is None:
            return
        kind = head["type"]
        if kind == protocol.HELLO:
            inst.pid = head.get("pid", inst.pid)
        elif kind == protocol.READY:
            if inst.state == STARTING:
                inst.state = READY
                inst.ready_once = True
                info = head.get("model_info") or {}
                self.vocab_size = info.get("vocab_size") or self.vocab_size
                log.info("instance %d ready (pid %s, affinity %s)", iid, head.get("pid"),
                         head.get("affinity"))
                self._announce_ready()
        elif kind == protocol.RESULT:
            d = inst.inflight
            if d is None or head.get("req") != d.req:
                return
            self._finish(inst, d)
            self._complete(inst, d, head, arrays)
        elif kind == protocol.ERROR:
            if head.get("fatal", True):
                inst.last_error = str(head.get("message"))[:500]
                log.error("instance %d: fatal error: %s", iid, inst.last_error)
                return  # the worker exits; _check_processes restarts it
            d = inst.inflight
            if d is not None and head.get("req") == d.req:
                self._finish(inst, d)
                inst.errors += 1
                for r in d.requests:
                    self._fail(r, f"instance {iid}: {head.get('message')}")
        elif kind == protocol.BYE:
            if inst.state == RETIRING:
                inst.state = STOPPED

    def _finish(self, inst: Instance, d: Dispatch) -> None:
        inst.inflight = None
        inst.busy_ns += time.monotonic_ns() - d.sent_ns
        self.dispatches.pop(d.req, None)
        if inst.state == RETIRING:
            self._send_stop(inst)

    def _complete(self, inst: Instance, d: Dispatch, head: dict[str, Any],
                  arrays: dict[str, np.ndarray]) -> None:
        out = arrays.get("output")
        if out is None or out.shape[0] != sum(r.rows for r in d.requests):
            for r in d.requests:
                self._fail(r, f"instance {inst.id} sent no usable output")
            return
        now = time.monotonic_ns()
        row = 0
        for r in d.requests:
            part = np.ascontiguousarray(out[row:row + r.rows, :r.seq])
            row += r.rows
            checksum = float(part.sum(dtype=np.float64))
            abs_sum = float(np.abs(part).sum(dtype=np.float64))
            header = {
                "instance": inst.id, "pool": r.pool, "seq": r.seq, "rows": r.rows,
                "padded_seq": d.target, "dispatch_rows": int(out.shape[0]),
                "queue_ns": d.sent_ns - r.arrived_ns, "compute_ns": int(head.get("compute_ns", 0)),
                "total_ns": now - r.arrived_ns, "retried": r.retried,
                "output": {"shape": list(part.shape), "dtype": protocol.dtype_name(part.dtype),
                           "checksum": checksum if math.isfinite(checksum) else None,
                           "abs_sum": abs_sum if math.isfinite(abs_sum) else None},
            }
            self._reply(r.envelope, r.rid, wire.OK, header,
                        {"output": part} if r.want == "outputs" else None)
            inst.served += 1
            pool = self.pools.get(r.pool)
            if pool is not None:
                pool.served += 1
                pool.latencies.append(now - r.arrived_ns)
            self._count("ok", r.pool, (now - r.arrived_ns) / 1e9)

    def _fail(self, r: Request, reason: str) -> None:
        pool = self.pools.get(r.pool)
        if pool is not None:
            pool.errors += 1
        self._count("error", r.pool)
        self._error(r.envelope, r.rid, reason, pool=r.pool)

    def _count(self, status: str, pool: str, latency_s: float | None = None) -> None:
        if self.metrics:
            self.metrics.request(pool, status, latency_s)

    # --- failures --------------------------------------------------------------------------

    def _check_processes(self) -> None:
        for inst in list(self.instances.values()) + self.retired:
            if inst.state not in (STARTING, READY, RETIRING):
                continue
            proc = self.group.procs.get(inst.id)
            if proc is not None and proc.poll() is not None:
                self._on_exit(inst, _describe_exit(inst.id, proc.returncode))

    def _on_exit(self, inst: Instance, how: str) -> None:
        inst.last_exit = how
        d = inst.inflight
        inst.inflight = None
        if d is not None:
            self.dispatches.pop(d.req, None)
        if inst.state == RETIRING or self.stopping or any(r is inst for r in self.retired):
            inst.state = STOPPED
            if d is not None:
                for r in d.requests:
                    self._retry_or_fail(r, inst, how)
            return
        now = time.monotonic()
        inst.deaths.append(now)
        while inst.deaths and now - inst.deaths[0] > self.opts.restart_window_s:
            inst.deaths.popleft()
        n = len(inst.deaths)
        if n >= self.opts.max_restarts:
            inst.state = FAILED
            log.error("instance %d %s; it died %d times in %.0f s: giving up (pool %s degraded)",
                      inst.id, how, n, self.opts.restart_window_s, inst.pool)
        else:
            inst.state = RESTARTING
            backoff = min(self.opts.restart_backoff_s * 2 ** (n - 1), self.opts.restart_backoff_max_s)
            inst.restart_at = now + backoff
            log.warning("instance %d %s; restarting in %.1f s (see %s)", inst.id, how, backoff,
                        self.group.log_path(inst.id))
        if d is not None:
            for r in d.requests:
                self._retry_or_fail(r, inst, how)
        pool = self.pools.get(inst.pool)
        if pool is not None and not self._pool_can_serve(pool):
            while pool.queue:
                self._fail(pool.queue.popleft(), f"pool {pool.spec.name} is degraded: none of its "
                                                 "instances is working")

    def _retry_or_fail(self, r: Request, inst: Instance, how: str) -> None:
        pool = self.pools.get(r.pool)
        others = pool is not None and any(
            i != inst.id and i in self.instances and self.instances[i].state in (STARTING, READY)
            for i in pool.spec.instances)
        if pool is not None and not r.retried and others and not self.stopping:
            r.retried, r.avoid = True, inst.id
            pool.queue.appendleft(r)
        else:
            self._fail(r, f"instance {inst.id} {how} while serving this request")

    def _kill(self, inst: Instance, why: str) -> None:
        log.warning("instance %d: %s; killing it", inst.id, why)
        proc = self.group.procs.get(inst.id)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None and proc.poll() is not None:
            self._on_exit(inst, f"was killed ({why})")

    def _check_timers(self, now: float) -> None:
        timeout_ns = int(self.opts.request_timeout_s * 1e9)
        mono = time.monotonic_ns()
        for inst in list(self.instances.values()):
            if inst.state == RESTARTING and now >= inst.restart_at and not self.stopping:
                inst.restarts += 1
                self._spawn(inst)
            elif inst.state == STARTING and now - inst.started_at > self.opts.ready_timeout_s:
                self._kill(inst, f"not ready after {self.opts.ready_timeout_s:.0f} s")
            elif inst.inflight is not None and mono - inst.inflight.sent_ns > timeout_ns:
                self._kill(inst, f"no reply within {self.opts.request_timeout_s:.0f} s")
        for pool in self.pools.values():
            while pool.queue and mono - pool.queue[0].arrived_ns > timeout_ns:
                self._fail(pool.queue.popleft(), f"not served within {self.opts.request_timeout_s:.0f} "
                                                 "s (the pool's instances are not ready)")
        if self.pending_starts and not any(r.state == RETIRING for r in self.retired):
            for inst in self.pending_starts:
                self._spawn(inst)
            self.pending_starts = []

    def _announce_ready(self) -> None:
        if not self._announced_ready and all(i.state == READY for i in self.instances.values()):
            self._announced_ready = True
            log.info("all %d instances ready; serving on %s", len(self.instances), self.endpoint)

    # --- reload ----------------------------------------------------------------------------

    def _reload(self, plan_path: Any) -> dict[str, Any]:
        from numabench.plans import load_plan, validate_plan

        path = plan_path or self.plan_file
        if not isinstance(path, str) or not path:
            raise NumabenchError("reload needs a plan file: this daemon was started without "
                                 "--plan; give one")
        if self.stopping:
            raise NumabenchError("the daemon is stopping")
        if self.pending_starts or any(r.state == RETIRING for r in self.retired):
            raise NumabenchError("a reload is still in progress; try again when it is done")
        plan = load_plan(Path(path))
        if self.machine is not None:
            validate_plan(plan, self.machine)
        specs = build_pools(plan, self.max_positions, self.opts.pad)
        fresh = self._build(plan, specs)
        kept, stopped, started = [], [], []
        for iid, inst in list(self.instances.items()):
            new = fresh.get(iid)
            if new is not None and new.config == inst.config and inst.state != FAILED:
                inst.pool = new.pool
                fresh[iid] = inst
                kept.append(iid)
                continue
            stopped.append(iid)
            if inst.state in (STARTING, READY):
                inst.state = RETIRING
                self.retired.append(inst)
                if inst.inflight is None:
                    self._send_stop(inst)
            else:
                inst.state = STOPPED
        for iid, inst in fresh.items():
            if iid not in kept:
                inst.state = PENDING
                self.pending_starts.append(inst)
                started.append(iid)
        self.instances = fresh
        old_pools = self.pools
        self.pools = {s.name: old_pools.get(s.name, Pool(s)) for s in specs}
        for s in specs:
            self.pools[s.name].spec = s
        # Requests still waiting go to the new pool of their length (or get an error).
        for pool in old_pools.values():
            while pool.queue:
                r = pool.queue.popleft()
                spec = route(specs, r.seq)
                if spec is None:
                    self._fail(r, f"no pool serves {r.seq} tokens after the reload")
                else:
                    r.pool = spec.name
                    self.pools[spec.name].queue.append(r)
        self.plan, self.plan_file = plan, path
        self._announced_ready = False
        log.info("reloaded %s: kept %s, stopping %s, starting %s", path, kept, stopped, started)
        return {"plan": path, "kept": kept, "stopped": stopped, "started": started,
                "pools": list(self.pools)}

    def _send_stop(self, inst: Instance) -> None:
        try:
            self.coord.send(inst.id, protocol.STOP)
        except WorkerFailed:
            pass  # already gone: the exit check marks it stopped

    # --- stop ------------------------------------------------------------------------------

    def _begin_stop(self) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.opts.drain_timeout_s

    def _check_drained(self) -> None:
        # Waiting requests of a pool with nothing ready to serve them will not be served.
        busy = any(i.inflight for i in list(self.instances.values()) + self.retired)
        waiting = any(pool.queue and any(
            self.instances[i].state in (STARTING, READY) for i in pool.spec.instances
            if i in self.instances) for pool in self.pools.values())
        if (busy or waiting) and time.monotonic() < self.stop_deadline:
            return
        for pool in self.pools.values():
            while pool.queue:
                self._fail(pool.queue.popleft(), "the daemon stopped before serving this request")
        for inst in list(self.instances.values()) + self.retired:
            if inst.inflight is not None:
                for r in inst.inflight.requests:
                    self._fail(r, "the daemon stopped before this request finished")
                inst.inflight = None
        self.done = True

    def _close(self) -> None:
        """Stop every worker (STOP, then signals), answer STOP callers, release everything."""
        group = getattr(self, "group", None)
        coord = getattr(self, "coord", None)
        try:
            if coord is not None and group is not None:
                live = [i for i in group.alive()]
                coord.stop_workers(live, timeout_s=self.opts.grace_s)
                group.wait_all(self.opts.grace_s)
        finally:
            if group is not None:
                group.stop(self.opts.grace_s)
            for envelope, rid in self.stop_waiters:
                self._reply(envelope, rid, wire.OK, {"stopped": True, "pid": os.getpid()})
            if self.metrics:
                self.metrics.close()
            if self.state_file is not None:
                endpoints.remove_state(os.getpid(), self.state_file)
            if getattr(self, "client", None) is not None:
                self.client.close(linger=1000)
            if coord is not None:
                coord.close()
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except OSError:
                    pass
            log.info("stopped; no worker left")

    # --- status ----------------------------------------------------------------------------

    def _state(self) -> str:
        if self.stopping:
            return "stopping"
        if self.instances and all(i.state == READY for i in self.instances.values()):
            return "serving"
        return "starting" if not any(i.ready_once for i in self.instances.values()) else "degraded"

    def _degraded(self, pool: Pool) -> bool:
        now = time.monotonic()
        for iid in pool.spec.instances:
            inst = self.instances.get(iid)
            if inst is None:
                continue
            recent = sum(1 for t in inst.deaths if now - t <= self.opts.restart_window_s)
            if inst.state == FAILED or recent >= self.opts.degraded_after:
                return True
        return False

    def status(self) -> dict[str, Any]:
        pools = []
        for pool in self.pools.values():
            lat = sorted(pool.latencies)
            pct = {f"p{q}": (round(percentile(lat, q) / 1e6, 3) if len(lat) >= n and lat else None)
                   for q, n in PERCENTILE_MIN_SAMPLES.items()}
            pools.append({
                "name": pool.spec.name, "seq_min": pool.spec.seq_min, "seq_max": pool.spec.seq_max,
                "shapes": list(pool.spec.shapes), "instances": list(pool.spec.instances),
                "queued": len(pool.queue), "queue_limit": self.opts.queue_size,
                "served": pool.served, "busy": pool.busy, "errors": pool.errors,
                "degraded": self._degraded(pool),
                "latency_ms": {"count": len(lat), **pct},
            })
        instances = []
        for inst in sorted(self.instances.values(), key=lambda i: i.id):
            instances.append({
                "id": inst.id, "pool": inst.pool, "state": inst.state, "pid": inst.pid,
                "cpus": list(inst.plan.cpus), "memory_nodes": list(inst.plan.memory_nodes),
                "threads": inst.plan.threads, "load": 1 if inst.inflight else 0,
                "served": inst.served, "errors": inst.errors, "restarts": inst.restarts,
                "busy_s": round(inst.busy_ns / 1e9, 3), "last_exit": inst.last_exit,
                "last_error": inst.last_error,
            })
        o = self.opts
        return {
            "pid": os.getpid(), "endpoint": self.endpoint, "state": self._state(),
            "started": self.started.isoformat(timespec="seconds"),
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "plan": {"file": self.plan_file, "name": self.plan.name},
            "model": o.model, "backend": o.backend, "precision": o.precision,
            "options": {"queue_size": o.queue_size, "max_batch": o.max_batch,
                        "max_wait_ms": o.max_wait_ms, "pad": o.pad, "max_rows": o.max_rows},
            "run_dir": str(self.run_dir),
            "metrics_port": self.metrics.port if self.metrics else None,
            "pools": pools, "instances": instances,
        }


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def serve(plan: Plan, opts: ServeOptions, plan_file: str | None = None, machine: Any = None) -> int:
    return Daemon(plan, opts, plan_file, machine).run()
