"""Memory of running workers, read by the launcher from /proc: what is private, what is shared.

`sample(pid, files)` returns one instance's RSS, PSS and USS (psutil), its anonymous memory (the
private allocations: heap, arenas, copy-on-write copies) and, for each shared weights file it maps,
how much of the file is resident in the mapping, its PSS, the bytes it copied on write (`copied`:
the mapping's anonymous pages; 0 unless something wrote to the weights), and the NUMA nodes holding
its pages (/proc/PID/numa_maps "N<node>=<pages>").

Not Private_Dirty: tmpfs pages are always dirty (they have no backing store), and smaps counts a
page as "private" when only this process maps it, so Private_Dirty of a tmpfs mapping is every
page no other worker has touched yet — not copies. USS overstates private memory the same way.
Parsing functions are pure; `sample` does the reading.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_SMAPS_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")
_NODE_PAGES = re.compile(r"^N(\d+)=(\d+)$")


def parse_smaps(text: str, files: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per wanted file: summed Rss, Pss and Anonymous ("copied": pages copied on write), in
    bytes, over its mappings in smaps."""
    wanted = set(files)
    out: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        m = _SMAPS_HEADER.match(line)
        if m:
            path = m.group(1).strip()
            current = out.setdefault(path, {"rss": 0, "pss": 0, "copied": 0, "mappings": 0}) \
                if path in wanted else None
            if current is not None:
                current["mappings"] += 1
            continue
        if current is None:
            continue
        key, _, value = line.partition(":")
        field = {"Rss": "rss", "Pss": "pss", "Anonymous": "copied"}.get(key)
        if field:
            current[field] += int(value.split()[0]) * 1024
    return out


def parse_numa_maps(text: str, files: Iterable[str], page_size: int = 4096) -> dict[str, dict[str, int]]:
    """Per wanted file: resident bytes per NUMA node ({"0": bytes}) over its mappings."""
    wanted = set(files)
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        path = next((f[5:] for f in fields if f.startswith("file=")), None)
        if path not in wanted:
            continue
        size = page_size
        for f in fields:
            if f.startswith("kernelpagesize_kB="):
                size = int(f.split("=")[1]) * 1024
        nodes = out.setdefault(path, {})
        for f in fields:
            m = _NODE_PAGES.match(f)
            if m:
                nodes[m.group(1)] = nodes.get(m.group(1), 0) + int(m.group(2)) * size
    return out


def parse_rollup(text: str) -> dict[str, int]:
    """smaps_rollup's Anonymous (bytes): memory no file backs, private to this process."""
    for line in text.splitlines():
        if line.startswith("Anonymous:"):
            return {"anonymous": int(line.split()[1]) * 1024}
    return {}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # gone, or not ours to read: the sample says what it could not see
        return ""


def sample(pid: int, files: Iterable[str] = ()) -> dict[str, Any]:
    """One process's memory now; {"error": ...} when it is gone or unreadable."""
    import psutil

    files = [str(f) for f in files]
    try:
        full = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {"rss": full.rss, "pss": getattr(full, "pss", None),
                           "uss": full.uss, **parse_rollup(_read(f"/proc/{pid}/smaps_rollup"))}
    if files:
        maps = parse_smaps(_read(f"/proc/{pid}/smaps"), files)
        nodes = parse_numa_maps(_read(f"/proc/{pid}/numa_maps"), files)
        out["shared_files"] = {f: {**maps.get(f, {"mappings": 0}), "nodes": nodes.get(f, {})}
                               for f in files}
    return out


def sample_instances(pids: Mapping[int, int], files: Mapping[int, Iterable[str]]) -> dict[int, dict[str, Any]]:
    """`sample` for every instance {id: pid}; `files` names each instance's shared files."""
    return {iid: sample(pid, files.get(iid, ())) for iid, pid in pids.items()}
