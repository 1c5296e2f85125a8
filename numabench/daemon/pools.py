"""Pools and routing, pure: a plan's instances grouped by sequence range, and where a request goes.

A pool is the set of instances that serve one sequence-length range of the plan (the article's
smart dispatching); a plan without ranges is one pool serving every length the model takes.
Each pool pads requests to a few fixed lengths ("shapes") so its warm workers only ever see the
shapes they were warmed up on: the pool's upper bound (`pad="max"`), or power-of-two buckets
inside the range (`pad="bucket"`; always used where the range has no upper bound).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from numabench.errors import NumabenchError
from numabench.plans.model import Plan

PAD_POLICIES = ("max", "bucket")
DEFAULT_MAX_POSITIONS = 512  # where the model does not say (hub ids before loading)
SMALLEST_BUCKET = 8
SERVE_WARMUP = 1  # warm-up iterations per pool shape and batch size, per instance


@dataclass(frozen=True)
class PoolSpec:
    """One pool: a name, the inclusive length range it serves, its instances and pad lengths."""

    name: str
    seq_min: int
    seq_max: int  # inclusive; capped at the model's positions
    instances: tuple[int, ...]
    shapes: tuple[int, ...]  # sorted pad lengths; the last one is seq_max

    def contains(self, seq: int) -> bool:
        return self.seq_min <= seq <= self.seq_max

    def pad_to(self, seq: int) -> int:
        """The pad length for a request of `seq` tokens (the smallest shape that holds it)."""
        for s in self.shapes:
            if s >= seq:
                return s
        raise ValueError(f"sequence length {seq} exceeds pool {self.name}'s {self.seq_max}")


def bucket_shapes(low: int, high: int) -> tuple[int, ...]:
    """Power-of-two pad lengths covering [low, high], ending with high: (33, 384) -> 64..384."""
    shapes = []
    b = SMALLEST_BUCKET
    while b < high:
        if b >= low:
            shapes.append(b)
        b *= 2
    shapes.append(high)
    return tuple(shapes)


def build_pools(plan: Plan, max_positions: int | None, pad: str = "max") -> tuple[PoolSpec, ...]:
    """Group the plan's instances into pools by seq_range (instances with equal ranges share one)."""
    if pad not in PAD_POLICIES:
        raise NumabenchError(f"unknown pad policy {pad!r}; choose one of {', '.join(PAD_POLICIES)}")
    cap = max_positions or DEFAULT_MAX_POSITIONS
    groups: dict[tuple[int, int | None], list[int]] = {}
    for inst in plan.instances:
        key = (inst.seq_range.min, inst.seq_range.max) if inst.seq_range else (1, None)
        groups.setdefault(key, []).append(inst.id)
    pools = []
    for (low, high), ids in sorted(groups.items()):
        if low > cap:
            raise NumabenchError(f"seq_range {low}-{high if high is not None else ''} starts beyond "
                                 f"the model's {cap} positions: instances {ids} could never serve")
        upper = cap if high is None else min(high, cap)
        name = ("all" if len(groups) == 1 and low == 1 and high is None
                else f"{low}-{high}" if high is not None else f"{low}-")
        shapes = bucket_shapes(low, upper) if (pad == "bucket" or high is None) else (upper,)
        pools.append(PoolSpec(name, low, upper, tuple(ids), shapes))
    return tuple(pools)


def route(pools: Sequence[PoolSpec], seq: int) -> PoolSpec | None:
    """The pool serving `seq` tokens, or None when no pool does."""
    for p in pools:
        if p.contains(seq):
            return p
    return None


def least_loaded(candidates: Sequence[tuple[int, int, int]]) -> int | None:
    """Pick an instance from (instance, in_flight, served): fewest in flight, then fewest served
    (spreads work evenly over idle instances), then lowest id. None when there is none."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c[1], c[2], c[0]))[0]
