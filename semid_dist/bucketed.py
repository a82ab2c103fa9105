"""The driver's per-key steps past `driver.gather_rows`, as engine tasks through staging.

Three steps need every row of one key together: the duplicate-id check (every copy of an
id), the capacity bound (every item under a SID prefix, `collisions.max_per_sid`) and the
collision suffixes (every item of a SID). Up to `driver.gather_rows` rows the
driver gathers them (`semid_dist.pipeline`, `semid_dist.reduce`); past it the functions
here split the rows by bucket into the version's `_staging/` (`semid_dist.shuffle`): one
task per group of consecutive shards writes its rows split by bucket, one task per bucket
does the step for its keys. The results are those of the driver-side steps, since all of
a key's rows meet in one bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist import shuffle
from semid_dist.codes.capacity import MoveDelta, merge_deltas, move_delta, prefix_ranges
from semid_dist.codes.collisions import (
    assign_suffixes,
    free_suffixes,
    key_range_bounds,
    last_layer_prefix,
    occupancy,
    suffix_counts,
    sum_suffix_counts,
)
from semid_dist.codes.drift import bucket_count, id_buckets
from semid_dist.codes.pruning import PruneDecision
from semid_dist.io.catalog import CatalogPlan, Shard
from semid_dist.io.duplicates import copy_rejects, find_duplicates, later_copies
from semid_dist.io.store import STAGING, FileEntry
from semid_dist.popularity import PopularityScan, scan_popularity
from semid_dist.reduce_tasks import (
    MOVE_SCHEMA,
    TAKEN_SCHEMA,
    Moves,
    Replaced,
    ShardReplaced,
    carried_suffixes,
    colliding_rows,
    column_matrix,
    overflow_rows,
    reassign,
    shard_moves,
    shard_replaced,
)
from semid_dist.shuffle import Split, Streams, split_tables
from semid_dist.stages import JobContext, scan_keys

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]


# -- the duplicate-id check --------------------------------------------------------------

@dataclass(frozen=True)
class Duplicates:
    """What the scan found: duplicated ids (ascending), how many rows hold them, and a way
    to the keep_first rejects of their later copies (as `first_copy_rejects` gives them)."""

    ids: pa.Array
    rows: int
    later: Callable[[], dict[int, pa.Table]]


@dataclass(frozen=True)
class ScanGroups:
    """The scan's groups of consecutive shards (with their positions in the plan), one task
    each, and the scan of each group's popularity (None without the column)."""

    groups: list[list[tuple[int, Shard]]]
    popularity: list[PopularityScan | None]


LATER = ("later_shard", "later_row", "origin_shard", "origin_row")


def _groups(plan: CatalogPlan, bucket_rows: int) -> list[list[tuple[int, Shard]]]:
    """Runs of consecutive shards (with their positions in the plan) of about `bucket_rows`
    rows: one split task each."""
    return shuffle.group_files(list(enumerate(plan.shards)),
                               [s.num_rows for s in plan.shards], target_rows=bucket_rows)


def bucketed_duplicates(engine: Engine, ctx: JobContext, plan: CatalogPlan, bucket_rows: int,
                         log: Log) -> tuple[Duplicates, ScanGroups]:
    """The duplicate check in B hash buckets of about `bucket_rows` ids (at most
    `codes.drift.MAX_BUCKETS`): one task per group of consecutive shards of about `bucket_rows`
    rows writes their ids split by bucket to the version's staging (`scan_split`); one task
    per bucket finds its duplicated ids and their later copies (`duplicate_bucket`). The
    driver holds the duplicates only. The same result as checking every id at once, since
    all copies of an id share a bucket. Also returns the groups with their popularity scans
    (None without the column)."""
    buckets = bucket_count(plan.num_rows, bucket_rows=bucket_rows)
    groups = _groups(plan, bucket_rows)
    log(f"scan: checking {plan.num_rows} ids for duplicates in {buckets} hash buckets "
        f"({len(groups)} split tasks, through staging)")
    scratch = f"{ctx.store().version_url(ctx.version_id)}/{STAGING}/scan"
    try:
        scanned = engine.map(scan_split, [(ctx, g, buckets, f"{scratch}/ids-{i:06d}")
                                          for i, g in enumerate(groups)])
        splits = [split for split, _ in scanned]
        found = engine.map(duplicate_bucket, [(splits, b) for b in range(buckets)])
    finally:
        shuffle.remove(scratch)
    ids = pa.concat_arrays([f["ids"] for f in found])

    def later() -> dict[int, pa.Table]:
        cols = [np.concatenate([f[k] for f in found]) for k in LATER]
        order = np.lexsort((cols[1], cols[0]))  # (shard, row) order
        return copy_rejects(plan.shards, *(c[order] for c in cols))

    return (Duplicates(ids.take(pc.sort_indices(ids)), sum(f["rows"] for f in found), later),
            ScanGroups(groups, [pop for _, pop in scanned]))


def _id_buckets(rows: pa.Table, buckets: int) -> np.ndarray:
    return id_buckets(rows.column("id"), buckets)


def scan_split(ctx: JobContext, shards: list[tuple[int, Shard]], buckets: int, out_url: str
               ) -> tuple[Split, PopularityScan | None]:
    """The scan of a group of shards when the ids are too many for the driver: their
    non-null ids with shard position `pos` and row inside the shard, written to `out_url`
    split by id hash bucket (`shuffle.split_tables`). Returns the split and the scan of the
    group's popularity (None without the column)."""
    tables, popularity = [], []
    for pos, shard in shards:
        ids, pop = scan_keys(ctx, shard)
        valid = ids.is_valid()
        rows = np.flatnonzero(valid.to_numpy(zero_copy_only=False))
        tables.append(pa.table({"id": ids.filter(valid),
                                "pos": np.full(len(rows), pos, dtype=np.int32), "row": rows}))
        popularity.append((pos, pop))
    split = split_tables(tables, _id_buckets, buckets, out_url)
    return split, None if popularity[0][1] is None else scan_popularity(popularity)


def duplicate_bucket(splits: list[Split], bucket: int) -> dict[str, Any]:
    """Duplicated ids of one hash bucket of the scan (`scan_split`): ids (ascending), rows
    (how many rows hold them), and every copy after an id's first one in (shard, row) order
    at (later_shard, later_row) with its first copy at (origin_shard, origin_row)."""
    rows = Streams.of_bucket(splits, bucket).read()
    ids = rows.column("id").combine_chunks()
    dups, held = find_duplicates([ids])
    later, origin = later_copies(ids, dups)  # the rows lie in (shard, row) order
    pos, row = rows.column("pos").to_numpy(), rows.column("row").to_numpy()
    return {"ids": dups, "rows": held, "later_shard": pos[later], "later_row": row[later],
            "origin_shard": pos[origin], "origin_row": row[origin]}


# -- the collision suffixes -------------------------------------------------------------

def bucketed_suffixes(engine: Engine, ctx: JobContext, plan: CatalogPlan, hot: np.ndarray,
                      hot_counts: np.ndarray, decision: PruneDecision,
                      moves: Moves, *, bucket_rows: int, scratch: str,
                      carried: list[FileEntry] | None = None, kept: pa.Table | None = None,
                      replaced: Replaced = None,
                      log: Log | None = None) -> tuple[list[Streams], np.ndarray]:
    """Collision suffixes of the colliding SIDs `hot` (sorted keys, `hot_counts` items each),
    ranked in B key ranges of about `bucket_rows` items (at most `codes.drift.MAX_BUCKETS`; each
    SID inside one range, wherever its rows lie). One task per group of consecutive shards
    of about `bucket_rows` rows writes their colliding rows split by key range
    (`colliding_split`); one task per range ranks them and writes the non-zero suffixes
    split by shard (`suffix_bucket`); each shard's data part then reads its streams. The
    suffixes are those of ranking every row at once, since a SID's ranks depend on its own
    rows only.

    carried: the data parts an incremental version carries, whose rows keep their suffixes
    (counted in `hot_counts` too): one task per group of parts of about `bucket_rows` rows
    writes their (key, suffix) of the SIDs `hot` split by key range (`carried_split`), and
    the plan's rows take the suffixes they leave free (`free_suffixes`), as
    `semid_dist.reduce.finalize_version` gives them on the driver. kept: (key, suffix) of the
    plan's rows of the SIDs `hot` that keep their item's suffix (`reduce_tasks.kept_rows`;
    `replaced`: per shard, its rows of items the parent held), held as the carried rows'
    are and not ranked; the driver
    writes them split by key range beside the carried parts'. Returns each shard's streams
    and how many of the plan's ranked rows hold each non-zero suffix."""
    hot_rows = int(hot_counts.sum())
    buckets = bucket_count(hot_rows, bucket_rows=bucket_rows)
    bounds = key_range_bounds(hot, hot_counts, buckets)
    groups = _groups(plan, bucket_rows)
    parts = shuffle.group_files(carried or [], [e.rows for e in carried or []],
                                target_rows=bucket_rows)
    if log:
        held = f" and {len(parts)} of carried parts" if carried is not None else ""
        log(f"collisions: ranking {hot_rows} colliding items in {buckets} key ranges "
            f"({len(groups)} split tasks of the catalog's rows{held}, through staging)")
    splits = engine.map(colliding_split, [(ctx, g, hot, decision, _group_moves(moves, g),
                                           bounds, f"{scratch}/rows-{i:06d}",
                                           _group_replaced(replaced, g))
                                          for i, g in enumerate(groups)])
    taken = (engine.map(carried_split, [(ctx, g, hot, decision, bounds,
                                         f"{scratch}/carried-{i:06d}")
                                        for i, g in enumerate(parts)])
             if carried is not None else None)
    if kept is not None and kept.num_rows:
        taken = (taken or []) + [split_tables([kept], _key_ranges(bounds), len(bounds) + 1,
                                              f"{scratch}/kept")]
    shards = len(plan.shards)
    ranked = engine.map(suffix_bucket, [(splits, b, shards, f"{scratch}/ranked-{b:06d}", taken)
                                        for b in range(buckets)])
    return (_per_shard([(split, rows) for split, rows, _ in ranked], shards),
            sum_suffix_counts([counts for _, _, counts in ranked]))


def _per_shard(results: list[tuple[Split, np.ndarray]], shards: int) -> list[Streams]:
    """Each shard's streams of range tasks' splits by shard position (a split with how many
    rows each of the `shards` streams holds; empty streams left out)."""
    return [Streams(tuple((split.path, split.offsets[pos], split.offsets[pos + 1])
                          for split, rows in results if rows[pos]))
            for pos in range(shards)]


def _group_moves(moves: Moves, group: list[tuple[int, Shard]]) -> Moves:
    """What a group task gets of the moves: the driver's table itself (one object, sent
    once), or the group's shards' own streams."""
    return [moves[pos] for pos, _ in group] if isinstance(moves, list) else moves


def _group_replaced(replaced: Replaced, group: list[tuple[int, Shard]]
                    ) -> list[ShardReplaced] | None:
    """A group task's share of the replaced rows: its shards' own (see `_group_moves`)."""
    return [replaced[pos] for pos, _ in group] if replaced is not None else None


def _key_ranges(bounds: np.ndarray) -> shuffle.BucketFn:
    """Rows by SID key range: a row of key k goes to bucket searchsorted(bounds, k, "right"),
    so every row of a SID lands in one bucket."""
    def of_key(rows: pa.Table, buckets: int) -> np.ndarray:
        return np.searchsorted(bounds, rows.column("key").to_numpy(), side="right")
    return of_key


def colliding_split(ctx: JobContext, shards: list[tuple[int, Shard]], keys: np.ndarray,
                    decision: PruneDecision, moves: Moves, bounds: np.ndarray,
                    out_url: str, replaced: list[ShardReplaced] | None = None) -> Split:
    """A group of shards' colliding rows (`colliding_rows`, with each row's shard position
    `pos` in the plan) written to `out_url` split into len(bounds) + 1 key ranges
    (`_key_ranges`, `shuffle.split_tables`)."""
    tables = []
    for i, (pos, shard) in enumerate(shards):
        t = colliding_rows(ctx, shard, keys, decision, shard_moves(moves, i),
                           shard_replaced(replaced, i))
        tables.append(t.append_column("pos", pa.array(np.full(t.num_rows, pos, np.int32))))
    return split_tables(tables, _key_ranges(bounds), len(bounds) + 1, out_url)


def carried_split(ctx: JobContext, entries: list[FileEntry], keys: np.ndarray,
                  decision: PruneDecision, bounds: np.ndarray, out_url: str) -> Split:
    """A group of carried data parts' (key, suffix) of the SIDs `keys` (`carried_suffixes`)
    written to `out_url` split into len(bounds) + 1 key ranges (`_key_ranges`)."""
    return split_tables([carried_suffixes(ctx, e, keys, decision) for e in entries],
                        _key_ranges(bounds), len(bounds) + 1, out_url)


def suffix_bucket(splits: list[Split], bucket: int, shards: int, out_url: str,
                  taken: list[Split] | None = None) -> tuple[Split, np.ndarray, np.ndarray]:
    """Collision suffixes of one key range: its colliding rows from every split ranked inside
    their SIDs (`assign_suffixes`; a SID's rows all lie in this range), or, with the carried
    rows' splits `taken`, given the suffixes those leave free (`free_suffixes`); the rows
    whose suffix is not 0 written to `out_url` split by shard position (row, suffix).
    Returns the split, how many rows each of the `shards` streams holds, and how many rows
    hold each non-zero suffix (`suffix_counts`)."""
    rows = Streams.of_bucket(splits, bucket).read()
    keys = rows.column("key").to_numpy()
    suffix = assign_suffixes(keys, rows.column("qerr").to_numpy(),
                             rows.column("item_id").combine_chunks())
    if taken is not None:
        held = Streams.of_bucket(taken, bucket).read(TAKEN_SCHEMA)
        suffix = free_suffixes(keys, suffix, held.column("key").to_numpy(),
                               held.column("suffix").to_numpy())
    nonzero = suffix > 0  # every other row of a data part gets suffix 0
    pos = rows.column("pos").to_numpy()[nonzero]
    out = pa.table({"row": rows.column("row").to_numpy()[nonzero], "suffix": suffix[nonzero]})
    split = split_tables([out], lambda t, n: pos, shards, out_url)
    return split, np.bincount(pos, minlength=shards), suffix_counts(suffix)


# -- the capacity bound ------------------------------------------------------------------

def bucketed_capacity(engine: Engine, ctx: JobContext, plan: CatalogPlan, keys: np.ndarray,
                      counts: np.ndarray, over: np.ndarray, decision: PruneDecision,
                      capacity: int, *, bucket_rows: int, scratch: str,
                      held: tuple[np.ndarray, np.ndarray] | None = None,
                      replaced: Replaced = None,
                      log: Log | None = None) -> tuple[MoveDelta, list[Streams]]:
    """Capacity moves for the over-full final SIDs in prefix ranges of about `bucket_rows`
    of their rows (`codes.capacity.prefix_ranges`; every prefix inside one range). keys
    (m,) sorted int64 final SID keys holding counts (m,) int64 items; over (m,) bool: those
    holding more than `capacity`. One task per group of consecutive shards writes their
    rows of those SIDs split by prefix range (`overflow_split`); one task per range moves
    its items (`reassign_range`) and writes the moves split by shard. held: (final SID keys,
    items) of rows that take the first places and never move (the parent's rows an
    incremental version carries, and its catalog's rows of `replaced` items that stay in the
    SIDs the items had: `reduce.bound_collisions`; counted in `counts` too); each range
    task gets the slice under its prefixes, and the split tasks leave those rows out. The
    moves are those of moving every row at once, since an item moves only under its own
    prefix. Returns the statistics' change and each shard's streams of its moves (row,
    code, qerr); the scratch is removed on failure, else once the data parts are written."""
    ranges = prefix_ranges(keys, counts, over, ctx.sizes[-1], bucket_rows=bucket_rows)
    groups = _groups(plan, bucket_rows)
    if log:
        log(f"collisions: moving the overflow of {int(over.sum())} over-full SIDs "
            f"({ranges.rows} items) in {ranges.count} prefix ranges ({len(groups)} split "
            "tasks, through staging)")
    over_keys = keys[over]  # one object: sent to the tasks once
    shards = len(plan.shards)
    if held is not None:  # the held SIDs under over-full prefixes, the only ones a task reads
        held_prefix, _ = last_layer_prefix(held[0], ctx.sizes[-1])
        under = np.isin(held_prefix, ranges.prefixes)
        held, held_prefix = (held[0][under], held[1][under]), held_prefix[under]
        held_edges = np.concatenate([[0], np.searchsorted(held_prefix, ranges.bounds),
                                     [len(held_prefix)]])

    def range_task(splits: list[Split], b: int) -> tuple:
        mine = slice(ranges.prefix_edges[b], ranges.prefix_edges[b + 1])
        sids = slice(ranges.key_edges[b], ranges.key_edges[b + 1])
        fixed = None
        if held is not None:
            under = slice(held_edges[b], held_edges[b + 1])
            fixed = (held[0][under], held[1][under])
        return (ctx, splits, b, ranges.prefixes[mine], keys[sids], counts[sids], capacity,
                shards, f"{scratch}/moves-{b:06d}", fixed)

    try:
        splits = engine.map(overflow_split, [(ctx, g, over_keys, decision, ranges.bounds,
                                              f"{scratch}/over-{i:06d}",
                                              _group_replaced(replaced, g))
                                             for i, g in enumerate(groups)])
        moved = engine.map(reassign_range, [range_task(splits, b) for b in range(ranges.count)])
    except BaseException:
        shuffle.remove(scratch)
        raise
    return (merge_deltas([delta for _, _, delta in moved]),
            _per_shard([(split, rows) for split, rows, _ in moved], shards))


def overflow_split(ctx: JobContext, shards: list[tuple[int, Shard]], keys: np.ndarray,
                   decision: PruneDecision, bounds: np.ndarray, out_url: str,
                   replaced: list[ShardReplaced] | None = None) -> Split:
    """A group of shards' rows of the over-full SIDs `keys` (`overflow_rows`, with each
    row's shard position `pos`) written to `out_url` split into len(bounds) + 1 prefix
    ranges: a row under prefix p goes to range searchsorted(bounds, p, "right")."""
    last = ctx.sizes[-1]

    def of_prefix(rows: pa.Table, buckets: int) -> np.ndarray:
        prefix, _ = last_layer_prefix(rows.column("key").to_numpy(), last)
        return np.searchsorted(bounds, prefix, side="right")

    tables = []
    for i, (pos, shard) in enumerate(shards):
        t = overflow_rows(ctx, shard, keys, decision, shard_replaced(replaced, i))
        tables.append(t.append_column("pos", pa.array(np.full(t.num_rows, pos, np.int32))))
    return split_tables(tables, of_prefix, len(bounds) + 1, out_url)


def reassign_range(ctx: JobContext, splits: list[Split], bucket: int, prefixes: np.ndarray,
                   keys: np.ndarray, counts: np.ndarray, capacity: int, shards: int,
                   out_url: str, held: tuple[np.ndarray, np.ndarray] | None = None,
                   ) -> tuple[Split, np.ndarray, MoveDelta]:
    """Capacity moves of one prefix range: its rows from every split moved as `reassign`
    moves them. prefixes (p,) sorted int64: the range's over-full prefixes; keys / counts
    (m,) int64: the final SIDs under them (over-full or not) and their items, whose
    occupancy the moves start from; held: (keys, items) of the rows among them that never
    move and take the first places (see `reassign`). The moves are written to `out_url`
    split by shard position (row, code, qerr). Returns the split, how many moves each of
    the `shards` streams holds, and the statistics' change."""
    last = ctx.sizes[-1]
    occ = occupancy(keys, counts, prefixes, last)
    fixed = None if held is None else occupancy(*held, prefixes, last)
    moves = reassign(ctx, Streams.of_bucket(splits, bucket).read(), prefixes, occ, capacity,
                     fixed)
    pos = moves.column("pos").to_numpy()
    out = pa.table({"row": moves.column("row"), "code": moves.column("code"),
                    "qerr": moves.column("qerr")}, schema=MOVE_SCHEMA)
    split = split_tables([out], lambda t, n: pos, shards, out_url)
    delta = move_delta(column_matrix(moves.column("old_codes"), len(ctx.sizes), np.int32),
                       moves.column("code").to_numpy(), moves.column("old_qerr").to_numpy(),
                       moves.column("qerr").to_numpy(), ctx.sizes)
    return split, np.bincount(pos, minlength=shards), delta
