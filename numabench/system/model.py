"""Facts about a machine that make a measurement noisy or a binding fail, each with a verdict."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERDICTS = ("ok", "warn", "fail", "unknown")
_RANK = {"ok": 0, "unknown": 1, "warn": 2, "fail": 3}


@dataclass(frozen=True)
class Fact:
    """One thing checked: what was found (`value`), how it bears on a benchmark, and the fix."""

    name: str
    value: str
    verdict: str  # one of VERDICTS
    why: str = ""  # what it does to a measurement (for warn/fail)
    fix: str = ""  # what to do; empty when nothing needs doing
    data: dict[str, Any] = field(default_factory=dict, compare=False)  # machine-readable detail

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "verdict": self.verdict, "why": self.why,
                "fix": self.fix, "data": self.data}


@dataclass(frozen=True)
class SystemReport:
    root: str
    cpus: tuple[int, ...]  # the CPUs judged (usable CPUs, or those asked for)
    facts: tuple[Fact, ...]

    @property
    def verdict(self) -> str:
        return worst(f.verdict for f in self.facts)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "numabench.system", "version": 1, "root": self.root, "cpus": list(self.cpus),
                "verdict": self.verdict, "facts": [f.to_dict() for f in self.facts]}


def worst(verdicts) -> str:
    return max(verdicts, key=lambda v: _RANK[v], default="ok")


def read_text(root: Path, rel: str) -> str | None:
    """A sysfs/proc file's text, None when absent or unreadable (many knobs exist only on some kernels)."""
    try:
        return (root / rel.lstrip("/")).read_bytes().decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return None
