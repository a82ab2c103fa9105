"""Incremental versions (`semid encode --incremental`): a catalog of new or changed items,
encoded with a parent version's codebooks, extends that parent.

The child version's table is the parent's rows of every item the catalog does not encode
anew, plus the catalog's items. Parent data parts holding none of the re-encoded items are
referenced (manifest entries naming the parent's version) instead of copied; a part holding
some is rewritten without them. Carried items keep their SIDs and suffixes, and so does an
item sent again that ends in the SID it had; new items use the parent's pruning decision,
take the suffixes these leave free, and (with
`collisions.max_per_sid`) move out of SIDs the carried items fill (`semid_dist.reduce`, given
the carried parts and their statistics; past `driver.gather_rows` as engine tasks). Every
figure and lookup is of the whole table: the parent's statistics (`stats/` of every version)
less the dropped rows, plus the new rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.codes.collisions import sum_suffix_counts
from semid_dist.codes.partials import Partial, subtract_rows
from semid_dist.codes.pruning import PruneDecision, final_keys, kept_layers
from semid_dist.config import BuildConfig
from semid_dist.errors import ConfigError, InputError, StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import CatalogPlan
from semid_dist.io.store import FileEntry, TableStore
from semid_dist.io.validate import stored_id_type
from semid_dist.reduce_tasks import carry_part, replaced_by_shard, staged_ids
from semid_dist.stages import JobContext

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]
STATS_PARTIAL = "stats/partial_all.npz"
STATS_DECISION = "stats/prune_decision.npz"
# figures that count replaced rows by their group's mean (see `subtract_rows`)
ESTIMATED = ["reconstruction.relative_error", "reconstruction.residual_norm_by_layer[:-1]",
             "reconstruction.residual_sq_norm_by_layer[:-1]", "quality"]


def write_stats(store: TableStore, vid: str, partial: Partial,
                decision: PruneDecision) -> list[FileEntry]:
    """stats/: the version's whole-table statistics and pruning decision, from which an
    incremental child derives its own."""
    return [store.write_file(vid, STATS_PARTIAL, partial.to_bytes()),
            store.write_file(vid, STATS_DECISION, decision.to_bytes())]


@dataclass(frozen=True)
class Carried:
    """What an incremental version keeps of its parent."""

    parent: str
    entries: list[FileEntry]  # data parts of the carried rows (referenced or rewritten)
    partial: Partial  # statistics of the carried rows
    decision: PruneDecision  # the parent's pruning
    rows: int  # carried rows
    replaced: int  # parent rows dropped for re-encoded items
    referenced: int  # parent parts referenced as they are
    suffixes: np.ndarray  # how many carried rows hold each non-zero suffix
    # the replaced rows' final SID keys and suffixes, by the shard and row re-encoding each
    replaced_by_shard: list[pa.Table]  # (`reduce_tasks.replaced_by_shard`)
    prune: dict[str, Any]  # the prune section of the config its SIDs are pruned by
    inherited_estimates: bool  # the parent's figures were already partly estimated

    def figures(self) -> dict[str, Any]:
        # with no row carried the figures are the new rows' own: exact
        estimated = self.rows > 0 and (self.replaced > 0 or self.inherited_estimates)
        return {"parent": self.parent, "carried": self.rows, "replaced": self.replaced,
                "parts_referenced": self.referenced,
                "parts_rewritten": len(self.entries) - self.referenced,
                "estimated": ESTIMATED if estimated else []}  # here or in an ancestor



def parent_parts(files: list[dict[str, Any]], parent: str) -> list[FileEntry]:
    """The data parts of version `parent` (its manifest's `files`), each naming the version
    that holds it (a part the parent referenced: its own)."""
    return [FileEntry(**{**e, "version": e.get("version") or parent})
            for e in files if e["path"].startswith("data/")]


def check_extendable(store: TableStore, parent: str, cfg: BuildConfig,
                     plan: CatalogPlan) -> None:
    """What an incremental version needs of its parent, checked before the build writes
    anything (they failed after the whole delta was encoded, leaving its staged shards): its
    data parts, its statistics (`stats/`) of the same prefix depth as this config's, and item
    ids of the catalog's type (as read from its first data part's footer, which is then
    readable Parquet)."""
    store.check_files(parent, "data")
    files = store.manifest(parent)["files"]
    if not {STATS_PARTIAL, STATS_DECISION} <= {e["path"] for e in files}:
        raise StoreError(f"version {parent} holds no stats/ files (it was built by an older "
                         "semid_dist), so an incremental version cannot extend it; run "
                         "`semid build` or a full `semid encode` once, then encode "
                         "incrementally from that version")
    depth = store.read_json(parent, "metrics.json")["quality"]["depth"]
    if depth != cfg.quality_depth:
        raise ConfigError(f"metrics.quality_depth is {cfg.quality_depth} but version {parent} "
                          f"was built with {depth}; an incremental version extends its "
                          f"statistics, so set metrics.quality_depth={depth}")
    parts = parent_parts(files, parent)
    if not parts or not plan.schemas:
        return
    first = store.entry_path(parent, parts[0])
    with store.fs.open(first, "rb") as f, fsio.damaged_parquet(first):
        held = pq.ParquetFile(f).schema_arrow.field("item_id").type
    ids = stored_id_type(plan.schemas[0][1].field(cfg.input.id_column).type)
    if held != ids:
        raise InputError(f"the catalog's item ids are {ids} but version {parent} holds {held} "
                         f"ids; write the catalog's {cfg.input.id_column!r} as {held}, as the "
                         "table's items are")


def _check_parent(store: TableStore, parent: str, cfg: BuildConfig,
                  decision: PruneDecision, log: Log) -> bool:
    """The parent's pruning is kept whatever this config says. -> whether its figures hold
    estimates."""
    metrics = store.read_json(parent, "metrics.json")
    if (cfg.prune.strategy, cfg.prune.layer) != (decision.strategy, decision.layer):
        log(f"incremental: prune.* of this config is not applied: carried and new items are "
            f"pruned by version {parent}'s decision ({decision.strategy}), so their SIDs agree")
    return bool((metrics.get("incremental") or {}).get("estimated"))


def _applied_prune(manifest: dict[str, Any], decision: PruneDecision) -> dict[str, Any]:
    """The prune section an incremental version records: its parent's (the pruning that
    version's decision came from), or, where that section disagrees with the decision (a
    parent committed incrementally by an older semid_dist recorded its own, unapplied
    prune.*), the decision's strategy and layer."""
    prune = (manifest.get("config") or {}).get("prune")
    layered = decision.strategy in ("drop_layer", "top_k", "mass")  # (the others: layer 1)
    if isinstance(prune, dict) and prune.get("strategy") == decision.strategy and (
            not layered or prune.get("layer") == decision.layer):
        return prune
    return {"strategy": decision.strategy, "layer": decision.layer}


def carry_parent(engine: Engine, ctx: JobContext, plan: CatalogPlan, store: TableStore, parent: str,
                 cfg: BuildConfig, log: Log) -> Carried:
    """Split the parent's data parts into referenced and rewritten ones (dropping the rows of
    items this version encoded) and derive the carried rows' statistics (the parent checked
    by `check_extendable` before the encode)."""
    partial = Partial.from_bytes(store.read_bytes(parent, STATS_PARTIAL))
    decision = PruneDecision.from_bytes(store.read_bytes(parent, STATS_DECISION))
    if tuple(decision.sizes) != tuple(ctx.sizes):
        raise StoreError(f"version {parent} prunes layers {list(decision.sizes)}, not "
                         f"{list(ctx.sizes)}")
    inherited = _check_parent(store, parent, cfg, decision, log)
    prune = _applied_prune(store.manifest(parent), decision)
    shard_ids = engine.map(staged_ids, [(ctx, s) for s in plan.shards])
    lengths, new_ids = [len(a) for a in shard_ids], pa.concat_arrays(shard_ids)
    del shard_ids  # (one copy of the catalog's ids on the driver)
    parts = parent_parts(store.manifest(parent)["files"], parent)
    results = engine.map(carry_part, [(ctx, e, i, new_ids) for i, e in enumerate(parts)])
    dropped = [r for r in results if len(r["qerr"])]
    codes = (np.concatenate([r["codes"] for r in dropped]) if dropped
             else np.zeros((0, len(ctx.sizes)), np.int32))
    qerr = np.concatenate([r["qerr"] for r in dropped]) if dropped else np.zeros(0, np.float32)
    replaced = replaced_by_shard(
        lengths, new_ids, pa.concat_arrays([r["ids"] for r in dropped]) if dropped else new_ids[:0],
        final_keys(codes, kept_layers(codes, decision), ctx.sizes),
        np.concatenate([r["suffix"] for r in dropped]) if dropped else np.zeros(0, np.int32))
    kept = subtract_rows(partial, codes, qerr, ctx.sizes, ctx.quality_depth)
    entries = [r["entry"] for r in results if r["entry"] is not None]  # None: all replaced
    referenced = sum(1 for e in entries if e.version is not None)
    out = Carried(parent=parent, entries=entries, partial=kept, decision=decision,
                  rows=sum(e.rows for e in entries), replaced=len(qerr), referenced=referenced,
                  suffixes=sum_suffix_counts([r["suffixes"] for r in results]),
                  replaced_by_shard=replaced, prune=prune,
                  inherited_estimates=inherited)
    log(f"incremental: {out.rows} rows of version {parent} carried ({referenced} of "
        f"{len(parts)} parts referenced, {len(entries) - referenced} rewritten), "
        f"{out.replaced} replaced by re-encoded items")
    return out


def incremental_rows(counts: dict[str, int], carried: Carried) -> dict[str, int]:
    """manifest / metrics `rows` of an incremental version."""
    return {**counts, "carried": carried.rows, "replaced": carried.replaced}

