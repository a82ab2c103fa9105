"""Mergeable partial statistics of encoded batches.

A `Partial` holds counts and sums only, so partials from any split of the catalog merge
(`merge`) into exactly the statistics of one pass over everything (sums of floats up to
summation order). Engines produce one per shard and merge them in shard order.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from semid_dist import packing
from semid_dist.codes.keyset import union_sorted
from semid_dist.quantize.group_sum import one_torch_thread, unit_group_sum


def radix(sizes: tuple[int, ...] | list[int]) -> np.ndarray:
    """Place values of the mixed-radix SID key: key = sum(code_l * radix[l])."""
    out = np.ones(len(sizes), dtype=np.int64)
    for i in range(len(sizes) - 2, -1, -1):
        out[i] = out[i + 1] * sizes[i + 1]
    return out


def sid_keys(codes: np.ndarray, sizes: tuple[int, ...] | list[int],
             depth: int | None = None) -> np.ndarray:
    """codes: (n, L) int -> (n,) int64 key of the first `depth` layers (all by default)."""
    depth = codes.shape[1] if depth is None else depth
    return codes[:, :depth].astype(np.int64) @ radix(list(sizes)[:depth])


def _count_sum(index: np.ndarray, counts: np.ndarray, rows: int) -> np.ndarray:
    """Integer counts (of either sign) summed by index; exact, as float64 holds every
    integer below 2^53."""
    return np.bincount(index, weights=counts, minlength=rows).astype(np.int64)


# Keys in [0, span) are counted in a table of `span` entries, not sorted, while the span is
# at most this or 4x the keys: 65,536 keys in [0, 65,536) take 0.5 ms against 3.7 ms for
# np.unique with the inverse (a shard's pair and prefix keys at 256-entry codebooks)
COUNT_SPAN = 1 << 16


def _unique(keys: np.ndarray, span: int, *, inverse: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """np.unique of int64 keys in [0, span): (sorted distinct keys (int64), their counts
    (int64), the index of each key's row in them when `inverse`, else None). The same arrays
    by counting (`COUNT_SPAN`), or by numpy's sort (as int32 where the span allows, which
    sorts faster; without the inverse it sorts the keys alone, no argsort)."""
    if span <= max(COUNT_SPAN, 4 * len(keys)):
        counts = np.bincount(keys, minlength=span)
        uniq = np.flatnonzero(counts)
        rank = None
        if inverse:
            rank = np.empty(span, dtype=np.int64)
            rank[uniq] = np.arange(len(uniq))
            rank = rank[keys]
        return uniq, counts[uniq].astype(np.int64), rank
    if span <= 2**31:  # sorted as int32: 65,536 keys in 1.4 ms against 2.3 as int64
        keys = keys.astype(np.int32)
    if inverse:
        uniq, rank, counts = np.unique(keys, return_inverse=True, return_counts=True)
        return uniq.astype(np.int64), counts.astype(np.int64), rank
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq.astype(np.int64), counts.astype(np.int64), None


def _unit_sums(keys: np.ndarray, span: int, x: np.ndarray, take: np.ndarray | None = None
               ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The quality table of rows `take` of x (all rows by default; keys (n,) int64 in
    [0, span), one per row) and the rows' squared norms (n,) float64, in one pass over x
    (`unit_group_sum`): (keys, counts of rows with a direction (non-zero), float64 sums of
    their unit vectors), keys without such a row left out. The same arrays as grouping the
    rows with a direction alone: a row without one adds zeros and is taken off its key's
    count. x is finite (`validate_batch` rejects other rows)."""
    uniq, counts, inverse = _unique(keys, span, inverse=True)
    sums, sq_norms = unit_group_sum(inverse, x, len(uniq), take=take)
    no_dir = sq_norms == 0
    if no_dir.any():
        counts = counts - np.bincount(inverse[no_dir], minlength=len(uniq))
        keep = counts > 0
        uniq, counts, sums = uniq[keep], counts[keep], sums[keep]
    return (uniq, counts, sums), sq_norms


@dataclass
class Partial:
    """Sufficient statistics of a set of encoded items.

    layer_counts: per layer (k_l,) int64 token counts. sid_keys/sid_counts: items per full
    SID. trans_keys/trans_counts: per layer l >= 1, items per (token at l-1, token at l)
    pair, keyed parent * k_l + child. sq_res_sum / res_norm_sum: (L,) sums of ||r_l||^2 and
    ||r_l||. x_sq_sum: sum ||x||^2.
    q_keys/q_counts/q_sums: per prefix at the quality depth, the count of items with a
    direction (non-zero embedding) and the sum of their unit vectors (m, d) float64
    (semantic cohesion and preference discrimination come from these).
    """

    n: int
    layer_counts: list[np.ndarray]
    sid_keys: np.ndarray
    sid_counts: np.ndarray
    sq_res_sum: np.ndarray
    res_norm_sum: np.ndarray
    x_sq_sum: float
    q_keys: np.ndarray
    q_counts: np.ndarray
    q_sums: np.ndarray
    trans_keys: list[np.ndarray]
    trans_counts: list[np.ndarray]

    def _arrays(self) -> dict[str, np.ndarray]:
        lists = ("layer_counts", "trans_keys", "trans_counts")
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)
                  if f.name not in lists}
        for name in lists:
            for i, c in enumerate(getattr(self, name)):
                arrays[f"{name}_{i}"] = c
        return arrays

    def to_bytes(self) -> bytes:
        """npz (no pickle): the form a committed version keeps (stats/partial_all.npz)."""
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    def pack(self) -> bytes:
        """A raw array bundle (`semid_dist.packing`): the form a shard's statistics are
        staged in for the driver, written and read with no zip or CRC pass.

        The unit-vector sums are staged in float32 (`from_bytes` reads them back as float64,
        and the driver merges in float64). They are most of a shard's statistics: a
        65,536-row shard of the benchmark catalog (3 x 256, d = 128, head and tail) stages
        5.9 MiB instead of 11.0, and every byte is written while the worker waits (on a disk
        that takes ~100 MB/s, a Ray worker waited ~105-115 ms a shard). Each staged sum is
        within a relative 2^-24 of its float64 value; over that catalog (1.5M items) staging
        in float32 moved semantic cohesion and preference discrimination by 4e-11."""
        arrays = self._arrays()
        arrays["q_sums"] = arrays["q_sums"].astype(np.float32)
        return packing.pack(arrays)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Partial:
        """A Partial from `to_bytes` (npz) or `pack` (bundle) output."""
        if packing.is_bundle(data):
            z = packing.unpack(data)[1]
            files = list(z)
        else:
            z = np.load(io.BytesIO(data), allow_pickle=False)
            files = z.files
        n_layers = sum(1 for k in files if k.startswith("layer_counts_"))

        def seq(name: str, count: int) -> list[np.ndarray]:
            return [z[f"{name}_{i}"] for i in range(count)]

        return cls(n=int(z["n"]), layer_counts=seq("layer_counts", n_layers),
                   trans_keys=seq("trans_keys", n_layers - 1),
                   trans_counts=seq("trans_counts", n_layers - 1),
                   sid_keys=z["sid_keys"], sid_counts=z["sid_counts"], sq_res_sum=z["sq_res_sum"],
                   res_norm_sum=z["res_norm_sum"], x_sq_sum=float(z["x_sq_sum"]),
                   q_keys=z["q_keys"], q_counts=z["q_counts"],
                   q_sums=z["q_sums"].astype(np.float64, copy=False))


def partial_from_batch(codes: np.ndarray, sq_residual: np.ndarray, x: np.ndarray,
                       sizes: tuple[int, ...] | list[int], *, quality_depth: int,
                       rows: np.ndarray | None = None) -> Partial:
    """codes: (n, L) int32, sq_residual: (n, L) float32, x: (n, d) float32 -> Partial.

    rows: optional boolean mask (n,) of the items to count (a shard's head or tail): the
    statistics of those rows alone, as if the arrays held only them, with no copy of `x`."""
    take = None
    if rows is not None:
        take = np.flatnonzero(rows)
        codes, sq_residual = codes[take], sq_residual[take]
    # the unit vectors x / ||x|| are formed chunk by chunk inside the float64 group sum, per
    # row, so the same whichever rows are taken; no float64 copy of x
    quality, sq_norms = _unit_sums(sid_keys(codes, sizes, quality_depth),
                                   math.prod(sizes[:quality_depth]), x, take)
    return _assemble(codes, sq_residual, sq_norms, sizes, quality)


def head_tail_partials(codes: np.ndarray, sq_residual: np.ndarray, x: np.ndarray,
                       sizes: tuple[int, ...] | list[int], *, quality_depth: int,
                       mask: np.ndarray) -> tuple[Partial, Partial]:
    """(statistics of the rows in boolean `mask`, statistics of the others): a shard's head
    and tail, bit-identical to `partial_from_batch(..., rows=mask)` and `(..., rows=~mask)`
    but with one pass over x. The per-prefix unit-vector sums of both sides are one float64
    group sum keyed by (side, prefix): each group still adds its own rows in row order, and
    the head's groups come first, so each side's sums are a slice of the one table."""
    span = math.prod(sizes[:quality_depth])  # prefix keys lie in [0, span)
    keys = sid_keys(codes, sizes, quality_depth) + (~mask).astype(np.int64) * span
    (uniq, counts, sums), sq_norms = _unit_sums(keys, 2 * span, x)
    cut = int(np.searchsorted(uniq, span))
    parts = []
    for rows, pick, base in ((mask, slice(0, cut), 0), (~mask, slice(cut, None), span)):
        idx = np.flatnonzero(rows)
        parts.append(_assemble(codes[idx], sq_residual[idx], sq_norms[idx], sizes,
                               (uniq[pick] - base, counts[pick], sums[pick])))
    return parts[0], parts[1]


def _assemble(codes: np.ndarray, sq_residual: np.ndarray, sq_norms: np.ndarray,
              sizes: tuple[int, ...] | list[int],
              quality: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Partial:
    """The Partial of these rows (codes, sq_residual, ||x||^2 per row) given their quality
    table (prefix keys, counts of rows with a direction, unit-vector sums)."""
    q_keys, q_counts, q_sums = quality
    layer_counts = [np.bincount(codes[:, i], minlength=k).astype(np.int64)
                    for i, k in enumerate(sizes)]
    keys, counts, _ = _unique(sid_keys(codes, sizes), math.prod(sizes))
    # (L, n): each layer's sum runs along a row (numpy's pairwise sum; 0.3 ms for 65,536
    # rows where a column of the (n, L) array took 2)
    sq64 = np.ascontiguousarray(sq_residual.T, dtype=np.float64)
    trans = [_unique(codes[:, i - 1].astype(np.int64) * sizes[i] + codes[:, i],
                     sizes[i - 1] * sizes[i]) for i in range(1, len(sizes))]
    return Partial(trans_keys=[t[0] for t in trans], trans_counts=[t[1] for t in trans],
                   n=len(codes), layer_counts=layer_counts, sid_keys=keys, sid_counts=counts,
                   sq_res_sum=sq64.sum(axis=1), res_norm_sum=np.sqrt(sq64).sum(axis=1),
                   x_sq_sum=float(sq_norms.sum()), q_keys=q_keys, q_counts=q_counts,
                   q_sums=q_sums)


def _merge_keyed(ka, ca, kb, cb, sa=None, sb=None):
    """Union of two keyed tables (keys sorted and unique in each), counts and sums added.

    Places a's rows, then adds b's in place: no concatenated copy of the two tables, and the
    same float64 additions (a's row, plus b's where both have the key) as adding the rows
    one by one."""
    uniq = union_sorted(ka, kb)
    ia, ib = np.searchsorted(uniq, ka), np.searchsorted(uniq, kb)
    counts = np.zeros(len(uniq), dtype=np.int64)
    counts[ia] = ca
    counts[ib] += cb
    if sa is None:
        return uniq, counts, None
    return uniq, counts, one_torch_thread(_placed_sum, len(uniq), ia, sa, ib, sb)


def _placed_sum(rows: int, ia: np.ndarray, sa: np.ndarray, ib: np.ndarray, sb: np.ndarray
                ) -> np.ndarray:
    """(rows, d) float64: zeros, a's rows placed at rows ia, then b's added at rows ib, as
    numpy's `out[ia] = sa; out[ib] += sb` gives it, bit for bit (each index unique, so each
    row adds once). ia: (m,) int64, sa: (m, d) float; ib: (p,) int64, sb: (p, d) float.
    Torch's index_copy_ / index_add_ work in place, where numpy's `out[ib] += sb` gathers the
    rows into a temporary, adds into another and scatters them back: fresh pages for each of
    them. A 1.5M-item build's shard statistics (3 x 256, d = 128: 23 shards, head and tail)
    merged in ~0.3 s against ~0.8 (sampled), in a driver that shares the cores with the
    workers: the Ray driver's CPU in the encode stage fell from 0.53-0.55 s to 0.45-0.46."""
    out = torch.zeros((rows, sa.shape[1]), dtype=torch.float64)
    out.index_copy_(0, torch.from_numpy(ia), _rows_tensor(sa))
    out.index_add_(0, torch.from_numpy(ib), _rows_tensor(sb))
    return out.numpy()


def _rows_tensor(a: np.ndarray) -> torch.Tensor:
    """A float64 tensor over `a`'s rows (copied only where `a` is not float64, contiguous
    and writable: torch warns on read-only arrays)."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def merge(a: Partial, b: Partial, *, sids: bool = True) -> Partial:
    """Statistics of the union of the item sets behind `a` and `b` (`sids=False`: without
    the SID count tables, left empty: `StreamMerge` merges those apart)."""
    sid_k, sid_c = (_merge_keyed(a.sid_keys, a.sid_counts, b.sid_keys, b.sid_counts)[:2]
                    if sids else (_NO_KEYS, _NO_KEYS))
    q_k, q_c, q_s = _merge_keyed(a.q_keys, a.q_counts, b.q_keys, b.q_counts, a.q_sums, b.q_sums)
    trans = [_merge_keyed(ka, ca, kb, cb)[:2] for ka, ca, kb, cb in
             zip(a.trans_keys, a.trans_counts, b.trans_keys, b.trans_counts)]
    return Partial(n=a.n + b.n, trans_keys=[t[0] for t in trans],
                   trans_counts=[t[1] for t in trans],
                   layer_counts=[x + y for x, y in zip(a.layer_counts, b.layer_counts)],
                   sid_keys=sid_k, sid_counts=sid_c, sq_res_sum=a.sq_res_sum + b.sq_res_sum,
                   res_norm_sum=a.res_norm_sum + b.res_norm_sum, x_sq_sum=a.x_sq_sum + b.x_sq_sum,
                   q_keys=q_k, q_counts=q_c, q_sums=q_s)


def add_keyed(keys: np.ndarray, counts: np.ndarray, add_keys: np.ndarray,
              add_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A keyed count table (keys sorted, unique) plus changes (any keys, repeats added up);
    keys whose count ends at 0 are dropped."""
    uniq, inv = np.unique(np.concatenate([keys, add_keys]), return_inverse=True)
    total = _count_sum(inv, np.concatenate([counts, add_counts]), len(uniq))
    return uniq[total != 0], total[total != 0]


def subtract_rows(p: Partial, codes: np.ndarray, sq_last: np.ndarray,
                  sizes: tuple[int, ...] | list[int], quality_depth: int) -> Partial:
    """Statistics of `p` without some of its items, known only by their stored codes (n, L)
    and last-layer squared residual (qerr): an incremental version drops the parent's rows of
    items it re-encodes, whose old embeddings are gone.

    Exact: the item count, token / SID / pair counts and the last layer's residual sums.
    Estimated, each removed item counted as the mean item of its group: x_sq_sum and the
    earlier layers' residual sums (mean over all items), and the per-prefix unit-vector sums
    (mean of the item's quality-depth prefix group); exact again when every item goes."""
    m = len(codes)
    if m == 0:
        return p
    codes = codes.astype(np.int64)
    minus = -np.ones(m, dtype=np.int64)
    layer_counts = [c - np.bincount(codes[:, i], minlength=k).astype(np.int64)
                    for i, (c, k) in enumerate(zip(p.layer_counts, sizes))]
    sid_k, sid_c = add_keyed(p.sid_keys, p.sid_counts, sid_keys(codes, sizes), minus)
    trans = [add_keyed(p.trans_keys[i - 1], p.trans_counts[i - 1],
                       codes[:, i - 1] * sizes[i] + codes[:, i], minus)
             for i in range(1, len(sizes))]
    keep = (p.n - m) / p.n
    sq64 = sq_last.astype(np.float64)
    sq_res, res_norm = p.sq_res_sum * keep, p.res_norm_sum * keep
    sq_res[-1] = p.sq_res_sum[-1] - sq64.sum() if m < p.n else 0.0  # (all gone: no residue)
    res_norm[-1] = p.res_norm_sum[-1] - np.sqrt(sq64).sum() if m < p.n else 0.0
    gone_keys, gone = np.unique(sid_keys(codes, sizes, quality_depth), return_counts=True)
    pos = np.searchsorted(p.q_keys, gone_keys).clip(0, max(len(p.q_keys) - 1, 0))
    hit = (pos < len(p.q_keys)) & (p.q_keys[pos] == gone_keys) if len(p.q_keys) else pos < 0
    q_counts = p.q_counts.copy()
    q_counts[pos[hit]] -= np.minimum(gone[hit], q_counts[pos[hit]])
    share = np.divide(q_counts, p.q_counts, out=np.zeros(len(q_counts)), where=p.q_counts > 0)
    alive = q_counts > 0
    return Partial(n=p.n - m, layer_counts=layer_counts, sid_keys=sid_k, sid_counts=sid_c,
                   sq_res_sum=sq_res, res_norm_sum=res_norm, x_sq_sum=p.x_sq_sum * keep,
                   q_keys=p.q_keys[alive], q_counts=q_counts[alive],
                   q_sums=p.q_sums[alive] * share[alive, None],
                   trans_keys=[t[0] for t in trans], trans_counts=[t[1] for t in trans])


def merge_all(parts: list[Partial]) -> Partial:
    """Merge in the given order, each into the running total."""
    if not parts:
        raise ValueError("merge_all needs at least one partial")
    return functools.reduce(merge, parts)


_NO_KEYS = np.zeros(0, dtype=np.int64)


class StreamMerge:
    """`merge_all` over partials that arrive one at a time, bit for bit, holding the running
    total and, apart, the SID count tables in a binary counter of merged runs (1, 2, 4, ...
    partials'; pushing a partial merges equal-sized runs on the top).

    The total's other tables are bounded by the codebooks (the prefixes' unit-vector sums:
    up to k0 x k1 rows of d floats); held once per run, as a tree of whole merges held
    them, the encode stage's peak RSS grew with the catalog's shards (+60 MiB from 6 to 23
    shards of 3 x 256 codes). The SID tables grow with the items: merged into the total at
    each shard they would take time in shards x items; in runs, in items x log2(shards).
    Integer counts: the same whatever the order of their merges.
    """

    def __init__(self) -> None:
        self._total: Partial | None = None
        self._sids: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._count = 0

    def push(self, part: Partial) -> None:
        self._total = (replace(part, sid_keys=_NO_KEYS, sid_counts=_NO_KEYS)
                       if self._total is None else merge(self._total, part, sids=False))
        size, keys, counts = 1, part.sid_keys, part.sid_counts
        while self._sids and self._sids[-1][0] == size:
            _, left_keys, left_counts = self._sids.pop()
            keys, counts, _ = _merge_keyed(left_keys, left_counts, keys, counts)
            size *= 2
        self._sids.append((size, keys, counts))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def result(self) -> Partial:
        """The merge of every partial pushed; it takes them: the merge is empty after."""
        if self._total is None:
            raise ValueError("no partials were merged")
        _, keys, counts = self._sids.pop()
        while self._sids:
            _, left_keys, left_counts = self._sids.pop()
            keys, counts, _ = _merge_keyed(left_keys, left_counts, keys, counts)
        total, self._total, self._count = self._total, None, 0
        return replace(total, sid_keys=keys, sid_counts=counts)
