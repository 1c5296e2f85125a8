"""One read-only copy of a PyTorch model's weights per NUMA node, mapped by that node's workers.

The launcher calls `prepare_shared_weights` once per run, before any worker starts:

1. The weights cache (on disk: $XDG_CACHE_HOME/numabench/weights, ~/.cache/numabench/weights)
   holds the model's fp32 tensors (parameters and buffers) as one safetensors file, keyed like the
   ONNX cache (model, config, weights seed, library versions) and checked by sha256 on every use;
   a missing, stale or corrupt entry is rebuilt.
2. For each set of memory nodes the plan's instances are bound to, a child process sets its
   memory policy to those nodes (set_mempolicy(MPOL_BIND)) and copies the file onto tmpfs
   (/dev/shm by default): tmpfs pages are allocated under the writer's policy, so the copy's pages
   live on that node and stay there (tmpfs is not reclaimed like the page cache).
3. Each worker gets its node's path (backend option "weights_path") and builds the model on the
   meta device, then assigns every tensor as a view of the mapped file (`load_model`): no private
   copy; the pages are shared by every worker of the node through the page cache.

Where there is no usable tmpfs (or the copies would not fit), workers map the disk cache file
itself: still one copy, but in the page cache, its pages placed where first read and reclaimable.

The per-run tmpfs copies carry the launcher's pid in their name and are removed at the end of the
run (`remove_copies`); copies left by a run that was killed are removed by the next run
(`remove_stale_copies`). `keep=True` writes reusable copies without a pid (checked by sha256 when
reused, rebuilt when corrupt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError
from numabench.fileio import file_sha256, locked, pid_alive

WEIGHTS_FORMAT = 1
ALIGN = 64  # tensor data starts on a cache line when the tensors before it are multiples of 64 B
SHM_ROOT = Path("/dev/shm")
# Free space left on tmpfs after the copies: a full /dev/shm breaks other programs (and ZeroMQ).
TMPFS_RESERVE_BYTES = 256 << 20
_PER_RUN = re.compile(r"\.pid(\d+)\.safetensors(\.tmp)?$")
# set_mempolicy(2) numbers; MPOL_BIND = 2. Other architectures fall back to numactl.
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237, "ppc64le": 261, "s390x": 270}
MPOL_BIND = 2


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numabench" / "weights"


def default_copies_dir() -> Path:
    return SHM_ROOT / f"numabench-{os.getuid()}" / "weights"


# ---- pure planning ----

def nodes_label(nodes: Sequence[int]) -> str:
    return "node" + "-".join(str(n) for n in sorted(nodes)) if nodes else "nodes-any"


@dataclasses.dataclass(frozen=True)
class NodeCopy:
    """Where the copy for one set of memory nodes goes (() = instances without memory binding)."""

    nodes: tuple[int, ...]
    path: Path
    per_run: bool  # removed at the end of the run (named with the launcher's pid)


def plan_copies(node_sets: Iterable[Sequence[int]], folder: Path, stem: str, owner_pid: int,
                keep: bool) -> tuple[NodeCopy, ...]:
    """One copy per distinct node set, in node order; per-run copies carry the owner's pid."""
    out = []
    for nodes in sorted({tuple(sorted(n)) for n in node_sets}):
        suffix = "" if keep else f".pid{owner_pid}"
        out.append(NodeCopy(nodes, folder / f"{stem}.{nodes_label(nodes)}{suffix}.safetensors",
                            per_run=not keep))
    return tuple(out)


def stale_copies(names: Iterable[str], alive: Callable[[int], bool]) -> list[str]:
    """Per-run copies (and their temporary files) whose owner process is gone."""
    out = []
    for name in names:
        m = _PER_RUN.search(name)
        if m and not alive(int(m.group(1))):
            out.append(name)
    return sorted(out)


def mempolicy_mask(nodes: Sequence[int]) -> int:
    mask = 0
    for n in nodes:
        mask |= 1 << n
    return mask


# ---- the cache entry on disk ----

def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "missing"
    return out


def weights_key(spec: Any, seed: int) -> dict[str, Any]:
    """What the file depends on: the ONNX cache's model part (config, seed or files), versions."""
    from numabench.workers.backends.onnx_cache import cache_key

    key = cache_key(spec, "fp32", seed)
    for field in ("opset", "exporter", "precision"):
        key.pop(field, None)
    key.update(format=f"weights-{WEIGHTS_FORMAT}", dtype="fp32", versions=library_versions())
    return key


def _key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stem(spec: Any, digest: str) -> str:
    name = re.sub(r"[^\w.-]+", "_", Path(spec.name).name or spec.name)[:48] or "model"
    return f"{name}-fp32-{digest}"




def _aligned_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header padded (spaces, as safetensors itself pads) so the data
    section starts at a multiple of ALIGN: mapped tensors then start on cache lines."""
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].rstrip(b" ")
    pad = (-(8 + len(header))) % ALIGN
    header += b" " * pad
    return struct.pack("<Q", len(header)) + header + data[8 + n:]


def save_model_file(model: Any, path: Path) -> int:
    """Write every parameter and buffer (non-persistent ones too: the meta-built model needs them)
    as one safetensors file; tensors shared under several names are stored once. Returns bytes."""
    import torch
    from safetensors.torch import save

    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False))
    for name, t in named:
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.contiguous().clone() if not t.is_contiguous() else t
    meta = {"numabench": json.dumps({"format": WEIGHTS_FORMAT, "aliases": aliases})}
    with torch.no_grad():
        data = _aligned_safetensors(save(tensors, metadata=meta))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return len(data)


def _check_entry(path: Path, sidecar: Path, key: Mapping[str, Any]) -> tuple[str | None, str]:
    """(why the entry is unusable or None, its sha256)."""
    if not sidecar.is_file():
        return "sidecar missing", ""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        return f"sidecar unreadable: {e}", ""
    want = json.loads(json.dumps(key, default=str))
    if not isinstance(meta, dict) or meta.get("key") != want:
        return "stale: key differs", ""
    if not path.is_file():
        return "weights file missing", ""
    sha = file_sha256(path)
    if sha != meta.get("sha256"):
        return "corrupt: checksum mismatch", sha
    return None, sha


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    path: Path
    sha256: str
    bytes: int
    cache: str  # hit, miss, rebuilt
    rebuilt_reason: str | None
    build_s: float
    built_by: str | None = None  # a miss: "fork server <pid>" or "pid <pid>" (this process)


def build_file(spec: Any, seed: int, path: Path) -> int:
    """Build the model and write its weights file (torch imported here): bytes written."""
    from numabench.workers import models

    return save_model_file(models.build_pytorch_model(spec, seed), path)


# Builds the weights file elsewhere (a process that has imported torch already: the launcher's
# fork server); returns who built it, or None when it could not and this process must.
Builder = Callable[[Any, int, Path], "str | None"]


def prepare_cache_entry(spec: Any, seed: int, cache_dir: str | os.PathLike | None = None,
                        log: Callable[[str], None] | None = None,
                        builder: Builder | None = None) -> CacheEntry:
    """The fp32 weights file on disk: reused when its key and sha256 match, else (re)built, by
    `builder` where given (still under this process's lock), else here."""
    say = log or (lambda _m: None)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NumabenchError(f"weights cache folder {folder}: {e.strerror}; set XDG_CACHE_HOME to a "
                             "writable folder, or run with --no-share-weights") from None
    key = weights_key(spec, seed)
    digest = _key_digest(key)
    stem = _stem(spec, digest)
    path, sidecar = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    with locked(folder / f"{stem}.lock"):
        present = path.exists() or sidecar.exists()
        reason = None
        if present:
            reason, sha = _check_entry(path, sidecar, key)
            if reason is None:
                say(f"weights cache hit: {path}")
                return CacheEntry(path, sha, path.stat().st_size, "hit", None, 0.0)
            say(f"weights cache entry {path.name} unusable ({reason}); rebuilding")
        t0 = time.monotonic()
        built_by = builder(spec, seed, path) if builder is not None else None
        if built_by is None:
            build_file(spec, seed, path)
            built_by = f"pid {os.getpid()}"
        size = path.stat().st_size
        sha = file_sha256(path)
        tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({
            "format": WEIGHTS_FORMAT, "key": key, "digest": digest, "sha256": sha, "bytes": size,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp, sidecar)
        build_s = time.monotonic() - t0
        say(f"weights of {spec.name} written in {build_s:.2f} s by {built_by}: {path}")
        return CacheEntry(path, sha, size, "rebuilt" if present else "miss", reason, build_s, built_by)


# ---- the per-node copies ----

def set_mempolicy_bind(nodes: Sequence[int]) -> None:
    """Bind this process's future allocations to `nodes` (raises OSError where it cannot)."""
    import ctypes
    import platform

    number = _SYS_SET_MEMPOLICY.get(platform.machine())
    if number is None:
        raise OSError(f"set_mempolicy: syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    mask = (ctypes.c_ulong * 16)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    if libc.syscall(number, MPOL_BIND, mask, ctypes.c_ulong(16 * 64 + 1)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy(MPOL_BIND, nodes {list(nodes)}): {os.strerror(err)}")


def write_copy(source: Path, dest: Path, sha256: str, nodes: Sequence[int]) -> None:
    """In the writer child: bind memory to `nodes`, copy `source` to `dest` (via a temporary file),
    checking the bytes against `sha256`."""
    if nodes:
        set_mempolicy_bind(nodes)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a run ending now may remove it
    tmp = dest.with_name(dest.name + ".tmp")
    h = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(4 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != sha256:
            raise NumabenchError(f"{source} changed while it was copied (sha256 {h.hexdigest()}, "
                                 f"expected {sha256}); run again")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_in_child(source: Path, dest: Path, sha256: str, nodes: Sequence[int]) -> None:
    argv = [sys.executable, "-m", "numabench.workers.backends.shared_weights", "write",
            str(source), str(dest), sha256, ",".join(map(str, nodes))]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise NumabenchError(f"writing the weights copy for {nodes_label(nodes)} to {dest} failed: "
                             f"{(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")


def _is_tmpfs(folder: Path) -> bool:
    best, fstype = "", ""
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1].replace("\\040", " ")
                if str(folder).startswith(mount.rstrip("/") + "/") or str(folder) == mount:
                    if len(mount) > len(best):
                        best, fstype = mount, parts[2]
    return fstype == "tmpfs"


def remove_stale_copies(folder: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove per-run copies left by launchers that are gone (killed before their cleanup)."""
    if not folder.is_dir():
        return []
    removed = []
    for name in stale_copies(os.listdir(folder), pid_alive):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(folder / name)
    if removed and log:
        log(f"removed {len(removed)} weights copies left by interrupted runs: "
            f"{', '.join(p.name for p in removed)}")
    return removed


def remove_copies(paths: Iterable[str | os.PathLike]) -> None:
    """Remove per-run copies, then their folders (up to numabench-UID) when left empty."""
    folders = set()
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        folders.add(Path(p).parent)
    for folder in folders:
        for f in (folder, folder.parent):
            if not f.name.startswith(("numabench", "weights")):
                break
            try:
                f.rmdir()
            except OSError:  # not empty (kept copies, another run): leave it
                break


@dataclasses.dataclass(frozen=True)
class SharedWeights:
    """What `prepare_shared_weights` did: the path per node set, and the files to remove."""

    paths: Mapping[tuple[int, ...], str]
    temporary: tuple[str, ...]
    record: Mapping[str, Any]
    warnings: tuple[str, ...]


def prepare_shared_weights(spec: Any, seed: int, node_sets: Iterable[Sequence[int]], *,
                           cache_dir: str | os.PathLike | None = None,
                           copies_dir: str | os.PathLike | None = None, keep: bool = False,
                           log: Callable[[str], None] | None = None,
                           builder: Builder | None = None) -> SharedWeights:
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    entry = prepare_cache_entry(spec, seed, cache_dir, say, builder)
    node_sets = sorted({tuple(sorted(n)) for n in node_sets})
    folder = Path(copies_dir) if copies_dir else default_copies_dir()
    warnings: list[str] = []
    record: dict[str, Any] = {
        "cache_file": str(entry.path), "sha256": entry.sha256, "file_bytes": entry.bytes,
        "cache": entry.cache, "rebuilt_reason": entry.rebuilt_reason,
        "build_s": round(entry.build_s, 3), "built_by": entry.built_by}
    if entry.rebuilt_reason:
        warnings.append(f"weights cache entry {entry.path.name} was unusable "
                        f"({entry.rebuilt_reason}); rebuilt")
    fallback = None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_copies(folder, say)
        fs = os.statvfs(folder)
        free = fs.f_bavail * fs.f_frsize
        need = entry.bytes * len(node_sets) + TMPFS_RESERVE_BYTES
        if not _is_tmpfs(folder.resolve()):
            fallback = f"{folder} is not on tmpfs"
        elif free < need:
            fallback = f"{folder} has {free >> 20} MiB free, the copies need {need >> 20} MiB"
    except OSError as e:
        fallback = f"{folder}: {e.strerror}"
    if fallback:
        warnings.append(f"weights shared through the page cache ({entry.path}), one copy for all "
                        f"nodes, pages placed where first read: {fallback}")
        record.update(placement="page cache", fallback_reason=fallback,
                      copies=[{"nodes": list(n), "path": str(entry.path), "cache": "page cache"}
                              for n in node_sets], prepare_s=round(time.monotonic() - t0, 3))
        return SharedWeights({n: str(entry.path) for n in node_sets}, (), record, tuple(warnings))
    copies = plan_copies(node_sets, folder, entry.path.stem, os.getpid(), keep)
    done: list[str] = []
    rows = []
    # Kept copies are shared between runs: one writer at a time (the lock lives with the cache,
    # so nothing is left on tmpfs).
    try:
        with locked(entry.path.with_suffix(".copies.lock")):
            for c in copies:
                status = "written"
                if not c.per_run and c.path.is_file():
                    if file_sha256(c.path) == entry.sha256:
                        status = "reused"
                    else:
                        status = "rewritten (corrupt)"
                        warnings.append(f"kept weights copy {c.path} was corrupt; rewritten")
                if status != "reused":
                    t1 = time.monotonic()
                    if c.per_run:
                        done.append(str(c.path))
                    _write_in_child(entry.path, c.path, entry.sha256, c.nodes)
                    say(f"weights copy for {nodes_label(c.nodes)} written in "
                        f"{time.monotonic() - t1:.2f} s: {c.path}")
                rows.append({"nodes": list(c.nodes), "path": str(c.path), "cache": status,
                             "kept": not c.per_run})
    except BaseException:  # an interrupt too: no half-made copy stays on tmpfs
        remove_copies(done)
        raise
    record.update(placement="tmpfs", copies_dir=str(folder), copies=rows, kept=keep,
                  prepare_s=round(time.monotonic() - t0, 3))
    return SharedWeights({c.nodes: str(c.path) for c in copies}, tuple(done), record, tuple(warnings))


# ---- in the worker ----

def load_model(spec: Any, path: str | os.PathLike) -> Any:
    """The model built on the meta device, every parameter and buffer a view of the mapped file.

    safetensors maps the file (MAP_PRIVATE, read only here): the pages stay the shared file pages;
    a write would copy one page privately, never change the file.
    """
    import torch
    from safetensors import safe_open

    from numabench.workers import models

    with torch.device("meta"):
        model = models.build_pytorch_model(spec, seed=0, weights=False)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("numabench", "{}"))
        names = list(f.keys())
        tensors = {name: f.get_tensor(name) for name in names}
    for alias, target in meta.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise NumabenchError(f"weights file {path} has {name!r}, which the model "
                                 f"{spec.name} does not; remove the file to rebuild it") from None
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        elif leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            raise NumabenchError(f"weights file {path}: {name!r} is neither a parameter nor a "
                                 f"buffer of {spec.name}; remove the file to rebuild it")
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta]
    if missing:
        raise NumabenchError(f"weights file {path} lacks {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} for {spec.name}; remove it to "
                             "rebuild it, or run with --no-share-weights")
    return model.eval()


def _main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "write":
        source, dest, sha, nodes = argv[1:]
        try:
            write_copy(Path(source), Path(dest), sha, [int(n) for n in nodes.split(",") if n])
        except (OSError, NumabenchError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m numabench.workers.backends.shared_weights write SRC DEST SHA256 "
          "NODES", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
