"""ONNX Runtime backend: a cached torch.onnx export run by the CPU execution provider.

The launcher exports (or reuses) the model once per run and passes its path as the option
"model_path" (see onnx_cache.prepare_onnx); this module then imports onnxruntime only, not torch.
Session: intra-op threads = the instance's threads, inter-op threads = 1, sequential execution,
graph optimization level from the option "opt_level" (default "all"). ONNX Runtime may pin its
own pool threads; they are told to stay on the instance's CPUs (the process affinity, set before
this module is imported) or, with the option "pin_threads" (the launcher's --pin-threads), each
on its own CPU; `info` reports every thread's allowed CPUs so a test can check it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from numabench.workers.backends import Backend, check_options, onnx_cache


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self) -> None:
        self.session: Any = None
        self.spec: Any = None
        self.path: Path | None = None
        self.opt_level = "all"
        self.pin_threads = False
        self.threads = 1
        self.cpus: list[int] = []
        self.prepared: dict[str, Any] | None = None
        self.input_names: tuple[str, ...] = ()

    def load(self, spec: Any, precision: str, threads: int, options: Mapping[str, Any],
             seed: int = 0) -> None:
        check_options(self.name, options)
        self.spec, self.threads = spec, threads
        self.opt_level = options.get("opt_level", "all")
        path = options.get("model_path")
        if path is None:
            # Started without a prepared file: export (or reuse) here. Under the cache's file lock,
            # so instances started together still export once. This imports torch.
            prepared = onnx_cache.prepare_onnx(spec, precision, options.get("cache_dir"), seed,
                                               self.opt_level)
            self.prepared = prepared.record()
            path = prepared.path
        self.path = Path(path)
        self.cpus = sorted(os.sched_getaffinity(0))
        self.pin_threads = bool(options.get("pin_threads", False))
        self.session = onnx_cache.ort_session(self.path, threads, self.opt_level, self.cpus,
                                              self.pin_threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    def run(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        ids = np.ascontiguousarray(arrays["input_ids"], dtype=np.int64)
        mask = arrays.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.ascontiguousarray(mask, dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        out = self.session.run([onnx_cache.OUTPUT_NAME], {k: feed[k] for k in self.input_names})[0]
        return np.asarray(out, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        import onnxruntime as ort

        so = self.session.get_session_options()
        spec = self.spec
        config = dict(spec.config or {}) if spec.config else {}
        from numabench.workers.worker import thread_cpus

        tasks = thread_cpus()
        allowed = sorted({c for cpus in tasks.values() for c in cpus})
        return {
            "threads": so.intra_op_num_threads,
            "interop_threads": so.inter_op_num_threads,
            "model": {
                "vocab_size": spec.vocab_size,
                "max_positions": spec.max_positions,
                "hidden_size": config.get("hidden_size") or config.get("dim"),
                "layers": config.get("num_hidden_layers") or config.get("n_layers"),
                "parameters": None,
            },
            "model_path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "opt_level": self.opt_level,
            "pin_threads": self.pin_threads,
            "providers": self.session.get_providers(),
            "onnxruntime": ort.__version__,
            "prepared_in_worker": self.prepared,
            # What ONNX Runtime's threads may run on: every OS thread of this process.
            "os_threads": len(tasks),
            "threads_cpus": allowed,
            "threads_within_affinity": set(allowed) <= set(self.cpus),
        }


BACKEND_CLASS = OnnxRuntimeBackend
