"""Item ids held by more than one catalog row: which ids (`find_duplicates`), and with
input.on_duplicate=keep_first the rejects of every copy after an id's first one, in (shard,
row) order (`first_copy_rejects`). Plain functions of the ids' Arrow arrays, run on the
driver (the gathered check) or per bucket (`semid_dist.bucketed`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.io import fs as fsio
from semid_dist.io.catalog import Shard


def find_duplicates(id_arrays: list[pa.Array]) -> tuple[pa.Array, int]:
    """-> (distinct ids that occur more than once, ascending; number of rows holding them).

    Integer ids are sorted with numpy (30 ms for 1.5M ids, against 260-360 ms for Arrow's
    hash-based `value_counts`); string ids are counted by Arrow."""
    empty = pa.array([], id_arrays[0].type if id_arrays else pa.int64())  # keeps the type
    ids = pc.drop_null(pa.chunked_array([a for a in id_arrays if len(a)] or [empty]))
    if pa.types.is_integer(ids.type):
        s = np.sort(ids.to_numpy())
        same = s[1:] == s[:-1]  # a row equal to the row before it: a later copy
        starts = np.flatnonzero(same & ~np.concatenate([[False], same[:-1]]))
        return pa.array(s[starts], ids.type), int(same.sum()) + len(starts)
    counts = pc.value_counts(ids)
    values, n = counts.field("values"), counts.field("counts")
    dup = pc.greater(n, 1)
    values = pc.filter(values, dup)
    return pc.take(values, pc.sort_indices(values)), int(pc.sum(pc.filter(n, dup)).as_py() or 0)


def first_copy_rejects(id_arrays: list[pa.Array], shards: Sequence[Shard],
                       dups: pa.Array) -> dict[int, pa.Table]:
    """on_duplicate=keep_first: every copy of an id in `dups` after its first one in (shard,
    row) order -> {shard index: table(offset: int64 sorted rows inside the shard, reason:
    "duplicate item_id (first at <file>:<row>)")}.

    id_arrays[i]: the ids of shards[i] in row order (as `scan_keys` returns them). Vectorized
    over the rows holding a duplicated id; the only Python loop is over shards."""
    sizes = np.array([len(a) for a in id_arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    chunks = [a for a in id_arrays if len(a)] or [pa.array([], dups.type)]
    later, origin = later_copies(pa.chunked_array(chunks).combine_chunks(), dups)
    later_shard = np.searchsorted(starts, later, side="right") - 1
    origin_shard = np.searchsorted(starts, origin, side="right") - 1
    return copy_rejects(shards, later_shard, later - starts[later_shard], origin_shard,
                        origin - starts[origin_shard])


def later_copies(ids: pa.Array, dups: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `ids` of every copy of an id in `dups` after its first one, ascending,
    and the position of that id's first copy."""
    if len(dups) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    group = pc.index_in(ids, value_set=dups)
    held = group.is_valid().to_numpy(zero_copy_only=False)
    pos = np.flatnonzero(held)  # ascending
    g = pc.drop_null(group).to_numpy().astype(np.int64)
    order = np.argsort(g, kind="stable")  # by id, then position
    g, pos = g[order], pos[order]
    first = np.concatenate([[True], g[1:] != g[:-1]])
    first_pos = np.empty(len(dups), dtype=np.int64)
    first_pos[g[first]] = pos[first]
    later = pos[~first]
    origin = first_pos[g[~first]]
    by_pos = np.argsort(later)
    return later[by_pos], origin[by_pos]


def _in_files(shards: Sequence[Shard], shard_pos: np.ndarray, rows: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray]:
    """(file, row inside it) of the rows at (shard_pos: position in `shards`, rows: row
    inside that shard)."""
    paths = np.empty(len(rows), dtype=object)
    file_rows = np.empty(len(rows), dtype=np.int64)
    order = np.argsort(shard_pos, kind="stable")
    cuts = np.searchsorted(shard_pos[order], np.arange(len(shards) + 1))
    for i in np.flatnonzero(np.diff(cuts)):
        at = order[cuts[i]:cuts[i + 1]]
        shard = shards[i]
        piece, file_rows[at] = shard.locate(rows[at])
        paths[at] = np.array([fsio.redact_url(p.path) for p in shard.pieces], dtype=object)[piece]
    return paths, file_rows


def copy_rejects(shards: Sequence[Shard], later_shard: np.ndarray, later_row: np.ndarray,
                 origin_shard: np.ndarray, origin_row: np.ndarray) -> dict[int, pa.Table]:
    """`first_copy_rejects`' tables from the later copies at (later_shard: position in
    `shards`, later_row: row inside that shard), in (shard, row) order, whose first copies
    lie at (origin_shard, origin_row)."""
    paths, file_rows = _in_files(shards, origin_shard, origin_row)
    reason = pc.binary_join_element_wise(
        "duplicate item_id (first at ", pa.array(paths, pa.string()), ":",
        pa.array(file_rows).cast(pa.string()), ")", "")
    cuts = np.searchsorted(later_shard, np.arange(len(shards) + 1))
    out: dict[int, pa.Table] = {}
    for i, shard in enumerate(shards):
        lo, hi = int(cuts[i]), int(cuts[i + 1])
        if hi > lo:
            out[shard.index] = pa.table({"offset": later_row[lo:hi].astype(np.int64),
                                         "reason": reason.slice(lo, hi - lo)})
    return out
