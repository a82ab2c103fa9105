"""Batch validation at the core boundary.

Turns a raw catalog batch into (ids, float32 matrix) of the valid rows and a rejects table
with one row and one reason per bad row. Embeddings may be list / large_list /
fixed_size_list of float16, float32, float64 or integers; all are cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.errors import InputError

REJECTS_SCHEMA_FIELDS = ("item_id", "source_file", "row", "reason")


@dataclass(frozen=True)
class ValidBatch:
    """ids: the valid rows' ids; x: (m, d) float32; rows: (m,) int64 row index in the file."""

    ids: pa.Array
    x: np.ndarray
    rows: np.ndarray
    popularity: np.ndarray | None
    rejects: pa.Table


def check_columns(schema: pa.Schema, id_column: str, embedding_column: str,
                  popularity_column: str | None) -> None:
    """Raise InputError when a configured column is missing or has an unusable type."""
    names = schema.names
    for key, col in (("input.id_column", id_column), ("input.embedding_column", embedding_column),
                     ("input.popularity_column", popularity_column)):
        if col is not None and col not in names:
            raise InputError(f"catalog has no column {col!r} (set by {key}); "
                             f"its columns are {names}")
    emb = schema.field(embedding_column).type
    ok_list = (pa.types.is_list(emb) or pa.types.is_large_list(emb)
               or pa.types.is_fixed_size_list(emb))
    if not ok_list or not (pa.types.is_floating(emb.value_type)
                           or pa.types.is_integer(emb.value_type)):
        raise InputError(f"column {embedding_column!r} has type {emb}; expected a list of "
                         "float32 (float16/float64/integers are cast)")
    id_type = schema.field(id_column).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type)
            or pa.types.is_large_string(id_type)):
        raise InputError(f"column {id_column!r} has type {id_type}; item ids must be "
                         "integers or strings")


def infer_dim(column: pa.ChunkedArray | pa.Array) -> int | None:
    """Embedding dimension: fixed by the type, else the first non-null row's length."""
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    lengths = pc.drop_null(pc.list_value_length(column))
    return int(lengths[0].as_py()) if len(lengths) else None


def _to_matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (x (n, dim) float32 with zeros where invalid, reason code per row).

    reason codes: 0 ok, 1 null embedding, 2 wrong dimension, 3 non-finite values.
    """
    n = len(column)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    is_null = np.isnan(lengths) if lengths.dtype.kind == "f" else np.zeros(n, bool)
    lengths = np.nan_to_num(lengths.astype(np.float64), nan=0).astype(np.int64)
    values = pc.cast(column.flatten(), pa.float32())
    values = pc.fill_null(values, np.float32("nan")).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    reason = np.where(is_null, 1, np.where(lengths != dim, 2, 0)).astype(np.int8)
    x = np.zeros((n, dim), dtype=np.float32)
    good = np.flatnonzero(reason == 0)
    if len(good):
        x[good] = values[starts[good, None] + np.arange(dim)]
        finite = np.isfinite(x[good]).all(axis=1)
        reason[good[~finite]] = 3
        x[good[~finite]] = 0.0
    return x, reason


def _reason_text(code: int, dim: int, lengths: np.ndarray, row: int) -> str:
    if code == 1:
        return "null embedding"
    if code == 2:
        return f"embedding dim {int(lengths[row])} != {dim}"
    if code == 3:
        return "non-finite values (NaN/Inf) in embedding"
    if code == 4:
        return "null item_id"
    return "duplicate item_id"


def validate_batch(table: pa.Table, *, id_column: str, embedding_column: str, dim: int,
                   source_file: str, row_offset: int, popularity_column: str | None = None,
                   duplicate_ids: pa.Array | None = None) -> ValidBatch:
    """Split a raw batch into valid rows and rejects (one reason per row)."""
    ids = table.column(id_column).combine_chunks()
    emb = table.column(embedding_column).combine_chunks()
    x, reason = _to_matrix(emb, dim)
    reason[ids.is_null().to_numpy(zero_copy_only=False)] = 4
    if duplicate_ids is not None and len(duplicate_ids):
        dup = pc.fill_null(pc.is_in(ids, value_set=duplicate_ids.cast(ids.type)), False)
        reason[dup.to_numpy(zero_copy_only=False) & (reason != 4)] = 5
    good = np.flatnonzero(reason == 0)
    bad = np.flatnonzero(reason != 0)
    rows = np.arange(row_offset, row_offset + len(table), dtype=np.int64)
    lengths = pc.fill_null(pc.list_value_length(emb), 0).to_numpy(zero_copy_only=False)
    rejects = pa.table({
        "item_id": pc.take(ids, pa.array(bad)).cast(pa.string()),
        "source_file": pa.array([source_file] * len(bad), pa.string()),
        "row": pa.array(rows[bad], pa.int64()),
        "reason": pa.array([_reason_text(int(reason[i]), dim, lengths, i) for i in bad],
                           pa.string()),
    })
    popularity = None
    if popularity_column is not None:
        pop = table.column(popularity_column).combine_chunks()
        popularity = pc.fill_null(pc.cast(pop, pa.float64()), 0.0).to_numpy()[good]
    return ValidBatch(ids=pc.take(ids, pa.array(good)), x=x[good], rows=rows[good],
                      popularity=popularity, rejects=rejects)


def empty_rejects() -> pa.Table:
    return pa.table({"item_id": pa.array([], pa.string()), "source_file": pa.array([], pa.string()),
                     "row": pa.array([], pa.int64()), "reason": pa.array([], pa.string())})
