"""PyTorch eager backend: fp32, bf16 (CPU autocast) and int8 (dynamic quantization of Linear).

Imported only inside a worker that is already pinned, so torch's thread pools start on the
right CPUs. Threads are set explicitly right after import: intra-op to the plan's count and
inter-op to 1 (one request at a time; extra pools would only compete for the same cores).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from numabench.workers import models
from numabench.workers.backends import Backend, check_options, timed_passes

MAX_CACHED_SHAPES = 32


class PyTorchBackend(Backend):
    name = "pytorch"

    def __init__(self) -> None:
        self.model: Any = None
        self.precision = "fp32"
        self.spec: Any = None
        self.parameters = 0
        self._torch: Any = None
        self.weights_path: str | None = None
        self._modes: tuple[Any, ...] = ()
        self._held: tuple[Any, ...] = ()
        self._shape_buffers: dict[tuple[int, ...], tuple[Any, np.ndarray, Any]] = {}

    def load(self, spec: Any, precision: str, threads: int, options: Mapping[str, Any],
             seed: int = 0) -> None:
        check_options(self.name, options)
        import torch

        self._torch = torch
        if threads:  # 0: torch's own defaults (the out-of-the-box baseline sets nothing)
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # already set, or inter-op work has started: keep what runs
                pass
        self.weights_path = options.get("weights_path")
        if self.weights_path:
            # Every tensor a view of the node's shared, read-only file: nothing private.
            from numabench.workers.backends.shared_weights import load_model

            model = load_model(spec, self.weights_path)
        else:
            model = models.build_pytorch_model(spec, seed)
        # Counted before quantization, which packs Linear weights out of .parameters().
        self.parameters = sum(p.numel() for p in model.parameters())
        if precision == "int8":
            with warnings.catch_warnings():
                # torch.ao.quantization is deprecated in favour of torchao, but still works and
                # needs no extra package; its warnings would only clutter every worker's log.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", UserWarning)
                # In place: a copy of the model first (the default) would copy shared weights
                # into private memory. Linear weights are repacked (private) either way.
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        self.model, self.precision, self.spec = model, precision, spec
        # Made once and entered around each call (each can be re-entered, one call at a time).
        self._modes = (torch.inference_mode(),) + (
            (torch.autocast("cpu", dtype=torch.bfloat16),) if precision == "bf16" else ())

    def hold_modes(self) -> None:
        """Enter inference mode (and bf16 autocast) on the calling thread for the rest of its life,
        as a bare loop does around its loop: entering them around each call instead made
        bert-tiny's forward pass 1-2% slower in a loop on the 2-vCPU dev VM. For a worker's main
        thread only (the process exists to serve); `run` then calls the model directly."""
        for mode in self._modes:
            mode.__enter__()
        # Kept: inference mode's guard object restores the previous mode when it is freed.
        self._held, self._modes = self._modes, ()

    def _buffers(self, shape: tuple[int, ...]) -> tuple[Any, np.ndarray, Any]:
        """(ids tensor, its numpy view, an all-ones mask) for one input shape, made on first use.

        A request's ids are copied into the buffer of their shape (ZeroMQ's frames are read-only
        and torch wants writable memory): no tensor is made per request. A bounded cache, as the
        daemon's batches come in many shapes."""
        bufs = self._shape_buffers.get(shape)
        if bufs is None:
            torch = self._torch
            if len(self._shape_buffers) >= MAX_CACHED_SHAPES:
                self._shape_buffers.clear()
            ids = torch.empty(shape, dtype=torch.int64)
            bufs = self._shape_buffers[shape] = (ids, ids.numpy(), torch.ones(shape, dtype=torch.int64))
        return bufs

    def _inputs(self, arrays: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
        src = arrays["input_ids"]
        ids, view, ones = self._buffers(src.shape)
        view[...] = src
        mask = arrays.get("attention_mask")
        return ids, ones if mask is None else self._torch.from_numpy(np.array(mask, dtype=np.int64))

    def run_loops(self, arrays: Mapping[str, np.ndarray], loops: int
                  ) -> tuple[np.ndarray, list[int], list[int]]:
        """Each pass times the model call alone, as the bare loop does: the ids are copied in
        once and the output converted once, after the last pass (per pass they cost 2.7% of a
        bert-tiny seq 32 forward on the 2-vCPU dev VM, the conversion 1.5% of it)."""
        if self._modes:  # modes not held (not a worker's main thread): entered per call by run
            return super().run_loops(arrays, loops)
        ids, mask = self._inputs(arrays)
        model = self.model
        out, starts, computes = timed_passes(lambda: model(input_ids=ids, attention_mask=mask), loops)
        return out.last_hidden_state.float().numpy(), starts, computes

    def run(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        ids, mask = self._inputs(arrays)
        modes = self._modes
        if not modes:  # held (hold_modes)
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        elif len(modes) == 1:
            with modes[0]:
                out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            with modes[0], modes[1]:
                out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out.float().numpy()

    def info(self) -> dict[str, Any]:
        torch, model = self._torch, self.model
        config = model.config
        return {
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "model": {
                "vocab_size": getattr(config, "vocab_size", None),
                "max_positions": self.spec.max_positions
                if self.spec.max_positions is not None
                else getattr(config, "max_position_embeddings", None),
                "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "dim", None),
                "layers": getattr(config, "num_hidden_layers", None)
                or getattr(config, "n_layers", None),
                "parameters": self.parameters,
                "attn_implementation": getattr(config, "_attn_implementation", None),
            },
            "quantized_engine": torch.backends.quantized.engine if self.precision == "int8" else None,
            # The shared file the weights are mapped from (None: built in this process).
            "weights_path": self.weights_path,
        }


BACKEND_CLASS = PyTorchBackend
