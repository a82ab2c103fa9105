"""The scan's popularity steps: the check (finite and >= 0) and the head / tail threshold.

Up to `driver.gather_rows` rows the driver holds the popularity column, shard by shard, and
finds the threshold there (`driver_threshold`). Past it the scan's tasks send only each
group's value-range histogram (`codes.headsplit`: at most 2,047 ranges, 40 bytes each), and
each pass deeper is one engine task per group that holds values in the range being narrowed
(`task_threshold`, at most 8,192 ranges a group): the driver holds no per-row popularity.
Both ways give the same threshold, bit for bit: the histograms are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from semid_dist.codes.headsplit import (
    ValueRanges,
    find_threshold,
    in_memory,
    merge_ranges,
    value_ranges,
)
from semid_dist.errors import InputError
from semid_dist.io.catalog import CatalogPlan, Shard, read_shard
from semid_dist.io.fs import shown_path
from semid_dist.io.validate import popularity_values
from semid_dist.stages import JobContext

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]


@dataclass(frozen=True)
class PopularityScan:
    """What the scan saw of a run of shards' popularity: the level-0 value ranges (None
    when a value is bad), and the NaN / infinite / negative values: how many, and the first
    as (shard position in the plan, row in the shard, value)."""

    ranges: ValueRanges | None
    bad: int
    first_bad: tuple[int, int, float] | None


def bad_values(pop: np.ndarray) -> tuple[int, int]:
    """NaN, infinite and negative values of pop (n,) float64: how many, and the first's
    index (-1: none)."""
    bad = ~(pop >= 0) | np.isinf(pop)  # NaN fails `>= 0`
    count = int(bad.sum())
    return count, int(np.argmax(bad)) if count else -1


def scan_popularity(parts: Sequence[tuple[int, np.ndarray]]) -> PopularityScan:
    """The scan of shards' popularity. parts: (shard position, its popularity (rows,)
    float64 in row order)."""
    bad, first = 0, None
    for pos, pop in parts:
        count, at = bad_values(pop)
        if count and first is None:
            first = (pos, at, float(pop[at]))
        bad += count
    ranges = None if bad else merge_ranges([value_ranges(p) for _, p in parts])
    return PopularityScan(ranges, bad, first)


def check_popularity(scans: Sequence[PopularityScan], plan: CatalogPlan, column: str) -> None:
    """Popularity must be finite and >= 0 (nulls count as 0): the head / tail split is by
    share of the total. Names how many values are bad and the first in (shard, row) order."""
    count = sum(s.bad for s in scans)
    if not count:
        return
    pos, row, value = min(s.first_bad for s in scans if s.first_bad is not None)
    shard = plan.shards[pos]
    piece, at = (int(v[0]) for v in shard.locate(np.array([row])))
    where = f"{shown_path(plan.url, shard.pieces[piece].path)}:{at}"
    raise InputError(f"input.popularity_column={column!r} holds {count} NaN, infinite or "
                     f"negative values (e.g. {value!r} at {where}); popularity must be finite "
                     "and >= 0 (nulls "
                     "count as 0): fix those rows, or unset input.popularity_column")


def popularity_ranges(ctx: JobContext, shards: Sequence[tuple[int, Shard]], level: int,
                      prefix: int) -> ValueRanges:
    """One pass deeper for a group of shards: the value ranges at `level` inside the range
    `prefix` of the level above, from the shards' popularity column."""
    return merge_ranges([value_ranges(_read(ctx, shard), level=level, prefix=prefix)
                         for _, shard in shards])


def driver_threshold(popularity: Sequence[np.ndarray], plan: CatalogPlan, column: str,
                     share: float) -> float:
    """Check the column the driver holds (one (rows,) float64 part per shard of `plan`) and
    find its threshold."""
    scans = [scan_popularity([(pos, p)]) for pos, p in enumerate(popularity)]
    check_popularity(scans, plan, column)
    return find_threshold(merge_ranges([s.ranges for s in scans]), share, in_memory(popularity))


def task_threshold(engine: Engine, ctx: JobContext, plan: CatalogPlan,
                   groups: Sequence[Sequence[tuple[int, Shard]]],
                   scans: Sequence[PopularityScan], column: str, share: float,
                   log: Log) -> float:
    """Check the groups' scans and find the threshold from them, with one engine task for
    each pass deeper per group that holds values in the range being narrowed (all of them
    in a shuffled catalog, few in one sorted by popularity)."""
    check_popularity(scans, plan, column)
    last = [s.ranges for s in scans]  # each group's ranges at the level last made
    passes = tasks = 0

    def refine(level: int, prefix: int) -> ValueRanges:
        nonlocal passes, tasks
        live = [g for g, r in enumerate(last) if r is not None and _holds(r, prefix)]
        found = engine.map(popularity_ranges, [(ctx, groups[g], level, prefix) for g in live])
        last[:] = [None] * len(last)
        for g, r in zip(live, found):
            last[g] = r
        passes, tasks = passes + 1, tasks + len(live)
        return merge_ranges(found)

    threshold = find_threshold(merge_ranges([s.ranges for s in scans]), share, refine)
    log(f"scan: the head threshold took {passes} more pass(es) over the popularity column "
        f"({tasks} task{'' if tasks == 1 else 's'})" if passes else
        "scan: the head threshold from the scan's value ranges alone (a single value)")
    return threshold


def _holds(ranges: ValueRanges, key: int) -> bool:
    keys = ranges.keys
    at = int(np.searchsorted(keys, np.uint64(key)))
    return at < len(keys) and int(keys[at]) == key


def _read(ctx: JobContext, shard: Shard) -> np.ndarray:
    values = [popularity_values(t.column(0)) for t in
              read_shard(ctx.catalog_url, shard, [ctx.popularity_column])]
    return values[0] if len(values) == 1 else np.concatenate(values)
