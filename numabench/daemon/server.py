"""`numabench serve`: the plan's instances kept warm, fed by client requests. The event loop.

One thread polls two ROUTER sockets: the worker-facing one of the launcher's Coordinator (same
protocol as `launch`) and the client-facing one (docs/serve.md). The parts it drives are pure and
live apart: client commands and the one guard around them (commands.py), request checks
(workers/requests.py), queues and credit-based dispatch (scheduler.py), the restart policy and
instance states (supervisor.py), the reload diff (reload.py), the records it keeps
(instances.py) and the status facts (status.py).

Every client message gets exactly one reply, and nothing a client sends can end the daemon:
`commands.handle` is the one place a message is handled, and any exception there becomes an
error reply to that client. Memory per client is bounded: a whole message is limited (not per frame),
and replies a client does not read are dropped beyond a send high-water mark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import logging
import math
import os
import shutil
import signal
import stat
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from numabench.daemon import auth, commands, endpoints, wire
from numabench.daemon.commands import Rejected, short
from numabench.daemon.instances import Dispatch, Instance, Pool, Rollout
from numabench.daemon.pools import SERVE_WARMUP, PoolSpec, build_pools, route
from numabench.daemon.reload import (
    DONE,
    NEXT,
    RETIRE,
    RETIRE_REMOVED,
    START,
    RolloutView,
    diff,
    next_step,
)
from numabench.daemon.scheduler import Candidate, Request, Scheduler
from numabench.daemon.status import DaemonStatus, InstanceStatus, PoolStatus
from numabench.daemon.supervisor import DeathRecord, InstanceState, RestartPolicy
from numabench.errors import NumabenchError
from numabench.launcher import binding, spawn
from numabench.launcher.coordinator import Coordinator, WorkerFailed
from numabench.launcher.options import Workload
from numabench.launcher.procs import ProcessGroup
from numabench.plans.model import InstancePlan, Plan
from numabench.workers import protocol
from numabench.workers.backends.shared_weights import nodes_label

log = logging.getLogger("numabench.serve")

S = InstanceState
WORKER_IDLE_TIMEOUT_S = 10 * 365 * 86400.0  # a warm worker may wait for requests indefinitely
CHECK_EVERY_S = 0.05  # process reaping and timers
METRICS_EVERY_S = 0.5
MAX_FRAMES = 8  # identity, REQ delimiter, header, input_ids, attention_mask, and some slack
MAX_PLAN_BYTES = 1 << 20
BATCH_PER_SOCKET = 1000  # messages read per socket per turn: let the other one and timers in
SUCCESSOR_KEY_STEP = 1_000_000  # worker keys of successors started beside their predecessors


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # STOP received: no new work, queued and in-flight work finishes
    CLOSING = "closing"    # workers asked to stop; clients still answered ("stopping")
    DONE = "done"


@dataclass(frozen=True)
class ServeOptions:
    # What each instance runs: the launcher's Workload (model, backend, precision, seed, backend
    # options, warm-up per shape, weight sharing); its seq/mode/iterations do not apply to serve.
    workload: Workload = field(default_factory=lambda: Workload(warmup=SERVE_WARMUP))
    pad: str = "max"  # max | bucket (pools)
    bind: str | None = None  # default: ipc:// in the private runtime folder
    allow_public_bind: bool = False
    queue_size: int = 64  # per pool, waiting requests (not counting those in flight)
    max_batch: int = 1  # rows per dispatch; > 1 enables micro-batching
    max_wait_ms: float = 2.0  # micro-batching: how long the oldest request may wait for company
    inflight: int = 2  # dispatches sent and unanswered per instance (credits)
    max_rows: int = 64  # rows per request
    max_request_bytes: int = 64 << 20  # a whole client message (all its frames)
    send_hwm: int = 64  # replies queued per client before further ones are dropped
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
    start: str = "fork"  # workers forked from a fork server per NUMA node (launcher/spawn.py)
    run_dir: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    path: str | None = None  # PATH for finding numactl / taskset
    pin_loop: bool = True  # run the event loop on CPUs the plan leaves free, where there are any
    weights_dir: str | None = None  # the per-node shared weights copies (default /dev/shm/...)
    weights_cache_dir: str | None = None  # the weights cache on disk (default ~/.cache/...)

    def policy(self) -> RestartPolicy:
        return RestartPolicy(int(self.restart_backoff_s * 1000), int(self.restart_backoff_max_s * 1000),
                             int(self.restart_window_s * 1000), self.degraded_after, self.max_restarts)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


FAULT_LOG_EVERY_S = 5.0  # a fault that repeats every turn is logged with its traceback this often


class Outcome:
    """What one guarded callback did: `failed` is set when it raised."""

    failed = False


class Daemon:
    def __init__(self, plan: Plan, opts: ServeOptions, plan_file: str | None = None,
                 machine: Any = None):
        from numabench.workers.backends import check_backend
        from numabench.workers.models import resolve_model

        w = opts.workload
        check_backend(w.backend, w.precision, w.backend_options)
        self.spec = resolve_model(w.model)
        for name, value, low in (("--queue-size", opts.queue_size, 0), ("--max-batch", opts.max_batch, 1),
                                 ("--max-rows", opts.max_rows, 1), ("--warmup", w.warmup, 0),
                                 ("--inflight", opts.inflight, 1), ("send_hwm", opts.send_hwm, 1)):
            if value < low:
                raise NumabenchError(f"{name} must be at least {low} (got {value})")
        spawn.check_start(opts.start)
        self.opts = opts
        self.policy = opts.policy()
        self.plan = plan
        self.plan_file = plan_file
        self.machine = machine
        self.max_positions = self.spec.max_positions
        self.vocab_size = self.spec.vocab_size
        self.pools: dict[str, Pool] = {}
        self.instances: dict[int, Instance] = {}  # the current plan's, by id
        self.others: list[Instance] = []  # replaced or removed by a reload, until they exit
        self.rollout: Rollout | None = None
        self.sched = Scheduler(opts.queue_size, opts.max_batch, int(opts.max_wait_ms * 1e6),
                               opts.inflight)
        self._next_req = 0
        self.phase = Phase.SERVING
        self.deadline = 0.0
        self.stop_waiters: list[tuple[list[bytes], Any]] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.started_mono = time.monotonic()
        self.tokenizer: Any = None
        self.metrics: Any = None
        self.run_dir = Path(opts.run_dir or (Path("runs") / (
            f"serve-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")))
        self.endpoint = ""
        self.state_file: Path | None = None
        self.warnings: list[str] = []
        self.replies: Counter = Counter()  # by status, since start (any message type)
        self.rejected: Counter = Counter()  # by reason, since start
        self.faults: Counter = Counter()  # exceptions the guard caught, by where, since start
        self._fault_logged: dict[str, float] = {}
        self.loop_cpus: tuple[int, ...] | None = None
        self._spawn_cpus: set[int] | None = None
        self._last_check = 0.0
        self._last_metrics = 0.0
        self._announced_ready = False
        self._pool_specs = build_pools(plan, self.max_positions, opts.pad)
        self.prepared: Any = None  # backends.Preparation: the ONNX file, the weights copies
        self.group: ProcessGroup | None = None
        self.coord: Coordinator | None = None
        self.ctx: zmq.Context | None = None
        self.client: zmq.Socket | None = None
        self.authenticator: Any = None
        self.worker_dir: Path | None = None
        self.fork: spawn.ForkPlan | None = None  # None: exec'd workers

    # --- setup -----------------------------------------------------------------------------

    def _make_instance(self, inst: InstancePlan, pool: PoolSpec) -> Instance:
        w = self.opts.workload
        batches = sorted({1, self.opts.max_batch})
        cfg = spawn.worker_config(
            inst, endpoint=self.coord.endpoint, model=w.model, backend=w.backend,
            precision=w.precision, seed=w.seed, pin_self=self.binder.name == "self",
            timeout_s=WORKER_IDLE_TIMEOUT_S,
            warmup_shapes=[(b, s) for s in pool.shapes for b in batches], warmup_iterations=w.warmup,
            options={**w.backend_options,
                     **(self.prepared.options_for(inst.memory_nodes) if self.prepared else {})})
        return Instance(plan=inst, pool=pool.name, config=cfg, deaths=DeathRecord(self.policy))

    def _build(self, plan: Plan, specs: tuple[PoolSpec, ...]) -> dict[int, Instance]:
        self._prepare_backend(plan)
        by_id = {i.id: i for i in plan.instances}
        return {iid: self._make_instance(by_id[iid], spec) for spec in specs for iid in spec.instances}

    def _prepare_backend(self, plan: Plan) -> None:
        """The launcher's once-per-run preparation, for the plan's memory nodes not prepared yet:
        the ONNX export (or cache check) at start; with shared weights (PyTorch), one read-only
        copy of the weights per NUMA node, written at start and for the nodes a reload adds."""
        from numabench.workers.backends import prepare_backend

        w, o = self.opts.workload, self.opts
        wanted = {tuple(sorted(i.memory_nodes)) for i in plan.instances}
        if self.prepared is not None and (not self.prepared.node_options
                                          or wanted <= set(self.prepared.node_options)):
            return  # prepared once (ONNX), or every node already has its copy
        have = set(self.prepared.node_options) if self.prepared is not None else set()
        # At start, a missing weights file is written by a child of the first instance's fork
        # server, so the daemon never imports torch (seconds, and ~130 MB it would keep).
        builder = (spawn.weights_builder(self.group, self.binder, plan.instances[0], self.fork, self.preload)
                   if self.fork is not None and self.fork.new_servers and self.group is not None
                   and w.backend == "pytorch" else None)
        prepared = prepare_backend(
            w.backend, self.spec, w.precision, w.backend_options, seed=w.seed,
            log=lambda msg: log.info("%s", msg), share_weights=w.share_weights,
            node_sets=tuple(sorted(wanted - have)), weights_dir=o.weights_dir,
            weights_cache_dir=o.weights_cache_dir, weights_builder=builder)
        if prepared is None:
            return
        if self.prepared is None:
            self.prepared = prepared
            self.warnings.extend(prepared.warnings)
        else:  # a reload's new nodes: their copies join the ones already made
            self.prepared = dataclasses.replace(
                self.prepared, node_options={**self.prepared.node_options, **prepared.node_options},
                temporary=self.prepared.temporary + prepared.temporary)

    def _release_unused_weights(self) -> None:
        """After a reload: remove the weights copies of nodes no instance uses any more."""
        from numabench.workers.backends import Preparation, release_preparation

        p = self.prepared
        if p is None or not p.temporary:
            return
        used = {tuple(sorted(i.plan.memory_nodes)) for i in self.instances.values()}
        gone = {n for n in p.node_options if n not in used}
        paths = tuple(t for t in p.temporary
                      if any(p.node_options[n].get("weights_path") == t for n in gone))
        if not paths:
            return
        release_preparation(Preparation({}, {}, [], temporary=paths))
        self.prepared = dataclasses.replace(
            p, node_options={n: v for n, v in p.node_options.items() if n not in gone},
            temporary=tuple(t for t in p.temporary if t not in paths))
        log.info("removed the weights copies no instance uses any more: %s", ", ".join(paths))

    def _worker_key(self, inst: Instance) -> int:
        """Its id, unless another live process holds that key (a predecessor still serving):
        then the first free id + n * SUCCESSOR_KEY_STEP (instance-1000003.log for id 3)."""
        held = {i.key for i in self._all() if i is not inst and i.state.alive}
        key = inst.id
        while key in held:
            key += SUCCESSOR_KEY_STEP
        return key

    def _spawn(self, inst: Instance) -> None:
        inst.key = self._worker_key(inst)
        plan, config = inst.plan, inst.config
        if inst.key != inst.id:
            plan = dataclasses.replace(plan, id=inst.key)
            config = dataclasses.replace(config, instance=inst.key)
        # Workers start from the full CPU set (their binder narrows it): numactl checks -C
        # against the affinity it inherits, which must not be the loop's few free CPUs.
        if self._spawn_cpus:
            os.sched_setaffinity(0, self._spawn_cpus)
        try:
            started = spawn.start_instance(self.group, self.binder, plan, config, self.preload, fork=self.fork)
        finally:
            if self._spawn_cpus and self.loop_cpus:
                os.sched_setaffinity(0, self.loop_cpus)
        for w in started.warnings:
            log.warning("%s", w)
        if started.fork_error is not None:
            log.warning("%s; workers are started as fresh processes instead", started.fork_error)
            self.fork = None
        inst.pid = started.pid
        inst.state = S.STARTING
        inst.started_at = time.monotonic()
        log.info("instance %d: started pid %d (cpus %s, pool %s%s%s)", inst.id, started.pid,
                 list(inst.plan.cpus), inst.pool,
                 f", forked by fork server {started.forked_by}" if started.forked_by else "",
                 f", beside its predecessor: log {self.group.log_path(inst.key)}"
                 if inst.key != inst.id else "")

    def _check_existing(self, endpoint: str) -> bool:
        """True when this daemon should own the state file (no other live daemon does)."""
        doc = endpoints.read_state()
        if doc is None or doc.get("pid") == os.getpid() or not endpoints.is_our_daemon(doc):
            return True  # none, or stale: its pid is gone or now belongs to another process
        if not _answers(doc.get("endpoint")):
            self.warnings.append(f"the daemon in {endpoints.state_path()} (pid {doc.get('pid')}) "
                                 "does not answer on its endpoint; taking its place")
            return True
        if doc.get("endpoint") == endpoint or self.opts.bind is None:
            raise NumabenchError(f"a daemon is already running (pid {doc.get('pid')}, "
                                 f"{doc.get('endpoint')}); stop it with `numabench stop` first")
        self.warnings.append(f"another daemon (pid {doc.get('pid')}) owns {endpoints.state_path()}: "
                             "clients need --endpoint to reach this one")
        return False

    def _pin_loop(self) -> None:
        """Run the loop (and the ZeroMQ threads created after this) on the CPUs no instance uses."""
        if not self.opts.pin_loop:
            return
        usable = set(os.sched_getaffinity(0))
        taken = {c for i in self.plan.instances for c in i.cpus}
        free = usable - taken
        if free and taken & usable:
            self._spawn_cpus = usable
            self.loop_cpus = tuple(sorted(free))
            os.sched_setaffinity(0, free)
            log.info("event loop on CPUs %s (left free by the plan)", list(self.loop_cpus))

    def _worker_ipc_dir(self, runtime: Path) -> Path | None:
        """The workers' socket folder inside the private runtime folder, so a `kill -9` leaves
        it where the next start finds and removes it (w<pid> of a dead daemon)."""
        for old in runtime.glob("w[0-9]*"):
            pid = old.name[1:]
            if pid.isdigit() and not endpoints.pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        folder = runtime / f"w{os.getpid()}"
        if len(str(folder)) + len("/cxxxxxxxx/coord.sock") > endpoints.IPC_PATH_MAX:
            log.warning("%s is too long a path for the workers' socket: using the temporary "
                        "folder (a killed daemon may leave it behind)", runtime)
            return None
        endpoints.make_private_dir(folder)
        return folder

    def _open(self) -> None:
        o = self.opts
        endpoint = o.bind or endpoints.default_endpoint()
        self.warnings.extend(endpoints.check_bind(endpoint, o.allow_public_bind))
        own_state = self._check_existing(endpoint)
        self.binder, self.preload = binding.prepare_binding(self.plan, o.binder, o.allocator, o.path)
        self.warnings.extend(self.binder.warnings)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.group = ProcessGroup(self.run_dir)
        why_exec = spawn.why_exec(o.start, os.environ)
        if why_exec is None:
            self.fork = spawn.ForkPlan.for_instances(self.plan.instances, o.workload.backend,
                                                     o.workload.model, timeout_s=o.ready_timeout_s)
        # One ONNX export or one weights copy per node for all instances, before any worker
        # starts (and before the loop is pinned: a fork server started here needs every CPU).
        self._prepare_backend(self.plan)
        self._pin_loop()
        runtime = endpoints.runtime_dir()
        self.worker_dir = self._worker_ipc_dir(runtime)
        self.coord = Coordinator(self.group, "ipc", ipc_dir=str(self.worker_dir) if self.worker_dir
                                 else None, handover=True)
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.ROUTER)
        self.client.setsockopt(zmq.LINGER, 1000)
        # Each frame is capped by ZeroMQ; the whole message is checked in _recv_client.
        self.client.setsockopt(zmq.MAXMSGSIZE, o.max_request_bytes)
        # A client that never reads: beyond this many queued replies the ROUTER drops them.
        self.client.setsockopt(zmq.SNDHWM, o.send_hwm)
        self.client.setsockopt(zmq.RCVHWM, 1000)
        if endpoint.startswith("tcp://"):
            keys = auth.ensure_keys(runtime)
            self.authenticator = auth.start_authenticator(self.ctx, keys)
            auth.secure_server(self.client, keys)
        try:
            if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
                port = self.client.bind_to_random_port(endpoint[:-2])
                endpoint = f"{endpoint[:-2]}:{port}"
            else:
                self.client.bind(endpoint)
        except zmq.ZMQError as e:
            raise NumabenchError(f"cannot listen on {endpoint}: {e}") from None
        if endpoint.startswith("ipc://"):
            os.chmod(endpoint[len("ipc://"):], 0o600)  # the socket file: ours, just created
        self.endpoint = endpoint
        self.poller = zmq.Poller()
        self.poller.register(self.coord.socket, zmq.POLLIN)
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
                "pid": os.getpid(), "pid_start": endpoints.process_start(os.getpid()),
                "endpoint": endpoint, "started": self.started.isoformat(),
                "plan": self.plan_file, "run_dir": str(self.run_dir.resolve()),
                "metrics_port": self.metrics.port if self.metrics else None})
        for w in self.warnings:
            log.warning("%s", w)
        self.pools = {s.name: Pool(s) for s in self._pool_specs}
        self.sched.set_pools(self.pools)
        self.instances = self._build(self.plan, self._pool_specs)
        if why_exec is not None:
            log.info("workers are started as fresh processes: %s", why_exec)
        for inst in self.instances.values():
            self._spawn(inst)
        if self.fork is not None:
            # Later (restarts, reloads) only servers that exist fork: starting one imports the
            # framework for seconds, which the event loop must not wait for.
            self.fork = dataclasses.replace(self.fork, new_servers=False)
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
            while self.phase is not Phase.DONE:
                self._step()
        finally:
            self._close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.begin_stop(f"signal {signum}")

    @contextlib.contextmanager
    def guard(self, where: str, answer: Callable[[str], None] | None = None) -> Iterator[Outcome]:
        """The one guard every handler, timer and event callback of the loop runs in: an
        exception becomes a logged error, a count in `faults` (status, metrics), and, where
        requests are involved, an error reply through `answer`; the daemon goes on serving.
        Only a deliberate stop ends the loop. `where` is a fixed label (a metrics label)."""
        outcome = Outcome()
        try:
            yield outcome
        except Exception as e:  # noqa: BLE001 - nothing but a stop may end the daemon
            outcome.failed = True
            self.faults[where] += 1
            now = time.monotonic()
            if now - self._fault_logged.get(where, -math.inf) >= FAULT_LOG_EVERY_S:
                self._fault_logged[where] = now
                log.exception("internal error in %s (%d so far); the daemon carries on",
                              where, self.faults[where])
            else:
                log.error("internal error in %s (%d so far): %s: %s", where, self.faults[where],
                          type(e).__name__, short(e))
            if answer is not None:
                try:
                    answer(f"internal error in {where}: {type(e).__name__}: {short(e)}")
                except Exception:  # noqa: BLE001
                    log.exception("answering after an internal error in %s failed", where)

    def _answer_requests(self, requests: list[Request]) -> Callable[[str], None]:
        """A guard's `answer` for requests taken off a queue: those not answered yet get an error."""
        def answer(message: str) -> None:
            for r in requests:
                if not r.answered:
                    self._fail(r, message)
        return answer

    def _step(self) -> None:
        for sock, _ in self.poller.poll(self._poll_timeout_ms()):
            if sock is self.client:
                for _ in range(BATCH_PER_SOCKET):
                    with self.guard("client"):  # commands.handle answers the client itself
                        got = self._recv_client()
                        if got is None:
                            break
                        commands.handle(self, *got)
            else:
                for _ in range(BATCH_PER_SOCKET):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    with self.guard("worker message"):
                        self._on_worker(frames)
        now = time.monotonic()
        if now - self._last_check >= CHECK_EVERY_S:
            self._last_check = now
            with self.guard("process check"):
                self._check_processes()
            with self.guard("timers"):
                self._check_timers(now)
            with self.guard("reload"):
                self._advance_rollout()
        if self.metrics and now - self._last_metrics >= METRICS_EVERY_S:
            self._last_metrics = now
            with self.guard("metrics"):
                self.metrics.refresh(self.snapshot(latency=False))
        for name in list(self.pools):
            with self.guard("dispatch"):
                self._pump(name)
        if self.phase in (Phase.DRAINING, Phase.CLOSING):
            with self.guard("stop") as g:
                (self._check_drained if self.phase is Phase.DRAINING else self._check_closed)()
            if g.failed:
                self._abandon()

    def _abandon(self) -> None:
        """A stop whose orderly steps raise still ends: every request waiting or in flight is
        answered, then _close stops (SIGTERM, SIGKILL) and reaps every worker."""
        try:
            with self.guard("stop"):
                waiting = self.sched.drain() + [r for i in self._all() for d in i.inflight.values()
                                                for r in d.requests]
                self._answer_requests(waiting)("the daemon stopped before serving this request")
        finally:
            self.phase = Phase.DONE

    def _poll_timeout_ms(self) -> int:
        timeout = CHECK_EVERY_S
        due = self.sched.next_wakeup_ns()
        if due is not None:
            timeout = min(timeout, max(0.0, (due - time.monotonic_ns()) / 1e9))
        return max(0, int(math.ceil(timeout * 1000)))

    # --- client messages -------------------------------------------------------------------

    def _recv_client(self) -> tuple[list[Any], str | None] | None:
        """One client message, frame by frame so that a message over the whole-message limit is
        counted and dropped as it is read: (frames, why refused or None), or None when none."""
        try:
            frames = [self.client.recv(zmq.NOBLOCK, copy=False)]
        except zmq.Again:
            return None
        total, count, refused = 0, 1, None
        while self.client.getsockopt(zmq.RCVMORE):
            frame = self.client.recv(copy=False)
            count += 1
            if refused:
                continue
            total += len(frame)
            if total > self.opts.max_request_bytes:
                refused = (f"message of more than {self.opts.max_request_bytes} bytes; the limit "
                           "(--max-request-mb) applies to the whole message")
            elif count > MAX_FRAMES:
                refused = f"message of more than {MAX_FRAMES - 1} frames"
            if refused:
                del frames[2:]  # keep the envelope (identity and a REQ delimiter), drop the rest
            else:
                frames.append(frame)
        return frames, refused

    def reply(self, envelope: list[bytes], rid: Any, status: str, header: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None) -> None:
        head = {"id": rid, "status": status, **(header or {})}
        self.replies[status] += 1
        try:
            frames = wire.encode(wire.REPLY, head, arrays)
        except wire.ProtocolError as e:  # a field that is not JSON: say so rather than nothing
            log.error("reply not encodable: %s", e)
            frames = wire.encode(wire.REPLY, {"id": rid, "status": wire.ERROR,
                                              "reason": f"internal error: reply not encodable: {e}"})
        try:
            # NOBLOCK: a client whose queue is at the high-water mark loses this reply; the
            # daemon never waits for, or buffers beyond, a client that does not read.
            self.client.send_multipart(envelope + frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the client is gone or not reading: nothing to tell it
            log.debug("reply dropped: %s", e)

    def reject(self, envelope: list[bytes], rid: Any, reason: str, message: str, **extra: Any) -> None:
        self.rejected[reason] += 1
        self.reply(envelope, rid, wire.ERROR, {"reason": message, **extra})

    def accepting(self) -> bool:
        return self.phase is Phase.SERVING

    def submit(self, envelope: list[bytes], rid: Any, want: str, ids: np.ndarray,
               mask: np.ndarray | None) -> None:
        """Route a checked INFER to its pool: queued (then dispatched), busy, or an error."""
        seq = int(ids.shape[1])
        spec = route([p.spec for p in self.pools.values()], seq)
        if spec is None:
            ranges = ", ".join(f"{p.spec.seq_min}-{p.spec.seq_max}" for p in self.pools.values())
            raise Rejected("no_pool", f"no pool serves {seq} tokens (pools serve {ranges})")
        pool = self.pools[spec.name]
        if not self._pool_can_serve(spec.name):
            pool.errors += 1
            self.reply(envelope, rid, wire.ERROR, {
                "reason": f"pool {spec.name} is degraded: none of its instances is working",
                "pool": spec.name})
            return
        r = Request(envelope, rid, want, ids, mask, spec.name, time.monotonic_ns())
        if not self.sched.offer(r, self._candidates(spec.name)):
            pool.busy += 1
            self.reply(envelope, rid, wire.BUSY, {
                "reason": f"pool {spec.name} is full ({self.sched.queued(spec.name)} requests "
                          "waiting)", "pool": spec.name})
            return
        self._pump(spec.name)

    # --- dispatch --------------------------------------------------------------------------

    def _all(self) -> list[Instance]:
        return list(self.instances.values()) + self.others

    def _members(self, pool: str) -> list[Instance]:
        return [i for i in self._all() if i.pool == pool]

    def _candidates(self, pool: str) -> list[Candidate]:
        """The pool's ready workers, by worker key (a predecessor and its successor both serve
        while the successor takes over)."""
        return [Candidate(i.key, len(i.inflight), i.served) for i in self._members(pool)
                if i.state is S.READY]

    def _pool_can_serve(self, pool: str) -> bool:
        return any(i.state.will_serve for i in self._members(pool))

    def _worker(self, key: int) -> Instance | None:
        """The instance whose process holds worker key `key` (its ZeroMQ identity) now."""
        found = None
        for i in self._all():
            if i.key == key:
                if i.state.alive:
                    return i
                found = found or i
        return found

    def _pump(self, pool: str) -> None:
        if not self.sched.queued(pool):
            return
        for iid, batch in self.sched.assign(pool, self._candidates(pool),
                                            stopping=self.phase is not Phase.SERVING):
            with self.guard("dispatch", self._answer_requests(batch)):
                self._send(self._worker(iid), pool, batch)

    def _send(self, inst: Instance, pool: str, batch: list[Request]) -> None:
        spec = self.pools[pool].spec
        target = spec.pad_to(max(r.seq for r in batch))
        rows = sum(r.rows for r in batch)
        # Pad with token 0 and attention_mask 0: padded positions are ignored by attention.
        ids = np.zeros((rows, target), dtype=np.int64)
        mask = np.zeros((rows, target), dtype=np.int64)
        row = 0
        for r in batch:
            ids[row:row + r.rows, :r.seq] = r.ids
            mask[row:row + r.rows, :r.seq] = 1 if r.mask is None else r.mask
            row += r.rows
        self._next_req += 1
        d = Dispatch(self._next_req, inst.id, batch, target, time.monotonic_ns())
        try:
            self.coord.send(inst.key, protocol.RUN, {"req": d.req, "want": "outputs"},
                            {"input_ids": ids, "attention_mask": mask})
        except WorkerFailed as e:
            log.warning("%s", str(e).splitlines()[0])
            for r in reversed(batch):
                self.sched.queues[r.pool].appendleft(r)
            ended = self.group.ended(inst.key, 0.5)
            if ended is not None:
                self._on_exit(inst, ended.describe())
            else:
                self._kill(inst, "unreachable")
            return
        inst.inflight[d.req] = d

    # --- worker messages -------------------------------------------------------------------

    def _on_worker(self, frames: list[Any]) -> None:
        try:
            iid = int(frames[0].bytes.decode())
            head, arrays = protocol.decode(frames[1:])
        except Exception as e:  # noqa: BLE001
            log.warning("malformed message from a worker: %s", short(e))
            return
        inst = self._worker(iid)
        if inst is None:
            return
        kind = head["type"]
        if kind == protocol.HELLO:
            pid = head.get("pid")
            inst.pid = pid if isinstance(pid, int) else inst.pid
        elif kind == protocol.READY:
            if inst.state is S.STARTING:
                inst.state = S.READY
                inst.ready_once = True
                info = head.get("model_info") or {}
                vocab = info.get("vocab_size") if isinstance(info, dict) else None
                # a worker's word is trusted only within sense: a bad value keeps the model's own
                ok = isinstance(vocab, int) and not isinstance(vocab, bool) and 0 < vocab < 1 << 31
                self.vocab_size = vocab if ok else self.vocab_size
                log.info("instance %d ready (pid %s, affinity %s)", inst.id, head.get("pid"),
                         head.get("affinity"))
                self._announce_ready()
        elif kind == protocol.RESULT:
            d = self._take_dispatch(inst, head.get("req"))
            if d is not None:
                with self.guard("result", self._answer_requests(d.requests)):
                    self._complete(inst, d, head, arrays)
        elif kind == protocol.ERROR:
            if head.get("fatal", True):
                inst.last_error = short(head.get("message"), 500)
                log.error("instance %d: fatal error: %s", inst.id, inst.last_error)
                return  # the worker exits; _check_processes restarts it
            d = self._take_dispatch(inst, head.get("req"))
            if d is not None:
                inst.errors += 1
                for r in d.requests:
                    self._fail(r, f"instance {inst.id}: {short(head.get('message'))}")

    def _take_dispatch(self, inst: Instance, req: Any) -> Dispatch | None:
        d = inst.inflight.pop(req, None) if isinstance(req, int) else None
        if d is not None and inst.state is S.RETIRING and not inst.inflight:
            self._send_stop(inst)
        return d

    def _complete(self, inst: Instance, d: Dispatch, head: dict[str, Any],
                  arrays: dict[str, np.ndarray]) -> None:
        out = arrays.get("output")
        if out is None or out.ndim < 2 or out.shape[0] != sum(r.rows for r in d.requests):
            for r in d.requests:
                self._fail(r, f"instance {inst.id} sent no usable output")
            return
        compute_ns = head.get("compute_ns")
        compute_ns = compute_ns if isinstance(compute_ns, int) else 0
        start_ns = head.get("start_ns")
        # Time the request waited in the worker's socket behind the one before it (pipelining).
        worker_queue_ns = max(0, start_ns - d.sent_ns) if isinstance(start_ns, int) else 0
        inst.busy_ns += compute_ns
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
                "queue_ns": d.sent_ns - r.arrived_ns, "worker_queue_ns": worker_queue_ns,
                "compute_ns": compute_ns, "total_ns": now - r.arrived_ns, "retried": r.retried,
                "output": {"shape": list(part.shape), "dtype": protocol.dtype_name(part.dtype),
                           "checksum": checksum if math.isfinite(checksum) else None,
                           "abs_sum": abs_sum if math.isfinite(abs_sum) else None},
            }
            r.answered = True
            self.reply(r.envelope, r.rid, wire.OK, header,
                       {"output": part} if r.want == "outputs" else None)
            inst.served += 1
            pool = self.pools.get(r.pool)
            if pool is not None:
                pool.served += 1
                pool.latency.add(now, now - r.arrived_ns, worker_queue_ns)
            if self.metrics:
                self.metrics.served(r.pool, (now - r.arrived_ns) / 1e9)

    def _fail(self, r: Request, reason: str) -> None:
        r.answered = True
        pool = self.pools.get(r.pool)
        if pool is not None:
            pool.errors += 1
        self.reply(r.envelope, r.rid, wire.ERROR, {"reason": reason, "pool": r.pool})

    # --- failures --------------------------------------------------------------------------

    def _check_processes(self) -> None:
        for inst in self._all():
            if inst.state.alive:
                ended = self.group.ended(inst.key)  # reaps it: no zombie
                if ended is not None:
                    self._on_exit(inst, ended.describe())

    def _on_exit(self, inst: Instance, how: str) -> None:
        inst.last_exit = how
        dispatches = list(inst.inflight.values())
        inst.inflight.clear()
        successor = self.instances.get(inst.id)
        current = successor is inst
        if inst.state is S.RETIRING or not current or self.phase is not Phase.SERVING:
            inst.state = S.STOPPED
            log.info("instance %d (pid %s) %s", inst.id, inst.pid, how)
            if successor is not None and not current:
                inst.fold_into(successor)
        else:
            decision = inst.deaths.died(_now_ms())
            if decision.give_up:
                inst.state = S.FAILED
                log.error("instance %d %s; it died %d times in %.0f s: giving up (pool %s degraded)",
                          inst.id, how, decision.deaths_in_window, self.opts.restart_window_s,
                          inst.pool)
            else:
                inst.state = S.RESTARTING
                inst.restart_at_ms = decision.restart_at_ms
                log.warning("instance %d %s; restarting in %.1f s (see %s)", inst.id, how,
                            (decision.restart_at_ms - _now_ms()) / 1000, self.group.log_path(inst.key))
        for d in dispatches:
            for r in d.requests:
                self._retry_or_fail(r, inst, how)
        if not self._pool_can_serve(inst.pool) and inst.pool in self.sched.queues:
            for r in list(self.sched.queues[inst.pool]):
                self._fail(r, f"pool {inst.pool} is degraded: none of its instances is working")
            self.sched.queues[inst.pool].clear()

    def _retry_or_fail(self, r: Request, inst: Instance, how: str) -> None:
        others = any(i is not inst and i.state in (S.STARTING, S.READY) for i in self._members(r.pool))
        if not r.retried and others and r.pool in self.sched.queues and self.phase is not Phase.CLOSING:
            r.retried, r.avoid = True, inst.key
            self.sched.requeue(r)
        else:
            self._fail(r, f"instance {inst.id} {how} while serving this request")

    def _kill(self, inst: Instance, why: str) -> None:
        log.warning("instance %d: %s; killing it", inst.id, why)
        code = self.group.kill(inst.key)
        if code is not None:
            self._on_exit(inst, f"was killed ({why})")

    def _check_timers(self, now: float) -> None:
        timeout_ns = int(self.opts.request_timeout_s * 1e9)
        mono = time.monotonic_ns()
        for inst in self._all():
            if inst.state is S.RESTARTING and _now_ms() >= inst.restart_at_ms \
                    and self.phase is Phase.SERVING and self.instances.get(inst.id) is inst:
                inst.restarts += 1
                self._spawn(inst)
            elif inst.state is S.RETIRING and inst.stop_sent_at is not None \
                    and now - inst.stop_sent_at > self.opts.grace_s:
                self._kill(inst, f"still running {self.opts.grace_s:.0f} s after STOP")
            elif inst.state is S.STARTING and now - inst.started_at > self.opts.ready_timeout_s:
                self._kill(inst, f"not ready after {self.opts.ready_timeout_s:.0f} s")
            elif inst.inflight and mono - next(iter(inst.inflight.values())).sent_ns > timeout_ns:
                self._kill(inst, f"no reply within {self.opts.request_timeout_s:.0f} s")
        for r in self.sched.expired(timeout_ns):
            ready = len(self._candidates(r.pool))
            self._fail(r, f"not served within {self.opts.request_timeout_s:.0f} s: it waited in "
                          f"pool {r.pool}'s queue ({ready} instances ready)")

    def _announce_ready(self) -> None:
        if not self._announced_ready and all(i.state is S.READY for i in self.instances.values()):
            self._announced_ready = True
            log.info("all %d instances ready; serving on %s", len(self.instances), self.endpoint)

    # --- reload ----------------------------------------------------------------------------

    def _read_plan(self, path: str) -> Plan:
        """The plan at `path`, read only if it is a regular file of this daemon's user: RELOAD
        never opens what its owner could not (the only clients are the owner's)."""
        from numabench.plans import load_plan

        try:
            st = os.stat(path)
        except OSError as e:
            raise Rejected("reload", f"cannot read plan {path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("reload", f"plan {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise Rejected("reload", f"plan {path} belongs to another user; reload reads only "
                                     "the daemon owner's files")
        if st.st_size > MAX_PLAN_BYTES:
            raise Rejected("reload", f"plan {path} is {st.st_size} bytes; a plan is at most "
                                     f"{MAX_PLAN_BYTES}")
        return load_plan(Path(path))

    def reload(self, plan_path: Any) -> dict[str, Any]:
        from numabench.plans import validate_plan

        path = plan_path or self.plan_file
        if not isinstance(path, str) or not path or not os.path.isabs(path):
            raise Rejected("reload", "reload needs an absolute plan path: this daemon was started "
                                     "without --plan, or the path is relative")
        if self.phase is not Phase.SERVING:
            raise Rejected("stopping", "the daemon is stopping")
        if self.rollout is not None:
            raise Rejected("reload", "a reload is still in progress; try again when it is done")
        plan = self._read_plan(path)
        if self.machine is not None:
            validate_plan(plan, self.machine)
        specs = build_pools(plan, self.max_positions, self.opts.pad)
        fresh = self._build(plan, specs)
        change = diff({i: x.config for i, x in self.instances.items()},
                      {i: x.config for i, x in fresh.items()},
                      failed=frozenset(i for i, x in self.instances.items() if x.state is S.FAILED))
        old = {iid: self.instances[iid] for iid in change.replaced + change.removed}
        for iid in change.kept:
            self.instances[iid].pool = fresh[iid].pool
            fresh[iid] = self.instances[iid]
        for iid in change.replaced:
            src, dst = self.instances[iid], fresh[iid]
            dst.ready_once = src.ready_once
            src.pool = dst.pool  # the predecessor serves its successor's pool until relieved
            if not src.state.alive:  # not running (restarting, given up): nothing to relieve
                src.state = S.STOPPED
                src.fold_into(dst)  # counts carry over (the others' when they exit)
        self.others.extend(old.values())
        self.instances = fresh
        self.pools = {s.name: self.pools.get(s.name) or Pool(s) for s in specs}
        for s in specs:
            self.pools[s.name].spec = s
        # Requests waiting in a pool that is gone move to the new pool of their length.
        for r in self.sched.set_pools(self.pools):
            spec = route(specs, r.seq)
            if spec is None:
                self._fail(r, f"no pool serves {r.seq} tokens after the reload")
            else:
                r.pool = spec.name
                self.sched.queues[spec.name].append(r)
        for iid in change.added:
            self._spawn(self.instances[iid])
        self.rollout = Rollout(change, deque(change.replaced), old)
        self.plan, self.plan_file = plan, path
        self._announced_ready = False
        log.info("reloading %s: kept %s, replacing %s one at a time (each successor ready before "
                 "its predecessor stops), adding %s, removing %s",
                 path, list(change.kept), list(change.replaced), list(change.added),
                 list(change.removed))
        self._advance_rollout()
        return {"plan": path, "kept": list(change.kept), "stopped": list(change.stopped),
                "started": list(change.started), "replaced": list(change.replaced),
                "pools": list(self.pools)}

    def _advance_rollout(self) -> None:
        """Carry out the rollout's next step (reload.next_step decides it)."""
        ro = self.rollout
        if ro is None:
            return
        view = RolloutView(
            starting=frozenset(i for i, x in self.instances.items()
                               if x.state in (S.STARTING, S.RESTARTING)),
            pending=frozenset(i for i, x in self.instances.items() if x.state is S.PENDING),
            old_alive=frozenset(i for i, x in ro.old.items() if x.state.alive),
            old_retiring=frozenset(i for i, x in ro.old.items() if x.state is S.RETIRING))
        step = next_step(ro.diff, ro.current, tuple(ro.replace), view)
        if step.action == NEXT:
            ro.current = ro.replace.popleft()
            self._advance_rollout()  # its successor starts now
        elif step.action == START:  # beside the predecessor, which serves until this is ready
            self._spawn(self.instances[step.instance])
        elif step.action == RETIRE:  # the successor is ready (or given up): drain the old one
            self._retire(ro.old[step.instance])
        elif step.action == RETIRE_REMOVED:
            for iid in ro.diff.removed:
                self._retire(ro.old[iid])
        elif step.action == DONE:
            self.others = [i for i in self.others if i.state.alive]
            self.rollout = None
            self._release_unused_weights()
            log.info("reload done: %d instances in %d pools", len(self.instances), len(self.pools))

    def _retire(self, inst: Instance) -> None:
        if inst.state in (S.STARTING, S.READY):
            inst.state = S.RETIRING
            if not inst.inflight:
                self._send_stop(inst)
        elif not inst.state.alive:
            inst.state = S.STOPPED

    def _send_stop(self, inst: Instance) -> None:
        inst.stop_sent_at = time.monotonic()
        try:
            self.coord.send(inst.key, protocol.STOP)
        except WorkerFailed:
            pass  # already gone: the exit check marks it stopped

    # --- stop ------------------------------------------------------------------------------

    def begin_stop(self, why: str) -> None:
        if self.phase is not Phase.SERVING:
            return
        log.info("%s: draining, then stopping", why)
        self.phase = Phase.DRAINING
        self.deadline = time.monotonic() + self.opts.drain_timeout_s

    def _check_drained(self) -> None:
        busy = any(i.inflight for i in self._all())
        # Waiting requests of a pool with nothing ready to serve them will not be served.
        waiting = any(self.sched.queued(p) and any(i.state in (S.STARTING, S.READY)
                                                   for i in self._members(p)) for p in self.pools)
        if (busy or waiting) and time.monotonic() < self.deadline:
            return
        for r in self.sched.drain():
            self._fail(r, "the daemon stopped before serving this request")
        for inst in self._all():
            for d in inst.inflight.values():
                for r in d.requests:
                    self._fail(r, "the daemon stopped before this request finished")
            inst.inflight.clear()
        # Ask the workers to finish; the loop goes on answering clients while they do.
        self.phase = Phase.CLOSING
        self.deadline = time.monotonic() + self.opts.grace_s
        for iid in self.group.alive():
            inst = self._worker(iid)
            if inst is not None:
                self._send_stop(inst)

    def _check_closed(self) -> None:
        if self.group.alive() and time.monotonic() < self.deadline:
            return
        self.group.stop(grace_s=1.0)  # SIGTERM, then SIGKILL whatever is left; reaps all
        self.phase = Phase.DONE

    def _close(self) -> None:
        """Stop every worker, answer STOP callers and whatever else came in, release everything."""
        from numabench.workers.backends import release_preparation

        try:
            if self.group is not None:
                self.group.stop(self.opts.grace_s if self.phase is not Phase.DONE else 0.5)
        finally:
            # The workers are gone: their weights copies go first (a daemon killed with -9
            # leaves them, named with its pid, for the next serve or launch to remove).
            release_preparation(self.prepared)
            if self.metrics:
                self.metrics.close()
            if self.client is not None:
                self._answer_stragglers()
                for envelope, rid in self.stop_waiters:
                    self.reply(envelope, rid, wire.OK, {"stopped": True, "pid": os.getpid()})
            if self.state_file is not None:
                endpoints.remove_state(os.getpid(), self.state_file)
            if self.client is not None:
                self.client.close(linger=1000)
            if self.authenticator is not None:
                self.authenticator.stop()
            if self.ctx is not None:
                self.ctx.term()
            if self.coord is not None:
                self.coord.close()
            if self.worker_dir is not None:
                shutil.rmtree(self.worker_dir, ignore_errors=True)
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except OSError:
                    pass
            log.info("stopped; no worker left")

    def _answer_stragglers(self) -> None:
        """Messages still queued at the very end: STOP joins the waiters, the rest get
        "stopping". (Not unbinding first: that would cut the connections the replies need.)"""
        while True:
            got = self._recv_client()
            if got is None:
                return
            envelope, body = commands.split_envelope(got[0])
            try:
                head, _ = wire.decode(body)
                rid = commands.request_id(head.get("id"))
                kind = head["type"]
            except Exception:  # noqa: BLE001
                rid, kind = None, None
            if kind == wire.STOP:
                self.stop_waiters.append((envelope, rid))
            else:
                self.reject(envelope, rid, "stopping", "the daemon is stopping")

    # --- status ----------------------------------------------------------------------------

    def state(self) -> str:
        if self.phase is not Phase.SERVING:
            return "stopping"
        if self.rollout is not None:
            return "reloading"
        if self.instances and all(i.state is S.READY for i in self.instances.values()):
            return "serving"
        return "starting" if not any(i.ready_once for i in self._all()) else "degraded"

    def _degraded(self, pool: str, now_ms: int) -> bool:
        return any(i.state is S.FAILED or i.deaths.degraded(now_ms) for i in self._members(pool)
                   if i.state is not S.STOPPED)

    def _shown(self) -> list[tuple[Instance, list[Instance]]]:
        """One row per id: (the object shown, every object of that id). During a reload's swap
        the predecessor is shown until its successor is ready; counts are summed over both."""
        by_id: dict[int, list[Instance]] = {}
        for i in self._all():
            by_id.setdefault(i.id, []).append(i)
        rows = []
        for iid in sorted(by_id):
            group = by_id[iid]
            current = self.instances.get(iid)
            old = [i for i in group if i is not current and i.state.alive]
            shown = current if current is not None and (current.state is S.READY or not old) \
                else (old or group)[0]
            rows.append((shown, group))
        return rows

    def snapshot(self, latency: bool = True) -> DaemonStatus:
        """The public status facts (metrics read these; latency=False skips the percentiles)."""
        now_ns, now_ms = time.monotonic_ns(), _now_ms()
        pools = tuple(PoolStatus(
            name=name, seq_min=p.spec.seq_min, seq_max=p.spec.seq_max, shapes=p.spec.shapes,
            instances=p.spec.instances, queued=self.sched.queued(name),
            queue_limit=self.opts.queue_size, served=p.served, busy=p.busy, errors=p.errors,
            degraded=self._degraded(name, now_ms),
            ready=sum(1 for i in self._members(name) if i.state is S.READY),
            latency_ms=p.latency.summary(now_ns) if latency else {})
            for name, p in self.pools.items())
        instances = tuple(InstanceStatus(
            id=i.id, pool=i.pool, state=i.state.value, pid=i.pid, cpus=tuple(i.plan.cpus),
            memory_nodes=tuple(i.plan.memory_nodes), threads=i.plan.threads,
            load=sum(len(x.inflight) for x in group), served=sum(x.served for x in group),
            errors=sum(x.errors for x in group), restarts=sum(x.restarts for x in group),
            busy_s=round(sum(x.busy_ns for x in group) / 1e9, 3),
            last_exit=i.last_exit, last_error=i.last_error,
            swap_pid=next((x.pid for x in group if x is not i and x.state.alive), None))
            for i, group in self._shown())
        o = self.opts
        return DaemonStatus(
            pid=os.getpid(), endpoint=self.endpoint, state=self.state(),
            started=self.started.isoformat(timespec="seconds"),
            uptime_s=round(time.monotonic() - self.started_mono, 1),
            plan={"file": self.plan_file, "name": self.plan.name}, model=o.workload.model,
            backend=o.workload.backend, precision=o.workload.precision,
            weights={nodes_label(n): v["weights_path"] for n, v in sorted(
                (self.prepared.node_options if self.prepared else {}).items())
                if "weights_path" in v},
            options={"queue_size": o.queue_size, "max_batch": o.max_batch, "inflight": o.inflight,
                     "max_wait_ms": o.max_wait_ms, "pad": o.pad, "max_rows": o.max_rows,
                     "max_request_bytes": o.max_request_bytes, "send_hwm": o.send_hwm},
            run_dir=str(self.run_dir), metrics_port=self.metrics.port if self.metrics else None,
            auth="curve" if self.endpoint.startswith("tcp://") else "ipc-0600",
            loop_cpus=self.loop_cpus, replies=dict(self.replies), rejected=dict(self.rejected),
            faults=dict(self.faults),
            pools=pools, instances=instances)

    def status(self) -> dict[str, Any]:
        return self.snapshot().to_doc()


def _answers(endpoint: Any) -> bool:
    """A daemon answers PING on `endpoint` (a stale state file's may not)."""
    if not isinstance(endpoint, str):
        return False
    from numabench.daemon.client import Client

    try:
        with Client(endpoint, timeout_s=2.0) as c:
            c.ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not a daemon we can reach
        return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def serve(plan: Plan, opts: ServeOptions, plan_file: str | None = None, machine: Any = None) -> int:
    return Daemon(plan, opts, plan_file, machine).run()
