"""The version's SID -> items lookup (lookup/sid_items/): every final SID with its items in
suffix order, one Parquet file per SID hash bucket of about a million items.

`sid_items_lookup` runs on the driver; with more than one bucket it splits the data parts by
bucket through the version's staging (`semid_dist.shuffle`, `sid_items_split` tasks), and a
`sid_items_bucket` task writes each bucket's file.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist import shuffle
from semid_dist.codes.drift import bucket_count, padded_lists
from semid_dist.codes.keyset import run_starts, unique_rows
from semid_dist.errors import StoreError
from semid_dist.io.store import STAGING, FileEntry
from semid_dist.shuffle import Split, read_bucket, read_columns, split_files, split_tables
from semid_dist.stages import JobContext

if TYPE_CHECKING:
    from semid_dist.engines import Engine


def sid_items_lookup(engine: Engine, ctx: JobContext, data_files: list[FileEntry], *,
                     bucket_rows: int = 1_000_000) -> list[FileEntry]:
    """lookup/sid_items/: SID -> items, one file per hash bucket (about `bucket_rows` items
    each). With more than one bucket the data parts are first split by bucket
    (`semid_dist.shuffle`) into the version's staging, each part read once, by one task per
    group of parts of about `bucket_rows` rows."""
    store = ctx.store()
    parts = sorted((store.entry_path(ctx.version_id, f), f.rows) for f in data_files)
    paths = [p for p, _ in parts]
    buckets = bucket_count(sum(f.rows for f in data_files), bucket_rows=bucket_rows)
    if buckets == 1:
        return engine.map(sid_items_bucket, [(ctx, [Split(p) for p in paths], 0)])
    scratch = f"{store.version_url(ctx.version_id)}/{STAGING}/sid_items"
    groups = shuffle.group_files(paths, [n for _, n in parts], target_rows=bucket_rows)
    try:
        splits = engine.map(sid_items_split, [(ctx, g, buckets, f"{scratch}/{i:06d}")
                                              for i, g in enumerate(groups)])
        return engine.map(sid_items_bucket, [(ctx, splits, b) for b in range(buckets)])
    finally:
        shuffle.remove(scratch)


_SID_HASH = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53],
                     dtype=np.uint64)


def sid_bucket(tokens: np.ndarray, buckets: int) -> np.ndarray:
    """(n, w) padded SID tokens -> (n,) bucket in [0, buckets), the same in every process."""
    mult = np.resize(_SID_HASH, tokens.shape[1])
    with np.errstate(over="ignore"):
        h = ((tokens + 1).astype(np.uint64) * mult[None, :]).sum(axis=1, dtype=np.uint64)
    return (h % np.uint64(buckets)).astype(np.int64)


SID_ITEMS_COLUMNS = ("item_id", "sid_tokens", "suffix")


def _sid_buckets(rows: pa.Table, buckets: int, *, width: int) -> np.ndarray:
    return sid_bucket(padded_lists(rows.column("sid_tokens"), width), buckets)


def key_radix(sizes: tuple[int, ...] | list[int]) -> int | None:
    """The radix of the SID keys the split files carry: every token + 1 lies below it (a
    token is its layer's offset + code, below the sizes' sum); None where len(sizes) digits
    of it reach 2^62."""
    radix = sum(sizes) + 1
    return radix if radix ** len(sizes) < 2**62 else None


def _keyed(rows: pa.Table, path: str, sizes: tuple[int, ...], radix: int) -> pa.Table:
    packed = sid_keys(rows.column("sid_tokens"), len(sizes), radix=radix)
    if packed is None:
        raise StoreError(f"data part {path!r}: sid_tokens that are not codes of layers of "
                         f"sizes {list(sizes)}; the version holding it is damaged: build the "
                         "table again with a full build")
    return pa.table({"item_id": rows.column("item_id"), "sid_key": packed[0],
                     "suffix": rows.column("suffix")})


def _key_buckets(rows: pa.Table, buckets: int, *, width: int, radix: int) -> np.ndarray:
    keys = rows.column("sid_key").to_numpy()
    return sid_bucket(key_rows(keys, radix, width), buckets)  # as `_sid_buckets` would


def sid_items_split(ctx: JobContext, paths: list[str], buckets: int, out_url: str) -> Split:
    """Split a group of data parts (paths inside the table's filesystem) by SID hash bucket
    into `out_url` (`shuffle.split_tables`), with the columns item_id, sid_key (a SID as one
    int64 in base `key_radix`: a row of 20 bytes, against 40 with 3 tokens as a list) and
    suffix; with item_id, sid_tokens and suffix where the layers' SIDs do not fit one key."""
    fs, sizes, width = ctx.store().fs, tuple(ctx.sizes), len(ctx.sizes)
    radix = key_radix(sizes)
    if radix is None:
        return split_files(fs, paths, SID_ITEMS_COLUMNS,
                           functools.partial(_sid_buckets, width=width), buckets, out_url)
    tables = (_keyed(read_columns(fs, p, SID_ITEMS_COLUMNS), p, sizes, radix) for p in paths)
    return split_tables(tables, functools.partial(_key_buckets, width=width, radix=radix),
                        buckets, out_url)


def sid_keys(col: pa.ChunkedArray | pa.Array, width: int, *, radix: int | None = None
             ) -> tuple[np.ndarray, int] | None:
    """A list column of SID tokens (ints >= 0, at most `width` a list) -> ((n,) int64 keys,
    radix): each list read as `width` digits in base radix, its tokens plus 1 and then 0s
    (a null list is all 0s), so the keys order as `padded_lists`' rows do (-1 below every
    token) and equal keys are equal lists. radix: the largest token + 2 unless given. None
    where radix ** width reaches 2^62, a token is negative, null or (a radix given) not below
    radix - 1, a list is longer than `width`, or the column is not a list of integers."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    plain = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
    if not plain or not pa.types.is_integer(arr.type.value_type) or arr.values.null_count:
        return None
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    starts = arr.offsets.to_numpy()[:-1]  # into arr.values: nulls and slices included
    values = arr.values.to_numpy(zero_copy_only=False)
    if (len(values) and int(values.min()) < 0) or int(lengths.max(initial=0)) > width:
        return None
    top = int(values.max()) + 2 if len(values) else 1
    if radix is None:
        radix = top
    if top > radix or radix**width >= 2**62:
        return None
    values = values.astype(np.int64, copy=False)  # tokens + 1 in int64, whatever the type
    keys = np.zeros(len(arr), dtype=np.int64)
    for pos in range(width):
        keys *= radix
        rows = np.flatnonzero(lengths > pos)
        keys[rows] += values[starts[rows] + pos] + 1
    return keys, radix


def key_rows(keys: np.ndarray, radix: int, width: int) -> np.ndarray:
    """`sid_keys`' keys back to (m, width) int64 token rows, padded with -1."""
    out = np.empty((len(keys), width), dtype=np.int64)
    rest = np.asarray(keys, dtype=np.int64)
    for pos in range(width - 1, -1, -1):
        rest, digit = np.divmod(rest, radix)
        out[:, pos] = digit - 1
    return out


def sid_groups(rows: pa.Table, width: int, *, radix: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bucket's rows (sid_tokens or, from split files, sid_key in base `radix`; suffix) ->
    (its distinct SIDs as token rows padded with -1, in lexicographic order (m, width); each
    one's count of rows (m,); the rows' order by SID, then suffix, then row (n,)). A SID is
    one int64 key (`sid_keys`) where it fits: for a 750,000-row bucket of 3 tokens no padded
    rows (18 MB) and none of their copies; wider SIDs are sorted as padded rows
    (`unique_rows`)."""
    suffix = rows.column("suffix").to_numpy()
    if "sid_key" in rows.column_names:  # split streams (`sid_items_split`)
        if radix is None:
            raise ValueError("sid_key rows need the radix they were keyed in (key_radix)")
        packed = rows.column("sid_key").to_numpy(), radix
    else:
        packed = sid_keys(rows.column("sid_tokens"), width)
    if packed is None:
        uniq, inv = unique_rows(padded_lists(rows.column("sid_tokens"), width))
        return uniq, np.bincount(inv, minlength=len(uniq)), np.lexsort((suffix, inv))
    keys, radix = packed
    order = np.lexsort((suffix, keys))
    keys = keys[order]
    first = run_starts(keys)
    counts = np.diff(np.append(np.flatnonzero(first), len(keys)))
    return key_rows(keys[first], radix, width), counts, order


def sid_items_bucket(ctx: JobContext, splits: list[Split], bucket: int) -> FileEntry:
    """Write lookup/sid_items/part-<bucket>.parquet: every final SID of this hash bucket
    (sid_tokens) with its items in suffix order and each one's suffix (`suffixes`, the k of
    its `<S k>`: an incremental version's may have gaps), from the version's split data
    parts."""
    store, width = ctx.store(), len(ctx.sizes)
    rows = read_bucket(store.fs, splits, bucket, SID_ITEMS_COLUMNS)
    if rows is None or rows.num_rows == 0:  # its items typed as the table's item ids
        ids = rows.schema.field("item_id").type if rows is not None else pa.int64()
        out = pa.table({"sid_tokens": pa.array([], pa.list_(pa.int64())),
                        "items": pa.array([], pa.list_(ids)),
                        "suffixes": pa.array([], pa.list_(pa.int32())),
                        "count": pa.array([], pa.int64())})
    else:
        uniq, counts, order = sid_groups(rows, width, radix=key_radix(ctx.sizes))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        lengths = (uniq >= 0).sum(axis=1)
        tok_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        order = pa.array(order)
        out = pa.table({
            "sid_tokens": pa.ListArray.from_arrays(tok_offsets, pa.array(uniq[uniq >= 0])),
            "items": pa.ListArray.from_arrays(offsets, pc.take(
                rows.column("item_id").combine_chunks(), order)),
            "suffixes": pa.ListArray.from_arrays(offsets, pc.take(
                rows.column("suffix").combine_chunks(), order).cast(pa.int32())),
            "count": counts.astype(np.int64),
        })
    return store.write_table(ctx.version_id, f"lookup/sid_items/part-{bucket:05d}.parquet", out)
