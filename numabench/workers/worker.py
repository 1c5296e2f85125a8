"""The worker: one pinned process, one model, a request/response loop over ZeroMQ.

Order matters. The worker pins itself (when asked) and arranges to die with its parent before
it imports numpy, zmq or the framework: those start thread pools, and threads inherit the
affinity their creator had when they were created. Only the standard library is imported at the
top of this module for that reason.

Exit codes: 0 after STOP, 2 bad config, 3 model load / warm-up failure (or pinning refused),
4 coordinator gone (parent died, or no message for timeout_s), 130 interrupted.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

# The one CPU-list parser; stdlib only, like everything this module imports before pinning.
from numabench.topology.cpulist import parse_cpulist
from numabench.workers.config import ConfigError, WarmupSpec, WorkerConfig, _is_int  # noqa: F401  (re-exported)

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_LOAD = 3
EXIT_ORPHANED = 4
EXIT_INTERRUPTED = 130

WANTS = ("shape", "summary", "outputs")
INPUT_ARRAYS = ("input_ids", "attention_mask")
REPORTED_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "KMP_AFFINITY", "KMP_BLOCKTIME",
                "OMP_PROC_BIND", "OMP_PLACES")
LINGER_MS = 1000  # long enough for BYE / a fatal ERROR to leave, short enough not to hang exit
POLL_SLICE_MS = 1000  # how often an idle worker checks that its parent is still there

log = logging.getLogger("numabench.worker")


class RequestError(Exception):
    """A RUN request the worker cannot serve; answered with a non-fatal ERROR."""


# ---- process setup (standard library only: runs before numpy / zmq / the framework) ----

def set_parent_death_signal() -> bool:
    """Ask the kernel to SIGTERM us when the parent exits, so no worker outlives its launcher.

    Linux delivers it when the parent *thread* exits: launchers must spawn workers from a
    thread that lives as long as the run.
    """
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pin_framework_threads(new_tids: list[int], cpus: tuple[int, ...], threads: int,
                          task_dir: str = "/proc/self/task") -> dict[str, Any]:
    """Bind the calling (main) thread and the framework's compute threads to one CPU each, as
    OMP_PROC_BIND=close with one place per CPU does for an exec'd worker.

    The compute threads are the `threads - 1` of `new_tids` (started since the model began
    loading) that ran longest: the framework starts other, idle ones too (an inter-op pool).
    Only with one thread per CPU; otherwise, or when too few ran, the OS keeps placing them
    within the instance's CPUs and `error` says why."""
    record: dict[str, Any] = {"pinned": {}, "error": None}
    ran = {}
    for tid in new_tids:
        try:
            with open(os.path.join(task_dir, str(tid), "schedstat")) as f:
                ran[tid] = int(f.read().split()[0])  # ns on a CPU
        except (OSError, ValueError, IndexError):
            continue
    compute = sorted((t for t in ran if ran[t] > 0), key=lambda t: -ran[t])[:max(threads - 1, 0)]
    if threads != len(cpus) or len(compute) != threads - 1:
        record["error"] = (f"{len(compute)} framework threads computed for {threads} threads on "
                           f"{len(cpus)} CPUs: not bound one per CPU")
        return record
    try:
        for tid, cpu in zip([threading.get_native_id(), *sorted(compute)], cpus):
            os.sched_setaffinity(tid, {cpu})
            record["pinned"][str(tid)] = cpu
    except OSError as e:
        record["error"] = f"cannot bind threads to CPUs {list(cpus)}: {e}"
    return record


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, top and psutil show (15 bytes at most): `numabench-w3` says which
    instance a process is, whether exec'd (otherwise "python") or forked (its server's name)."""
    PR_SET_NAME = 15
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def read_mems_allowed(status_path: str = "/proc/self/status") -> list[int] | None:
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("Mems_allowed_list:"):
                    return list(parse_cpulist(line.split(":", 1)[1]))
    except OSError:
        pass
    return None


MPOL_MODES = {0: "default", 1: "preferred", 2: "bind", 3: "interleave", 4: "local",
              5: "preferred_many", 6: "weighted_interleave"}
MPOL_FLAGS = {1 << 15: "static_nodes", 1 << 14: "relative_nodes", 1 << 13: "numa_balancing"}
GET_MEMPOLICY_NR = {"x86_64": 239, "aarch64": 236}


def read_mempolicy() -> dict[str, Any]:
    """The calling thread's NUMA memory policy: get_mempolicy(2), else /proc/self/numa_maps."""
    policy = _mempolicy_syscall()
    if policy is None:
        policy = _mempolicy_numa_maps()
    return policy or {"mode": "unknown", "nodes": [], "source": None}


def _mempolicy_syscall() -> dict[str, Any] | None:
    nr = GET_MEMPOLICY_NR.get(platform.machine())
    if nr is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.syscall.restype = ctypes.c_long
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for maxnode in (1024, 8192):  # EINVAL when maxnode is below the kernel's node count
        mode = ctypes.c_int(0)
        mask = (ctypes.c_ulong * (maxnode // bits))()
        rc = libc.syscall(ctypes.c_long(nr), ctypes.byref(mode), mask, ctypes.c_ulong(maxnode),
                          ctypes.c_void_p(None), ctypes.c_ulong(0))
        if rc == 0:
            raw_mode = mode.value
            flags = [name for bit, name in MPOL_FLAGS.items() if raw_mode & bit]
            base = raw_mode & ~sum(MPOL_FLAGS)
            nodes = [i * bits + b for i, word in enumerate(mask) for b in range(bits) if word >> b & 1]
            name = MPOL_MODES.get(base, f"mode{base}")
            if name == "preferred" and not nodes:
                name = "local"  # MPOL_PREFERRED with an empty mask is how older tools say local
            return {"mode": name, "nodes": nodes, "flags": flags, "source": "get_mempolicy"}
        if ctypes.get_errno() != 22:  # not EINVAL: seccomp (EPERM) or ENOSYS; use numa_maps
            return None
    return None


def _mempolicy_numa_maps(path: str = "/proc/self/numa_maps") -> dict[str, Any] | None:
    # Mappings without a policy of their own show the task policy, e.g. "bind:0-1", "prefer:0".
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError:
        return None
    if len(first) < 2:
        return None
    mode, _, nodes = first[1].partition(":")
    mode = {"prefer": "preferred", "prefer (many)": "preferred_many"}.get(mode, mode)
    try:
        node_list = list(parse_cpulist(nodes)) if nodes else []
    except ValueError:
        node_list = []
    return {"mode": mode, "nodes": node_list, "flags": [], "source": "numa_maps"}


def framework_versions() -> dict[str, str]:
    """Versions of what this process actually imported (a framework not loaded is not listed)."""
    import numabench

    versions = {"python": platform.python_version(), "numabench": numabench.__version__}
    for module in ("numpy", "zmq", "torch", "transformers", "onnxruntime"):
        mod = sys.modules.get(module)
        if mod is not None:
            versions["pyzmq" if module == "zmq" else module] = getattr(mod, "__version__", "?")
    return versions


def task_ids(task_dir: str = "/proc/self/task") -> list[int]:
    try:
        return [int(t) for t in os.listdir(task_dir)]
    except OSError:
        return []


def place_io_threads(tids: set[int], cpus: tuple[int, ...] | None) -> dict[str, Any]:
    """Move ZeroMQ's background threads (`tids`) to `cpus`, when given.

    Every message in or out wakes ZeroMQ's I/O thread; on the instance's own CPU each wake-up
    preempts the compute thread (with a request queued behind the one computing, one lands in
    the middle of every compute). Done with sched_setaffinity rather than ZMQ_THREAD_AFFINITY_CPU_ADD,
    which aborts the process when the kernel refuses the CPUs: here a refusal is only reported.
    """
    record: dict[str, Any] = {"tids": sorted(tids), "cpus": None, "error": None}
    if cpus is None or not tids:
        return record
    try:
        for tid in tids:
            os.sched_setaffinity(tid, cpus)
        record["cpus"] = list(cpus)
    except OSError as e:
        record["error"] = f"cannot move ZeroMQ's threads to CPUs {list(cpus)}: {e}"
        log.warning("%s; they stay on the instance's CPUs", record["error"])
    return record


def thread_cpus(task_dir: str = "/proc/self/task", exclude: frozenset[int] = frozenset()
                ) -> dict[int, list[int]]:
    """Allowed CPUs of every thread of this process (but `exclude`): {tid: [cpus]}."""
    out: dict[int, list[int]] = {}
    try:
        tids = [t for t in os.listdir(task_dir) if int(t) not in exclude]
    except OSError:
        return out
    for tid in tids:
        try:
            with open(os.path.join(task_dir, tid, "status")) as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        out[int(tid)] = list(parse_cpulist(line.split(":", 1)[1]))
                        break
        except OSError:  # the thread ended while we read
            continue
    return out


# ---- the worker ----

class Worker:
    """Loads one model and answers RUN requests until STOP. `handle` is transport-agnostic."""

    def __init__(self, config: WorkerConfig, parent_pid: int):
        from numabench.workers import protocol, requests  # numpy: only once the process is pinned

        self._protocol = protocol
        self._requests = requests  # looked up per request: a from-import there costs a microsecond
        self._decoder = protocol.RequestDecoder()  # a benchmark's RUNs differ only in "req"
        self.config = config
        self.parent_pid = parent_pid
        self.backend: Any = None
        self.tokenizer: Any = None
        self.spec: Any = None
        self.vocab_size = 1000
        self.max_positions: int | None = None
        self.io_threads: dict[str, Any] = {"tids": [], "cpus": None, "error": None}
        self.thread_pinning: dict[str, Any] | None = None
        # The last arrays dict checked and the inputs made of it: the decoder hands back the
        # same dict when a request resends the same bytes, which need no second check.
        self._checked: tuple[Any, dict[str, Any]] = (None, {})

    # -- lifecycle --

    def serve(self, startup_error: str | None = None) -> int:
        import zmq

        protocol = self._protocol
        cfg = self.config
        ctx = zmq.Context.instance()
        before = set(task_ids())
        sock = ctx.socket(zmq.DEALER)  # the first socket starts ZeroMQ's background threads
        self.io_threads = place_io_threads(set(task_ids()) - before, cfg.io_cpus)
        sock.setsockopt(zmq.IDENTITY, protocol.identity(cfg.instance))
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(cfg.endpoint)
        try:
            self._send(sock, protocol.HELLO, {"instance": cfg.instance, "pid": os.getpid()})
            if startup_error is not None:
                log.error("%s", startup_error)
                self._send(sock, protocol.ERROR, {"req": None, "fatal": True,
                                                  "message": startup_error, "traceback": None})
                return EXIT_LOAD
            try:
                ready = self.load_and_warm_up()
            except Exception as e:  # noqa: BLE001 - any failure here is fatal and reported
                tb = traceback.format_exc()
                log.error("model load failed: %s\n%s", e, tb)
                self._send(sock, protocol.ERROR, {
                    "req": None, "fatal": True, "message": f"{type(e).__name__}: {e}", "traceback": tb})
                return EXIT_LOAD
            self._send(sock, protocol.READY, ready)
            log.info("ready: load %.2f s, warm-up %.2f s",
                     ready["load_ns"] / 1e9, ready["warmup_ns"] / 1e9)
            return self._loop(sock)
        finally:
            sock.close()
            ctx.term()

    def _loop(self, sock: Any) -> int:
        import zmq

        timeout_ns = int(self.config.timeout_s * 1e9)
        # A blocking receive with a timeout rather than poll + receive: one call less on the
        # path of every request (numabench's own overhead is measured and kept small).
        sock.setsockopt(zmq.RCVTIMEO, max(1, min(POLL_SLICE_MS, timeout_ns // 1_000_000)))
        last = time.monotonic_ns()
        more, RCVMORE = sock.get, zmq.RCVMORE
        while True:
            try:
                # Not recv_multipart: every frame as bytes (no Frame objects), a few
                # microseconds less on every request's path; bytes also let the decoder tell a
                # resent shard by a memcmp (RequestDecoder), and then skip its input check.
                frames = [sock.recv()]
                while more(RCVMORE):
                    frames.append(sock.recv())
            except zmq.Again:
                if os.getppid() != self.parent_pid:
                    log.error("parent process %d is gone; exiting", self.parent_pid)
                    return EXIT_ORPHANED
                if time.monotonic_ns() - last >= timeout_ns:
                    log.error("no message from the coordinator for %.1f s; exiting", self.config.timeout_s)
                    return EXIT_ORPHANED
                continue
            reply, stop = self.handle(frames)
            if len(reply) == 1:
                sock.send(reply[0])
            else:
                sock.send_multipart(reply, copy=False)
            last = time.monotonic_ns()  # a long compute is not silence: count from the reply
            if stop:
                log.info("STOP received; bye")
                return EXIT_OK

    def _send(self, sock: Any, msg_type: str, header: dict[str, Any]) -> None:
        sock.send_multipart(self._protocol.encode(msg_type, header), copy=False)

    # -- load and warm up --

    def load_and_warm_up(self) -> dict[str, Any]:
        import numpy as np

        from numabench.workers import models
        from numabench.workers.backends import create_backend

        cfg = self.config
        t0 = time.monotonic_ns()
        before = set(task_ids())  # threads the framework starts from here on are its pool's
        self.spec = spec = models.resolve_model(cfg.model)
        self.backend = create_backend(cfg.backend)
        self.backend.load(spec, cfg.precision, cfg.threads, cfg.options, seed=cfg.seed)
        # Framework modes (PyTorch's inference mode) entered once on this, the computing thread,
        # as a bare loop does, rather than around every request.
        hold = getattr(self.backend, "hold_modes", None)
        if hold is not None:
            hold()
        if cfg.tokenizer and spec.has_tokenizer is not False:
            self.tokenizer = models.load_tokenizer(spec)
        info = self.backend.info()
        model_info = info.get("model", {})
        self.vocab_size = model_info.get("vocab_size") or spec.vocab_size or self.vocab_size
        self.max_positions = model_info.get("max_positions") or spec.max_positions
        load_ns = time.monotonic_ns() - t0

        # Warm up on the exact shapes the run will use (allocator pools, kernels, caches).
        t1 = time.monotonic_ns()
        rng = np.random.default_rng(cfg.seed)
        for batch, seq in cfg.warmup.shapes:
            self._check_seq(seq)
            ids = rng.integers(0, self.vocab_size, size=(batch, seq), dtype=np.int64)
            mask = np.ones_like(ids)
            for _ in range(cfg.warmup.iterations):
                self.backend.run({"input_ids": ids, "attention_mask": mask})
        warmup_ns = time.monotonic_ns() - t1
        if cfg.pin_threads and cfg.cpus is not None:
            self.thread_pinning = pin_framework_threads(sorted(set(task_ids()) - before), cfg.cpus,
                                                        cfg.threads)
            if self.thread_pinning["error"]:
                log.warning("%s", self.thread_pinning["error"])

        # The process's CPUs are the union over its threads: an OpenMP runtime told to bind
        # (OMP_PLACES, KMP_AFFINITY) narrows the main thread to one CPU of the instance.
        # ZeroMQ's threads, when moved off the instance's CPUs, are reported on their own.
        io = self.io_threads
        per_thread = thread_cpus(exclude=frozenset(io["tids"]) if io["cpus"] else frozenset())
        affinity = sorted({c for cpus in per_thread.values() for c in cpus}) or sorted(os.sched_getaffinity(0))
        if cfg.cpus is not None and affinity != list(cfg.cpus):
            log.warning("affinity %s differs from the expected CPUs %s", affinity, list(cfg.cpus))
        return {
            "instance": cfg.instance,
            "pid": os.getpid(),
            "affinity": affinity,
            # CPUs each OS thread may run on, main thread first: shows whether threads are bound.
            "thread_cpus": [per_thread[t] for t in sorted(per_thread, key=lambda t: (t != os.getpid(), t))],
            # Where ZeroMQ's I/O threads run (cpus null: on the instance's CPUs, as asked or
            # because moving them was refused, then `error` says why).
            "io_threads": {"cpus": io["cpus"], "error": io["error"]},
            # A forked worker binds its own threads (its parent read OMP_* long before):
            # tid -> CPU, or why not.
            "thread_pinning": self.thread_pinning,
            "mems_allowed": read_mems_allowed(),
            "mempolicy": read_mempolicy(),
            "threads": info.get("threads"),
            "versions": framework_versions(),
            "model_info": {
                "name": spec.name, "kind": spec.kind,
                "vocab_size": self.vocab_size, "max_positions": self.max_positions,
                "hidden_size": model_info.get("hidden_size"), "layers": model_info.get("layers"),
                "parameters": model_info.get("parameters"),
                "has_tokenizer": True if self.tokenizer is not None else spec.has_tokenizer,
                "tokenizer_loaded": self.tokenizer is not None,
                "precision": cfg.precision, "backend": cfg.backend,
            },
            "backend_info": {k: v for k, v in info.items() if k not in ("threads", "model")},
            "load_ns": load_ns,
            "warmup_ns": warmup_ns,
            "env": {name: os.environ.get(name) for name in REPORTED_ENV},
        }

    def _check_seq(self, seq: int) -> None:
        if self.max_positions is not None and seq > self.max_positions:
            raise RequestError(
                f"sequence length {seq} exceeds the model's {self.max_positions} positions")

    # -- requests --

    def handle(self, frames: Any) -> tuple[list[Any], bool]:
        """One request in, one reply out: (reply frames, stop?)."""
        protocol = self._protocol
        try:
            head, arrays = self._decoder.decode(frames)
        except protocol.ProtocolError as e:
            log.warning("malformed message: %s", e)
            return self._error(None, f"malformed message: {e}"), False
        kind = head["type"]
        if kind == protocol.STOP:
            return protocol.encode(protocol.BYE, {"instance": self.config.instance}), True
        req = head.get("req")
        if kind != protocol.RUN:
            return self._error(req, f"unexpected message type {kind!r} (a worker takes RUN, STOP)"), False
        try:
            return self._run(head, arrays), False
        except RequestError as e:
            return self._error(req, str(e)), False
        except Exception as e:  # noqa: BLE001 - a failing request must not kill the worker
            tb = traceback.format_exc()
            log.error("request %r failed: %s\n%s", req, e, tb)
            return self._error(req, f"{type(e).__name__}: {e}", tb), False

    def _error(self, req: Any, message: str, tb: str | None = None) -> list[Any]:
        return self._protocol.encode(self._protocol.ERROR, {
            "req": req, "fatal": False, "message": message, "traceback": tb})

    def _run(self, head: Mapping[str, Any], arrays: Mapping[str, Any]) -> list[Any]:
        want = head.get("want", "summary")
        if want not in WANTS:
            raise RequestError(f"want must be one of {', '.join(WANTS)}, got {want!r}")
        loops = head.get("loops", 1)
        if not _is_int(loops) or not 1 <= loops <= self._protocol.MAX_LOOPS:
            raise RequestError(f"loops must be an integer from 1 to {self._protocol.MAX_LOOPS}, got {loops!r}")
        inputs = self._inputs(head, arrays)
        run, now = self.backend.run, time.monotonic_ns
        if loops == 1:
            start_ns: int | list[int] = now()
            out = run(inputs)
            end_ns = now()
            compute_ns: int | list[int] = end_ns - start_ns  # type: ignore[operator]
        else:  # the passes back to back, as a bare loop runs them (Backend.run_loops)
            out, start_ns, compute_ns = self.backend.run_loops(inputs, loops)
            end_ns = start_ns[-1] + compute_ns[-1]
        output: dict[str, Any] = {"shape": list(out.shape), "dtype": self._protocol.dtype_name(out.dtype)}
        if want == "shape":  # the timed path: formatted, not json.dumps'd (see docs/protocol.md)
            return self._protocol.encode_result(head.get("req"), compute_ns, start_ns, end_ns, output)
        import numpy as np
        # Two passes over the output (0.7 ms for BERT-base at batch 8 x seq 128 on the 2-vCPU
        # dev VM): timed runs ask for "shape" so that this cost stays out of their latency.
        checksum = float(out.sum(dtype=np.float64))
        abs_sum = float(np.abs(out).sum(dtype=np.float64))
        # null where the output holds NaN/Inf: JSON has no such numbers
        output["checksum"] = checksum if math.isfinite(checksum) else None
        # LayerNorm outputs sum to ~0 per token, so the plain sum barely tells models
        # apart; the sum of magnitudes does.
        output["abs_sum"] = abs_sum if math.isfinite(abs_sum) else None
        header = {"req": head.get("req"), "compute_ns": compute_ns, "start_ns": start_ns,
                  "end_ns": end_ns, "output": output}
        out_arrays = {"output": out.astype(np.float32, copy=False)} if want == "outputs" else None
        return self._protocol.encode(self._protocol.RESULT, header, out_arrays)

    def _inputs(self, head: Mapping[str, Any], arrays: Mapping[str, Any]) -> dict[str, Any]:
        requests = self._requests
        texts = head.get("texts")
        try:
            if texts is not None:
                if arrays:
                    raise RequestError("send either texts or input arrays, not both")
                return self._tokenize(texts, head.get("seq"))
            if arrays is self._checked[0]:
                return self._checked[1]
            ids, mask = requests.check_arrays(arrays, vocab_size=self.vocab_size,
                                              max_positions=self.max_positions)
        except requests.RequestError as e:
            raise RequestError(str(e)) from None
        inputs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        self._checked = (arrays, inputs)
        return inputs

    def _tokenize(self, texts: Any, seq: Any) -> dict[str, Any]:
        from numabench.workers import requests

        requests.check_texts(texts)
        if not _is_int(seq) or seq <= 0:
            raise RequestError(f"texts need seq, a positive integer, got {seq!r}")
        if self.tokenizer is None:
            if self.config.tokenizer or self.spec.has_tokenizer is False:
                raise RequestError(f"model {self.config.model!r} has no tokenizer; send input_ids instead")
            raise RequestError("this worker was started without its tokenizer (its run sends token "
                               "ids); send input_ids instead")
        requests.check_seq(seq, self.max_positions)
        ids, mask = requests.tokenize(self.tokenizer, texts, max_length=seq, padding="max_length")
        return {"input_ids": ids, "attention_mask": mask}


# ---- entry point ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m numabench.workers",
                                description="One numabench worker (started by the launcher).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the worker config as a JSON object")
    src.add_argument("--config-file", help="a file holding the worker config as JSON")
    return p.parse_args(argv)


def _setup_logging(instance: Any) -> None:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format=f"[worker {instance}] %(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    # The launcher holds stop signals while it forks us (launcher/procs.py); take them again.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    parent_pid = os.getppid()
    set_parent_death_signal()
    expected = os.environ.get("NUMABENCH_PARENT_PID")  # launcher/procs.py PARENT_ENV
    if os.getppid() != parent_pid or (expected is not None and expected != str(parent_pid)):
        return EXIT_ORPHANED  # the launcher died before prctl took effect, or before we started
    args = parse_args(argv)
    _setup_logging("?")
    raw: Any = None
    try:
        if args.config_file is not None:
            with open(args.config_file) as f:
                raw = json.load(f)
        else:
            raw = json.loads(args.config)
        if isinstance(raw, dict):
            _setup_logging(raw.get("instance", "?"))
        config = WorkerConfig.from_dict(raw)
        set_process_name(f"numabench-w{config.instance}")
    except (OSError, ValueError, ConfigError) as e:
        log.error("bad worker config: %s", e)
        _report_config_error(raw, str(e))
        return EXIT_CONFIG

    startup_error = None
    if config.pin_self:
        # Before numpy/zmq/torch start any thread: threads inherit the affinity at creation.
        try:
            os.sched_setaffinity(0, config.cpus)
        except OSError as e:
            startup_error = f"cannot pin to CPUs {list(config.cpus)}: {e}"
    try:
        return Worker(config, parent_pid).serve(startup_error)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _report_config_error(raw: Any, message: str) -> None:
    """Best effort: tell the coordinator why, when the config says where it is."""
    if not isinstance(raw, dict) or not isinstance(raw.get("endpoint"), str):
        return
    instance = raw.get("instance")
    if not _is_int(instance):
        return
    try:
        import zmq

        from numabench.workers import protocol

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, protocol.identity(instance))
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(raw["endpoint"])
        sock.send_multipart(protocol.encode(protocol.ERROR, {
            "req": None, "fatal": True, "message": f"bad worker config: {message}", "traceback": None}))
        sock.close()
        ctx.term()
    except Exception as e:  # noqa: BLE001 - reporting is best effort; the exit code says enough
        log.debug("could not report the config error to the coordinator: %s", e)
