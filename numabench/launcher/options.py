"""What a launch runs (Workload) and how (LaunchOptions), with their defaults and bounds.

Kept apart from launch.py and free of heavy imports so the command line can take its choices
and defaults from here without loading numpy or ZeroMQ.
"""
from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("split", "throughput")
TRANSPORTS = ("ipc", "tcp")
DEFAULT_ITERATIONS = 20
DEFAULT_INFLIGHT = 2  # throughput mode: one computing, one waiting: enough to hide the round trip
# throughput mode, --loops auto: forward passes per request for about this much compute each
# (numabench's own cost per message, ~0.15 ms, is then 0.3% of a request; benchmarks/README.md)
LOOPS_TARGET_NS = 50_000_000
# ... and when every CPU is a worker's: each reply then wakes the coordinator (and ZeroMQ's
# threads) on a worker's CPU, which costs that worker ~1.5 ms of compute (the gap and the cold
# caches after it). bert-tiny on 2 x 1 vCPU: 2850-2910 samples/s at 50 ms, 3060-3100 at ~200 ms.
LOOPS_TARGET_SHARED_NS = 200_000_000
DEFAULT_READY_TIMEOUT_S = 600.0
DEFAULT_REQUEST_TIMEOUT_S = 300.0
RESULTS_FILE = "results.json"
# Bounds that catch typos before any process starts (a week of measuring, a billion requests).
MAX_DURATION_S = 7 * 24 * 3600.0
MAX_ITERATIONS = 1_000_000_000
MAX_REPEAT = 1000
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a closed terminal stops a run like kill does


@dataclass(frozen=True)
class Workload:
    """What each instance runs, and for how long."""

    model: str = "bert-base-cased"
    backend: str = "pytorch"
    precision: str = "fp32"
    seq: int = 128
    mode: str = "split"
    iterations: int | None = None  # split: steps; throughput: requests per instance
    duration_s: float | None = None
    warmup: int = 3
    seed: int = 0
    text_file: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    share_weights: bool = True  # pytorch: one read-only weights copy per NUMA node (shared_weights.py)


@dataclass(frozen=True)
class LaunchOptions:
    """How instances are started and where results go."""

    binder: str = "auto"
    allocator: str = "default"
    transport: str = "ipc"
    run_dir: Path | None = None
    output: Path | None = None
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    grace_s: float = 5.0
    progress: bool | None = None  # None: only when stderr is a terminal
    path: str | None = None  # PATH used to find numactl/taskset (tests hide numactl with it)
    repeat: int = 1  # launch --repeat: that many runs, fresh workers each, RUN_DIR/rep-<k>/
    keep_weights: bool = False  # keep the tmpfs weights copies for the next run
    weights_dir: str | None = None  # where the per-node weights copies go (default /dev/shm/...)
    weights_cache_dir: str | None = None  # the weights cache on disk (default ~/.cache/...)
    # Called once every instance is READY, just before the clock starts; it may block (a fleet's
    # common start barrier across hosts, numabench.cluster.fleet) or raise NumabenchError to stop.
    before_measure: Callable[[], None] | None = None
    inflight: int = DEFAULT_INFLIGHT  # throughput mode: requests outstanding per instance
    # throughput mode: forward passes per request (None: calibrated per instance, measure.py)
    loops: int | None = None
    omp_runtime: str = "gnu"  # gnu (the framework's own) or intel (libiomp5 preloaded)
    pin_threads: bool = True  # each OpenMP / ONNX Runtime thread bound to its own CPU
    # The out-of-the-box baseline: no binding (as --binder none) and no thread settings at all
    # (no OMP/MKL variables, no set_num_threads): the framework's own defaults, recorded as got.
    framework_defaults: bool = False
    # Each worker's ZeroMQ threads on the coordinator's CPUs when the plan leaves any free
    # (True) or on the instance's own (False). None: off only where messages reach a worker
    # while it computes, one pass each (throughput mode, --loops 1, more than one in flight):
    # there each wake-up preempts the compute (2 involuntary switches per request). Elsewhere
    # a message finds the worker waiting, or comes once per many passes, and a wake-up on the
    # worker's own CPU is the cheaper one: the no-op round trip with one in flight was 1.21-1.24x
    # bare pyzmq on the instance's CPU against 1.29-1.44x off it (2-vCPU dev VM).
    io_threads_off_cores: bool | None = None
    # fork: workers forked from a fork server per NUMA node that imported the framework once
    # (shared runtime pages, fast start-up); exec: each worker a fresh interpreter.
    start: str = "fork"
