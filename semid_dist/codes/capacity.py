"""What capacity moves change in a build's statistics, as a mergeable delta.

Capacity-bounded collisions (`collisions.max_per_sid`) move items to another last-layer
code under the same prefix (`codes.collisions.reassign_overflow`). The statistics change by
the moved items' old codes out and new codes in: integer counts, and the last layer's
residual sums. The moves of disjoint prefix ranges (engine tasks past
`driver.gather_rows`, cut by `prefix_ranges`) give deltas that add up: the counts exactly;
the float sums, one per range, added in range order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from semid_dist.codes.collisions import key_range_bounds, last_layer_prefix
from semid_dist.codes.drift import bucket_count
from semid_dist.codes.partials import Partial, add_keyed, sid_keys


@dataclass(frozen=True)
class MoveDelta:
    """The change some moves make. moved: how many items moved; last_counts (k_last,)
    int64: the last layer's token counts; sid_keys / sid_counts and pair_keys / pair_counts:
    keyed count changes (sorted unique int64 keys; int64 counts, zero changes dropped) of
    the SIDs and of the (layer L-2, layer L-1) code pairs; sq_res / res_norm: the change of
    the last layer's squared-residual and residual-norm sums."""

    moved: int
    last_counts: np.ndarray
    sid_keys: np.ndarray
    sid_counts: np.ndarray
    pair_keys: np.ndarray
    pair_counts: np.ndarray
    sq_res: float
    res_norm: float


def move_delta(old_codes: np.ndarray, new_last: np.ndarray, old_sq: np.ndarray,
               new_sq: np.ndarray, sizes: tuple[int, ...] | list[int]) -> MoveDelta:
    """old_codes (m, L) int32: the moved items' codes before; new_last (m,) int32: their new
    last-layer codes; old_sq / new_sq (m,) float32: their last-layer squared residual before
    and after."""
    new_codes = old_codes.copy()
    new_codes[:, -1] = new_last
    last = len(sizes) - 1
    signs = np.concatenate([-np.ones(len(old_codes), np.int64), np.ones(len(old_codes), np.int64)])
    empty = np.zeros(0, np.int64)
    sid_k, sid_c = add_keyed(empty, empty, np.concatenate([sid_keys(old_codes, sizes),
                                                           sid_keys(new_codes, sizes)]), signs)
    pair_k, pair_c = empty, empty
    if last >= 1:
        pair = [c[:, last - 1].astype(np.int64) * sizes[last] + c[:, last]
                for c in (old_codes, new_codes)]
        pair_k, pair_c = add_keyed(empty, empty, np.concatenate(pair), signs)
    old64, new64 = old_sq.astype(np.float64), new_sq.astype(np.float64)
    return MoveDelta(
        moved=len(old_codes),
        last_counts=(np.bincount(new_last, minlength=sizes[last])
                     - np.bincount(old_codes[:, -1], minlength=sizes[last])).astype(np.int64),
        sid_keys=sid_k, sid_counts=sid_c, pair_keys=pair_k, pair_counts=pair_c,
        sq_res=float(new64.sum() - old64.sum()),
        res_norm=float(np.sqrt(new64).sum() - np.sqrt(old64).sum()))


def merge_deltas(deltas: Sequence[MoveDelta]) -> MoveDelta:
    """One delta of the moves of several disjoint sets (at least one), in their order."""
    def keyed(keys: str, counts: str) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0, np.int64)
        return add_keyed(empty, empty, np.concatenate([getattr(d, keys) for d in deltas]),
                         np.concatenate([getattr(d, counts) for d in deltas]))

    sq_res = res_norm = 0.0
    for d in deltas:
        sq_res += d.sq_res
        res_norm += d.res_norm
    sid_k, sid_c = keyed("sid_keys", "sid_counts")
    pair_k, pair_c = keyed("pair_keys", "pair_counts")
    return MoveDelta(moved=sum(d.moved for d in deltas),
                     last_counts=np.sum([d.last_counts for d in deltas], axis=0),
                     sid_keys=sid_k, sid_counts=sid_c, pair_keys=pair_k, pair_counts=pair_c,
                     sq_res=sq_res, res_norm=res_norm)


def apply_delta(p: Partial, delta: MoveDelta) -> Partial:
    """Statistics after the moves: token, SID and pair counts and the last layer's residual
    sums. The per-prefix unit-vector sums are unchanged when the quality depth is below L
    (they need no codes of the last layer)."""
    if delta.moved == 0:
        return p
    layer_counts = [c.copy() for c in p.layer_counts]
    layer_counts[-1] = layer_counts[-1] + delta.last_counts
    sid_k, sid_c = add_keyed(p.sid_keys, p.sid_counts, delta.sid_keys, delta.sid_counts)
    trans_keys, trans_counts = list(p.trans_keys), list(p.trans_counts)
    if trans_keys:
        trans_keys[-1], trans_counts[-1] = add_keyed(trans_keys[-1], trans_counts[-1],
                                                     delta.pair_keys, delta.pair_counts)
    sq_res, res_norm = p.sq_res_sum.copy(), p.res_norm_sum.copy()
    sq_res[-1] += delta.sq_res
    res_norm[-1] += delta.res_norm
    return Partial(n=p.n, layer_counts=layer_counts, sid_keys=sid_k, sid_counts=sid_c,
                   sq_res_sum=sq_res, res_norm_sum=res_norm, x_sq_sum=p.x_sq_sum,
                   q_keys=p.q_keys, q_counts=p.q_counts, q_sums=p.q_sums,
                   trans_keys=trans_keys, trans_counts=trans_counts)


@dataclass(frozen=True)
class PrefixRanges:
    """The over-full SIDs' prefixes cut into ranges of about equal rows, every prefix in one
    range. prefixes (p,) int64: the over-full SIDs' prefixes, sorted; rows: their SIDs'
    items in all; bounds (r - 1,) int64: a prefix q lies in range searchsorted(bounds, q,
    "right"); prefix_edges / key_edges (r + 1,) int64: range b's prefixes are
    prefixes[prefix_edges[b]:prefix_edges[b + 1]], and the SIDs under them (over-full or
    not) lie in keys[key_edges[b]:key_edges[b + 1]]."""

    prefixes: np.ndarray
    rows: int
    bounds: np.ndarray
    prefix_edges: np.ndarray
    key_edges: np.ndarray

    @property
    def count(self) -> int:
        return len(self.bounds) + 1


def prefix_ranges(keys: np.ndarray, counts: np.ndarray, over: np.ndarray, last_size: int, *,
                  bucket_rows: int) -> PrefixRanges:
    """keys (m,) sorted int64 final SID keys holding counts (m,) int64 items; over (m,) bool:
    the over-full ones -> ranges of about `bucket_rows` of their rows (at most
    `codes.drift.MAX_BUCKETS`)."""
    prefix, _ = last_layer_prefix(keys, last_size)  # sorted, as the keys are
    prefixes, first = np.unique(prefix[over], return_index=True)
    rows_of = np.add.reduceat(counts[over], first) if len(first) else counts[:0]
    rows = int(rows_of.sum())
    bounds = key_range_bounds(prefixes, rows_of, bucket_count(rows, bucket_rows=bucket_rows))
    return PrefixRanges(
        prefixes=prefixes, rows=rows, bounds=bounds,
        prefix_edges=np.concatenate([[0], np.searchsorted(prefixes, bounds), [len(prefixes)]]
                                    ).astype(np.int64),
        key_edges=np.concatenate([[0], np.searchsorted(prefix, bounds), [len(keys)]]
                                 ).astype(np.int64))
