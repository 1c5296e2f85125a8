"""What a reload changes, pure: the running instances' configs against the new plan's.

The rollout order keeps every pool serving, so a pool never goes empty: new ids start first (on
their own cores, beside the old ones); then replaced instances are swapped one at a time, make
before break: the successor starts while its predecessor keeps serving, and only once the
successor is ready does the predecessor drain and exit (the two run side by side for a while, on
the same cores where the new plan keeps them there); then removed ones retire.
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


WAIT, NEXT, START, RETIRE, RETIRE_REMOVED, DONE = (
    "wait", "next", "start", "retire", "retire-removed", "done")


@dataclass(frozen=True)
class RolloutView:
    """What the next rollout step depends on, by instance id."""

    starting: frozenset[int] = frozenset()   # current-plan instances not ready yet (starting,
    #                                          or restarting after a death in warm-up)
    pending: frozenset[int] = frozenset()    # successors not started yet
    old_alive: frozenset[int] = frozenset()  # replaced or removed instances whose process runs
    old_retiring: frozenset[int] = frozenset()  # ...of which these were told to drain and stop


@dataclass(frozen=True)
class Step:
    action: str  # WAIT, NEXT (take replaced id `instance` next), START (its successor),
    instance: int | None = None  # RETIRE (its predecessor), RETIRE_REMOVED (all removed), DONE


def next_step(change: ReloadDiff, current: int | None, remaining: tuple[int, ...],
              view: RolloutView) -> Step:
    """The rollout's next step: added instances get ready first; then, one replaced id at a
    time, its successor starts (START) and warms up while the old process serves (WAIT); once the
    successor is ready (or given up) the old one drains (RETIRE) and exits (WAIT); then removed
    instances retire; DONE once none of them runs."""
    if any(i in view.starting for i in change.added):
        return Step(WAIT)
    if current is not None:
        if current in view.pending:
            return Step(START, current)
        if current in view.starting:
            return Step(WAIT, current)
        if current in view.old_alive - view.old_retiring:
            return Step(RETIRE, current)
        if current in view.old_alive:
            return Step(WAIT, current)
    if remaining:
        return Step(NEXT, remaining[0])
    if any(i in view.old_alive for i in change.removed):
        return Step(RETIRE_REMOVED)
    return Step(DONE)
