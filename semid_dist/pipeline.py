"""`semid build`: plan -> check ids -> sample -> fit -> encode -> reduce -> finalize -> commit
(what comes before the first write, and the dry run: `semid_dist.plan`).

Engine-agnostic: the engine only runs the stage functions of `semid_dist.stages`. Until the
manifest is written the new version is invisible, so any failure leaves `_latest` and every
committed version untouched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

import semid_dist
from semid_dist.bucketed import Duplicates, bucketed_duplicates
from semid_dist.codebooks import build_codebooks
from semid_dist.codes.collisions import sum_suffix_counts
from semid_dist.codes.partials import Partial, merge
from semid_dist.codes.pruning import PruneDecision
from semid_dist.config import BuildConfig
from semid_dist.diff import DRIFT_FILE, parent_drift
from semid_dist.encode_stage import check_rejects, encode_shards
from semid_dist.engines import Engine, make_engine
from semid_dist.errors import (
    InputError,
    InterruptedAfterCommit,
    StoreError,
)
from semid_dist.faults import maybe_die
from semid_dist.incremental import carry_parent, incremental_rows, write_stats
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import CatalogPlan, check_input_exists
from semid_dist.io.duplicates import find_duplicates, first_copy_rejects
from semid_dist.io.fs import redact, redact_url
from semid_dist.io.store import MANIFEST, FileEntry, TableStore
from semid_dist.memory import huge_pages, release_freed_memory
from semid_dist.plan import lineage, order_warning, plan_input, redacting, storage_failures
from semid_dist.popularity import driver_threshold, task_threshold
from semid_dist.preflight import (
    check_inputs,
    parent_notes,
    popularity_column,
)
from semid_dist.reduce import finalize_version, reduce_partials, write_lookups
from semid_dist.report import write_report
from semid_dist.resume import (
    Claim,
    claim_version,
    heartbeat,
    planned_parent,
    run_key,
    run_settings,
)
from semid_dist.runtime import (
    TABLE_PREFIX,
    check_table_outside_catalog,
    torch_device,
    with_absolute_paths,
)
from semid_dist.sid_items import sid_items_lookup
from semid_dist.signals import check_interrupted
from semid_dist.stages import JobContext, scan_keys
from semid_dist.summary import counted

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    version_id: str
    path: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    drift: dict[str, Any] | None = None  # against the parent version (None without one)


def make_logger(prefix: str = "semid") -> Log:
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{prefix} {time.monotonic() - start:7.1f}s] {redact_url(msg)}", file=sys.stderr,
              flush=True)

    return log


def _scan(engine: Engine, ctx: JobContext, plan: CatalogPlan, cfg: BuildConfig,
          log: Log) -> JobContext:
    """Pre-pass over ids (+ popularity): duplicates and the head/tail popularity threshold.
    Up to `driver.gather_rows` rows the ids and popularity are checked on the driver; more,
    by engine tasks: the ids in hash buckets of about that many (`semid_dist.bucketed`), the
    popularity in value ranges (`semid_dist.popularity`)."""
    gathered = plan.num_rows <= cfg.driver.gather_rows
    looked_for = " and popularity" if ctx.popularity_column else ""
    log(f"scan: the ids{looked_for} of {counted(plan.num_rows, 'row')} "
        f"({'on the driver' if gathered else 'in hash buckets'})")
    if gathered:
        scanned = engine.map(scan_keys, [(ctx, s) for s in plan.shards])
        id_arrays = [ids for ids, _ in scanned]
        dups, held = find_duplicates(id_arrays)
        dup = Duplicates(dups, held, lambda: first_copy_rejects(id_arrays, plan.shards, dups))
        popularity = [p for _, p in scanned]
        del scanned
    else:
        dup, groups = bucketed_duplicates(engine, ctx, plan, cfg.driver.gather_rows, log)
    ctx = _check_duplicates(ctx, dup, cfg, log)
    column, share, threshold = cfg.input.popularity_column, cfg.metrics.head_share, None
    if column and cfg.encode.incremental:
        log("scan: no head / tail figures for an incremental version (the popularity of the "
            "carried items is not in this catalog)")
    elif column and gathered:
        threshold = driver_threshold(popularity, plan, column, share)
    elif column:
        threshold = task_threshold(engine, ctx, plan, groups.groups, groups.popularity, column,
                                   share, log)
    if threshold is not None and math.isinf(threshold):
        log("scan: no head: every item's popularity is 0 or null (every item is in the tail)")
    elif threshold is not None:
        log(f"scan: head = popularity >= {threshold:g} (the most popular items holding at "
            f"least {share:.0%} of popularity, every item at {threshold:g} included)")
    return replace(ctx, head_threshold=threshold,
                   reject_zero_vectors=cfg.input.on_zero_vector == "reject")


def _check_duplicates(ctx: JobContext, dup: Duplicates, cfg: BuildConfig,
                      log: Log) -> JobContext:
    """Apply input.on_duplicate: reject every copy (ctx.duplicate_ids), keep the first copy
    in (file, row) order and reject the later ones (ctx.duplicate_rows), or fail. Under
    input.on_bad_rows=fail any duplicate fails, since it would be a rejected row."""
    dups, rows = dup.ids, dup.rows
    if not len(dups):
        return ctx
    policy = cfg.input.on_duplicate
    examples = ", ".join(repr(v) for v in dups[:5].to_pylist())
    found = (f"{counted(len(dups), 'item id occurs', 'item ids occur')} more than once "
             f"({rows} rows; e.g. {examples})")
    if policy == "fail":
        raise InputError(f"{found}; deduplicate the catalog, or set input.on_duplicate="
                         "keep_first (keep the first copy) or reject (reject every copy)")
    if cfg.input.on_bad_rows == "fail":
        raise InputError(f"{found} and input.on_bad_rows=fail; deduplicate the catalog or "
                         "set input.on_bad_rows=reject (duplicates then follow "
                         f"input.on_duplicate={policy})")
    if policy == "keep_first":
        later = dup.later()
        log(f"check: {counted(len(dups), 'duplicated item id')} ({rows} rows): the first copy "
            f"of each is kept, {counted(rows - len(dups), 'later copy', 'later copies')} will "
            f"be rejected, e.g. {examples}")
        return replace(ctx, duplicate_rows=later)
    log(f"check: {counted(len(dups), 'duplicated item id')} ({rows} rows) will be rejected, "
        f"e.g. {examples}")
    return replace(ctx, duplicate_ids=dups)


@dataclass(frozen=True)
class _Reduced:
    partials: dict[str, Partial]  # merged statistics after capacity moves
    decision: PruneDecision
    metrics: dict[str, Any]
    data_files: list[FileEntry]  # data parts (carried and new) and the SID -> items lookup
    counts: dict[str, int]  # rows, with carried / replaced for an incremental version
    suffixes: np.ndarray  # how many rows hold each non-zero suffix (carried and new)
    prune: dict[str, Any] | None  # an incremental version's prune section (its parent's)


def _reduce(engine: Engine, ctx: JobContext, plan: CatalogPlan, partials: dict[str, Partial],
            counts: dict[str, int], cfg: BuildConfig, store: TableStore, parent: str | None,
            log: Log) -> _Reduced:
    """Reduce -> data parts -> SID lookup; an incremental version first carries its
    parent's rows and statistics (`semid_dist.incremental`)."""
    carried = None
    if cfg.encode.incremental:
        carried = carry_parent(engine, ctx, plan, store, parent, cfg, log)
        partials = {"all": merge(carried.partial, partials["all"])}
        counts = incremental_rows(counts, carried)
    # the parent rows of re-encoded items: one that stays in its SID keeps place and suffix
    replaced = carried.replaced_by_shard if carried is not None and carried.replaced else None
    merged, decision, moves, metrics = reduce_partials(
        engine, ctx, plan, partials, cfg, log, decision=carried.decision if carried else None,
        held=carried.partial if carried else None, replaced=replaced)
    maybe_die("reduce")
    data_files, suffixes = finalize_version(
        engine, ctx, plan, merged["all"], decision, moves,
        carried=carried.entries if carried else None, held=carried.partial if carried else None,
        replaced=replaced, bucket_rows=cfg.driver.gather_rows, log=log)
    if carried is not None:
        data_files = list(carried.entries) + data_files
        suffixes = sum_suffix_counts([suffixes, carried.suffixes])
        metrics["incremental"] = carried.figures()
    data_files += sid_items_lookup(engine, ctx, data_files)
    return _Reduced(merged, decision, metrics, data_files, counts, suffixes,
                    carried.prune if carried is not None else None)


def build(cfg: BuildConfig, *, log: Log | None = None) -> BuildResult:
    """Run the whole job and commit a new version; returns its id, path and metrics."""
    with huge_pages(cfg.encode.huge_pages):  # this process as it was, afterwards
        return _build(cfg, log=log)


def _build(cfg: BuildConfig, *, log: Log | None = None) -> BuildResult:
    log = redacting(log or make_logger())
    t0 = time.monotonic()
    cfg = with_absolute_paths(cfg)
    store = TableStore(cfg.output.root, cfg.output.table)
    cfg, parent, latest = lineage(cfg, store)
    timings: dict[str, float] = {}
    started: list[str] = []  # the version this run writes, once chosen
    committed: list[str] = []  # and once its commit returned
    early = None  # a delta that may be empty and skipped: planned before an engine starts
    if not cfg.input.path.startswith(TABLE_PREFIX):  # (a table's location: once resolved)
        check_table_outside_catalog(cfg.input.path, store)  # before an engine starts
        with storage_failures(store, started):
            check_input_exists(cfg.input.path)
            if cfg.encode.incremental and cfg.encode.empty_delta == "skip":
                early = plan_input(cfg.input.path, cfg, store, parent, log)
    with storage_failures(store, started, committed), contextlib.ExitStack() as claimed:
        with make_engine(cfg, log=log) as engine:
            if not engine.warm_up_beside_fit or cfg.encode.from_version:  # (no fit to be beside)
                engine.warm_up()
            catalog = engine.resolve_input(cfg.input.path)
            if catalog != cfg.input.path:
                check_table_outside_catalog(catalog, store)
            plan = early or plan_input(catalog, cfg, store, parent, log)
            key = run_key(cfg, plan)  # (a resumed version's parent is its first run's)
            dim, reused = check_inputs(plan, cfg, store, planned_parent(store, key, parent))
            vid, _, parent, reads, latest = _start_version(store, cfg, plan, key, parent,
                                                           latest, log)
            started.append(vid)
            parent_notes(store, cfg, parent, dim, log, latest=latest)
            # renewed until the commit: a build started meanwhile does not take this version,
            # and gc keeps it and the versions it reads
            claimed.enter_context(heartbeat(store, vid, key, reads, parent=parent,
                                            latest=latest))
            ctx = _scan(engine, _job_context(cfg, plan, vid, dim), plan, cfg, log)
            if cfg.collisions.max_per_sid is not None:
                ctx = replace(ctx, candidates=cfg.collisions.candidates)
            with _timed(timings, "fit_s"):
                files, fit_stats, source = build_codebooks(engine, ctx, plan, cfg, store, vid,
                                                           log, parent, reused)
            check_interrupted()  # (one a finaliser dropped: the fit's are collected here)
            if engine.warm_up_beside_fit:  # a resumed run's codebooks (it runs once per engine)
                engine.warm_up()
            with _timed(timings, "encode_s"):
                try:
                    partials, counts, reject_files, reasons = encode_shards(engine, ctx, plan,
                                                                            log, timings)
                finally:
                    release_freed_memory()  # kept by an encode worker in this process
                check_interrupted()
                check_rejects(counts, reasons, cfg)
            with _timed(timings, "reduce_s"):
                red = _reduce(engine, ctx, plan, partials, counts, cfg, store, parent, log)
            with _timed(timings, "drift_s"):
                drift, skipped = parent_drift(engine, store, parent, vid, red.data_files, log)
        metrics = _metrics(red, fit_stats, source, timings, drift_skipped=skipped and {
            "parent": parent, "reason": skipped})
        files += _version_files(store, vid, red, metrics, drift) + reject_files
        moved = _commit(store, vid, _manifest(cfg, plan, ctx, parent, red), files,
                        expect=latest)
        committed.append(vid)  # (a Ctrl-C from here on: InterruptedAfterCommit)
    return _committed(store, vid, moved, metrics, drift, log, t0, expected=latest)


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """timings[key] = the seconds the block took (not set when it raises)."""
    t = time.monotonic()
    yield
    timings[key] = time.monotonic() - t


def _committed(store: TableStore, vid: str, moved: bool, metrics: dict[str, Any],
               drift: dict[str, Any] | None, log: Log, t0: float, *,
               expected: str | None = None) -> BuildResult:
    """After version `vid`'s commit (`moved`: whether `_latest` moved to it): its work files
    removed, the commit said, its result. The version stands whatever stops the process
    from here on (a Ctrl-C is `InterruptedAfterCommit`). `expected`: for an incremental
    version, what "latest" meant as its build started (where "latest" means another version
    now, that one was committed while it was built)."""
    try:
        try:
            store.remove_staging(vid)
        except Exception as exc:  # committed all the same: gc removes them
            if not fsio.storage_failure(exc):
                raise
            log(f"commit: the work files (_staging) of version {vid} stay "
                f"({fsio.failure_text(exc)}); `semid versions gc` removes them")
        now = None if moved else store.head()
        sibling = not moved and expected is not None and now != expected
        log(f"commit: version {vid} committed in {time.monotonic() - t0:.1f}s"
            + ("" if moved or sibling else f"; _latest stays at the newer {now}"))
        if sibling:
            parent = store.manifest(vid).get("parent")
            log(f"warning: _latest stays at {now}, committed while this incremental version "
                f"was built: {vid} extends {parent} and holds none of {now}'s changes, so "
                f"serving it would drop them; re-run this encode with encode.from_version={now} "
                f"(or latest) to serve both, or write {vid} into _latest to serve it as it is")
        return BuildResult(vid, store.display_url(vid), metrics, store.manifest(vid), drift)
    except KeyboardInterrupt as exc:
        raise InterruptedAfterCommit(vid) from exc
    except Exception as exc:  # reading the committed version back
        if not fsio.storage_failure(exc):
            raise
        raise StoreError(f"version {vid} was committed, but the storage failed after it "
                         f"({fsio.failure_text(exc)}); the version "
                         f"stands (`semid versions show --version {vid}` reads it)") from None


def _version_files(store: TableStore, vid: str, red: _Reduced, metrics: dict[str, Any],
                   drift: dict[str, Any] | None) -> list[FileEntry]:
    """Write the version's files besides its codebooks and rejects (drift, metrics, lookups,
    statistics, report) and return their entries with the data parts'."""
    files = [store.write_file(vid, DRIFT_FILE, _json(drift))] if drift is not None else []
    files += [store.write_file(vid, "metrics.json", _json(metrics))]
    files += write_lookups(store, vid, red.partials, red.decision, red.suffixes)
    files += write_stats(store, vid, red.partials["all"], red.decision)
    files += write_report(store, vid)
    return files + sorted(red.data_files, key=lambda e: e.path)


def _commit(store: TableStore, vid: str, manifest: dict[str, Any],
            files: list[FileEntry], *, expect: str | None) -> bool:
    """`store.commit`; Ctrl-C once the manifest is written says the version stands."""
    check_interrupted()
    maybe_die("commit")
    try:
        return store.commit(vid, manifest, files, expect_latest=expect)
    except KeyboardInterrupt as exc:
        if store.fs.exists(f"{store.version_dir(vid)}/{MANIFEST}"):
            raise InterruptedAfterCommit(vid) from exc
        raise


def _start_version(store: TableStore, cfg: BuildConfig, plan: CatalogPlan, key: str,
                   parent: str | None, latest: str | None, log: Log) -> Claim:
    """The version this run writes: the one a killed run of the same `run_key` left (with
    the parent that run started from), or a new one (`resume.claim_version`)."""
    from_version = (cfg.encode.from_version,) if cfg.encode.from_version else ()
    claim = claim_version(store, key, log, parent=parent, reads=from_version, latest=latest,
                          settings=run_settings(cfg, plan))
    log(f"plan: {counted(plan.num_rows, 'row')} in {counted(len(plan.shards), 'shard')}; "
        f"{'resuming' if claim.resuming else 'new'} version {claim.version} of "
        f"{store.url} (parent {claim.parent or 'none'}); engine {cfg.engine}")
    if plan.skipped:
        names = ", ".join(plan.skipped[:3])
        log(f"warning: {len(plan.skipped)} file(s) below input.path are not named *.parquet "
            f"and are not read ({names}{', ...' if len(plan.skipped) > 3 else ''}); rename "
            "the catalog's files to *.parquet, or move the others out")
    order_warning(plan, log)
    return claim


def _job_context(cfg: BuildConfig, plan: CatalogPlan, vid: str, dim: int) -> JobContext:
    """What the workers of version `vid` need, before the scan adds its findings."""
    return JobContext(catalog_url=plan.url, id_column=cfg.input.id_column,
                      embedding_column=cfg.input.embedding_column,
                      popularity_column=popularity_column(cfg),
                      dim=dim, sizes=tuple(cfg.quantizer.layers),
                      root=cfg.output.root, table=cfg.output.table, version_id=vid,
                      quality_depth=cfg.quality_depth, chunk_rows=cfg.encode.chunk_rows,
                      device=torch_device(cfg, "encode"),
                      precision=cfg.encode.precision,
                      rerank=cfg.encode.rerank, reuse_memory=cfg.encode.reuse_memory,
                      huge_pages=cfg.encode.huge_pages)


def _metrics(red: _Reduced, fit_stats: list[dict[str, Any]], source: str,
             timings: dict[str, float], *, drift_skipped: dict[str, str] | None,
             ) -> dict[str, Any]:
    """The version's metrics.json: rows, the reduce's figures, the fit per layer, timings;
    why the drift against the parent was not measured, where it was not (said where drift is
    looked for: the summary, `versions show`)."""
    return {"rows": red.counts, **red.metrics,
            **({"drift_skipped": drift_skipped} if drift_skipped else {}),
            "fit": {"codebooks_from": source,
                    "layers": [{"layer": s["layer"], "k": s["k"], "mse": s["final_mse"],
                                "n": s["n"]} for s in fit_stats]},
            "timings": {k: round(v, 3) for k, v in timings.items()}}


def _manifest(cfg: BuildConfig, plan: CatalogPlan, ctx: JobContext, parent: str | None,
              red: _Reduced) -> dict[str, Any]:
    """The version's manifest body (the store adds its files): lineage, config, input. An
    incremental version records the `prune` section its SIDs are pruned by (its parent's)
    in place of its own, which it does not apply."""
    config = redact(cfg.to_dict())
    if red.prune is not None:
        config["prune"] = red.prune
    return {
        "parent": parent, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "package_version": semid_dist.__version__, "engine": cfg.engine,
        "config": config,
        "input": {"url": redact_url(plan.url), "fingerprint": plan.fingerprint,
                  "rows": plan.num_rows, "dim": ctx.dim},
        "rows": red.counts,
    }


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, default=float).encode()
