"""Batch validation at the core boundary.

Turns a raw catalog batch into (ids, float32 matrix) of the valid rows and a rejects table
with one row and one reason per bad row. Embeddings may be list / large_list /
fixed_size_list of float16, float32, float64 or integers; all are cast to float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.errors import ConfigError, InputError
from semid_dist.io.fs import redact_url

# a rejects file's columns: item_id as a string whatever the id type (null for a null id)
REJECTS_SCHEMA = pa.schema([("item_id", pa.string()), ("source_file", pa.string()),
                            ("row", pa.int64()), ("reason", pa.string())])


@dataclass(frozen=True)
class ValidBatch:
    """ids: the valid rows' ids; x: (m, d) float32; rows: (m,) int64 row index in the file
    (in a shard of several files, `concat_batches`: each row's in its own file)."""

    ids: pa.Array
    x: np.ndarray
    rows: np.ndarray
    popularity: np.ndarray | None
    rejects: pa.Table


def check_columns(schema: pa.Schema, id_column: str, embedding_column: str,
                  popularity_column: str | None) -> None:
    """Raise ConfigError when two keys name one column, InputError when a configured column
    is missing, appears twice or has an unusable type."""
    columns = check_distinct_columns(id_column, embedding_column, popularity_column)
    names = schema.names
    for key, col in columns.items():
        if col is not None and col not in names:
            raise InputError(f"catalog has no column {col!r} (set by {key}); "
                             f"its columns are {names}")
        if col is not None and names.count(col) > 1:
            raise InputError(f"column {col!r} (set by {key}) appears {names.count(col)} times; "
                             "write the file with one column of each name")
    emb = schema.field(embedding_column).type
    if pa.types.is_null(emb):  # a writer's type for a column of nulls: rejected rows
        emb = pa.list_(pa.float32())
    ok_list = (pa.types.is_list(emb) or pa.types.is_large_list(emb)
               or pa.types.is_fixed_size_list(emb))
    if not ok_list or not (pa.types.is_floating(emb.value_type)
                           or pa.types.is_integer(emb.value_type)):
        raise InputError(f"column {embedding_column!r} (set by input.embedding_column) has "
                         f"type {emb}; expected a list of float32 (float16/float64/integers "
                         f"are cast); its columns are {names}: cast the column, or set "
                         "input.embedding_column to the embeddings' column")
    id_type = schema.field(id_column).type
    if not (_id_kind(id_type) == "integer" or _decoded(id_type) in _STRING_TYPES):
        raise InputError(f"column {id_column!r} (set by input.id_column) has type {id_type}; "
                         "item ids must be integers or strings (string, large_string, "
                         f"string_view, or dictionary-encoded); its columns are {names}: "
                         "cast the column, or set input.id_column to the ids' column")
    if popularity_column is not None:
        pop = schema.field(popularity_column).type
        try:  # what `popularity_values` does to the column's values
            pa.array([], pop).cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"column {popularity_column!r} (set by input.popularity_column) "
                             f"has type {pop}, not a number; popularity must be integers, "
                             "floats, decimals, booleans or strings of numbers; its columns are "
                             f"{names}: cast the column to a number, or unset "
                             "input.popularity_column") from None


def check_distinct_columns(id_column: str, embedding_column: str,
                           popularity_column: str | None) -> dict[str, str | None]:
    """{input key: column}; ConfigError when two of the keys name one column (the popularity
    column read as the ids, say)."""
    columns = {"input.id_column": id_column, "input.embedding_column": embedding_column,
               "input.popularity_column": popularity_column}
    keys = list(columns)
    for i, key in enumerate(keys):
        for other in keys[i + 1:]:
            col = columns[other]
            if col is not None and col == columns[key]:
                unset = ", or null for none" if other == "input.popularity_column" else ""
                raise ConfigError(f"{other}={col!r} names the same column as {key}; each "
                                  f"needs a column of its own: set {other} to another "
                                  f"column{unset}")
    return columns


# string_view: pyarrow 16 and later
_STRING_TYPES = (pa.string(), pa.large_string(),
                 *([pa.string_view()] if hasattr(pa, "string_view") else []))


def _decoded(type_: pa.DataType) -> pa.DataType:
    """A dictionary-encoded type's value type; any other type as is."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _id_kind(id_type: pa.DataType) -> str:
    return "integer" if pa.types.is_integer(_decoded(id_type)) else "string"


def check_schemas(schemas: Sequence[tuple[str, pa.Schema]], id_column: str,
                  embedding_column: str, popularity_column: str | None) -> None:
    """`check_columns` on each distinct file schema (the error names the file), then check
    that the files agree: one kind of item id (integers or strings) and, for
    fixed_size_list embeddings, one dimension. schemas: (a file having it, schema)."""
    for path, schema in schemas:
        try:
            check_columns(schema, id_column, embedding_column, popularity_column)
        except InputError as exc:
            raise InputError(redact_url(f"{path}: {exc}")) from None
    if not schemas:
        return
    path0, schema0 = schemas[0]
    id0, emb0 = schema0.field(id_column).type, schema0.field(embedding_column).type
    for path, schema in schemas[1:]:
        id_type, emb = schema.field(id_column).type, schema.field(embedding_column).type
        if _id_kind(id_type) != _id_kind(id0):
            raise InputError(redact_url(
                f"catalog files mix item id types: {path0!r} has {id_column!r} as {id0}, "
                f"{path!r} as {id_type}; write every file with one id type (cast the ids to "
                "string, or to int64, everywhere)"))
        if (pa.types.is_fixed_size_list(emb) and pa.types.is_fixed_size_list(emb0)
                and emb.list_size != emb0.list_size):
            raise InputError(redact_url(
                f"catalog files disagree on the embedding dimension: {path0!r} has "
                f"{emb0.list_size}, {path!r} has {emb.list_size}; one catalog holds the "
                "embeddings of one model (split it into two)"))


def stored_id_type(id_type: pa.DataType) -> pa.DataType:
    """The type item ids of `id_type` are written as (`normalize_ids`): int64 or string."""
    return pa.int64() if _id_kind(id_type) == "integer" else pa.string()


def normalize_ids(ids: pa.ChunkedArray | pa.Array, source: str, row_offset: int) -> pa.Array:
    """Item ids with one type per kind, whatever each file used: integers -> int64,
    strings (string / large_string / string_view, or dictionary-encoded ids) -> string,
    checked to be UTF-8 (a writer may store other bytes; the table written from them could
    not be read as strings). source, row_offset: their file and the first id's row there,
    for the errors."""
    target = stored_id_type(ids.type)
    if ids.type != target:
        try:
            ids = pc.cast(ids, target)
        except pa.ArrowInvalid as exc:
            raise InputError(redact_url(
                f"{source}: item ids of type {ids.type} do not fit {target} ({exc}); store "
                "the ids as strings")) from None
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if target == pa.string():
        try:
            ids.validate(full=True)
        except pa.ArrowInvalid:
            row, value = _first_non_utf8(ids)
            raise InputError(redact_url(
                f"{source}: the item id at row {row_offset + row} is not valid UTF-8 "
                f"({value[:40]!r}); write the ids as UTF-8 strings")) from None
    return ids


def _first_non_utf8(ids: pa.Array) -> tuple[int, bytes]:
    """(index, bytes) of the first string in `ids` that is not UTF-8 (one there is)."""
    for i, value in enumerate(ids.view(pa.binary()).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return i, value
    raise AssertionError("no string that is not UTF-8")


# how a build decides the embedding dimension (`preflight`), for the errors it explains
DIMENSION_RULE = ("the embedding dimension is the fixed_size_list type's, else the most common "
                  "length in the catalog's first shard holding an embedding (a shard of "
                  "several small files: its first file holding one)")


def infer_dim(column: pa.ChunkedArray | pa.Array) -> int | None:
    """Embedding dimension: fixed by the type, else the most common length of the non-null
    rows (ties: the first seen), so a few wrong-length rows are rejected, not the rest.
    None for a column without one (a column of type null, the type a writer gives a column
    whose every value is null, included)."""
    if pa.types.is_null(column.type):
        return None
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    lengths = pc.drop_null(pc.list_value_length(column))
    if not len(lengths):
        return None
    counts = pc.value_counts(lengths)  # in order of first occurrence
    best = int(np.argmax(counts.field("counts").to_numpy()))
    return int(counts.field("values")[best].as_py())


def concat_batches(batches: list[ValidBatch], dim: int) -> ValidBatch:
    """The batches of a shard's files as one, in order; the rows' matrix in Arrow's pool,
    as each file's (`_pool_matrix`). Empties `batches`: each file's matrix is freed as it is
    copied."""
    pops = [b.popularity for b in batches]
    ids = pa.concat_arrays([b.ids for b in batches])
    rows = np.concatenate([b.rows for b in batches])
    popularity = None if pops[0] is None else np.concatenate(pops)
    rejects = pa.concat_tables([b.rejects for b in batches])
    del pops
    x = _pool_matrix(sum(len(b.x) for b in batches), dim)
    start = 0
    while batches:
        part = batches.pop(0).x
        x[start:start + len(part)] = part
        start += len(part)
    return ValidBatch(ids=ids, x=x, rows=rows, popularity=popularity, rejects=rejects)


def _pool_matrix(rows: int, dim: int) -> np.ndarray:
    """An uninitialised, writable (rows, dim) float32 array in Arrow's memory pool, freed when
    the array is. The pool hands its pages back for the next shard's matrix, whereas glibc
    serves each block over 32 MiB (a 65,536 x 128 shard's) with a new mmap, faulted in page
    by page: on the benchmark VMs that made one shard in ten validate in 0.2-0.45 s instead
    of 0.02 s."""
    buf = pa.allocate_buffer(rows * dim * 4, memory_pool=pa.default_memory_pool())
    return np.frombuffer(buf, dtype=np.float32).reshape(rows, dim)


def _to_matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (x (n, dim) float32 with zeros where invalid, reason code per row).

    reason codes: 0 ok, 1 null embedding, 2 wrong dimension, 3 non-finite values,
    8 too large, 9 too small, 10 null values inside (validate_batch adds 4 null item_id,
    5 duplicate item_id, 6 all-zero embedding, 7 a later copy of an item_id, keep_first).
    """
    n = len(column)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    is_null = np.isnan(lengths) if lengths.dtype.kind == "f" else np.zeros(n, bool)
    lengths = np.nan_to_num(lengths.astype(np.float64), nan=0).astype(np.int64)
    flat = column.flatten()
    # (integers beyond 2**24 round to the nearest float32, as float64 values do)
    values = pc.cast(flat, pa.float32(), safe=False)
    null_inside = None
    if values.null_count:  # null values inside an embedding: NaN until told apart below
        # each value's row, as `flatten` lays them out (it drops what a null row holds)
        parents = np.repeat(np.arange(n), lengths)
        null_inside = np.unique(parents[values.is_null().to_numpy(zero_copy_only=False)])
        values = pc.fill_null(values, np.float32("nan"))
    values = values.to_numpy(zero_copy_only=False)
    reason = np.where(is_null, 1, np.where(lengths != dim, 2, 0)).astype(np.int8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # each row's first value in `flat`
    x = _pool_matrix(n, dim)
    if not reason.any():  # every row holds `dim` values: the flat values are the matrix
        np.copyto(x, values.reshape(n, dim))  # writable, unlike Arrow's read-only view
        bad, codes = _unusable_rows(x)
    else:
        x.fill(0.0)
        good = np.flatnonzero(reason == 0)
        x[good] = values[starts[good, None] + np.arange(dim)]
        bad, codes = _unusable_rows(x[good])
        bad = good[bad]
    reason[bad] = codes
    x[bad] = 0.0
    if null_inside is not None:  # (their NaN made them code 3)
        reason[null_inside[reason[null_inside] == 3]] = 10
    if pa.types.is_float64(flat.type):  # values under float32's range: 0 in x
        reason[_underflowed(flat, starts, x, reason, dim)] = 9
    return x, reason


def _underflowed(flat: pa.Array, starts: np.ndarray, x: np.ndarray, reason: np.ndarray,
                 dim: int) -> np.ndarray:
    """The rows that are all zero in float32 but not in float64 (values of 1e-60, say):
    each would be a zero vector, all in one SID, without a word; they are too small."""
    zero = np.flatnonzero((reason == 0) & ~x.any(axis=1))
    if not len(zero):
        return zero
    src = flat.to_numpy(zero_copy_only=False)
    return zero[src[starts[zero, None] + np.arange(dim)].any(axis=1)]


# Bounds on a row's float32 squared norm: above _MAX_SQ_NORM a squared distance to a point
# of like size (|x - c|^2 <= 4 max(|x|^2, |c|^2)) can overflow float32, and below
# float32's smallest normal number the squares of a non-zero row have underflowed (to 0 for
# values of 1e-30: every such row would land in one SID).
_MAX_SQ_NORM = np.float32(np.finfo(np.float32).max / 4)
_MIN_SQ_NORM = np.finfo(np.float32).tiny


def _unusable_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the float32 matrix x (m, d) that float32 arithmetic cannot use, as (row
    numbers, reason code each): 3 a NaN or an infinity, 8 a squared norm above
    `_MAX_SQ_NORM`, 9 a non-zero row's below `_MIN_SQ_NORM`. One pass of row sums of
    squares finds every candidate (NaN and infinities carry through it, 1.5x the time of
    plain row sums); only the candidates (all-zero rows among them, left to
    input.on_zero_vector) are looked at again, element by element. The sums are numpy's
    own loop, not a BLAS product: a multi-threaded BLAS call here left its idle threads
    spinning against the encode kernel's (1.5x the kernel's time in the local engine)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # only tested
        sq = np.einsum("ij,ij->i", x, x)
    large = np.flatnonzero(~(sq <= _MAX_SQ_NORM))  # NaN too
    small = np.flatnonzero(sq < _MIN_SQ_NORM)
    small = small[x[small].any(axis=1)]
    codes = np.concatenate([np.where(np.isfinite(x[large]).all(axis=1), 8, 3),
                            np.full(len(small), 9)]).astype(np.int8)
    return np.concatenate([large, small]), codes


def _reason_text(code: int, dim: int, lengths: np.ndarray, row: int) -> str:
    if code == 1:
        return "null embedding"
    if code == 2:
        return f"embedding dim {int(lengths[row])} != {dim}"
    if code == 3:
        return "non-finite values (NaN/Inf) in embedding"
    if code == 4:
        return "null item_id"
    if code == 6:
        return "all-zero embedding"
    if code == 8:
        return f"embedding too large for float32 arithmetic (squared norm over {_MAX_SQ_NORM:.2g})"
    if code == 9:
        return ("embedding too small for float32 arithmetic (squared norm under "
                f"{_MIN_SQ_NORM:.2g})")
    if code == 10:
        return "null values inside embedding"
    return "duplicate item_id"


def validate_batch(table: pa.Table, *, id_column: str, embedding_column: str, dim: int,
                   source_file: str, row_offset: int, popularity_column: str | None = None,
                   duplicate_ids: pa.Array | None = None,
                   duplicate_rows: pa.Table | None = None,
                   reject_zero: bool = False) -> ValidBatch:
    """Split a raw batch into valid rows and rejects (one reason per row).

    duplicate_ids: reject every row holding one of these ids (on_duplicate=reject);
    duplicate_rows: reject these rows, `offset` (int64, row inside the batch) with its
    `reason` (on_duplicate=keep_first: the later copies); reject_zero: reject all-zero
    embeddings. A null item_id wins over every other reason, a duplicate over the
    embedding's problems."""
    ids = normalize_ids(table.column(id_column), source_file, row_offset)
    emb = table.column(embedding_column)
    # a shard of one row group is one chunk: no combined copy of it
    emb = emb.chunk(0) if emb.num_chunks == 1 else emb.combine_chunks()
    if pa.types.is_null(emb.type):  # every embedding null (a writer's type for that)
        emb = emb.cast(pa.list_(pa.float32()))
    x, reason = _to_matrix(emb, dim)
    if reject_zero:
        reason[(reason == 0) & ~x.any(axis=1)] = 6
    reason[ids.is_null().to_numpy(zero_copy_only=False)] = 4
    if duplicate_ids is not None and len(duplicate_ids):
        dup = pc.fill_null(pc.is_in(ids, value_set=duplicate_ids.cast(ids.type)), False)
        reason[dup.to_numpy(zero_copy_only=False) & (reason != 4)] = 5
    later: dict[int, str] = {}
    if duplicate_rows is not None and duplicate_rows.num_rows:
        later = dict(zip(duplicate_rows.column("offset").to_pylist(),
                         duplicate_rows.column("reason").to_pylist()))
        offsets = np.fromiter(later, dtype=np.int64, count=len(later))
        reason[offsets[reason[offsets] != 4]] = 7
    good = np.flatnonzero(reason == 0)
    bad = np.flatnonzero(reason != 0)
    rows = np.arange(row_offset, row_offset + len(table), dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(emb), 0).to_numpy(zero_copy_only=False)
    rejects = pa.table({
        "item_id": pc.take(ids, pa.array(bad)).cast(pa.string()),
        "source_file": [source_file] * len(bad),
        "row": rows[bad],
        "reason": [later[i] if reason[i] == 7 else _reason_text(int(reason[i]), dim, lengths, i)
                   for i in bad],
    }, schema=REJECTS_SCHEMA)
    popularity = None
    if popularity_column is not None:
        popularity = popularity_values(table.column(popularity_column),
                                       name=popularity_column, source=source_file)
        popularity = popularity[good] if len(bad) else popularity
    if len(bad):
        ids, x, rows = pc.take(ids, pa.array(good)), x[good], rows[good]
    return ValidBatch(ids=ids, x=x, rows=rows, popularity=popularity, rejects=rejects)


def popularity_values(column: pa.ChunkedArray, *, name: str | None = None,
                      source: str | None = None) -> np.ndarray:
    """A popularity column as (rows,) float64, nulls as 0 (the scan, its passes and the
    encode's head / tail split read it alike). Integers beyond 2**53 round to the nearest
    float64 (popularity only ranks items). name, source: the column and its file, for the
    error a value that is not a number gives."""
    integer = pa.types.is_integer(_decoded(column.type))
    try:
        values = pc.cast(column, pa.float64(), safe=not integer)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        key = f"input.popularity_column={name!r}" if name else "input.popularity_column"
        where = f" of {source}" if source else ""
        raise InputError(redact_url(
            f"{key}: the column{where} ({column.type}) holds values "
            f"that are not numbers ({exc}); popularity must be numeric: fix those values, or "
            "unset input.popularity_column")) from None
    return pc.fill_null(values, 0.0).to_numpy()


def reject_reasons(rejects: pa.Table) -> dict[str, int]:
    """Rejected rows per reason, with the per-row detail of keep_first duplicates
    ("(first at <file>:<row>)") left out, so the counts merge across shards."""
    if not rejects.num_rows:
        return {}
    kinds = pc.replace_substring_regex(rejects.column("reason"), pattern=r" \(first at .*\)$",
                                       replacement="")
    counts = pc.value_counts(kinds)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))


def reasons_text(reasons: dict[str, int], top: int = 4) -> str:
    """'3 null embedding, 1 null item_id': rejected rows per reason, the most common first."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{n} {why}" for why, n in ranked[:top])
    return text + (f", {len(ranked) - top} more reasons" if len(ranked) > top else "")
