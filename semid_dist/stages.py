"""Shard-level stage functions: the one batch function per step that every engine wraps.

Engines only decide *where* these run (in-process, Ray tasks / Ray Data actors, Spark).
Every function takes plain, picklable data (a `JobContext` and a `Shard`) and returns
plain data, so any engine gives identical outputs for the same shards. Those of the reduce
and the commit are in `reduce_tasks`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from semid_dist.codes.drift import seeded_hashes
from semid_dist.codes.partials import head_tail_partials, partial_from_batch
from semid_dist.errors import InputError
from semid_dist.faults import die_once
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import Piece, Shard, read_pieces, read_shard
from semid_dist.io.store import STAGING, TableStore
from semid_dist.io.validate import (
    ValidBatch,
    concat_batches,
    normalize_ids,
    popularity_values,
    reject_reasons,
    validate_batch,
)
from semid_dist.memory import keep_freed_memory, set_huge_pages
from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE
from semid_dist.quantize.encode import EncodeResult
from semid_dist.quantize.model import KMeansQuantizer, Quantizer
from semid_dist.quantize.model import load_quantizer as quantizer_from_files
from semid_dist.runtime import check_worker_gpu
from semid_dist.shard_results import result_counts, save_shard_result
from semid_dist.shuffle import Split, read_bucket, split_files


@dataclass(frozen=True)
class JobContext:
    """Everything a worker needs, as plain values."""

    catalog_url: str
    id_column: str
    embedding_column: str
    popularity_column: str | None
    dim: int
    sizes: tuple[int, ...]
    root: str
    table: str
    version_id: str
    quality_depth: int
    chunk_rows: int = 8192
    precision: str = "fp32"  # encode.precision
    rerank: int = 8  # encode.rerank
    reuse_memory: bool = False  # encode.reuse_memory: workers call memory.keep_freed_memory
    huge_pages: bool | None = None  # encode.huge_pages, for memory.set_huge_pages (None: as is)
    device: str = "cpu"
    codebooks_version: str | None = None  # read codebooks from this version (default: own)
    duplicate_ids: pa.Array | None = field(default=None, compare=False)
    head_threshold: float | None = None  # popularity >= this is "head" (None: no split)
    candidates: int = 1  # last-layer candidate codes staged per item (capacity-bounded SIDs)
    reject_zero_vectors: bool = False  # input.on_zero_vector=reject
    # input.on_duplicate=keep_first: shard index -> the later copies to reject there,
    # table(offset: int64 sorted rows inside the shard, reason: string); see
    # io.duplicates.first_copy_rejects
    duplicate_rows: dict[int, pa.Table] | None = field(default=None, compare=False)

    def store(self) -> TableStore:
        return TableStore(self.root, self.table)


def warm_worker() -> None:
    """Pay a fresh worker process's first-use costs before it takes a shard (the engines'
    warm-up tasks call this): importing this module loads torch and pyarrow.parquet, and
    validating a two-row batch loads what pyarrow's conversions import on first use (its
    pandas shim, where pandas is installed: 0.13 s of the first shard on 2 cores)."""
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 2)
    validate_batch(pa.table({"item_id": pa.array([1, 2], pa.int64()), "embedding": emb}),
                   id_column="item_id", embedding_column="embedding", dim=2,
                   source_file="warm-up", row_offset=0)


def _validated(ctx: JobContext, shard: Shard) -> ValidBatch:
    return _validate(ctx, shard, _read(ctx, shard))


def _read(ctx: JobContext, shard: Shard, wanted: list[bool] | None = None,
          ) -> list[pa.Table | None]:
    """The shard's tables, a piece (file) at a time; only the pieces `wanted` says (None for
    the others) where given."""
    cols = [ctx.id_column, ctx.embedding_column]
    if ctx.popularity_column:
        cols.append(ctx.popularity_column)
    return read_pieces(ctx.catalog_url, shard, cols,
                       [True] * len(shard.pieces) if wanted is None else wanted)


class Run(NamedTuple):
    """Consecutive pieces of a shard validated as one table (`_runs`): the batch, with its
    rows and rejects named by each row's own file and row, and where those rows are inside
    the shard (`valid_at`: the batch's rows; `rejects_at`: its rejects')."""

    batch: ValidBatch
    valid_at: np.ndarray
    rejects_at: np.ndarray


def _runs(ctx: JobContext, shard: Shard, raw: list[pa.Table | None]) -> Iterator[Run]:
    """The shard's rows validated, in row order, but those of the pieces not read (None):
    consecutive pieces (files) of one schema as one table, so a shard of 4,096 one-row files
    is one call, not 4,096 of 0.3 ms each. An input error of a run of several pieces is
    raised again by its piece (`_piece_error`), naming the file and its row."""
    later = (ctx.duplicate_rows or {}).get(shard.index)
    starts = shard.starts()
    for i, j in _same_schema(raw):
        yield _run(ctx, shard.pieces[i:j], raw[i:j], int(starts[i]), later)


def _same_schema(tables: list[pa.Table | None]) -> Iterator[tuple[int, int]]:
    """(first, end) of each run of consecutive tables of one schema, their metadata aside;
    None ends a run and is in none."""
    i = 0
    while i < len(tables):
        if (first := tables[i]) is None:
            i += 1
            continue
        j = i + 1
        while j < len(tables) and (t := tables[j]) is not None and t.schema.equals(
                first.schema, check_metadata=False):
            j += 1
        yield i, j
        i = j


def _run(ctx: JobContext, pieces: tuple[Piece, ...], tables: list[pa.Table], start: int,
         later: pa.Table | None) -> Run:
    """`_runs`' run of pieces from the shard's row `start`."""
    names = [fsio.shown_path(ctx.catalog_url, piece.path) for piece in pieces]
    one = len(pieces) == 1
    rows = sum(piece.num_rows for piece in pieces)
    table = tables[0] if one else pa.concat_tables(tables)
    try:
        batch = validate_batch(
            table, id_column=ctx.id_column, embedding_column=ctx.embedding_column, dim=ctx.dim,
            source_file=names[0], row_offset=pieces[0].row_offset if one else 0,
            popularity_column=ctx.popularity_column, duplicate_ids=ctx.duplicate_ids,
            duplicate_rows=_rows_within(later, start, rows),
            reject_zero=ctx.reject_zero_vectors)
    except InputError:
        if not one:
            _piece_error(ctx, pieces, tables)
        raise
    if one:
        shift = start - pieces[0].row_offset
        return Run(batch, batch.rows + shift,
                   batch.rejects.column("row").to_numpy() + shift)
    # rows inside the run -> (piece, row inside its file)
    firsts = np.cumsum([0] + [piece.num_rows for piece in pieces[:-1]])
    offsets = np.array([piece.row_offset for piece in pieces], np.int64)

    def located(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.searchsorted(firsts, at, side="right") - 1
        return k, at - firsts[k] + offsets[k]

    _, file_rows = located(batch.rows)
    rejects = batch.rejects
    at = rejects.column("row").to_numpy()
    k, rejected_rows = located(at)
    rejects = rejects.set_column(1, "source_file", pa.array(np.array(names, object)[k],
                                                            pa.string()))
    rejects = rejects.set_column(2, "row", pa.array(rejected_rows, pa.int64()))
    return Run(ValidBatch(ids=batch.ids, x=batch.x, rows=file_rows,
                          popularity=batch.popularity, rejects=rejects),
               batch.rows + start, at + start)


def _piece_error(ctx: JobContext, pieces: tuple[Piece, ...], tables: list[pa.Table]) -> None:
    """Validate a run's pieces one at a time, for the error of the first one that has it (the
    run's error named no file); returns when none has one."""
    for piece, table in zip(pieces, tables):
        validate_batch(table, id_column=ctx.id_column, embedding_column=ctx.embedding_column,
                       dim=ctx.dim, source_file=fsio.shown_path(ctx.catalog_url, piece.path),
                       row_offset=piece.row_offset, popularity_column=ctx.popularity_column)


def _rows_within(later: pa.Table | None, start: int, rows: int) -> pa.Table | None:
    """The keep_first rejects (`JobContext.duplicate_rows`' table) among a piece's rows,
    their offsets inside the piece."""
    if later is None or not later.num_rows:
        return None
    offsets = later.column("offset").to_numpy()
    lo, hi = np.searchsorted(offsets, [start, start + rows])
    return later.slice(lo, hi - lo).set_column(
        0, "offset", pa.array(offsets[lo:hi] - start, pa.int64()))


def _validate(ctx: JobContext, shard: Shard, raw: list[pa.Table | None]) -> ValidBatch:
    """The shard's valid rows and rejects, in row order (`_runs`)."""
    batches = [run.batch for run in _runs(ctx, shard, raw)]
    return batches[0] if len(batches) == 1 else concat_batches(batches, ctx.dim)


def scan_keys(ctx: JobContext, shard: Shard) -> tuple[pa.Array, np.ndarray | None]:
    """The shard's item ids in row order (int64 or string, nulls included; for the
    duplicate check) and popularity."""
    cols = [ctx.id_column] + ([ctx.popularity_column] if ctx.popularity_column else [])
    ids, pops = [], []
    tables = read_shard(ctx.catalog_url, shard, cols)

    def keys(piece: Piece, t: pa.Table, source: str) -> None:
        ids.append(normalize_ids(t.column(ctx.id_column), source, piece.row_offset))
        if ctx.popularity_column:
            pops.append(popularity_values(t.column(ctx.popularity_column),
                                          name=ctx.popularity_column, source=source))

    for i, j in _same_schema(tables):  # (a run of files as one table: see `_runs`)
        if j - i == 1:
            keys(shard.pieces[i], tables[i], fsio.shown_path(ctx.catalog_url,
                                                             shard.pieces[i].path))
            continue
        try:
            keys(shard.pieces[i], pa.concat_tables(tables[i:j]), "")
        except InputError:  # raised again by the file that has it, naming it and its row
            for piece, t in zip(shard.pieces[i:j], tables[i:j]):
                keys(piece, t, fsio.shown_path(ctx.catalog_url, piece.path))
            raise
    return (ids[0] if len(ids) == 1 else pa.concat_arrays(ids),
            np.concatenate(pops) if pops else None)


def sample_rows(ctx: JobContext, shard: Shard, local_rows: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray | None, dict[str, int]]:
    """Valid embeddings (m, d) float32 at `local_rows` (sorted indices inside the shard),
    their popularity (m,) (None without a popularity column), and the rows there rejected,
    per reason. Reads only the pieces (files) holding a drawn row."""
    cuts = np.searchsorted(local_rows, shard.starts())
    xs, pops, rejected = [], [], []
    for batch, valid_at, rejects_at in _runs(ctx, shard, _read(ctx, shard, (
            cuts[1:] > cuts[:-1]).tolist())):
        wanted = np.isin(valid_at, local_rows)
        xs.append(batch.x[wanted])
        if batch.popularity is not None:
            pops.append(batch.popularity[wanted])
        rejects = batch.rejects
        if rejects.num_rows:
            rejects = rejects.filter(pa.array(np.isin(rejects_at, local_rows)))
        rejected.append(rejects)
    return (xs[0] if len(xs) == 1 else np.concatenate(xs),
            np.concatenate(pops) if pops else None, reject_reasons(pa.concat_tables(rejected)))


def sample_rows_by_id(ctx: JobContext, shard: Shard, below: int, seed: int,
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[str, int]]:
    """The shard's valid rows whose seeded id hash (`seeded_hashes`) is at most `below`:
    embeddings (m, d) float32, popularity (m,) (None without a popularity column), the
    hashes (m,) uint64; and the shard's rejected rows per reason (all of them: a rejected
    row's id may be missing, so it is never drawn)."""
    batch = _validated(ctx, shard)
    h = seeded_hashes(batch.ids, seed)
    drawn = h <= np.uint64(below)
    return (batch.x[drawn], None if batch.popularity is None else batch.popularity[drawn],
            h[drawn], reject_reasons(batch.rejects))


def load_quantizer(ctx: JobContext) -> Quantizer:
    """The verified quantizer (any method) of the version holding this job's codebooks."""
    store = ctx.store()
    vid = ctx.codebooks_version or ctx.version_id
    files = {name: store.read_bytes(vid, f"codebooks/{name}") for name in (ARRAYS_FILE, META_FILE)}
    return quantizer_from_files(files, where=f"codebooks of version {vid}")


def load_codebooks(ctx: JobContext) -> list[np.ndarray]:
    """The rq_kmeans codebooks, L arrays (k_l, d) float32, of this job's version."""
    q = load_quantizer(ctx)
    if not isinstance(q, KMeansQuantizer):
        raise TypeError(f"the codebooks of this job are a {q.method} model, not rq_kmeans "
                        "codebooks; use load_quantizer")
    return q.codebooks


class EncodeWorker:
    """Loads the quantizer once, then encodes whole shards: validate -> encode -> stage codes,
    write rejects, stage the shard's mergeable statistics with its counts, return the counts
    and the seconds of each step (read, validate, quantize, write, statistics, result; as
    JSON, like the reject reasons)."""

    def __init__(self, ctx: JobContext) -> None:
        if ctx.reuse_memory:
            keep_freed_memory()
        if ctx.huge_pages is not None:  # worker_env's variable leaves numpy to it
            set_huge_pages(ctx.huge_pages)
        check_worker_gpu(ctx.device, "encode")
        self.ctx = ctx
        self.quantizer = load_quantizer(ctx)
        self.store = ctx.store()
        self._ahead: dict[int, tuple[list[pa.Table], float]] = {}  # shard index -> (rows, read s)
        self._shards = 0  # shards this worker took (for the fault point of the second)

    def read_ahead(self, shard: Shard) -> None:
        """Read the shard's rows now, in any thread, for a later call on it (an engine may
        read the next shard while this worker encodes one); the call takes them over."""
        start = time.perf_counter()
        rows = _read(self.ctx, shard)
        self._ahead[shard.index] = rows, time.perf_counter() - start

    def drop_reads(self) -> None:
        """Forget the rows read ahead that no call took over (an engine that stops early)."""
        self._ahead.clear()

    def __call__(self, shard: Shard) -> dict[str, Any]:
        ctx = self.ctx
        die_once("encode_worker")
        self._shards += 1
        if self._shards == 2:
            die_once("encode_worker_second", after_s=1.0)  # the first result sent
        clock = StepClock()
        ahead = self._ahead.pop(shard.index, None)
        if ahead is None:
            raw = _read(ctx, shard)
            clock.lap("read")
        else:  # read beforehand (`read_ahead`): its own seconds
            raw, clock.seconds["read"] = ahead
            del ahead
        batch = _validate(ctx, shard, raw)
        del raw
        clock.lap("validate")
        enc = self.quantizer.encode(batch.x, chunk_rows=ctx.chunk_rows, device=ctx.device,
                                    candidates=ctx.candidates, precision=ctx.precision,
                                    rerank=ctx.rerank)
        clock.lap("quantize")
        self.store.write_table(ctx.version_id, f"{STAGING}/codes-{shard.index:06d}.parquet",
                               _staged_codes(batch.ids, enc, len(ctx.sizes)))
        rejects = None
        if batch.rejects.num_rows:
            rejects = self.store.write_table(
                ctx.version_id, f"rejects/part-{ctx.version_id}-{shard.index:06d}.parquet",
                batch.rejects)
        clock.lap("write")
        result = {"index": shard.index, "rows": shard.num_rows, "encoded": len(batch.x),
                  "rejected": batch.rejects.num_rows, "rejects_file": rejects,
                  # {reason: rows} as JSON: one string column in Ray Data's Arrow blocks
                  "reasons": json.dumps(reject_reasons(batch.rejects), sort_keys=True)}
        if ctx.head_threshold is not None and batch.popularity is not None:
            # head and tail only, in one pass over x: the driver merges them into the whole
            # catalog's statistics
            head, tail = head_tail_partials(enc.codes, enc.sq_residual, batch.x, ctx.sizes,
                                            quality_depth=ctx.quality_depth,
                                            mask=batch.popularity >= ctx.head_threshold)
            result["partial_head"], result["partial_tail"] = head.pack(), tail.pack()
        else:
            result["partial"] = partial_from_batch(
                enc.codes, enc.sq_residual, batch.x, ctx.sizes,
                quality_depth=ctx.quality_depth).pack()
        clock.lap("statistics")
        save_shard_result(self.store, ctx.version_id, result)
        clock.lap("result")
        # the statistics stay in the staged result (read back by `load_shard_statistics`):
        # the engine carries counts only, so its blocks and the driver hold no shard's sums.
        # The step times ride along (not staged: a resumed run's shards took no time in it)
        return {**result_counts(result), "seconds": json.dumps(clock.seconds)}


def _staged_codes(ids: pa.Array, enc: EncodeResult, layers: int) -> pa.Table:
    """A shard's staged codes: item_id, codes (L per row), qerr, and with candidates
    alt_codes / alt_err."""
    staged = pa.table({
        "item_id": ids,
        "codes": pa.FixedSizeListArray.from_arrays(enc.codes.ravel(), layers),
        "qerr": enc.qerr,
    })
    if enc.alt_codes is not None:
        width = enc.alt_codes.shape[1]
        staged = staged.append_column("alt_codes", pa.FixedSizeListArray.from_arrays(
            enc.alt_codes.ravel(), width)).append_column(
            "alt_err", pa.FixedSizeListArray.from_arrays(enc.alt_err.ravel(), width))
    return staged


class StepClock:
    """Seconds spent in each step of a shard's work, in the order the steps ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        """The time since the last lap (or the start) is `step`'s."""
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._last
        self._last = now


_WORKERS: dict[str, EncodeWorker] = {}  # encode job token -> worker, in a reused process


def has_job_worker(job: str) -> bool:
    """Whether this process holds encode job `job`'s `EncodeWorker` already (`job_worker`)."""
    return job in _WORKERS


def job_worker(job: str, ctx: JobContext) -> EncodeWorker:
    """The `EncodeWorker` of encode job `job` (a token unique per encode run) in this process:
    built on first use, then reused by the job's later tasks that land on the same process
    (Ray and Spark reuse their Python workers); a new job replaces it."""
    if job not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[job] = EncodeWorker(ctx)
    return _WORKERS[job]


def _item_buckets(rows: pa.Table, buckets: int) -> np.ndarray:
    from semid_dist.codes.drift import id_buckets

    return id_buckets(rows.column("item_id"), buckets)


def drift_split(root: str, table: str, paths: list[str], buckets: int, out_url: str
                ) -> Split:
    """Split a group of data parts (paths inside the table's filesystem) by item-id bucket
    into `out_url` (columns item_id, codes, sid, sid_layers, suffix; `shuffle.split_files`)."""
    from semid_dist.codes.drift import DRIFT_COLUMNS

    return split_files(TableStore(root, table).fs, paths, DRIFT_COLUMNS, _item_buckets,
                       buckets, out_url)


def drift_bucket(root: str, table: str, old: list[Split], new: list[Split],
                 bucket: int) -> dict[str, Any]:
    """Drift counts of one item-id bucket: its rows of both versions' split data parts,
    joined on item id -> `semid_dist.codes.drift.drift_counts` (plain, summable counts)."""
    from semid_dist.codes.drift import DRIFT_COLUMNS, drift_counts

    fs = TableStore(root, table).fs
    return drift_counts(read_bucket(fs, old, bucket, DRIFT_COLUMNS),
                        read_bucket(fs, new, bucket, DRIFT_COLUMNS))
