"""Every file numabench reads or writes as a document goes through here.

`read_text` turns every way a read can fail (missing, a folder, no permission, not UTF-8, empty,
absurdly large) into a NumabenchError that names the file, so no caller shows a traceback.
`write_json_atomic` writes through a temporary file and a rename (a crash never leaves half a
document) with the permissions the user's umask gives any new file, not mkstemp's 0600.
`check_output_file` / `check_output_dir` find an unwritable destination before a run starts.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError

MAX_TEXT_BYTES = 64 << 20  # plans, presets, experiments and text files are small; refuse the rest


class FileReadError(NumabenchError):
    """A file could not be read as text. The message starts with the file's path."""


def _reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError) or e.errno == errno.EISDIR:
        return "is a folder, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    return e.strerror or str(e)


def read_text(path: str | os.PathLike, what: str = "file", *, allow_empty: bool = True,
              max_bytes: int = MAX_TEXT_BYTES, errors: str = "strict") -> str:
    """The UTF-8 text of `path`; any failure is a FileReadError naming the file and `what` it is.

    `errors="replace"` is for kernel files (sysfs, procfs) whose odd bytes the parsers judge.
    """
    p = os.fspath(path)
    try:
        if os.path.isdir(p):
            raise IsADirectoryError(errno.EISDIR, "is a folder", p)
        with open(p, "rb") as f:
            # in chunks: read(max_bytes + 1) would allocate the whole bound up front, and
            # procfs/sysfs files report a size of 0 or 4096 whatever they hold
            chunks, size = [], 0
            while size <= max_bytes and (chunk := f.read(1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    except OSError as e:
        raise FileReadError(f"{p}: cannot read {what}: {_reason(e)}") from None
    if len(data) > max_bytes:
        raise FileReadError(f"{p}: {what} is larger than {max_bytes >> 20} MiB; not read")
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise FileReadError(f"{p}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} "
                            f"at offset {e.start})") from None
    if not allow_empty and not text.strip():
        raise FileReadError(f"{p}: {what} is empty")
    return text


def _umask() -> int:
    # os.umask can only be read by setting it; done once per write, restored at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` via a temporary file in the same folder and a rename; the folder must exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; colleagues may need to read it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, doc: Any, *, sort_keys: bool = False) -> None:
    """A JSON document written atomically (see write_text_atomic); creates missing folders."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=sort_keys) + "\n")


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a file destination that cannot be written: its folder must exist
    (nothing is created silently) and be writable, and the path must not be a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise NumabenchError(f"{what} {p} is a folder; give a file name")
    if not parent.is_dir():
        raise NumabenchError(f"{what} {p}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise NumabenchError(f"{what} {p}: no permission to write there")
    return p


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Refuse a folder destination that is a file or cannot be created or written. Its nearest
    existing ancestor must be a writable folder (missing levels are created at run time)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NumabenchError(f"{what} {p} exists and is not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NumabenchError(f"{what} {p}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NumabenchError(f"{what} {p}: no permission to write in {probe}")
    return p


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (the weights and ONNX caches check entries by it)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the duration: one process at a time
    builds a cache entry."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pid_alive(pid: object) -> bool:
    """Whether the process a file names (a state file, a lock, a per-run copy) still runs: how a
    stale file is told from a live one. Another user's process counts as alive."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # beyond pid_t: no such process
        return False
    return True
