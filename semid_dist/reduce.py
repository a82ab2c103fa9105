"""The reduce: merge shard statistics, decide the pruning, bound collisions, compute every
figure, then finalize the data parts and write the lookup tables.

Only statistics (counts, distinct SIDs, pair counts) meet on the driver; per-item work (the
overflow rows of over-full SIDs, suffixes, data parts) runs as engine tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist import shuffle
from semid_dist.bucketed import bucketed_capacity, bucketed_suffixes
from semid_dist.codes.capacity import apply_delta, move_delta
from semid_dist.codes.collisions import (
    add_keys,
    last_layer_prefix,
    needs_suffixes,
    occupancy,
    suffix_counts,
    sum_suffix_counts,
)
from semid_dist.codes.keyset import in_sorted, unique_sorted
from semid_dist.codes.lookups import (
    flows_table,
    prefix_table,
    sid_size_table,
    token_counts_table,
    vocabulary_table,
)
from semid_dist.codes.metrics import final_sid_counts, finalize_metrics, quality_warnings
from semid_dist.codes.partials import Partial
from semid_dist.codes.pruning import (
    PruneDecision,
    codes_of_keys,
    decide,
    kept_layers,
    layer_counts_after,
)
from semid_dist.config import BuildConfig
from semid_dist.io.catalog import CatalogPlan
from semid_dist.io.store import STAGING, FileEntry, TableStore
from semid_dist.reduce_tasks import (
    TAKEN_SCHEMA,
    Moves,
    Replaced,
    carried_suffixes,
    colliding_rows,
    column_matrix,
    finalize_shard,
    kept_suffixes,
    overflow_rows,
    reassign,
    shard_moves,
    shard_replaced,
    suffix_tables,
)
from semid_dist.shuffle import Streams
from semid_dist.stages import JobContext

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]


def bound_collisions(engine: Engine, ctx: JobContext, plan: CatalogPlan, merged: Partial,
                     decision: PruneDecision, capacity: int | None, held: Partial | None = None,
                     replaced: Replaced = None, *, bucket_rows: int,
                     log: Log | None = None) -> tuple[Partial, Moves, int]:
    """Move the overflow of SIDs holding more than `capacity` items to next-best last-layer
    codes under the same prefix. Only the rows `plan` encoded move; `held` (the parent's rows
    an incremental version carries, part of `merged`) keep their SIDs and take the first
    places, as do its catalog's rows of items the parent held (`replaced`, per shard:
    `reduce_tasks.replaced_by_shard`) whose SID is the one the item had. Up to `bucket_rows`
    rows of over-full SIDs the driver gathers them and engine tasks move them in 16 prefix
    chunks; more are moved by engine tasks in prefix ranges through the version's staging
    (`semid_dist.bucketed.bucketed_capacity`). Returns (statistics after the moves, the
    moves, how many items moved)."""
    if capacity is None:
        return merged, None, 0
    sizes = ctx.sizes
    keys, counts = final_sid_counts(merged, list(sizes), decision)
    prefix, digit = last_layer_prefix(keys, sizes[-1])
    over = (counts > capacity) & (digit < sizes[-1])
    if not over.any():
        return merged, None, 0
    fixed_sids = None if held is None else final_sid_counts(held, list(sizes), decision)
    if replaced is not None:
        if fixed_sids is None:
            raise ValueError("replaced rows come with the carried rows' statistics (held)")
        kept = gather_kept(engine, ctx, plan, replaced, decision, None)
        fixed_sids = add_keys(*fixed_sids, kept.column("key").to_numpy())
    if int(counts[over].sum()) > bucket_rows:
        delta, streams = bucketed_capacity(engine, ctx, plan, keys, counts, over, decision,
                                           capacity, bucket_rows=bucket_rows,
                                           scratch=capacity_scratch(ctx), held=fixed_sids,
                                           replaced=replaced, log=log)
        return apply_delta(merged, delta), streams, delta.moved
    over_keys = keys[over]  # one object: sent to the tasks once
    rows = pa.concat_tables(engine.map(overflow_rows, [
        (ctx, s, over_keys, decision, shard_replaced(replaced, pos))
        for pos, s in enumerate(plan.shards)]))
    prefixes = unique_sorted(prefix[over])
    occ = occupancy(keys, counts, prefixes, sizes[-1])
    fixed = None if fixed_sids is None else occupancy(*fixed_sids, prefixes, sizes[-1])
    row_prefix, _ = last_layer_prefix(rows.column("key").to_numpy(), sizes[-1])
    tasks = []
    for chunk in np.array_split(np.arange(len(prefixes)), min(len(prefixes), 16)):
        mask = pa.array(np.isin(row_prefix, prefixes[chunk]))
        tasks.append((ctx, pc.filter(rows, mask), prefixes[chunk], occ[chunk], capacity,
                      None if fixed is None else fixed[chunk]))
    moves = pa.concat_tables(engine.map(reassign, tasks))
    delta = move_delta(column_matrix(moves.column("old_codes"), len(sizes), np.int32),
                       moves.column("code").to_numpy(), moves.column("old_qerr").to_numpy(),
                       moves.column("qerr").to_numpy(), sizes)
    return apply_delta(merged, delta), moves, delta.moved


def gather_kept(engine: Engine, ctx: JobContext, plan: CatalogPlan, replaced: list[pa.Table],
                decision: PruneDecision, moves: Moves) -> pa.Table:
    """(key, suffix) of every row that keeps its item's suffix (`reduce_tasks.kept_suffixes`,
    after `moves`), read from the shards holding replaced items only."""
    holding = [pos for pos, t in enumerate(replaced) if t.num_rows]
    return pa.concat_tables([TAKEN_SCHEMA.empty_table()] + engine.map(kept_suffixes, [
        (ctx, plan.shards[pos], replaced[pos], decision, shard_moves(moves, pos))
        for pos in holding]))


def capacity_scratch(ctx: JobContext) -> str:
    """Where the capacity bound's streams lie until the data parts are written."""
    return f"{ctx.store().version_url(ctx.version_id)}/{STAGING}/capacity"


def reduce_partials(engine: Engine, ctx: JobContext, plan: CatalogPlan,
                    partials: dict[str, Partial], cfg: BuildConfig, log: Log, *,
                    decision: PruneDecision | None = None, held: Partial | None = None,
                    replaced: Replaced = None,
                    ) -> tuple[dict[str, Partial], PruneDecision, Moves, dict[str, Any]]:
    """partials: {"all"|"head"|"tail": statistics merged over every shard} ->
    ({"all"|"head"|"tail": merged statistics}, pruning decision, capacity moves, metrics).
    Head / tail figures are of the codes before capacity moves. An incremental version
    passes its parent's `decision` (carried SIDs keep their pruning) and the carried rows'
    statistics as `held` and the parent rows its catalog replaces as `replaced` (see
    `bound_collisions`)."""
    sizes = tuple(cfg.quantizer.layers)
    merged = dict(partials)
    pr = cfg.prune
    if decision is None:
        decision = decide(pr.strategy, sizes, merged["all"].layer_counts,
                          merged["all"].sid_keys, merged["all"].sid_counts, layer=pr.layer,
                          k=pr.k, p=pr.p, tau=pr.tau)
    merged["all"], moves, moved = bound_collisions(
        engine, ctx, plan, merged["all"], decision, cfg.collisions.max_per_sid, held, replaced,
        bucket_rows=cfg.driver.gather_rows, log=log)

    def figures(p: Partial, table: Partial | None = None) -> dict[str, Any]:
        return finalize_metrics(p, list(sizes), quality_depth=cfg.quality_depth,
                                pd_t=cfg.metrics.pd_t, pd_max_clusters=cfg.metrics.pd_max_clusters,
                                seed=cfg.seed, decision=decision, table=table)

    metrics = figures(merged["all"])
    q = cfg.quantizer
    metrics["quantizer"] = {"method": q.method, "layers": list(sizes),
                            **({"base": q.acrq_base} if q.method == "acrq" else {})}
    if cfg.learned:  # its residuals after the other layers are in the model's latent space
        metrics["reconstruction"]["latent_layers"] = len(sizes) - 1
    metrics["collisions"]["capacity"] = cfg.collisions.max_per_sid
    metrics["collisions"]["reassigned"] = moved
    if cfg.collisions.max_per_sid is not None:
        over = over_capacity(merged["all"], sizes, decision, cfg.collisions.max_per_sid)
        metrics["collisions"]["over_capacity"] = over
    for part in ("head", "tail"):
        if part in merged:
            sub = merged[part]
            metrics[part] = ({"items": sub.n, **figures(sub, partials["all"])} if sub.n
                             else {"items": 0})  # collisions with any item, before moves
    log(f"reduce: {metrics['hourglass']['verdict']}")
    for line in quality_warnings(metrics, merged["all"].n, learned=cfg.learned,
                                 reused=bool(cfg.encode.from_version)):
        log(f"warning: {line}")
    if moves is not None:
        left = metrics["collisions"]["over_capacity"]
        codes = min(cfg.collisions.candidates, sizes[-1])  # (the last layer's every code)
        fixes = (["more candidates"] if codes < sizes[-1] else []) + [
            "a larger last layer", "a larger bound"]
        log(f"collisions: {moved} items moved to a next-best last-layer code "
            f"(capacity {cfg.collisions.max_per_sid} per SID)"
            + (f"; {left['items']} items in {left['sids']} SIDs stay over it (no room in "
               + (f"their collisions.candidates={codes} codes" if codes < sizes[-1] else
                  f"any of the last layer's {codes} codes")
               + (", or carried from the parent" if cfg.encode.incremental else "")
               + f": {', '.join(fixes[:-1])} or {fixes[-1]} place more)"
               if left["sids"] else ""))
    return merged, decision, moves, metrics


def over_capacity(merged: Partial, sizes: tuple[int, ...], decision: PruneDecision,
                  capacity: int) -> dict[str, int]:
    """What is over the capacity bound after its moves: {"sids": SIDs that keep a last-layer
    code (those it applies to) holding more than `capacity` items, "items": their items past
    it (none of whose candidate codes had room; an incremental version's carried items are
    never moved), "pruned_sids" / "pruned_items": the same of SIDs that pruning cut before
    their last layer (the bound does not apply to them)}."""
    keys, counts = final_sid_counts(merged, list(sizes), decision)
    _, digit = last_layer_prefix(keys, sizes[-1])
    over, bounded = counts > capacity, digit < sizes[-1]
    past = counts - capacity
    return {"sids": int((over & bounded).sum()), "items": int(past[over & bounded].sum()),
            "pruned_sids": int((over & ~bounded).sum()),
            "pruned_items": int(past[over & ~bounded].sum())}


def finalize_version(engine: Engine, ctx: JobContext, plan: CatalogPlan, merged: Partial,
                     decision: PruneDecision, moves: Moves, *,
                     carried: list[FileEntry] | None = None, held: Partial | None = None,
                     replaced: Replaced = None, bucket_rows: int,
                     log: Log | None = None) -> tuple[list[FileEntry], np.ndarray]:
    """Collision suffixes on the final SIDs, then one data part per shard of the plan.
    -> (the data parts, how many of the plan's rows hold each non-zero suffix: every other
    row takes suffix 0; `codes.collisions.suffix_counts`).

    An incremental version passes the parent's data parts it carries and their statistics
    (`held`, part of `merged`): their rows keep their suffixes, and the plan's rows of a SID
    they hold take the suffixes they leave free (`codes.collisions.free_suffixes`).
    replaced: per shard, its rows of items the parent held, with their final SID keys and
    suffixes there (`reduce_tasks.replaced_by_shard`); such a row whose final SID is the
    one its item had keeps that suffix, as a carried row does (`reduce_tasks.kept_rows`), so
    an item sent again unchanged keeps its suffix (and its SID, but where the parent's
    capacity bound had moved it off its nearest code: it is placed anew).

    Up to `bucket_rows` rows of colliding SIDs (with new rows, in an incremental version;
    the carried rows of those SIDs included) are ranked on the driver. More are ranked by
    engine tasks in key ranges of about `bucket_rows` rows each, through the version's
    staging (`semid_dist.bucketed.bucketed_suffixes`), so the driver holds only their
    per-file offsets, and the (key, suffix) of the rows keeping their items' suffixes (at
    most one per replaced row, as the replaced rows the driver holds)."""
    def write_parts(suffixes: list[pa.Table] | list[Streams]) -> list[FileEntry]:
        return engine.map(finalize_shard, [(ctx, s, part, decision, shard_moves(moves, pos),
                                            shard_replaced(replaced, pos))
                                           for pos, (s, part) in enumerate(zip(plan.shards,
                                                                               suffixes))])

    scratch = f"{ctx.store().version_url(ctx.version_id)}/{STAGING}/suffixes"
    try:
        sizes = list(ctx.sizes)
        keys, counts = final_sid_counts(merged, sizes, decision)
        held_sids = final_sid_counts(held, sizes, decision) if held is not None else None
        kept = None
        if replaced is not None:  # rows keeping their suffixes count as held
            if held_sids is None:
                raise ValueError("replaced rows come with the carried rows' statistics (held)")
            kept = gather_kept(engine, ctx, plan, replaced, decision, moves)
            held_sids = add_keys(*held_sids, kept.column("key").to_numpy())
        need = needs_suffixes(keys, counts, *(held_sids or ()))
        hot, hot_counts = keys[need], counts[need]
        kept_by = [suffix_counts(kept.column("suffix").to_numpy())] if kept is not None else []
        if kept is not None:  # those of the SIDs ranked
            kept = kept.filter(pa.array(in_sorted(kept.column("key").to_numpy(), hot)))
        if int(hot_counts.sum()) <= bucket_rows:
            rows = (engine.map(colliding_rows, [(ctx, s, hot, decision, shard_moves(moves, pos),
                                                 shard_replaced(replaced, pos))
                                                for pos, s in enumerate(plan.shards)])
                    if len(hot) else [])
            taken = None
            if (carried or kept is not None) and len(hot):
                taken = pa.concat_tables(  # no carried part when every parent row is replaced
                    engine.map(carried_suffixes, [(ctx, e, hot, decision) for e in carried or []])
                    + ([kept] if kept is not None else []))
            suffixes = suffix_tables(rows, len(plan.shards), taken)
            held_by = sum_suffix_counts([suffix_counts(t.column("suffix").to_numpy())
                                         for t in suffixes] + kept_by)
            return write_parts(suffixes), held_by
        streams, held_by = bucketed_suffixes(engine, ctx, plan, hot, hot_counts, decision,
                                             moves, bucket_rows=bucket_rows, scratch=scratch,
                                             carried=carried, kept=kept, replaced=replaced,
                                             log=log)
        return write_parts(streams), sum_suffix_counts([held_by] + kept_by)
    finally:
        shuffle.remove(scratch)
        if isinstance(moves, list):  # the capacity bound's streams, read by now
            shuffle.remove(capacity_scratch(ctx))


def write_lookups(store: TableStore, vid: str, partials: dict[str, Partial],
                  decision: PruneDecision, suffixes: np.ndarray) -> list[FileEntry]:
    """vocab.parquet (tokens for a language model), lookup/prefixes.parquet (valid SID
    prefixes for constrained decoding) and the analytics/ tables behind the report's figures,
    all from the distinct SIDs and pair counts (never from per-item rows). suffixes: how many
    of the table's rows hold each non-zero collision suffix (the rest hold suffix 0)."""
    sizes, merged = decision.sizes, partials["all"]
    suffixes = suffixes.copy()
    suffixes[0] = merged.n - suffixes[1:].sum()
    codes = codes_of_keys(merged.sid_keys, sizes)
    after = layer_counts_after(codes, merged.sid_counts, kept_layers(codes, decision), sizes)
    split = ([partials["head"].layer_counts, partials["tail"].layer_counts]
             if "head" in partials else [None, None])
    _, final_counts = final_sid_counts(merged, list(sizes), decision)
    tables = {
        "vocab.parquet": vocabulary_table(merged.sid_keys, merged.sid_counts, sizes, decision,
                                          suffixes),
        "lookup/prefixes.parquet": prefix_table(merged.sid_keys, merged.sid_counts, sizes,
                                                decision),
        "analytics/token_counts.parquet": token_counts_table(merged.layer_counts, after, *split),
        "analytics/flows.parquet": flows_table(merged.trans_keys, merged.trans_counts, sizes),
        "analytics/sid_sizes.parquet": sid_size_table(merged.sid_counts, final_counts),
    }
    return [store.write_table(vid, rel, t) for rel, t in tables.items()]
