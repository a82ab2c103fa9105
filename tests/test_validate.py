"""io/validate.py: valid rows, float32 casting and one reject row per bad row, on real Arrow
tables (and one real Parquet round trip)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.errors import ConfigError, InputError
from semid_dist.io.catalog import plan_catalog, read_shard
from semid_dist.io.validate import (
    REJECTS_SCHEMA,
    check_columns,
    check_schemas,
    infer_dim,
    normalize_ids,
    popularity_values,
    validate_batch,
)

D = 4
SOURCE = "s3://bucket/catalog/part-007.parquet"
NAN, INF = float("nan"), float("inf")
NON_FINITE = "non-finite values (NaN/Inf) in embedding"
F32, I64, LIST_F32 = pa.float32(), pa.int64(), pa.list_(pa.float32())

# (item_id, embedding) with the problem each row has; None = valid
ROWS = [
    (10, [0.5, 1.0, -2.0, 3.25], None),
    (11, [0.5, NAN, -2.0, 3.0], "nonfinite"),
    (12, [1.0, 2.0, 3.0, 4.0], None),
    (13, [INF, 1.0, 1.0, 1.0], "nonfinite"),
    (14, [1.0, 1.0, 1.0, -INF], "nonfinite"),
    (15, None, "null_embedding"),
    (16, [1.0, 2.0, 3.0], "dim"),
    (None, [1.0, 1.0, 2.0, 2.0], "null_id"),
    (18, [4.0, 3.0, 2.0, 1.0], "duplicate"),
    (19, [1.0, 2.0, 3.0, 4.0, 5.0], "dim"),
    (20, [-1.5, 0.0, 0.25, 8.0], None),
    (21, [1.0, None, 3.0, 4.0], "null_inside"),  # a null inside the vector has its own reason
    (22, [], "dim"),
    (23, [7.0, 6.0, 5.0, 4.0], None),
    (None, None, "null_id"),  # two problems, still exactly one reject row
]


def reason_ok(problem: str, reason: str, emb) -> bool:
    r = reason.lower()
    if problem == "nonfinite":
        return reason == NON_FINITE
    if problem == "null_inside":
        return reason == "null values inside embedding"
    if problem == "too_large":
        return reason == "embedding too large for float32 arithmetic (squared norm over 8.5e+37)"
    if problem == "too_small":
        return reason == "embedding too small for float32 arithmetic (squared norm under 1.2e-38)"
    if problem == "null_embedding":
        return "null" in r and "embedding" in r
    if problem == "dim":
        return "dim" in r and str(len(emb)) in r and str(D) in r
    if problem == "null_id":
        return "null" in r and "item_id" in r
    if problem == "duplicate":
        return "duplicate" in r
    raise AssertionError(problem)


def list_column(rows, value_type=F32, kind="list", d=D):
    """Arrow list column of `kind` with numpy-built values of `value_type` (nulls kept)."""
    np_type = value_type.to_pandas_dtype()
    mask = [r is None for r in rows]
    flat, offsets = [], [0]
    for r in rows:
        flat.extend([] if r is None else r)
        offsets.append(len(flat))
    if pa.types.is_integer(value_type):
        values = pa.array(np.array(flat, dtype=np_type), type=value_type)
    else:
        nulls = [v is None for v in flat]
        arr = np.array([0.0 if v is None else v for v in flat], dtype=np.float64).astype(np_type)
        values = pa.array(arr, type=value_type, mask=np.array(nulls, dtype=bool))
    if kind == "fixed":
        filled = [([0] * d if r is None else r) for r in rows]
        assert all(len(r) == d for r in filled)
        flat = [v for r in filled for v in r]
        nulls = [v is None for v in flat]
        arr = np.array([0.0 if v is None else v for v in flat], dtype=np.float64).astype(np_type)
        values = pa.array(arr, type=value_type, mask=np.array(nulls, dtype=bool))
        return pa.FixedSizeListArray.from_arrays(values, d, mask=pa.array(mask))
    cls = pa.LargeListArray if kind == "large_list" else pa.ListArray
    off_type = pa.int64() if kind == "large_list" else pa.int32()
    return cls.from_arrays(pa.array(offsets, off_type), values, mask=pa.array(mask))


def make_table(rows, ids, **kw):
    return pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": list_column(rows, **kw)})


def run(table, *, offset=1000, dup=None, popularity_column=None):
    return validate_batch(table, id_column="item_id", embedding_column="embedding", dim=D,
                          source_file=SOURCE, row_offset=offset,
                          popularity_column=popularity_column, duplicate_ids=dup)


def check_against_rows(vb, rows, ids, problems, offset):
    """Brute-force expectations for every row of the batch."""
    n = len(rows)
    good = [i for i in range(n) if problems[i] is None]
    bad = [i for i in range(n) if problems[i] is not None]
    assert vb.ids.to_pylist() == [ids[i] for i in good]
    assert vb.rows.tolist() == [offset + i for i in good]
    assert vb.x.dtype == np.float32 and vb.x.shape == (len(good), D)
    want = np.array([[np.float32(v) for v in rows[i]] for i in good], dtype=np.float32)
    assert np.array_equal(vb.x, want.reshape(len(good), D))
    rej = vb.rejects
    assert rej.schema.equals(REJECTS_SCHEMA)
    assert rej.num_rows == len(bad)
    assert len(good) + rej.num_rows == n
    assert rej.column("row").to_pylist() == [offset + i for i in bad]
    assert set(rej.column("source_file").to_pylist()) <= {SOURCE}
    assert rej.column("item_id").to_pylist() == [None if ids[i] is None else str(ids[i])
                                                 for i in bad]
    for i, reason in zip(bad, rej.column("reason").to_pylist()):
        assert reason_ok(problems[i], reason, rows[i]), (i, problems[i], reason)
    assert set(vb.rows.tolist()).isdisjoint(rej.column("row").to_pylist())


def test_bad_rows_are_rejected_with_reasons():
    ids = [r[0] for r in ROWS]
    rows = [r[1] for r in ROWS]
    problems = [r[2] for r in ROWS]
    table = make_table(rows, ids)
    vb = run(table, dup=pa.array([18, 999], pa.int64()))
    check_against_rows(vb, rows, ids, problems, 1000)


def test_duplicate_ids_only_when_passed():
    ids, rows = [1, 2, 3], [[1.0] * D, [2.0] * D, [3.0] * D]
    table = make_table(rows, ids)
    assert run(table).rejects.num_rows == 0
    vb = run(table, dup=pa.array([3, 1], pa.int64()))
    assert vb.ids.to_pylist() == [2]
    assert vb.rejects.column("item_id").to_pylist() == ["1", "3"]
    assert all("duplicate" in r for r in vb.rejects.column("reason").to_pylist())
    assert run(table, dup=pa.array([], pa.int64())).rejects.num_rows == 0


def test_string_ids_and_string_duplicates():
    ids = ["a", "b", None, "d"]
    rows = [[1.0] * D, [2.0] * D, [3.0] * D, [NAN] * D]
    table = pa.table({"item_id": pa.array(ids, pa.string()), "embedding": list_column(rows)})
    vb = run(table, offset=0, dup=pa.array(["b"]))
    check_against_rows(vb, rows, ids, [None, "duplicate", "null_id", "nonfinite"], 0)


@pytest.mark.parametrize("value_type", [pa.float64(), pa.float16(), pa.int32(), pa.int64(),
                                        pa.int8()])
def test_value_types_cast_to_identical_float32(value_type):
    rng = np.random.default_rng(0)
    data = rng.integers(-100, 100, size=(30, D)).astype(float).tolist()  # exact in every type
    ids = list(range(30))
    ref = run(make_table(data, ids, value_type=pa.float32()))
    got = run(make_table(data, ids, value_type=value_type))
    assert got.x.dtype == np.float32
    assert np.array_equal(got.x, np.array(data, dtype=np.float32))
    assert np.array_equal(got.x, ref.x)
    assert got.ids.equals(ref.ids) and np.array_equal(got.rows, ref.rows)


def test_float64_and_float16_values_round_like_numpy():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(20, D))
    ids = list(range(20))
    got64 = run(make_table(data.tolist(), ids, value_type=pa.float64()))
    assert np.array_equal(got64.x, data.astype(np.float32))
    half = data.astype(np.float16)
    got16 = run(make_table(half.astype(np.float64).tolist(), ids, value_type=pa.float16()))
    assert np.array_equal(got16.x, half.astype(np.float32))


@pytest.mark.parametrize("kind", ["list", "fixed"])
def test_rows_of_the_right_length_with_nan_or_inf_are_rejected(kind):
    """Every row has `dim` values (the batch's fast path): NaN / Inf rows are still rejected,
    and the valid rows come back as a writable float32 matrix."""
    rows = [[1.0, 2.0, 3.0, 4.0], [np.nan, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0],
            [0.0, 0.0, -np.inf, 0.0], [9.0, 9.5, 10.0, 10.5]]
    vb = run(make_table(rows, [1, 2, 3, 4, 5], kind=kind))
    check_against_rows(vb, rows, [1, 2, 3, 4, 5],
                       [None, "nonfinite", None, "nonfinite", None], 1000)
    assert vb.x.flags.writeable
    clean = run(make_table([rows[0], rows[2]], [1, 3], kind=kind))
    assert clean.x.flags.writeable and np.array_equal(clean.x, np.array([rows[0], rows[2]],
                                                                        dtype=np.float32))


def parquet_round_trip(tmp_path, table: pa.Table, name: str = "part.parquet") -> pa.Table:
    """table written to a Parquet file and read back as a shard is."""
    path = str(tmp_path / name)
    pq.write_table(table, path)
    plan = plan_catalog(path)
    return pa.concat_tables([t for s in plan.shards
                             for t in read_shard(path, s, table.column_names)])


@pytest.mark.parametrize("short_row", [False, True])
def test_finite_rows_whose_squared_norm_overflows_are_too_large_not_non_finite(short_row):
    """The value check sums each row's squares first: finite rows whose squares overflow
    float32 are rejected as too large (their codes would be NaN, the MSE inf), not as
    non-finite, and a row holding +inf and -inf or only a NaN as non-finite, on the
    all-rows-valid path and on the path with a wrong-length row beside them."""
    big = float(np.finfo(np.float32).max)
    rows = [[big, big, 1.0, 2.0], [-big, -big, -big, 0.0], [INF, -INF, 0.0, 0.0],
            [1.0, 2.0, NAN, 4.0], [big, -big, big, -big], [0.5, 0.25, 0.0, 1.0]]
    problems = ["too_large", "too_large", "nonfinite", "nonfinite", "too_large", None]
    ids = list(range(1, len(rows) + 1))
    if short_row:
        rows, problems, ids = rows + [[1.0, 2.0]], problems + ["dim"], ids + [99]
    vb = run(make_table(rows, ids))
    check_against_rows(vb, rows, ids, problems, 1000)


@pytest.mark.parametrize("kind", ["list", "fixed"])
@pytest.mark.parametrize("short_row", [False, True])
def test_embeddings_too_large_or_too_small_for_float32_are_rejected(tmp_path, kind,
                                                                    short_row):
    """Finite rows whose float32 squared norm overflows (1e20 a value, or 5e18 in each of
    the 4: 1e38 > float32 max / 4) or, non-zero, underflows (1e-30: the squares are 0) get
    their own reasons; an all-zero row is input.on_zero_vector's, a tiny value beside a
    normal one and rows just inside the bounds are kept."""
    rows = [[1e20, 0.0, 0.0, 0.0], [5e18, -5e18, 5e18, 5e18], [1e-30, 0.0, -1e-30, 0.0],
            [1e-20, 1e-20, 1e-20, 1e-20], [0.0, 0.0, 0.0, 0.0], [1.0, 1e-30, 0.0, 2.0],
            [4e18, 4e18, 4e18, 4e18], [2e-19, 0.0, 0.0, 0.0], [0.5, 1.5, -2.0, 3.0]]
    problems = ["too_large", "too_large", "too_small", "too_small", None, None, None, None,
                None]
    ids = list(range(len(rows)))
    if short_row and kind == "list":
        rows, problems, ids = rows + [[1.0, 2.0]], problems + ["dim"], ids + [99]
    table = parquet_round_trip(tmp_path, make_table(rows, ids, kind=kind))
    vb = run(table, offset=0)
    check_against_rows(vb, rows, ids, problems, 0)
    assert np.isfinite(np.einsum("ij,ij->i", vb.x, vb.x)).all()
    zero = validate_batch(table, id_column="item_id", embedding_column="embedding", dim=D,
                          source_file=SOURCE, row_offset=0, reject_zero=True)
    assert dict(zip(zero.rejects.column("row").to_pylist(),
                    zero.rejects.column("reason").to_pylist()))[4] == "all-zero embedding"
    # float64 values beyond float32's squared-norm range but inside its range: too large
    vb64 = run(make_table([[1e30, 0.0, 0.0, 0.0], [1.0] * D], [1, 2], value_type=pa.float64()))
    assert vb64.ids.to_pylist() == [2]
    assert reason_ok("too_large", vb64.rejects.column("reason")[0].as_py(), None)


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed"])
def test_null_values_inside_an_embedding_have_their_own_reason(tmp_path, kind):
    """A null element inside an embedding (a list's or a fixed_size_list's values) is
    `null values inside embedding`, not non-finite; a NaN beside it is the null's reason,
    a wrong-length row with a null stays a wrong length, a null row a null embedding."""
    rows = [[1.0, None, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [None, None, None, None],
            [NAN, None, 0.0, 1.0], None, [5.0, 6.0, 7.0, 8.0], [1.0, NAN, 0.0, 0.0]]
    problems = ["null_inside", None, "null_inside", "null_inside", "null_embedding", None,
                "nonfinite"]
    ids = list(range(len(rows)))
    if kind != "fixed":
        rows, problems, ids = rows + [[None, 1.0]], problems + ["dim"], ids + [99]
    table = parquet_round_trip(tmp_path, make_table(rows, ids, kind=kind))
    check_against_rows(run(table, offset=0), rows, ids, problems, 0)
    sliced = table.slice(2)  # the rows' positions inside a slice of the values
    check_against_rows(run(sliced, offset=2), rows[2:], ids[2:], problems[2:], 2)


def test_float64_out_of_float32_range_is_rejected_as_non_finite():
    rows = [[1e300, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]]
    vb = run(make_table(rows, [1, 2], value_type=pa.float64()))
    assert vb.ids.to_pylist() == [2]
    assert vb.rejects.num_rows == 1
    assert reason_ok("nonfinite", vb.rejects.column("reason")[0].as_py(), rows[0])


@pytest.mark.parametrize("value_type", [pa.float32(), pa.float64(), pa.float16()])
def test_list_kinds_give_the_same_matrix(value_type):
    ids = [r[0] for r in ROWS if r[2] != "dim"]
    rows = [r[1] for r in ROWS if r[2] != "dim"]
    problems = [r[2] for r in ROWS if r[2] != "dim"]
    results = {kind: run(make_table(rows, ids, value_type=value_type, kind=kind),
                         dup=pa.array([18], pa.int64()))
               for kind in ("list", "large_list", "fixed")}
    ref = results["list"]
    check_against_rows(ref, rows, ids, problems, 1000)
    for kind, vb in results.items():
        assert np.array_equal(vb.x, ref.x), kind
        assert vb.ids.equals(ref.ids), kind
        assert np.array_equal(vb.rows, ref.rows), kind
        assert vb.rejects.equals(ref.rejects), kind


def test_null_embedding_backed_by_hidden_values_does_not_shift_later_rows():
    # offsets give the null entry two real values; they must not leak into row 2
    values = pa.array([1, 2, 3, 4, 90, 91, 92, 93, 5, 6, 7, 8], pa.float32())
    emb = pa.ListArray.from_arrays(pa.array([0, 4, 8, 12], pa.int32()), values,
                                   mask=pa.array([False, True, False]))
    table = pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "embedding": emb})
    vb = run(table, offset=0)
    assert vb.ids.to_pylist() == [1, 3]
    assert vb.x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert vb.rejects.column("row").to_pylist() == [1]


@pytest.mark.parametrize("kind", ["list", "fixed"])
def test_sliced_and_chunked_tables(kind):
    rng = np.random.default_rng(2)
    n = 40
    data = rng.normal(size=(n, D)).tolist()
    for i in (3, 17, 31):
        data[i][i % D] = NAN
    ids = list(range(100, 100 + n))
    problems = [("nonfinite" if i in (3, 17, 31) else None) for i in range(n)]
    t1 = make_table(data[:25], ids[:25], kind=kind)
    t2 = make_table(data[25:], ids[25:], kind=kind)
    chunked = pa.concat_tables([t1, t2])
    assert chunked.column("embedding").num_chunks == 2
    check_against_rows(run(chunked, offset=500), data, ids, problems, 500)
    sliced = chunked.slice(5, 30)
    check_against_rows(run(sliced, offset=5), data[5:35], ids[5:35], problems[5:35], 5)


def test_parquet_round_trip(tmp_path):
    ids = [r[0] for r in ROWS]
    rows = [r[1] for r in ROWS]
    problems = [r[2] for r in ROWS]
    path = tmp_path / "part.parquet"
    pq.write_table(make_table(rows, ids), path, row_group_size=4)
    pf = pq.ParquetFile(path)
    offset = 0
    valid_rows, reject_rows = [], []
    for batch in pf.iter_batches(batch_size=4):
        vb = run(pa.Table.from_batches([batch]), offset=offset, dup=pa.array([18], pa.int64()))
        valid_rows += vb.rows.tolist()
        reject_rows += vb.rejects.column("row").to_pylist()
        offset += batch.num_rows
    assert sorted(valid_rows + reject_rows) == list(range(len(ROWS)))
    assert valid_rows == [i for i, p in enumerate(problems) if p is None]
    assert reject_rows == [i for i, p in enumerate(problems) if p is not None]


def test_popularity_is_aligned_with_valid_rows_and_nulls_are_zero():
    rows = [[1.0] * D, [NAN] * D, [2.0] * D, [3.0] * D]
    table = pa.table({"item_id": pa.array([1, 2, 3, 4], pa.int64()),
                      "embedding": list_column(rows),
                      "popularity": pa.array([5, 6, None, 8], pa.int64())})
    vb = run(table, popularity_column="popularity")
    assert vb.popularity.tolist() == [5.0, 0.0, 8.0]
    assert run(table).popularity is None


def test_all_rows_valid_gives_empty_rejects_with_schema():
    rows = [[float(i)] * D for i in range(5)]
    vb = run(make_table(rows, list(range(5))))
    assert vb.rejects.num_rows == 0
    assert vb.rejects.schema.equals(REJECTS_SCHEMA)


@pytest.mark.parametrize("with_bad_row", [False, True])
def test_valid_matrix_is_a_writable_array_in_arrows_pool(with_bad_row):
    """The matrix lives in Arrow's memory pool (pages the pool reuses for the next shard), is
    writable like numpy's own arrays, and is freed with the array."""
    rng = np.random.default_rng(5)
    rows = [rng.normal(size=64).astype(np.float32).tolist() for _ in range(2000)]
    if with_bad_row:
        rows[7] = rows[7][:10]
    pool = pa.default_memory_pool()
    table = (make_table(rows, list(range(len(rows))), d=64) if with_bad_row
             else make_table(rows, list(range(len(rows))), kind="fixed", d=64))
    before = pool.bytes_allocated()
    vb = validate_batch(table, id_column="item_id", embedding_column="embedding", dim=64,
                        source_file=SOURCE, row_offset=0)
    good = [r for r in rows if len(r) == 64]
    np.testing.assert_array_equal(vb.x, np.array(good, np.float32))
    assert vb.rejects.num_rows == int(with_bad_row)
    assert vb.x.flags.writeable
    if not with_bad_row:  # (with a bad row the valid rows are numpy's copy)
        assert pool.bytes_allocated() - before >= vb.x.nbytes
        del vb
        assert pool.bytes_allocated() - before < 2000 * 64 * 4


def schema(emb_type=LIST_F32, id_type=I64, extra=()):
    return pa.schema([("item_id", id_type), ("embedding", emb_type), *extra])


def test_check_columns_accepts_supported_types():
    for emb in (pa.list_(pa.float32()), pa.large_list(pa.float64()), pa.list_(pa.float16(), 8),
                pa.list_(pa.int32())):
        for id_type in (pa.int64(), pa.int32(), pa.string(), pa.large_string()):
            check_columns(schema(emb, id_type), "item_id", "embedding", None)
    check_columns(schema(extra=[("pop", pa.int64())]), "item_id", "embedding", "pop")


@pytest.mark.parametrize("missing, key", [("vec", "input.embedding_column"),
                                          ("id", "input.id_column"),
                                          ("pop", "input.popularity_column")])
def test_check_columns_missing_column_names_it_and_lists_available(missing, key):
    s = schema(extra=[("title", pa.string())])
    args = {"id_column": "item_id", "embedding_column": "embedding", "popularity_column": None}
    args[key.split(".")[1]] = missing
    with pytest.raises(InputError) as exc:
        check_columns(s, **args)
    msg = str(exc.value)
    assert repr(missing) in msg and key in msg
    for name in s.names:
        assert name in msg


@pytest.mark.parametrize("emb_type", [pa.string(), pa.list_(pa.string()), pa.float32(),
                                      pa.binary()])
def test_check_columns_rejects_unusable_embedding_types(emb_type):
    with pytest.raises(InputError) as exc:
        check_columns(schema(emb_type), "item_id", "embedding", None)
    assert "embedding" in str(exc.value)


@pytest.mark.parametrize("key, column, col_type", [
    ("input.id_column", "item_id", pa.float64()),
    ("input.id_column", "item_id", pa.binary()),
    ("input.embedding_column", "embedding", pa.list_(pa.string())),
    ("input.popularity_column", "pop", pa.timestamp("ms")),
    ("input.popularity_column", "pop", pa.list_(pa.int64())),
])
def test_check_columns_wrong_type_names_the_key_and_the_columns_there_are(key, column,
                                                                         col_type):
    s = schema(extra=[("pop", pa.int64()), ("title", pa.string())])
    s = s.set(s.get_field_index(column), pa.field(column, col_type))
    with pytest.raises(InputError) as exc:
        check_columns(s, "item_id", "embedding", "pop")
    msg = str(exc.value)
    assert f"column {column!r} (set by {key}) has type {col_type}" in msg
    assert f"its columns are {s.names}" in msg and f"set {key}" in msg


def test_dictionary_and_string_view_ids_are_strings(tmp_path):
    """Dictionary-encoded string ids (as pandas' categoricals write them) and string_view ids
    pass the check and come back as plain strings, equal to the string file's."""
    rows = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]]
    names = ["a", "b", "a"]
    tables = {kind: pa.table({"item_id": ids, "embedding": list_column(rows)}) for kind, ids in {
        "string": pa.array(names), "dictionary": pa.array(names).dictionary_encode(),
        "string_view": pa.array(names, pa.string_view())}.items()}
    schemas = []
    for kind, table in tables.items():
        raw = parquet_round_trip(tmp_path, table, f"{kind}.parquet")
        assert raw.schema.field("item_id").type == table.schema.field("item_id").type
        schemas.append((kind, raw.schema))
        check_columns(raw.schema, "item_id", "embedding", None)
        want = pa.array(names)
        assert normalize_ids(raw.column("item_id"), SOURCE, 0).equals(want), kind
        vb = validate_batch(raw, id_column="item_id", embedding_column="embedding", dim=D,
                            source_file=SOURCE, row_offset=0, duplicate_ids=want[:1])
        assert vb.ids.equals(want[1:2]) and vb.rejects.num_rows == 2, kind
    check_schemas(schemas, "item_id", "embedding", None)  # one kind of id: strings


def test_duplicate_column_names_are_a_named_error(tmp_path):
    """A file with two columns of one name (Arrow writes them) fails naming the column and
    the file, instead of Arrow's `Column item_id does not exist in schema`."""
    emb = list_column([[1.0] * D, [2.0] * D])
    table = pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4]), emb],
                                 names=["item_id", "item_id", "embedding"])
    path = tmp_path / "dup.parquet"
    pq.write_table(table, path)
    plan = plan_catalog(str(path))
    with pytest.raises(InputError, match=rf"^{path}: column 'item_id' \(set by "
                                         r"input\.id_column\) appears 2 times; write the file "
                                         "with one column of each name$"):
        check_schemas(plan.schemas, "item_id", "embedding", None)


@pytest.mark.parametrize("same_as", ["item_id", "embedding"])
def test_popularity_column_naming_the_id_or_embedding_column_is_a_config_error(same_as):
    key = "input.id_column" if same_as == "item_id" else "input.embedding_column"
    with pytest.raises(ConfigError, match=rf"^input\.popularity_column='{same_as}' names the "
                                          rf"same column as {key}; each needs a column of its "
                                          r"own: set input\.popularity_column to another "
                                          "column, or null for none$"):
        check_schemas([("a.parquet", schema())], "item_id", "embedding", same_as)
    with pytest.raises(ConfigError, match=r"input\.embedding_column='item_id' names the same "
                                          r"column as input\.id_column"):
        check_columns(schema(), "item_id", "item_id", None)


def test_popularity_beyond_2_53_is_rounded_and_non_numbers_are_named(tmp_path):
    """Integer popularity above 2**53 (Arrow's exact float64 range) ranks as float64 values;
    a string that is not a number fails naming the key, the column, the file and the value."""
    big = [2**62, 2**53 + 1, None, 5]
    table = pa.table({"pop": pa.array(big, pa.int64()),
                      "upop": pa.array([2**64 - 1, 0, 1, None], pa.uint64()),
                      "spop": pa.array(["1.5", "abc", None, "2"])})
    raw = parquet_round_trip(tmp_path, table)
    assert popularity_values(raw.column("pop")).tolist() == [2.0**62, 2.0**53, 0.0, 5.0]
    assert popularity_values(raw.column("upop")).tolist() == [2.0**64, 0.0, 1.0, 0.0]
    check_columns(schema(extra=[("spop", pa.string())]), "item_id", "embedding", "spop")
    with pytest.raises(InputError, match=r"^input\.popularity_column='spop': the column of "
                                         r"s3://b/part-1\.parquet \(string\) holds values that "
                                         r"are not numbers \(.*'abc'.*\); popularity must be "
                                         r"numeric: fix those values, or unset "
                                         r"input\.popularity_column$"):
        popularity_values(raw.column("spop"), name="spop", source="s3://b/part-1.parquet")


def test_infer_dim():
    assert infer_dim(pa.array([None, [1.0, 2.0]], pa.list_(pa.float32(), 2))) == 2
    assert infer_dim(pa.chunked_array([pa.array([None, [1.0, 2.0, 3.0], [1.0]],
                                                pa.list_(pa.float32()))])) == 3
    assert infer_dim(pa.array([None, None], pa.list_(pa.float32()))) is None


def test_all_null_embeddings_are_all_rejected():
    table = pa.table({"item_id": pa.array([1, 2, 3], pa.int64()),
                      "embedding": pa.array([None, None, None], pa.list_(pa.float32()))})
    vb = run(table, offset=7)
    assert len(vb.ids) == 0 and vb.x.shape == (0, D)
    assert vb.rejects.column("row").to_pylist() == [7, 8, 9]
    assert all(reason_ok("null_embedding", r, None)
               for r in vb.rejects.column("reason").to_pylist())


_FIRST_SHARD_PROBE = """
import sys
from semid_dist.io.catalog import Piece, Shard, read_shard
from semid_dist.io.validate import validate_batch
from semid_dist.stages import warm_worker

if sys.argv[2] == "warm":
    warm_worker()
before = set(sys.modules)
path = sys.argv[1]
raw, = read_shard(path, Shard(0, (Piece(path, (0,), 0, 3),)), ["item_id", "embedding"])
batch = validate_batch(raw, id_column="item_id", embedding_column="embedding", dim=4,
                       source_file=path, row_offset=0)
assert len(batch.ids) == 3, batch
print(" ".join(sorted(m for m in set(sys.modules) - before
                      if m.split(".")[0] in ("pandas", "pyarrow", "numpy", "torch"))))
"""


def test_a_warmed_worker_imports_nothing_more_for_its_first_shard(tmp_path):
    """The engines' warm-up (`stages.warm_worker`) pays the imports pyarrow's conversions make
    on first use (its pandas shim), so a fresh worker's first shard does not."""
    path = str(tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"item_id": pa.array([1, 2, 3], I64), "embedding": pa.array(
        [[1.0, 2.0, 3.0, 4.0]] * 3, pa.list_(F32, D))}), path)
    new = {mode: subprocess.run([sys.executable, "-c", _FIRST_SHARD_PROBE, path, mode],
                                capture_output=True, text=True, check=True).stdout.split()
           for mode in ("cold", "warm")}
    assert new["warm"] == []
    pytest.importorskip("pandas")  # where pandas is installed, pyarrow imports it on first use
    assert "pandas" in new["cold"], new["cold"]


def test_a_null_row_with_values_behind_it_and_a_null_inside_are_told_apart():
    """An in-memory list array whose null row still holds values (Arrow IPC, not Parquet):
    `flatten` drops them, so the null inside the next row is found at its own row."""
    values = pa.array([9.0, 9.0, 9.0, 9.0, 1.0, None, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0],
                      pa.float32())
    offsets = pa.array([0, 4, 8, 12], pa.int32())
    emb = pa.ListArray.from_arrays(offsets, values, mask=pa.array([True, False, False]))
    vb = validate_batch(pa.table({"item_id": pa.array([1, 2, 3], pa.int64()), "embedding": emb}),
                        id_column="item_id", embedding_column="embedding", dim=D,
                        source_file=SOURCE, row_offset=0)
    assert vb.ids.to_pylist() == [3]
    assert vb.rejects.column("reason").to_pylist() == ["null embedding",
                                                       "null values inside embedding"]


def test_two_input_keys_naming_one_column_is_a_config_error_before_any_file_is_read():
    from semid_dist.config import parse_config

    with pytest.raises(ConfigError, match=r"input.popularity_column='item_id' names the same "
                                          r"column as input.id_column"):
        parse_config({"input": {"path": "x", "popularity_column": "item_id"},
                      "output": {"root": "y"}})
