"""What a reload changes, pure: the running instances' configs against the new plan's.

The rollout order keeps every pool serving: new ids start first (on their own cores, beside the
old ones), then replaced instances are swapped one at a time (the old one drains and exits
before its successor, which has the same worker identity, starts), then removed ones retire.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReloadDiff:
    kept: tuple[int, ...]      # same config: keeps running (its pool may be renamed)
    replaced: tuple[int, ...]  # same id, new config: swapped one at a time
    added: tuple[int, ...]     # new ids: started first
    removed: tuple[int, ...]   # gone from the plan: retired last

    @property
    def stopped(self) -> tuple[int, ...]:
        return tuple(sorted(self.replaced + self.removed))

    @property
    def started(self) -> tuple[int, ...]:
        return tuple(sorted(self.replaced + self.added))


def diff(running: Mapping[int, Any], wanted: Mapping[int, Any],
         failed: frozenset[int] = frozenset()) -> ReloadDiff:
    """`running` / `wanted`: instance id → config (anything comparable with ==). A failed
    instance is replaced even when its config did not change (a reload is a way to retry it)."""
    kept, replaced = [], []
    for iid in sorted(set(running) & set(wanted)):
        (kept if running[iid] == wanted[iid] and iid not in failed else replaced).append(iid)
    return ReloadDiff(tuple(kept), tuple(replaced), tuple(sorted(set(wanted) - set(running))),
                      tuple(sorted(set(running) - set(wanted))))
