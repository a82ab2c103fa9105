"""The head / tail popularity threshold, in exact arithmetic, from value-range histograms.

The head is the most popular items that together hold `share` of the total popularity: the
threshold is the popularity of the item at which the running sum from the most popular item
down first reaches share x total (ties at it are head too).

A float64 >= 0 orders like its bit pattern, and inside one binary exponent it is an integer
mantissa times a fixed power of two. So a histogram of the values by their leading bits,
holding each range's count and mantissa sum as integers, adds up exactly in any order and in
any grouping of the rows: shards, engine tasks or the driver's whole column give the same
histogram, and so the same threshold, bit for bit. The threshold is found in at most
`len(SHIFTS)` passes: ranges by binary exponent (the top 12 bits: at most 2,047 ranges),
then, inside the one range where the running sum reaches the share, by the next 13 bits (at
most 8,192 ranges), and so on down to single values; a pass stops early when its range holds
a single value. No pass sorts or holds more than one part of the column.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SHIFTS = (52, 39, 26, 13, 0)  # a level's ranges: the values' bit patterns >> SHIFTS[level]
_HALF = 26  # mantissas (<= 2^53) are summed as two int64 halves: exact for < 2^36 values
MAX_ROWS = 1 << 36
_FRACTION = (1 << 52) - 1


@dataclass(frozen=True)
class ValueRanges:
    """A histogram of popularity values by range, ascending: 40 bytes a range. low / high
    (r,) uint64: the least and greatest bit pattern in the range (its key is low >>
    SHIFTS[level]); count (r,) int64; hi / lo (r,) int64: the sums of the values' integer
    mantissas >> 26 and & (2^26 - 1)."""

    level: int
    low: np.ndarray
    high: np.ndarray
    count: np.ndarray
    hi: np.ndarray
    lo: np.ndarray

    @property
    def keys(self) -> np.ndarray:
        """(r,) uint64: the ranges' keys, the values' bit patterns >> SHIFTS[level]."""
        return self.low >> np.uint64(SHIFTS[self.level])

    def exact_sums(self) -> list[int]:
        """Each range's sum in units of 2^-1074 (the least subnormal), as exact integers."""
        exponents = (self.low >> np.uint64(52)).astype(np.int64)
        return [((int(upper) << _HALF) + int(lower)) << (max(int(e), 1) - 1)
                for upper, lower, e in zip(self.hi, self.lo, exponents)]


def value_ranges(pop: np.ndarray, *, level: int = 0, prefix: int = 0) -> ValueRanges:
    """The histogram of `pop` at `level`, over the values inside the range `prefix` of the
    level above (every value at level 0). pop: (n,) float64, finite and >= 0."""
    bits = np.sort(_bits(pop) if level == 0 else _inside(_bits(pop), level, prefix))
    keys = bits >> np.uint64(SHIFTS[level])
    starts = _starts(keys)
    ends = np.append(starts[1:], len(bits)).astype(np.int64) if len(starts) else starts
    exponent = bits >> np.uint64(52)
    mantissa = ((bits & np.uint64(_FRACTION)) | ((exponent > 0).astype(np.uint64) << np.uint64(52))
                ).astype(np.int64)
    return ValueRanges(level=level, low=bits[starts], high=bits[ends - 1], count=ends - starts,
                       hi=_sums(mantissa >> _HALF, starts),
                       lo=_sums(mantissa & ((1 << _HALF) - 1), starts))


def merge_ranges(parts: Sequence[ValueRanges]) -> ValueRanges:
    """One histogram of several parts' (of the same level): integer sums, so exact."""
    level = {p.level for p in parts}
    if len(level) != 1:
        raise ValueError(f"merge_ranges: parts of levels {sorted(level)}; need one level")
    if sum(int(p.count.sum()) for p in parts) >= MAX_ROWS:
        raise ValueError(f"merge_ranges: {MAX_ROWS} or more values; the int64 mantissa sums "
                         "would overflow")
    keys = np.concatenate([p.keys for p in parts])
    order = np.argsort(keys, kind="stable")
    starts = _starts(keys[order])

    def joined(name: str, reduce: np.ufunc) -> np.ndarray:
        values = np.concatenate([getattr(p, name) for p in parts])[order]
        return reduce.reduceat(values, starts) if len(starts) else values

    return ValueRanges(level=level.pop(), low=joined("low", np.minimum),
                       high=joined("high", np.maximum), count=joined("count", np.add),
                       hi=joined("hi", np.add), lo=joined("lo", np.add))


Refine = Callable[[int, int], ValueRanges]  # (level, prefix) -> the merged ranges inside it


def find_threshold(first: ValueRanges, share: float, refine: Refine) -> float:
    """The head threshold from the level-0 histogram of the whole column and `refine`, which
    gives the histogram of a deeper level inside one range (one more pass over the column).
    share: in [0, 1]. inf when the total is 0 (no head)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"find_threshold: share={share!r} must be in [0, 1]")
    sums = first.exact_sums()
    total = sum(sums)
    if total == 0:
        return float("inf")
    num, den = float(share).as_integer_ratio()  # den is a power of two: the compare is exact
    goal, carry, ranges = num * total, 0, first
    while True:
        for i in range(len(sums) - 1, -1, -1):
            if (carry + sums[i]) * den >= goal:
                break
            carry += sums[i]
        else:  # exact sums cannot leave it short; only a pass that lost rows can
            raise ValueError(f"find_threshold: level {ranges.level} holds no range that "
                             "reaches the share (a refine pass missed rows)")
        if ranges.low[i] == ranges.high[i] or ranges.level == len(SHIFTS) - 1:
            return float(ranges.low[i:i + 1].view(np.float64)[0])
        ranges = refine(ranges.level + 1, int(ranges.keys[i]))
        sums = ranges.exact_sums()


def in_memory(parts: Sequence[np.ndarray]) -> Refine:
    """`refine` over a column held in memory in parts (each (n_i,) float64)."""
    def refine(level: int, prefix: int) -> ValueRanges:
        return merge_ranges([value_ranges(p, level=level, prefix=prefix) for p in parts])

    return refine


def head_threshold(popularity: np.ndarray | Sequence[np.ndarray], share: float) -> float:
    """The head threshold of a column held in memory, whole or in parts (each (n_i,) finite
    and >= 0): the same as the engines' passes over shards give. inf for no values."""
    parts = [popularity] if isinstance(popularity, np.ndarray) else list(popularity)
    if not parts:
        return float("inf")
    return find_threshold(merge_ranges([value_ranges(p) for p in parts]), share,
                          in_memory(parts))


def _bits(pop: np.ndarray) -> np.ndarray:
    """The values' bit patterns, with -0.0 made +0.0 (so order by bits is order by value)."""
    pop = np.ascontiguousarray(pop, dtype=np.float64)
    return (pop + 0.0).view(np.uint64) if np.signbit(pop).any() else pop.view(np.uint64)


def _inside(bits: np.ndarray, level: int, prefix: int) -> np.ndarray:
    """The bit patterns inside range `prefix` of the level above `level`."""
    return bits[(bits >> np.uint64(SHIFTS[level - 1])) == np.uint64(prefix)]


def _starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys starts in `keys` (ascending)."""
    if not len(keys):
        return np.zeros(0, np.int64)
    return np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1]).astype(np.int64)


def _sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, starts) if len(starts) else np.zeros(0, np.int64)
