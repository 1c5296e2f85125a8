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


WAIT, START, RETIRE, RETIRE_REMOVED, DONE = "wait", "start", "retire", "retire-removed", "done"


@dataclass(frozen=True)
class RolloutView:
    """What the next rollout step depends on, by instance id."""

    starting: frozenset[int] = frozenset()   # current-plan instances warming up
    pending: frozenset[int] = frozenset()    # successors not started yet
    old_alive: frozenset[int] = frozenset()  # replaced or removed instances whose process runs


@dataclass(frozen=True)
class Step:
    action: str  # WAIT, START (the successor of `instance`), RETIRE (the old `instance`),
    instance: int | None = None  # RETIRE_REMOVED (all removed ones), DONE


def next_step(change: ReloadDiff, current: int | None, remaining: tuple[int, ...],
              view: RolloutView) -> Step:
    """The rollout's next step: added instances get ready first; then, one replaced id at a
    time, the old process exits (RETIRE, then WAIT) before its successor starts (START, then
    WAIT until ready); then removed instances retire; DONE once none of them runs."""
    if any(i in view.starting for i in change.added):
        return Step(WAIT)
    if current is not None:
        if current in view.old_alive:
            return Step(WAIT, current)
        if current in view.pending:
            return Step(START, current)
        if current in view.starting:
            return Step(WAIT, current)
    if remaining:
        return Step(RETIRE, remaining[0])
    if any(i in view.old_alive for i in change.removed):
        return Step(RETIRE_REMOVED)
    return Step(DONE)
