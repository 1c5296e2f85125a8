"""ONNX export cache: one torch.onnx export per model, reused across instances and runs.

The launcher calls `prepare_onnx` once, before any worker starts, and hands the file's path to
every worker (option "model_path"): sixteen instances share one export, and the workers' load
time is not polluted by it. A worker started without a path (by hand, or by a caller that did
not prepare) calls it itself; a per-entry file lock makes concurrent callers export once.

Layout of the cache folder ($XDG_CACHE_HOME/numabench/onnx, ~/.cache/numabench/onnx, or
--cache-dir), one entry per (model, config, weights seed, opset, exporter, library versions,
precision):

    <name>-<precision>-<digest>.onnx        the model
    <name>-<precision>-<digest>.json        sidecar: the full key, the files' sha256, timings
    <name>-<precision>-<digest>.check.npz   a check batch and PyTorch's fp32 output for it

`digest` hashes the key, so a new torch/transformers/onnxruntime version or another config lands
in a new file. An entry is checked on every use: sidecar key equal to the wanted key, sha256 of
the model and check files, loadable by ONNX Runtime, and its output on the check batch compared
with PyTorch's. A missing, corrupt or stale entry is reported (the returned record's
`rebuilt_reason`) and rebuilt.

torch and onnxruntime are imported inside the functions: importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError
from numabench.fileio import file_sha256, locked, write_json_atomic
from numabench.workers.backends import ORT_OPT_LEVELS as OPT_LEVELS

CACHE_FORMAT = 1
OPSET = 17  # LayerNormalization is a single op from 17 on; every ORT >= 1.14 runs it
EXPORTER = "torchscript"  # torch.onnx.export(dynamo=False): ships with torch, exports in < 1 s
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
ORT_PRECISIONS = ("fp32", "int8")
# The check batch: two rows, the second padded after 10 tokens, so the mask path is exercised.
CHECK_SHAPE = (2, 16)
CHECK_PADDED_FROM = 10
CHECK_SEED = 1234
# Agreement with PyTorch fp32 on the check batch. fp32: largest absolute difference of the last
# hidden state (LayerNorm output, values of order 1); measured ~1e-6 on bert-tiny and a few 1e-6
# on bert-base. int8 (dynamic quantization of the weights and activations of MatMul) changes
# values by design: only the correlation with the fp32 output is held to a bound.
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_CORRELATION = 0.99

log = logging.getLogger("numabench.onnx")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numabench" / "onnx"


@dataclasses.dataclass(frozen=True)
class PreparedOnnx:
    """What `prepare_onnx` did and found; `record()` is what the results document keeps."""

    path: Path
    key: Mapping[str, Any]
    digest: str
    sha256: str
    cache: str  # "hit" (reused), "miss" (built, nothing there), "rebuilt" (there, but unusable)
    rebuilt_reason: str | None
    exports: int  # torch.onnx.export calls made by this call (0 when everything was cached)
    quantizations: int  # quantize_dynamic calls made by this call
    agreement: Mapping[str, Any]
    prepare_s: float
    source: PreparedOnnx | None = None  # int8: the fp32 entry it was quantized from

    def record(self) -> dict[str, Any]:
        out = {
            "model_path": str(self.path), "cache_dir": str(self.path.parent),
            "file_bytes": self.path.stat().st_size, "sha256": self.sha256, "key_digest": self.digest,
            "cache": self.cache, "rebuilt_reason": self.rebuilt_reason,
            "exports": self.exports + (self.source.exports if self.source else 0),
            "quantizations": self.quantizations, "exporter": EXPORTER, "opset": OPSET,
            "prepare_s": round(self.prepare_s, 3), "agreement": dict(self.agreement),
        }
        if self.source is not None:
            out["source"] = {"model_path": str(self.source.path), "cache": self.source.cache,
                             "rebuilt_reason": self.source.rebuilt_reason}
        return out

    def warnings(self) -> list[str]:
        out = []
        for entry in (self.source, self):
            if entry is not None and entry.rebuilt_reason:
                out.append(f"ONNX cache entry {entry.path.name} was unusable ({entry.rebuilt_reason}); "
                           "rebuilt")
        if not self.agreement.get("within", True):
            out.append(f"ONNX Runtime disagrees with PyTorch fp32 on the check batch: "
                       f"{_describe_agreement(self.agreement)}")
        return out


def _describe_agreement(a: Mapping[str, Any]) -> str:
    return (f"max abs diff {a['max_abs_diff']:.3g}, correlation {a['correlation']:.6f} "
            f"(tolerance: {', '.join(f'{k} {v}' for k, v in a['tolerance'].items())})")


# ---- keys and files ----

def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "onnxruntime", "onnx"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def cache_key(spec: Any, precision: str, seed: int) -> dict[str, Any]:
    """Everything the exported file depends on. The file name holds a hash of it."""
    key: dict[str, Any] = {"format": CACHE_FORMAT, "model": spec.name, "kind": spec.kind,
                           "precision": precision, "opset": OPSET, "exporter": EXPORTER,
                           "versions": library_versions()}
    if spec.kind == "builtin":
        key["config"] = dict(spec.config or {})
        key["seed"] = seed  # random weights: the seed is the weights
    elif spec.kind in ("package", "folder"):
        folder = Path(spec.path)
        key["path"] = str(folder)
        key["config"] = json.loads((folder / "config.json").read_text())
        # The weights themselves are too big to hash on every run; size and mtime catch a change.
        key["weights"] = sorted(
            [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir()
            if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"))
    else:  # hub: the config as transformers resolves it (its own cache, or the network)
        from numabench.workers.models import offline_env_for

        offline_env_for(spec)
        from transformers import AutoConfig

        key["config"] = AutoConfig.from_pretrained(spec.path).to_dict()
    if precision == "int8":
        key["quantization"] = {"method": "onnxruntime.quantization.quantize_dynamic",
                               "weight_type": "QInt8", "per_channel": False, "reduce_range": False}
    return key


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class _Entry:
    folder: Path
    stem: str

    @property
    def model(self) -> Path:
        return self.folder / f"{self.stem}.onnx"

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.stem}.json"

    @property
    def check(self) -> Path:
        return self.folder / f"{self.stem}.check.npz"

    @property
    def lock(self) -> Path:
        return self.folder / f"{self.stem}.lock"

    def remove(self) -> None:
        for p in (self.model, self.sidecar, self.check):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _entry(folder: Path, spec: Any, precision: str, digest: str) -> _Entry:
    name = re.sub(r"[^\w.-]+", "_", Path(spec.name).name or spec.name)[:48] or "model"
    return _Entry(folder, f"{name}-{precision}-{digest}")




def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


# ---- checking an entry ----

def ort_session(path: Path | str, threads: int = 1, opt_level: str = "all",
                affinity_cpus: list[int] | None = None, pin_threads: bool = False):
    """An ONNX Runtime CPU session with numabench's settings (shared by the backend and checks)."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[opt_level]
    so.log_severity_level = 3  # errors only: ORT's warnings would repeat in every worker log
    if affinity_cpus and threads > 1:
        # ORT places the threads it creates (all but the calling one) itself when told to; give
        # each the instance's whole CPU set so none can leave it. Ids are 1-based in this entry.
        cpus = sorted(affinity_cpus)
        if pin_threads and threads == len(cpus):
            # One CPU per thread: ORT's thread k on the instance's CPU k; the calling thread
            # (not ORT's to place) keeps the first CPU to itself.
            per_thread = [str(c + 1) for c in cpus[1:]]
        else:
            per_thread = [",".join(str(c + 1) for c in cpus)] * (threads - 1)
        so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(per_thread))
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def check_batch(vocab_size: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(CHECK_SEED)
    ids = rng.integers(0, vocab_size, size=CHECK_SHAPE, dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, CHECK_PADDED_FROM:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def compare(out: Any, ref: Any, precision: str, opt_level: str) -> dict[str, Any]:
    """Agreement of an ONNX Runtime output with the PyTorch fp32 reference."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise NumabenchError(f"ONNX output shape {list(out.shape)} != PyTorch's {list(ref.shape)}")
    diff = np.abs(out - ref)
    corr = float(np.corrcoef(out.ravel(), ref.ravel())[0, 1]) if out.size > 1 else 1.0
    max_abs = float(diff.max())
    if precision == "fp32":
        tolerance = {"max_abs_diff": FP32_MAX_ABS_DIFF}
        within = max_abs <= FP32_MAX_ABS_DIFF
    else:
        tolerance = {"correlation": INT8_MIN_CORRELATION}
        within = corr >= INT8_MIN_CORRELATION
    return {"max_abs_diff": max_abs, "mean_abs_diff": float(diff.mean()), "correlation": corr,
            "reference_max_abs": float(np.abs(ref).max()), "check_batch": list(CHECK_SHAPE),
            "padded_rows": 1, "precision": precision, "opt_level": opt_level,
            "tolerance": tolerance, "within": bool(within)}


def _verify(entry: _Entry, key: Mapping[str, Any], precision: str,
            opt_level: str) -> tuple[str | None, dict[str, Any] | None, str]:
    """(why the entry is unusable or None, agreement, sha256)."""
    import numpy as np

    if not entry.sidecar.is_file():
        return "sidecar missing", None, ""
    try:
        meta = json.loads(entry.sidecar.read_text())
    except (OSError, ValueError) as e:
        return f"sidecar unreadable: {e}", None, ""
    want = json.loads(json.dumps(key, default=str))  # as the sidecar holds it (lists, str)
    if not isinstance(meta, dict) or meta.get("key") != want:
        old = meta.get("key") if isinstance(meta, dict) else None
        fields = (sorted(k for k in set(want) | set(old) if want.get(k) != old.get(k))
                  if isinstance(old, dict) else ["key"])
        return f"stale: key differs in {', '.join(fields)}", None, ""
    if not entry.model.is_file():
        return "model file missing", None, ""
    sha = file_sha256(entry.model)
    if sha != meta.get("sha256"):
        return "corrupt: model checksum mismatch", None, sha
    try:
        if file_sha256(entry.check) != meta.get("check_sha256"):
            return "corrupt: check batch checksum mismatch", None, sha
        with np.load(entry.check) as npz:
            check = {k: npz[k] for k in (*INPUT_NAMES, "reference")}
    except (OSError, ValueError, KeyError) as e:
        return f"check batch unreadable: {e}", None, sha
    try:
        session = ort_session(entry.model, opt_level=opt_level)
        out = session.run([OUTPUT_NAME], {k: check[k] for k in INPUT_NAMES})[0]
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        return f"unreadable by onnxruntime: {type(e).__name__}: {str(e).splitlines()[0][:200]}", None, sha
    return None, compare(out, check["reference"], precision, opt_level), sha


# ---- building an entry ----

def _export_fp32(spec: Any, seed: int, entry: _Entry) -> float:
    """Export with torch.onnx; write the model and the check batch. Returns the export seconds."""
    import numpy as np
    import torch

    from numabench.workers import models

    model = models.build_pytorch_model(spec, seed)
    vocab = int(getattr(model.config, "vocab_size", None) or spec.vocab_size or 1000)
    check = check_batch(vocab)
    tensors = {k: torch.from_numpy(v) for k, v in check.items()}
    # The reference comes first: a TorchScript trace leaves the traced transformers model in a
    # state where it no longer computes the same outputs (seen with transformers 5).
    with torch.inference_mode():
        reference = model(**tensors).last_hidden_state.float().numpy()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    dynamic = {name: {0: "batch", 1: "seq"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    tmp = _tmp(entry.model)
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Deprecation of the TorchScript exporter and tracer notes on shape arithmetic: the
            # agreement check below is what says whether the graph is right.
            warnings.simplefilter("ignore")
            torch.onnx.export(LastHiddenState(model), (tensors["input_ids"], tensors["attention_mask"]),
                              str(tmp), dynamo=False, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
        os.replace(tmp, entry.model)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    export_s = time.monotonic() - t0
    tmp_check = _tmp(entry.check).with_suffix(".npz")
    np.savez(tmp_check, reference=reference, **check)
    os.replace(tmp_check, entry.check)
    return export_s


def _quantize_int8(source: PreparedOnnx, source_entry: _Entry, entry: _Entry) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = _tmp(entry.model)
    t0 = time.monotonic()
    ort_log = logging.getLogger()  # quantize_dynamic logs a pre-processing hint at WARNING
    level = ort_log.level
    try:
        ort_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source.path), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=False, reduce_range=False)
        os.replace(tmp, entry.model)
    finally:
        ort_log.setLevel(level)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    # The int8 model is checked against the same fp32 PyTorch reference.
    data = source_entry.check.read_bytes()
    tmp_check = _tmp(entry.check)
    tmp_check.write_bytes(data)
    os.replace(tmp_check, entry.check)
    return time.monotonic() - t0


def prepare_onnx(spec: Any, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 seed: int = 0, opt_level: str = "all",
                 log_event: Callable[[str], None] | None = None) -> PreparedOnnx:
    """The ONNX file for `spec` at `precision`: reused from the cache when valid, else built.

    Safe to call from several processes at once (one export; the others wait and reuse it).
    """
    if precision not in ORT_PRECISIONS:
        raise NumabenchError(f"ONNX export supports {', '.join(ORT_PRECISIONS)}, not {precision}")
    if opt_level not in OPT_LEVELS:
        raise NumabenchError(f"unknown ONNX Runtime optimization level {opt_level!r}; "
                             f"choose one of {', '.join(OPT_LEVELS)}")
    say = log_event or log.info
    t0 = time.monotonic()
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NumabenchError(f"ONNX cache folder {folder}: {e.strerror}") from None
    folder = folder.resolve()
    source = source_entry = None
    if precision == "int8":
        source = prepare_onnx(spec, "fp32", folder, seed, opt_level, log_event)
        source_entry = _Entry(folder, source.path.name.removesuffix(".onnx"))
    key = cache_key(spec, precision, seed)
    digest = key_digest(key)
    entry = _entry(folder, spec, precision, digest)
    with locked(entry.lock):
        reason, agreement, sha = None, None, ""
        present = entry.model.exists() or entry.sidecar.exists() or entry.check.exists()
        if present:
            reason, agreement, sha = _verify(entry, key, precision, opt_level)
            if reason is None:
                say(f"onnx cache hit: {entry.model}")
                return PreparedOnnx(entry.model, key, digest, sha, "hit", None, 0, 0, agreement,
                                    time.monotonic() - t0, source)
            say(f"onnx cache entry {entry.model.name} unusable ({reason}); rebuilding")
            entry.remove()
        exports = quantizations = 0
        if precision == "fp32":
            say(f"exporting {spec.name} to ONNX (opset {OPSET}): {entry.model}")
            build_s = _export_fp32(spec, seed, entry)
            exports = 1
        else:
            say(f"quantizing {source.path.name} to int8 (dynamic): {entry.model}")
            build_s = _quantize_int8(source, source_entry, entry)
            quantizations = 1
        sha = file_sha256(entry.model)
        write_json_atomic(entry.sidecar, sort_keys=True, doc={
            "format": CACHE_FORMAT, "key": key, "digest": digest, "file": entry.model.name,
            "sha256": sha, "bytes": entry.model.stat().st_size,
            "check_sha256": file_sha256(entry.check),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build_s": round(build_s, 3),
            "source": source.path.name if source is not None else None,
        })
        problem, agreement, _ = _verify(entry, key, precision, opt_level)
        if problem is not None:
            raise NumabenchError(f"the freshly built ONNX file {entry.model} is unusable: {problem}")
        say(f"onnx {precision} ready in {build_s:.2f} s: {_describe_agreement(agreement)}")
        return PreparedOnnx(entry.model, key, digest, sha, "rebuilt" if present else "miss", reason,
                            exports, quantizations, agreement, time.monotonic() - t0, source)
