"""The shard-level functions of the reduce and the commit, which every engine runs as it
runs `stages`' encode: capacity moves, colliding rows and their suffixes, a shard's final data
part, and an incremental version's carried parts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.codes.collisions import (
    assign_suffixes,
    free_suffixes,
    last_layer_prefix,
    reassign_overflow,
    suffix_counts,
)
from semid_dist.codes.keyset import in_sorted
from semid_dist.codes.pruning import PruneDecision, final_keys, kept_layers, token_offsets
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import Shard
from semid_dist.io.store import STAGING, FileEntry
from semid_dist.shuffle import Streams
from semid_dist.stages import JobContext

SUFFIX_SCHEMA = pa.schema([("row", pa.int64()), ("suffix", pa.int32())])  # per shard


def column_matrix(col: pa.ChunkedArray, width: int, dtype: type) -> np.ndarray:
    """A fixed-size list column as an (n, width) array of `dtype`."""
    return col.combine_chunks().flatten().to_numpy().astype(dtype).reshape(-1, width)


# capacity moves: by item id (item_id, code, qerr; the driver's table), or one shard's
# streams by row in its staged codes (row, code, qerr; `semid_dist.bucketed`)
ShardMoves = pa.Table | Streams | None
Moves = pa.Table | list[Streams] | None  # the driver's table, or each shard's streams
MOVE_SCHEMA = pa.schema([("row", pa.int64()), ("code", pa.int32()), ("qerr", pa.float32())])


def shard_moves(moves: Moves, pos: int) -> ShardMoves:
    """The moves a shard (at position `pos` in the plan) applies: the driver's table, or
    its own streams of the per-shard list."""
    return moves[pos] if isinstance(moves, list) else moves


def _read_staged(ctx: JobContext, shard: Shard, moves: ShardMoves = None,
                 columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """The shard's staged codes (item_id, codes, qerr[, alt_codes, alt_err]; or `columns`
    of them, item_id, codes and qerr among them) with the capacity moves (new last code,
    new qerr) applied."""
    store = ctx.store()
    rel = f"{STAGING}/codes-{shard.index:06d}.parquet"
    t = fsio.read_parquet(store.fs, fsio.join(store.version_dir(ctx.version_id), rel),
                          columns=columns)
    codes = column_matrix(t.column("codes"), len(ctx.sizes), np.int32)
    if isinstance(moves, Streams):
        moved = moves.read(MOVE_SCHEMA)
        if not moved.num_rows:
            return t, codes
        rows = moved.column("row").to_numpy()
        new_code, new_qerr = moved.column("code").to_numpy(), moved.column("qerr").to_numpy()
    elif moves is not None and moves.num_rows:
        ids = t.column("item_id").combine_chunks()
        pos = pc.index_in(ids, value_set=moves.column("item_id").combine_chunks().cast(ids.type))
        rows = np.flatnonzero(pos.is_valid().to_numpy(zero_copy_only=False))
        found = pc.drop_null(pos).to_numpy()
        new_code = moves.column("code").to_numpy()[found]
        new_qerr = moves.column("qerr").to_numpy()[found]
    else:
        return t, codes
    codes[rows, -1] = new_code
    qerr = t.column("qerr").to_numpy().copy()
    qerr[rows] = new_qerr
    t = t.set_column(t.schema.get_field_index("qerr"), "qerr", pa.array(qerr))
    t = t.set_column(t.schema.get_field_index("codes"), "codes",
                     pa.FixedSizeListArray.from_arrays(codes.ravel(), len(ctx.sizes)))
    return t, codes


# a shard's rows of items an incremental version's parent held: row (in the shard's staged
# codes), key and suffix (the item's final SID key and suffix there); a row whose final SID
# is the one its item had keeps the suffix (`kept_rows`). Per shard of the plan, or None.
REPLACED_SCHEMA = pa.schema([("row", pa.int64()), ("key", pa.int64()), ("suffix", pa.int32())])
ShardReplaced = pa.Table | None
Replaced = list[pa.Table] | None
# (key, suffix) of rows that hold their suffixes: carried rows, and rows that keep their item's
TAKEN_SCHEMA = pa.schema([("key", pa.int64()), ("suffix", pa.int32())])


def shard_replaced(replaced: Replaced, pos: int) -> ShardReplaced:
    """The replaced rows of the shard at position `pos` in the plan (None without any)."""
    return replaced[pos] if replaced is not None else None


def replaced_by_shard(lengths: list[int], catalog_ids: pa.Array, ids: pa.Array,
                      keys: np.ndarray, suffix: np.ndarray) -> list[pa.Table]:
    """The parent rows an incremental version replaces (their item `ids`, final SID `keys`
    and `suffix`) by the shard and row encoding each item anew (`catalog_ids`: every shard's
    staged ids in the plan's order, `lengths` of them each; every one of `ids` among them)
    -> per shard, a table of REPLACED_SCHEMA in row order. One lookup on the driver, so that
    no task builds a hash set of the whole catalog's replaced ids."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    at = (pc.index_in(ids, value_set=catalog_ids) if len(ids)
          else pa.array([], pa.int32()))
    if at.null_count:
        raise ValueError(f"{at.null_count} replaced ids are not among the catalog's ids")
    at = at.to_numpy().astype(np.int64)
    order = np.argsort(at, kind="stable")  # by shard, then row
    at, keys, suffix = at[order], np.asarray(keys)[order], np.asarray(suffix)[order]
    cut = np.searchsorted(at, np.concatenate([[0], ends]))
    return [pa.table({"row": at[lo:hi] - (end - n), "key": keys[lo:hi],
                      "suffix": suffix[lo:hi]}, schema=REPLACED_SCHEMA)
            for lo, hi, end, n in zip(cut[:-1], cut[1:], ends, lengths)]


def kept_rows(keys: np.ndarray, replaced: ShardReplaced) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a shard (final SID `keys` of all its rows) that keep the suffix their
    item had in the parent: its `replaced` rows whose final SID is the one the item had.
    -> (their row numbers, their suffixes)."""
    if replaced is None or not replaced.num_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    row = replaced.column("row").to_numpy()
    same = keys[row] == replaced.column("key").to_numpy()
    return row[same], replaced.column("suffix").to_numpy()[same]


def kept_suffixes(ctx: JobContext, shard: Shard, replaced: ShardReplaced,
                  decision: PruneDecision, moves: ShardMoves = None) -> pa.Table:
    """(key, suffix) of the shard's rows that keep their item's suffix (`kept_rows`); a
    shard with no replaced item is not read."""
    if replaced is None or not replaced.num_rows:
        return TAKEN_SCHEMA.empty_table()
    t, codes = _read_staged(ctx, shard, moves, columns=["item_id", "codes", "qerr"])
    k = final_keys(codes, kept_layers(codes, decision), ctx.sizes)
    rows, suffix = kept_rows(k, replaced)
    return pa.table({"key": k[rows], "suffix": suffix}, schema=TAKEN_SCHEMA)


def overflow_rows(ctx: JobContext, shard: Shard, keys: np.ndarray,
                  decision: PruneDecision, replaced: ShardReplaced = None) -> pa.Table:
    """Staged rows of the over-capacity final SIDs `keys` (sorted int64), but those of
    replaced items in the SIDs they had (`kept_rows`: they hold their places), with
    candidates, their final SID `key` and `row` (their row numbers in the shard's staged
    codes, which the moves of `semid_dist.bucketed.bucketed_capacity` are keyed by)."""
    t, codes = _read_staged(ctx, shard)
    k = final_keys(codes, kept_layers(codes, decision), ctx.sizes)
    hit = in_sorted(k, keys)
    hit[kept_rows(k, replaced)[0]] = False
    return (pc.filter(t, pa.array(hit)).append_column("key", pa.array(k[hit]))
            .append_column("row", pa.array(np.flatnonzero(hit))))


def reassign(ctx: JobContext, rows: pa.Table, prefixes: np.ndarray, occ: np.ndarray,
             capacity: int, held: np.ndarray | None = None) -> pa.Table:
    """Capacity moves for the rows of some prefix groups -> (item_id, old codes, code, old
    qerr, qerr, and the rows' `row` and `pos` where they have them) of the items that move
    (held: see `reassign_overflow`)."""
    last = ctx.sizes[-1]
    prefix, _ = last_layer_prefix(rows.column("key").to_numpy(), last)
    codes = column_matrix(rows.column("codes"), len(ctx.sizes), np.int32)
    width = rows.schema.field("alt_codes").type.list_size
    qerr = rows.column("qerr").to_numpy()
    idx, new_code, new_err = reassign_overflow(
        prefix, codes[:, -1], qerr, rows.column("item_id").combine_chunks(),
        column_matrix(rows.column("alt_codes"), width, np.int32),
        column_matrix(rows.column("alt_err"), width, np.float32), prefixes, occ, capacity, held)
    take = pa.array(idx)
    out = pa.table({"item_id": pc.take(rows.column("item_id"), take),
                    "old_codes": pa.FixedSizeListArray.from_arrays(codes[idx].ravel(),
                                                                   len(ctx.sizes)),
                    "code": new_code, "old_qerr": qerr[idx], "qerr": new_err})
    for name in ("row", "pos"):
        if name in rows.column_names:
            out = out.append_column(name, pc.take(rows.column(name), take))
    return out


def colliding_rows(ctx: JobContext, shard: Shard, keys: np.ndarray,
                   decision: PruneDecision, moves: ShardMoves = None,
                   replaced: ShardReplaced = None) -> pa.Table:
    """Staged rows whose final SID key is in `keys` (sorted int64), but those that keep
    their item's suffix (`kept_rows`): key, qerr, item_id, and row (their row numbers in the
    shard's staged codes)."""
    t, codes = _read_staged(ctx, shard, moves)
    k = final_keys(codes, kept_layers(codes, decision), ctx.sizes)
    hit = in_sorted(k, keys)
    hit[kept_rows(k, replaced)[0]] = False
    return pa.table({"key": k[hit], "qerr": t.column("qerr").to_numpy()[hit],
                     "item_id": pc.filter(t.column("item_id"), pa.array(hit)),
                     "row": np.flatnonzero(hit)})


def suffix_tables(rows: list[pa.Table], shards: int, taken: pa.Table | None = None
                  ) -> list[pa.Table]:
    """Collision suffixes for the colliding rows gathered from each of `shards` shards (in
    shard order; none when no SID collides): per shard, row -> suffix. taken: (key,
    suffix) of rows that keep their suffixes (an incremental version's carried rows of
    those SIDs); the gathered rows then take the suffixes these leave free."""
    t = pa.concat_tables(rows) if rows else None
    if t is None or t.num_rows == 0:
        return shard_suffixes([], np.zeros(0, np.int32), shards)
    keys = t.column("key").to_numpy()
    suffix = assign_suffixes(keys, t.column("qerr").to_numpy(),
                             t.column("item_id").combine_chunks())
    if taken is not None:
        suffix = free_suffixes(keys, suffix, taken.column("key").to_numpy(),
                               taken.column("suffix").to_numpy())
    return shard_suffixes(rows, suffix, shards)


def shard_suffixes(rows: list[pa.Table], suffix: np.ndarray, shards: int) -> list[pa.Table]:
    """Split `suffix` (n,) int32, the suffixes of the concatenated `rows` (each shard's
    colliding rows, in shard order), into one table per shard: row (in the shard's staged
    codes), suffix. A shard then sets its suffixes by row number, with no lookup of its ids
    in the whole catalog's colliding ids (a hash set of them rebuilt by every shard)."""
    if not rows:
        empty = pa.table({"row": pa.array([], pa.int64()), "suffix": pa.array([], pa.int32())})
        return [empty] * shards
    ends = np.cumsum([r.num_rows for r in rows])
    if len(rows) != shards or ends[-1] != len(suffix):
        raise ValueError(f"{len(rows)} shards' colliding rows ({ends[-1]} in all) for {shards} "
                         f"shards and {len(suffix)} suffixes")
    return [pa.table({"row": r.column("row"), "suffix": suffix[end - r.num_rows:end]})
            for r, end in zip(rows, ends)]


def finalize_shard(ctx: JobContext, shard: Shard, suffixes: pa.Table | Streams,
                   decision: PruneDecision, moves: ShardMoves = None,
                   replaced: ShardReplaced = None) -> FileEntry:
    """Write the shard's data part: item_id, codes (all L), sid (kept codes), sid_layers,
    sid_tokens (layer-scoped token ids offset[layer] + code), suffix, qerr. suffixes: this
    shard's collision suffixes (row, suffix; `shard_suffixes`, or its streams in the
    reduce's bucket files, `semid_dist.bucketed.bucketed_suffixes`); the rows of replaced
    items that keep their suffix (`kept_rows`) get it, and other rows suffix 0."""
    t, codes = _read_staged(ctx, shard, moves)
    n, n_layers = codes.shape
    kept = kept_layers(codes, decision)
    if isinstance(suffixes, Streams):
        suffixes = suffixes.read(SUFFIX_SCHEMA)
    suffix = np.zeros(n, dtype=np.int32)
    if suffixes.num_rows:
        suffix[suffixes.column("row").to_numpy()] = suffixes.column("suffix").to_numpy()
    if replaced is not None and replaced.num_rows:
        rows, old = kept_rows(final_keys(codes, kept, ctx.sizes), replaced)
        suffix[rows] = old
    flat = kept.ravel()
    layers = np.tile(np.arange(n_layers, dtype=np.int8), n)[flat]
    kept_codes = codes.ravel()[flat].astype(np.int32)
    tokens = kept_codes + token_offsets(ctx.sizes)[layers]
    offsets = pa.array(np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32))

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values, typ))

    out = pa.table({
        "item_id": t.column("item_id"),
        "codes": t.column("codes"),
        "sid": lists(kept_codes, pa.int32()),
        "sid_layers": lists(layers, pa.int8()),
        "sid_tokens": lists(tokens, pa.int64()),
        "suffix": suffix,
        "qerr": t.column("qerr"),
    })
    return ctx.store().write_table(ctx.version_id,
                                   f"data/part-{ctx.version_id}-{shard.index:06d}.parquet", out)


def staged_ids(ctx: JobContext, shard: Shard) -> pa.Array:
    """The item ids a shard encoded (from its staged codes)."""
    store = ctx.store()
    rel = f"{STAGING}/codes-{shard.index:06d}.parquet"
    return fsio.read_parquet(store.fs, fsio.join(store.version_dir(ctx.version_id), rel),
                             columns=["item_id"]).column(0).combine_chunks()


def carry_part(ctx: JobContext, entry: FileEntry, index: int,
               replaced: pa.Array) -> dict[str, Any]:
    """A parent data part in an incremental version. `entry.version` names the version
    holding it; replaced: the ids this version encodes anew. A part holding none of them is
    referenced as it is; otherwise its other rows are written as a new part of this version.
    -> {"entry": the part's entry in this version (None when every row is replaced),
    "codes"/"qerr"/"ids"/"suffix": the dropped rows' stored codes, qerr, item ids and
    suffixes, "suffixes": how many rows kept hold each non-zero suffix (`suffix_counts`)}."""
    store = ctx.store()
    path = store.entry_path(ctx.version_id, entry)
    keys = fsio.read_parquet(store.fs, path, columns=["item_id", "suffix"])
    ids = keys.column("item_id").combine_chunks()
    gone = pc.is_in(ids, value_set=replaced).to_numpy(zero_copy_only=False)
    suffix = keys.column("suffix").to_numpy()
    held_by = suffix_counts(suffix[~gone])
    if not gone.any():
        return {"entry": entry, "codes": np.zeros((0, len(ctx.sizes)), np.int32),
                "qerr": np.zeros(0, np.float32), "ids": ids.slice(0, 0),
                "suffix": np.zeros(0, np.int32), "suffixes": held_by}
    t = fsio.read_parquet(store.fs, path)
    kept, dropped = t.filter(pa.array(~gone)), t.filter(pa.array(gone))
    out = (store.write_table(ctx.version_id,
                             f"data/part-{ctx.version_id}-carried-{index:06d}.parquet", kept)
           if kept.num_rows else None)
    return {"entry": out, "codes": column_matrix(dropped.column("codes"), len(ctx.sizes), np.int32),
            "qerr": dropped.column("qerr").to_numpy().astype(np.float32),
            "ids": ids.filter(pa.array(gone)), "suffix": suffix[gone].astype(np.int32),
            "suffixes": held_by}


def carried_suffixes(ctx: JobContext, entry: FileEntry, keys: np.ndarray,
                     decision: PruneDecision) -> pa.Table:
    """(key, suffix) of a carried part's rows whose final SID key is in `keys` (sorted)."""
    store = ctx.store()
    t = fsio.read_parquet(store.fs, store.entry_path(ctx.version_id, entry),
                          columns=["codes", "suffix"])
    codes = column_matrix(t.column("codes"), len(ctx.sizes), np.int32)
    k = final_keys(codes, kept_layers(codes, decision), ctx.sizes)
    hit = in_sorted(k, keys)
    return pa.table({"key": k[hit], "suffix": t.column("suffix").to_numpy()[hit]})
