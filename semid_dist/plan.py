"""Before a build's first write: the table's lineage (`lineage`), the catalog's plan
(`plan_input`: an empty delta skipped under `encode.empty_delta: skip`), the storage's
failures as one line (`storage_failures`), and `semid build --dry-run` (`dry_run`): the
build's checks, and what it would do, with nothing written."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from semid_dist.config import BuildConfig
from semid_dist.engines import make_engine
from semid_dist.errors import (
    EmptyCatalog,
    InterruptedAfterCommit,
    InterruptedBuild,
    NothingToEncode,
    SemidError,
    StoreError,
)
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import CatalogPlan, numbers_out_of_order, plan_catalog
from semid_dist.io.fs import redact_url
from semid_dist.io.store import TableStore
from semid_dist.io.validate import stored_id_type
from semid_dist.preflight import check_empty_delta, check_inputs, parent_notes
from semid_dist.resume import (
    check_writable,
    killed_runs,
    other_run_line,
    overtaken_line,
    planned_parent,
    read_run,
    run_key,
    run_settings,
)
from semid_dist.runtime import TABLE_PREFIX, check_table_outside_catalog, with_absolute_paths
from semid_dist.signals import interrupt_raised

Log = Callable[[str], None]


def redacting(log: Log) -> Log:
    """`log` with credentials in URLs (`s3://KEY:SECRET@...`, `?X-Amz-Signature=`) masked."""
    return lambda msg: log(redact_url(msg))


def plan_input(catalog: str, cfg: BuildConfig, store: TableStore,
               parent: str | None, log: Log | None = None) -> CatalogPlan:
    """The catalog's plan (`plan_catalog`; log: its progress lines). A catalog with no row is
    an error (InputError), but for an incremental delta under `encode.empty_delta: skip`:
    NothingToEncode, before anything is written, once its files pass the checks a delta's do
    (`preflight.check_empty_delta`)."""
    try:
        return plan_catalog(catalog, target_rows=cfg.encode.shard_rows, log=log)
    except EmptyCatalog as exc:
        if not cfg.encode.incremental:
            raise
        empty = f"the delta at {exc.url!r} has no rows ({exc.files} Parquet file(s), all empty"
        if cfg.encode.empty_delta != "skip":
            raise EmptyCatalog(f"{empty}); export it again, or set encode.empty_delta=skip "
                               "where a day without changes is expected (nothing is written "
                               "then)", url=exc.url, files=exc.files,
                               schemas=exc.schemas) from None
        check_empty_delta(CatalogPlan(catalog, (), exc.schemas[0][1], "", exc.schemas), cfg,
                          store, parent)
        raise NothingToEncode(
            f"nothing to encode: {empty}; encode.empty_delta=skip); nothing was written, the "
            f"table {redact_url(store.url)} is as it was (latest {store.head() or 'none'})"
        ) from None


def order_warning(plan: CatalogPlan, log: Log) -> None:
    """A warning where the catalog's path order puts `part-10` before `part-2`: the rows come
    in that order, which the fit sample by position, keep_first's first copy and the table's
    rows follow, and a user numbering files as numbers meant the other."""
    files = dict.fromkeys(piece.path for shard in plan.shards for piece in shard.pieces)
    if (pair := numbers_out_of_order(files)) is not None:
        first, then = (fsio.shown_path(plan.url, path) for path in pair)
        log(f"warning: the catalog's files are read in path order, which puts {first} before "
            f"{then} (numbers without leading zeros); the rows follow that order (the fit "
            "sample of fit.sample_by=position, input.on_duplicate=keep_first's first copies, "
            "the table's rows): write the numbers with leading zeros to read the files in "
            "number order, or set fit.sample_by=id for a sample that no order changes")


def dry_run(cfg: BuildConfig, *, log: Log) -> dict[str, Any]:
    """What `build(cfg)` would do, after the checks it makes before writing anything (the
    config, the table's versions and `encode.from_version`, every catalog file's schema, the
    embedding dimension, the GPU settings, the codebooks to reuse or warm-start from, an
    incremental parent's parts, statistics and id type) and those its engine makes before
    it starts (`engines.check_engine`), a local output.root's folder writable
    (`resume.check_writable`), with nothing written and no engine started (but Spark's, to
    resolve a `table:` input). Its errors are the build's. -> {"catalog", "files" (files
    holding rows), "rows", "shards", "skipped", "dim", "item_id_type", "table", "latest",
    "codebooks" ("fit" or the version they come from), "warm_start" (the version a fit
    starts from, or None), "incremental", "version" ("new" or the unfinished run's version it
    resumes), "resuming", "parent", "engine"}. Its log gets the lines the build would say
    before it writes: a warm start's, an unfinished run it will not continue."""
    log = redacting(log)
    cfg = with_absolute_paths(cfg)
    store = TableStore(cfg.output.root, cfg.output.table)
    cfg, parent, latest = lineage(cfg, store)
    catalog = cfg.input.path
    if catalog.startswith(TABLE_PREFIX) and cfg.engine == "spark":  # its files, by Spark
        with make_engine(cfg, log=log) as engine:
            catalog = engine.resolve_input(catalog)
    else:
        from semid_dist.engines import check_engine
        from semid_dist.engines.local import LocalEngine

        catalog = LocalEngine(cfg).resolve_input(catalog)  # (no `table:` input: no Spark)
        check_engine(cfg)
    check_table_outside_catalog(catalog, store)
    with storage_failures(store, []):
        plan = plan_input(catalog, cfg, store, parent, log)
        order_warning(plan, log)
        key = run_key(cfg, plan)
        resumes, overtaken, other = killed_runs(store, key)
        if overtaken is not None:
            log(overtaken_line(overtaken))
        elif other is not None:
            log(other_run_line(store, other, run_settings(cfg, plan)))
        parent = planned_parent(store, key, parent)
        dim, _ = check_inputs(plan, cfg, store, parent, log)
        if resumes is not None:  # the latest its first run saw, as the build reads it
            latest = (read_run(store, resumes) or {}).get("latest", latest)
        parent_notes(store, cfg, parent, dim, log, latest=latest)
        check_writable(store)
    ids = plan.schema.field(cfg.input.id_column).type if plan.schemas else None
    warm = parent if cfg.fit.warm_start == "parent" and not cfg.encode.from_version else None
    files = {p.path for s in plan.shards for p in s.pieces}
    return {"catalog": redact_url(plan.url), "files": len(files),
            "rows": plan.num_rows, "shards": len(plan.shards), "skipped": list(plan.skipped),
            "dim": dim, "item_id_type": str(stored_id_type(ids)) if ids is not None else None,
            "table": redact_url(store.url), "latest": store.head(),
            "codebooks": cfg.encode.from_version or "fit", "warm_start": warm,
            "incremental": cfg.encode.incremental, "version": resumes or "new",
            "resuming": resumes is not None, "parent": parent, "engine": cfg.engine}


def lineage(cfg: BuildConfig, store: TableStore) -> tuple[BuildConfig, str | None,
                                                          str | None]:
    """(cfg with encode.from_version resolved to a version name, the parent, the "latest"
    an incremental version expects). "latest" is read once: an incremental version moves
    `_latest` only while it still means this (`TableStore.advance_latest`); the
    codebooks' source, the parent and the run key agree on the one resolve."""
    latest = store.head()
    if cfg.encode.from_version:
        cfg = replace(cfg, encode=replace(cfg.encode, from_version=store.resolve(
            cfg.encode.from_version, head=latest)))
    if cfg.encode.incremental:
        return cfg, cfg.encode.from_version, latest
    return cfg, latest, None


@contextlib.contextmanager
def storage_failures(store: TableStore, started: list[str],
                     committed: list[str] | None = None) -> Iterator[None]:
    """A full disk, a read-only mount, a permission denied or storage that does not answer
    under the build (before its commit: one after its manifest is the commit's own error)
    as one line: nothing was committed, what to do, and that the same command resumes the
    version it had started (`started`). The table is named where the system named no file.
    A Ctrl-C once that version was started (or an error after it, where the Ctrl-C itself
    was dropped: `signals.interrupt_raised`) is InterruptedBuild, whose line names the
    version, or InterruptedAfterCommit once its commit had returned (`committed` holds it:
    known without asking the storage, which may be what does not answer)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not started or isinstance(exc, InterruptedAfterCommit | InterruptedBuild):
            raise
        raise _interrupted(started[0], committed) from exc
    except Exception as exc:
        if started and interrupt_raised():  # what the stopping broke
            raise _interrupted(started[0], committed) from exc
        if isinstance(exc, SemidError):  # (a named error says what failed, and what to do)
            raise
        remote = fsio.remote_failure(exc)  # (a Ray task's: its own error, not the wrapper's)
        cause = fsio.storage_cause(exc) if remote else exc
        fix, doing = fsio.storage_advice(cause, table=True), "writing the table"
        if fix is None and fsio.no_answer(exc):
            fix = fsio.no_answer_advice(store.url) + (
                " (as Ray's workers see it)" if remote else "")
            doing = "reading the catalog or writing the table"
        elif fix is None and fsio.named(cause, fsio.NO_CREDENTIALS):
            fix = fsio.credentials_advice(remote)
            doing = "reading the catalog or writing the table"
        elif fix is None:
            raise
        where = ("" if getattr(cause, "filename", None)
                 else f" ({doing} {redact_url(store.url)}?)")
        what, task = fsio.failure_text(cause), " (raised in a Ray task)" if remote else ""
        if fsio.named(cause, fsio.NO_CREDENTIALS):  # (as `semid`'s line for one outside a build)
            what, task = f"no credentials for the object store ({what}){task}", ""
        again = f" (it resumes version {started[0]})" if started else ""
        raise StoreError(f"{what}{task}{where}; nothing was committed (the table's versions are as "
                         f"they were): {fix}, then run the same command again{again}") from None


def _interrupted(vid: str, committed: list[str] | None) -> KeyboardInterrupt:
    """A Ctrl-C under the build of version `vid`: InterruptedAfterCommit once its commit
    returned (stopped as it left the build), else InterruptedBuild."""
    return InterruptedAfterCommit(vid) if committed else InterruptedBuild(vid)
