"""Pure parsers for the kernel's CPU list ("0-3,8") and hex mask ("00000000,0000ff0f") formats."""
from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")

# The largest CPU count a Linux kernel can be built for (CONFIG_NR_CPUS tops out at 8192, x86
# MAXSMP); no CPU or node number reaches it. Checked before a range is expanded, so a typo like
# "0-99999999999" is refused at once instead of filling memory.
MAX_CPUS = 8192


def parse_cpulist(text: str, limit: int = MAX_CPUS) -> tuple[int, ...]:
    """Parse a kernel cpulist ("0-3,8", "", "0-7:2/4") into sorted, unique CPU numbers below
    `limit`.

    Raises ValueError on anything else, so callers can name the file it came from.
    """
    cpus: set[int] = set()
    text = text.replace("\x00", "").strip()  # captured sysfs files can carry NUL padding
    if text in ("", "(null)"):  # empty lists; nohz_full shows "(null)" when unset
        return ()
    for part in text.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"not a CPU list: {text[:80]!r}")
        if any(g is not None and len(g) > 9 for g in m.groups()):
            raise ValueError(f"{part.strip()[:40]!r} is beyond the kernel's limit of {limit} CPUs")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            raise ValueError(f"descending range {part!r} in CPU list {text!r}")
        if last >= limit:
            raise ValueError(f"{last} in {part.strip()!r} is beyond the kernel's limit of "
                             f"{limit} CPUs")
        if m.group(3) is not None:  # "a-b:used/group" form (kernel boot parameters)
            used, group = int(m.group(3)), int(m.group(4))
            if group == 0 or used > group:
                raise ValueError(f"bad stride {part!r} in CPU list {text!r}")
            cpus.update(c for c in range(first, last + 1) if (c - first) % group < used)
        else:
            cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpulist(cpus) -> str:
    """Format CPU numbers as a kernel cpulist: (0, 1, 2, 3, 8) -> "0-3,8"."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


_HEXWORD = re.compile(r"^[0-9a-fA-F]{1,8}$")


def parse_cpumask(text: str) -> tuple[int, ...]:
    """Parse a kernel hex CPU mask: comma-separated 32-bit words, most significant first."""
    words = text.replace("\x00", "").strip().split(",")
    if not words or any(not _HEXWORD.match(w) for w in words):
        raise ValueError(f"not a CPU mask: {text.strip()!r}")
    if len(words) * 32 > MAX_CPUS:
        raise ValueError(f"CPU mask of {len(words) * 32} bits is beyond the kernel's limit of "
                         f"{MAX_CPUS} CPUs")
    cpus: list[int] = []
    for position, word in enumerate(reversed(words)):
        value = int(word, 16)
        cpus.extend(32 * position + bit for bit in range(32) if value >> bit & 1)
    return tuple(cpus)
