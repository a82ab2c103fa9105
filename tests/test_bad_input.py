"""Bad input, one class per test: end-to-end `build` on the local engine over small real
Parquet catalogs. Each class either fails with a named error that says what is wrong and how
to fix it (nothing committed), or becomes rejected rows with a reason, and the counts
reconcile (manifest rows: input = encoded + rejected, matching the data / rejects files)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.errors import ConfigError, InputError
from semid_dist.io.catalog import (
    Piece,
    Shard,
    catalog_files,
    plan_catalog,
    read_shard,
    shard_from_dict,
    shard_to_dict,
)
from semid_dist.io.duplicates import find_duplicates, first_copy_rejects
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.plan import dry_run
from semid_dist.stages import JobContext, sample_rows
from tests.conftest import REPO, cli_build, clustered, named_error, small_config, write_catalog

N, D = 600, 6
LAYERS = [8, 4]
NON_FINITE = "non-finite values (NaN/Inf) in embedding"
F32, I64 = pa.float32(), pa.int64()


def quiet(msg: str) -> None:
    pass


def cfg(catalog: str, root: str, **over):
    """small_config with every valid row in the fit sample (so two catalogs with the same
    valid rows in the same order fit identical codebooks), shards of 200 rows and up to 5%
    of the rows rejected."""
    over.setdefault("quantizer__layers", LAYERS)
    over.setdefault("fit__sample_size", 10**6)
    over.setdefault("encode__shard_rows", 200)
    over.setdefault("input__max_reject_fraction", 0.05)
    return small_config(catalog, root, **over)


def base_x(seed: int = 5) -> np.ndarray:
    return clustered(N, D, seed=seed)


def emb_array(rows: list, value_type: pa.DataType = F32) -> pa.Array:
    """list<value_type> column; a row of None is a null embedding."""
    lengths = [0 if r is None else len(r) for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    parts = [np.asarray(r, dtype=np.float64) for r in rows if r is not None and len(r)]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    values = pa.array(flat.astype(value_type.to_pandas_dtype()), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values,
                                    mask=pa.array([r is None for r in rows]))


def write_file(path: Path, ids, rows, *, id_type: pa.DataType = I64,
               value_type: pa.DataType = F32, row_group_rows: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array(list(ids), id_type),
                             "embedding": emb_array(list(rows), value_type)}),
                   path, row_group_size=row_group_rows)
    return path


def as_rows(x: np.ndarray) -> list:
    return [list(map(float, r)) for r in x]


def committed(root: str, res) -> tuple[pa.Table, pa.Table]:
    """The version's data and rejects, after checking that every count reconciles."""
    store = TableStore(root, "sids")
    rows = store.manifest(res.version_id)["rows"]
    assert rows["input"] == rows["encoded"] + rows["rejected"]
    assert res.metrics["rows"] == rows
    data = store.read_data(res.version_id)
    rejects = store.read_data(res.version_id, kind="rejects")
    assert data.num_rows == rows["encoded"] and rejects.num_rows == rows["rejected"]
    if rejects.num_rows:
        assert rejects.column_names == ["item_id", "source_file", "row", "reason"]
    return data, rejects.sort_by([("source_file", "ascending"), ("row", "ascending")]) \
        if rejects.num_rows else rejects


def nothing_committed(root: str) -> bool:
    """No version exists for readers: no `_latest`, no manifest anywhere under the root."""
    if not Path(root).exists():
        return True
    return TableStore(root, "sids").latest() is None and not list(
        Path(root).rglob("_manifest.json"))


def codes_by_id(data: pa.Table) -> pa.Table:
    return data.select(["item_id", "codes", "sid", "suffix", "qerr"]).sort_by("item_id")


@pytest.fixture()
def root(tmp_path) -> str:
    return str(tmp_path / "out")


# -- NaN / +Inf / -Inf --------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "+inf", "-inf"])
def test_non_finite_values_are_rejected_with_a_reason(tmp_path, root, value):
    x = base_x()
    bad = [0, 17, 250, 599]  # first row, inside, another shard, last row
    for i in bad:
        x[i, i % D] = value
    path = write_file(tmp_path / "cat" / "part-0.parquet", range(N), as_rows(x))
    data, rej = committed(root, build(cfg(str(path.parent), root), log=quiet))
    assert rej.column("row").to_pylist() == bad
    assert rej.column("item_id").to_pylist() == [str(i) for i in bad]
    assert set(rej.column("reason").to_pylist()) == {NON_FINITE}
    assert set(rej.column("source_file").to_pylist()) == {str(path)}
    assert data.num_rows == N - len(bad)
    assert set(data.column("item_id").to_pylist()).isdisjoint(bad)
    # on_bad_rows=fail: the same catalog fails, naming the reason; nothing is committed
    other = str(tmp_path / "fail")
    with pytest.raises(InputError, match=r"4 bad rows \(4 non-finite.*on_bad_rows=reject"):
        build(cfg(str(path.parent), other, input__on_bad_rows="fail"), log=quiet)
    assert nothing_committed(other)


def test_values_float32_cannot_square_and_nulls_inside_are_rejected(tmp_path, root):
    """Finite embeddings whose float32 squared norm overflows (scaled by 1e20) or underflows
    (scaled by 1e-30) are rejected with their own reasons, so the fit and metrics.json stay
    finite; a null element inside an embedding is rejected as such, not as NaN."""
    x = base_x()
    rows = as_rows(x)
    rows[17] = as_rows(x[17:18] * 1e20)[0]
    rows[250] = as_rows(x[250:251] * 1e-30)[0]
    rows[420][2] = None  # a null element (emb_array would make it NaN)
    path = tmp_path / "cat" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(range(N), I64),
                             "embedding": pa.array(rows, pa.list_(F32))}), path)
    res = build(cfg(str(path.parent), root), log=quiet)
    data, rej = committed(root, res)
    assert rej.column("row").to_pylist() == [17, 250, 420]
    assert rej.column("reason").to_pylist() == [
        "embedding too large for float32 arithmetic (squared norm over 8.5e+37)",
        "embedding too small for float32 arithmetic (squared norm under 1.2e-38)",
        "null values inside embedding"]
    metrics = TableStore(root, "sids").read_bytes(res.version_id, "metrics.json").decode()
    json.loads(metrics, parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))
    assert 0 < res.metrics["reconstruction"]["relative_error"] < 1


def test_over_max_reject_fraction_fails_and_commits_nothing(tmp_path, root):
    x = base_x()
    x[::10, 0] = np.nan  # 10% of the rows
    cat = write_catalog(tmp_path / "cat", x)
    with pytest.raises(InputError, match=r"60 of 600 rows rejected \(10\.00%: 60 non-finite.*"
                                         r"max_reject_fraction=0\.05; nothing was committed"):
        build(cfg(cat, root, input__max_reject_fraction=0.05), log=quiet)
    assert nothing_committed(root)
    res = build(cfg(cat, root, input__max_reject_fraction=0.1), log=quiet)  # at the limit: ok
    data, rej = committed(root, res)
    assert (data.num_rows, rej.num_rows) == (540, 60)


# -- all-zero vectors ---------------------------------------------------------------------

def test_all_zero_vectors_are_kept_or_rejected_by_policy(tmp_path, root):
    x = base_x()
    zero = [3, 222, 480]
    x[zero] = 0.0
    cat = write_catalog(tmp_path / "cat", x)
    kept, rej = committed(root, build(cfg(cat, root), log=quiet))  # default: keep
    assert kept.num_rows == N and rej.num_rows == 0
    root2 = str(tmp_path / "reject")
    res = build(cfg(cat, root2, input__on_zero_vector="reject"), log=quiet)
    data, rej = committed(root2, res)
    assert rej.column("row").to_pylist() == zero
    assert set(rej.column("reason").to_pylist()) == {"all-zero embedding"}
    # identical to a catalog that never had those rows
    keep = np.setdiff1d(np.arange(N), zero)
    clean = write_catalog(tmp_path / "clean", x[keep], ids=keep.astype(np.int64))
    root3 = str(tmp_path / "clean_out")
    ref, _ = committed(root3, build(cfg(clean, root3), log=quiet))
    assert codes_by_id(data).equals(codes_by_id(ref))


# -- wrong dimension, null embedding, null item id -----------------------------------------

def test_wrong_dimension_is_rejected_even_on_the_first_row(tmp_path, root):
    rows = as_rows(base_x())
    rows[0] = rows[0][:4]  # the first row must not decide the dimension
    rows[9] = rows[9] + [1.0, 2.0]
    rows[300] = []
    path = write_file(tmp_path / "cat" / "p.parquet", range(N), rows)
    res = build(cfg(str(path.parent), root), log=quiet)
    data, rej = committed(root, res)
    assert res.manifest["input"]["dim"] == D
    assert rej.column("row").to_pylist() == [0, 9, 300]
    assert rej.column("reason").to_pylist() == ["embedding dim 4 != 6", "embedding dim 8 != 6",
                                                "embedding dim 0 != 6"]


def test_the_first_shard_holding_embeddings_decides_the_dimension(tmp_path, root):
    """A file without rows decides nothing, whatever its type says (a 0-row
    fixed_size_list[4] file first, list<float> rows of 6 after it: the dimension is 6; it was
    4, and every row failed the fit as bad); a first shard of other-length rows decides, and
    the error of the rows it rejects says how the dimension was decided."""
    from semid_dist.io.validate import DIMENSION_RULE

    x = as_rows(base_x())
    d = tmp_path / "cat"
    d.mkdir()
    pq.write_table(pa.table({"item_id": pa.array([], I64), "embedding": pa.array(
        [], pa.list_(F32, 4))}), d / "a-empty.parquet")
    write_file(d / "b.parquet", range(N), x)
    res = build(cfg(str(d), root), log=quiet)
    data, rej = committed(root, res)
    assert res.manifest["input"]["dim"] == D and data.num_rows == N and rej.num_rows == 0
    short = tmp_path / "short"
    write_file(short / "a.parquet", range(N, N + 20), [r[:4] for r in x[:20]])
    write_file(short / "b.parquet", range(N), x)
    with pytest.raises(InputError, match=r"^600 of 620 rows rejected \(96\.77%: 600 embedding "
                                         rf"dim 6 != 4\) .* \({re.escape(DIMENSION_RULE)}\)$"):
        build(cfg(str(short), str(tmp_path / "out-short")), log=quiet)


def test_null_embedding_and_null_item_id_are_rejected(tmp_path, root):
    rows = as_rows(base_x())
    ids: list = list(range(N))
    rows[5] = None
    rows[401] = None
    ids[6] = None
    ids[402] = None
    rows[402] = None  # both null: one reject row, for the id
    path = write_file(tmp_path / "cat" / "p.parquet", ids, rows)
    data, rej = committed(root, build(cfg(str(path.parent), root), log=quiet))
    assert rej.column("row").to_pylist() == [5, 6, 401, 402]
    assert rej.column("reason").to_pylist() == ["null embedding", "null item_id",
                                                "null embedding", "null item_id"]
    assert rej.column("item_id").to_pylist() == ["5", None, "401", None]
    assert data.column("item_id").null_count == 0 and data.num_rows == N - 4


def test_a_file_whose_embedding_column_is_of_type_null_is_rejected_rows(tmp_path, root):
    """A writer gives a column whose every value is null Arrow's type null (pandas' None,
    say): that file's rows are null embeddings, rejected, not a stopped build; the other
    files decide the dimension (the null-typed file comes first in the catalog's order),
    and their rows get the SIDs of a catalog without that file. Every file null-typed:
    an error saying there is no embedding."""
    x = as_rows(base_x())
    cat, ref = tmp_path / "cat", tmp_path / "ref"
    write_file(ref / "b.parquet", range(N), x)
    shutil.copytree(ref, cat)
    pq.write_table(pa.table({"item_id": pa.array([N, N + 1, N + 2], I64),
                             "embedding": pa.nulls(3)}), cat / "a.parquet")
    data, rej = committed(root, build(cfg(str(cat), root), log=quiet))
    assert rej.column("reason").to_pylist() == ["null embedding"] * 3
    assert rej.column("item_id").to_pylist() == [str(N), str(N + 1), str(N + 2)]
    assert all(f.endswith("a.parquet") for f in rej.column("source_file").to_pylist())
    want, _ = committed(str(tmp_path / "out-ref"),
                        build(cfg(str(ref), str(tmp_path / "out-ref")), log=quiet))
    assert codes_by_id(data).equals(codes_by_id(want))
    only_null = tmp_path / "only-null"
    only_null.mkdir()
    shutil.copy(cat / "a.parquet", only_null / "a.parquet")
    with pytest.raises(InputError, match="holds no non-null embedding"):
        build(cfg(str(only_null), str(tmp_path / "out-null")), log=quiet)
    assert nothing_committed(str(tmp_path / "out-null"))


# -- duplicate item ids: reject | keep_first | fail ---------------------------------------

def dup_catalog(tmp_path: Path) -> tuple[str, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Two files of 300 rows; ids repeat inside a file, across files and across shards.
    Returns (dir, x (600, D), ids (600,), [(global row of a later copy, of its first)])."""
    x = base_x()
    ids = np.arange(N, dtype=np.int64)
    copies = {10: [150], 20: [21, 350, 599], 320: [330, 480], 5: [300]}  # first -> later
    later = []
    for first, rest in copies.items():
        for r in rest:
            ids[r] = ids[first]
            later.append((r, first))
    d = tmp_path / "dups"
    for f in range(2):
        lo = f * 300
        write_file(d / f"part-{f}.parquet", ids[lo:lo + 300], as_rows(x[lo:lo + 300]))
    return str(d), x, ids, sorted(later)


def test_duplicates_reject_every_copy_by_default(tmp_path, root):
    cat, x, ids, later = dup_catalog(tmp_path)
    data, rej = committed(root, build(cfg(cat, root), log=quiet))
    dup_ids = {int(ids[r]) for r, _ in later}
    copies = np.flatnonzero(np.isin(ids, list(dup_ids)))
    assert rej.num_rows == len(copies) == 11
    assert set(rej.column("reason").to_pylist()) == {"duplicate item_id"}
    assert set(data.column("item_id").to_pylist()).isdisjoint(dup_ids)
    keep = np.setdiff1d(np.arange(N), copies)
    clean = write_catalog(tmp_path / "clean", x[keep], ids=ids[keep])
    root2 = str(tmp_path / "clean_out")
    ref, _ = committed(root2, build(cfg(clean, root2), log=quiet))
    assert codes_by_id(data).equals(codes_by_id(ref))
    # more ids than driver.gather_rows: checked by tasks in hash buckets, the same version
    logs: list[str] = []
    root3 = str(tmp_path / "bucketed")
    bucketed, rej3 = committed(root3, build(cfg(cat, root3, driver__gather_rows=100),
                                            log=logs.append))
    assert any("checking 600 ids for duplicates in 6 hash buckets" in m for m in logs)
    assert codes_by_id(bucketed).equals(codes_by_id(data)) and rej3.equals(rej)


def test_duplicates_keep_first_keeps_the_first_file_row_copy(tmp_path, root):
    cat, x, ids, later = dup_catalog(tmp_path)
    res = build(cfg(cat, root, input__on_duplicate="keep_first"), log=quiet)
    data, rej = committed(root, res)
    files = sorted(str(p) for p in Path(cat).glob("*.parquet"))

    def where(r: int) -> tuple[str, int]:
        return files[r // 300], r % 300

    assert [(f, r) for f, r in zip(rej.column("source_file").to_pylist(),
                                   rej.column("row").to_pylist())] == [where(r) for r, _ in later]
    want = [f"duplicate item_id (first at {where(first)[0]}:{where(first)[1]})"
            for _, first in later]
    assert rej.column("reason").to_pylist() == want
    assert rej.column("item_id").to_pylist() == [str(ids[r]) for r, _ in later]
    assert sorted(data.column("item_id").to_pylist()) == sorted(set(ids.tolist()))
    # identical to the catalog deduplicated by hand, keeping each id's first row
    keep = np.setdiff1d(np.arange(N), [r for r, _ in later])
    clean = write_catalog(tmp_path / "clean", x[keep], ids=ids[keep])
    root2 = str(tmp_path / "clean_out")
    ref, _ = committed(root2, build(cfg(clean, root2), log=quiet))
    assert codes_by_id(data).equals(codes_by_id(ref))
    # deterministic: another shard size, same table
    root3 = str(tmp_path / "again")
    res3 = build(cfg(cat, root3, input__on_duplicate="keep_first", encode__shard_rows=100),
                 log=quiet)
    again, rej3 = committed(root3, res3)
    assert codes_by_id(again).equals(codes_by_id(data)) and rej3.equals(rej)
    # ids checked by tasks in 6 hash buckets (split tasks of one 100-row shard or two)
    for gather in (100, 250):
        root4 = str(tmp_path / f"bucketed-{gather}")
        res4 = build(cfg(cat, root4, input__on_duplicate="keep_first", encode__shard_rows=100,
                         driver__gather_rows=gather), log=quiet)
        bucketed, rej4 = committed(root4, res4)
        assert codes_by_id(bucketed).equals(codes_by_id(data)) and rej4.equals(rej)


def test_small_files_are_packed_whole_into_shards_and_large_ones_cut_by_row_groups(tmp_path):
    """Shards of 100 rows over files of 30, 45 (row groups of 20), 250 (of 100), 5, 60, 0 and
    50 rows: the small files whole, in order, at most 100 rows a shard (closed before a file
    that would pass it, or before a large file); the large one in its row groups as ever.
    Each shard reads its pieces' rows, and names a row inside it by file and row there."""
    d = tmp_path / "cat"
    sizes = {"a": 30, "b": 45, "c": 250, "d": 5, "e": 60, "f": 0, "g": 50}
    start = 0
    for name, n in sizes.items():
        if n:
            write_file(d / f"{name}.parquet", range(start, start + n), as_rows(base_x()[:n]),
                       row_group_rows=20 if name == "b" else 100)
        else:
            pq.write_table(pq.read_table(d / "a.parquet").slice(0, 0), d / f"{name}.parquet")
        start += n
    plan = plan_catalog(str(d), target_rows=100)

    def piece(name: str, groups: tuple, offset: int, rows: int) -> Piece:
        return Piece(str(d / f"{name}.parquet"), groups, offset, rows)

    assert [s.pieces for s in plan.shards] == [
        (piece("a", (0,), 0, 30), piece("b", (0, 1, 2), 0, 45)),
        (piece("c", (0,), 0, 100),), (piece("c", (1,), 100, 100),), (piece("c", (2,), 200, 50),),
        (piece("d", (0,), 0, 5), piece("e", (0,), 0, 60)), (piece("g", (0,), 0, 50),)]
    assert [s.index for s in plan.shards] == list(range(6)) and plan.num_rows == 440
    ids = [t.column("item_id").to_pylist() for s in plan.shards
           for t in read_shard(str(d), s, ["item_id"])]
    assert sum(ids, []) == list(range(440))
    at, file_rows = plan.shards[4].locate(np.array([0, 4, 5, 64]))
    assert at.tolist() == [0, 0, 1, 1] and file_rows.tolist() == [0, 4, 0, 59]
    assert all(shard_from_dict(json.loads(json.dumps(shard_to_dict(s)))) == s
               for s in plan.shards)


def test_the_plan_says_how_many_footers_it_has_read_while_it_reads_them(tmp_path,
                                                                        monkeypatch):
    """A line every PLAN_LINE_S while the footers are read (0 here: one per file, counted in
    order); none in a plan that takes less; the plan is the same either way."""
    from semid_dist.io import catalog

    d = tmp_path / "cat"
    for f in range(3):
        write_file(d / f"part-{f}.parquet", range(10 * f, 10 * f + 10), as_rows(base_x()[:10]))
    lines: list[str] = []
    quick = plan_catalog(str(d), target_rows=100, log=lines.append)
    assert lines == []
    monkeypatch.setattr(catalog, "PLAN_LINE_S", 0.0)
    assert plan_catalog(str(d), target_rows=100, log=lines.append) == quick
    assert [re.sub(r"\(\d+ s\)$", "(T)", line) for line in lines] == [
        f"plan: read the footers of {i} of 3 catalog files (T)" for i in (1, 2, 3)]


def test_files_numbered_without_leading_zeros_get_a_warning_naming_two_of_them(tmp_path):
    """part-10 sorts before part-2: the rows follow the path order, which a user who numbered
    the files did not mean; the build and its dry run say so, naming two files in that
    order. Padded numbers, and Spark's names (one part number, other job ids), do not."""
    from semid_dist.io.catalog import numbers_out_of_order

    assert numbers_out_of_order(["/c/part-0.parquet", "/c/part-1.parquet",
                                 "/c/part-10.parquet", "/c/part-2.parquet"]) == (
        "/c/part-10.parquet", "/c/part-2.parquet")
    assert numbers_out_of_order(["/c/d=2024-1-10/a.parquet", "/c/d=2024-1-9/a.parquet"]) == (
        "/c/d=2024-1-10/a.parquet", "/c/d=2024-1-9/a.parquet")
    assert numbers_out_of_order([f"/c/part-{i:02d}.parquet" for i in range(12)]) is None
    spark = ["part-00000-1b6f9e0c-52d4-4a8e-9d37-0e8f4c2a7b15-c000.snappy.parquet",
             "part-00000-9a0c3d72-e1f8-4b65-8c24-7d5e2f1a9b03-c000.snappy.parquet",
             "part-00001-1b6f9e0c-52d4-4a8e-9d37-0e8f4c2a7b15-c000.snappy.parquet"]
    assert numbers_out_of_order(f"/c/{name}" for name in spark) is None
    d = tmp_path / "cat"
    x = as_rows(base_x())
    for f in range(12):
        write_file(d / f"part-{f}.parquet", range(50 * f, 50 * f + 50), x[50 * f:50 * f + 50])
    want = (f"warning: the catalog's files are read in path order, which puts "
            f"{d / 'part-11.parquet'} before {d / 'part-2.parquet'} (numbers without leading "
            "zeros)")
    lines: list[str] = []
    dry_run(cfg(str(d), str(tmp_path / "out")), log=lines.append)
    assert sum(line.startswith(want) for line in lines) == 1, lines
    lines.clear()
    build(cfg(str(d), str(tmp_path / "out")), log=lines.append)
    assert sum(line.startswith(want) for line in lines) == 1, lines
    padded = tmp_path / "padded"
    padded.mkdir()
    for f in range(12):
        shutil.copy(d / f"part-{f}.parquet", padded / f"part-{f:02d}.parquet")
    lines.clear()
    dry_run(cfg(str(padded), str(tmp_path / "out-padded")), log=lines.append)
    assert not any("leading zeros" in line for line in lines), lines


def test_the_sample_reads_only_the_files_of_a_shard_it_draws_rows_from(tmp_path):
    """A shard of 10 small files, rows drawn from the 2nd and 7th: the sample reads those
    two (the others may even be unreadable) and gives their rows' embeddings; a drawn row
    of a bad embedding is counted rejected."""
    d = tmp_path / "cat"
    x = base_x()[:100]
    rows = as_rows(x)
    rows[63][0] = float("nan")
    for f in range(10):
        write_file(d / f"part-{f}.parquet", range(10 * f, 10 * f + 10), rows[10 * f:10 * f + 10])
    shard, = plan_catalog(str(d), target_rows=100).shards
    for f in (0, 4, 9):
        (d / f"part-{f}.parquet").write_bytes(b"PAR1 not a Parquet file PAR1")
    ctx = JobContext(catalog_url=str(d), id_column="item_id", embedding_column="embedding",
                     popularity_column=None, dim=D, sizes=tuple(LAYERS), root=str(tmp_path),
                     table="sids", version_id="v", quality_depth=2)
    got, pop, rejected = sample_rows(ctx, shard, np.array([12, 15, 61, 63, 69]))
    np.testing.assert_array_equal(got, x[[12, 15, 61, 69]])
    assert pop is None and rejected == {NON_FINITE: 1}
    with pytest.raises(InputError, match=r"part-4\.parquet"):
        sample_rows(ctx, shard, np.array([12, 45]))
    # files 1 to 3 read as one table: the drawn rows of each, the NaN of the 3rd rejected
    rows[33][1] = float("nan")
    write_file(d / "part-3.parquet", range(30, 40), rows[30:40])
    got, _, rejected = sample_rows(ctx, shard, np.array([10, 19, 25, 33, 38]))
    np.testing.assert_array_equal(got, x[[10, 19, 25, 38]])
    assert rejected == {NON_FINITE: 1}


def test_the_plan_keeps_the_files_order_and_names_the_first_bad_file(tmp_path):
    """150 files of 1 to 7 rows plan in path order, each file's rows and row groups its own;
    of two bad files, the first in path order is the one named (on an object store the
    footers are read 16 at once: tests/test_s3.py)."""
    d = tmp_path / "cat"
    sizes = [1 + (i * 5) % 7 for i in range(150)]
    start = 0
    for i, n in enumerate(sizes):
        write_file(d / f"part-{i:03d}.parquet", range(start, start + n), as_rows(base_x()[:n]),
                   row_group_rows=1 + i % 3)
        start += n
    plan = plan_catalog(str(d), target_rows=20)
    pieces = [p for s in plan.shards for p in s.pieces]
    assert [p.path for p in pieces] == [str(d / f"part-{i:03d}.parquet") for i in range(150)]
    assert [p.num_rows for p in pieces] == sizes
    assert [len(p.row_groups) for p in pieces] == [-(-n // (1 + i % 3))
                                                   for i, n in enumerate(sizes)]
    assert all(s.num_rows <= 20 for s in plan.shards) and plan.num_rows == sum(sizes)
    (d / "part-120.parquet").write_bytes(b"not parquet")  # read first: it is small, and late
    (d / "part-100.parquet").write_bytes(b"PAR1" + b"x" * 5000 + b"PAR1")
    with pytest.raises(InputError, match=r"catalog file '[^']*part-100\.parquet' is not "
                                         "readable Parquet"):
        plan_catalog(str(d), target_rows=20)


def test_a_tar_archives_catalog_plans_as_its_folder_does(tmp_path):
    """A catalog inside a tar archive (`tar://cat::file:///x.tar`) is read one footer at a
    time: the archive's one file position, shared by reads in threads, gave each other's
    bytes ('not readable Parquet' for good files)."""
    import tarfile

    d = tmp_path / "cat"
    for i in range(120):
        write_file(d / f"part-{i:03d}.parquet", range(5 * i, 5 * i + 5), as_rows(base_x()[:5]))
    with tarfile.open(tmp_path / "cat.tar", "w") as tar:
        tar.add(d, arcname="cat")
    plan = plan_catalog(f"tar://cat::file://{tmp_path}/cat.tar", target_rows=50)
    mine = plan_catalog(str(d), target_rows=50)
    assert [[(p.path.rsplit("/", 1)[1], p.num_rows) for p in s.pieces] for s in plan.shards] \
        == [[(p.path.rsplit("/", 1)[1], p.num_rows) for p in s.pieces] for s in mine.shards]
    assert plan.num_rows == 600


def test_a_catalog_of_small_files_is_encoded_in_shards_of_several_files(tmp_path, root):
    """40 files of 15 rows, shards of 200 rows: 4 shards of whole files (13, 13, 13 and 1)
    and 4 table parts, not 40. Rejects and the first copies of duplicates are named by their
    file and row there; the SIDs are those of the same rows in two files."""
    cat, x, ids, later = dup_catalog(tmp_path)
    rows = as_rows(x)
    rows[40][2], rows[229] = float("nan"), None  # the 3rd file's 10th row; the 16th's 4th
    small = tmp_path / "small"
    for f in range(40):
        write_file(small / f"part-{f:03d}.parquet", ids[15 * f:15 * f + 15],
                   rows[15 * f:15 * f + 15], row_group_rows=10)
    write_file(Path(cat) / "part-0.parquet", ids[:300], rows[:300])  # the same rows
    logs: list[str] = []
    res = build(cfg(str(small), root, input__on_duplicate="keep_first"), log=logs.append)
    data, rej = committed(root, res)
    assert any(m.startswith("plan: 600 rows in 4 shards") for m in logs), logs
    assert len(TableStore(root, "sids").part_paths(res.version_id)) == 4

    def where(r: int) -> tuple[str, int]:
        return str(small / f"part-{r // 15:03d}.parquet"), r % 15

    bad = {40: NON_FINITE, 229: "null embedding"}
    bad.update({r: f"duplicate item_id (first at {where(first)[0]}:{where(first)[1]})"
                for r, first in later})
    want = sorted((*where(r), reason) for r, reason in bad.items())
    assert list(zip(rej.column("source_file").to_pylist(), rej.column("row").to_pylist(),
                    rej.column("reason").to_pylist())) == want
    root2 = str(tmp_path / "two_files")
    ref, rej2 = committed(root2, build(cfg(cat, root2, input__on_duplicate="keep_first"),
                                       log=quiet))
    assert rej2.num_rows == len(want) and codes_by_id(data).equals(codes_by_id(ref))


def test_duplicates_fail_policy_and_on_bad_rows_fail(tmp_path, root):
    cat, *_ = dup_catalog(tmp_path)
    with pytest.raises(InputError, match=r"4 item ids occur more than once \(11 rows; e\.g\. "
                                         r".*input\.on_duplicate=keep_first") as exc:
        build(cfg(cat, root, input__on_duplicate="fail"), log=quiet)
    for i in ("10", "20", "320", "5"):
        assert i in str(exc.value)
    with pytest.raises(InputError) as bucketed:  # checked in hash buckets: the same error
        build(cfg(cat, root, input__on_duplicate="fail", driver__gather_rows=100), log=quiet)
    assert str(bucketed.value) == str(exc.value)
    for policy in ("reject", "keep_first"):  # any rejected row fails under on_bad_rows=fail
        with pytest.raises(InputError, match="occur more than once.*on_bad_rows=fail"):
            build(cfg(cat, root, input__on_duplicate=policy, input__on_bad_rows="fail"),
                  log=quiet)
    assert nothing_committed(root)


@pytest.mark.parametrize("bad", [float("nan"), -2.0, float("inf")])
def test_popularity_that_is_nan_infinite_or_negative_is_a_clear_error(tmp_path, root, bad):
    """The head / tail split is by share of total popularity: a NaN, infinite or negative
    value fails the build, naming the column, the count and the first bad file and row,
    whether the driver or hash-bucket tasks check the ids. Nulls count as 0."""
    x = base_x()
    pop = np.arange(N, dtype=np.float64) % 13
    pop[[337, 412]] = bad
    d = tmp_path / "pop"
    d.mkdir()
    for f in range(2):
        lo = f * 300
        popularity = pa.array(pop[lo:lo + 300].tolist(), pa.float64())
        if f == 0:  # a null: counts as 0, not an error
            popularity = pa.array([None] + pop[1:300].tolist(), pa.float64())
        pq.write_table(pa.table({"item_id": pa.array(np.arange(lo, lo + 300)),
                                 "embedding": emb_array(as_rows(x[lo:lo + 300])),
                                 "popularity": popularity}), d / f"part-{f}.parquet")
    want = (rf"input\.popularity_column='popularity' holds 2 NaN, infinite or negative values "
            rf"\(e\.g\. {bad!r} at .*part-1\.parquet:37\); popularity must be finite and >= 0 "
            r"\(nulls count as 0\): fix those rows, or unset input\.popularity_column")
    for gather in (10**6, 100):
        with pytest.raises(InputError, match=want):
            build(cfg(str(d), root, input__popularity_column="popularity",
                      driver__gather_rows=gather), log=quiet)
    assert nothing_committed(root)
    pop[[337, 412]] = 0.0  # the same catalog with valid popularity builds
    pq.write_table(pa.table({"item_id": pa.array(np.arange(300, 600)),
                             "embedding": emb_array(as_rows(x[300:])),
                             "popularity": pa.array(pop[300:])}), d / "part-1.parquet")
    res = build(cfg(str(d), root, input__popularity_column="popularity"), log=quiet)
    assert res.metrics["head"]["items"] + res.metrics["tail"]["items"] == N


def pop_catalog(tmp_path: Path, name: str, popularity: list[pa.Array]) -> Path:
    """Two files of 300 rows of base_x with these popularity columns."""
    x = base_x()
    d = tmp_path / name
    d.mkdir()
    for f, pop in enumerate(popularity):
        lo = f * 300
        pq.write_table(pa.table({"item_id": pa.array(np.arange(lo, lo + 300)),
                                 "embedding": emb_array(as_rows(x[lo:lo + 300])),
                                 "popularity": pop}), d / f"part-{f}.parquet")
    return d


def test_popularity_beyond_2_53_ranks_like_the_same_popularity_scaled_down(tmp_path, root):
    """Integer popularity above 2**53 (not exact in float64) builds: popularity only ranks
    items, so values k * 2**54 split head and tail like k."""
    pop = (np.arange(N) * 7 % 13).astype(np.int64)
    small = pop_catalog(tmp_path, "small", [pa.array(pop[:300]), pa.array(pop[300:])])
    huge = pop_catalog(tmp_path, "huge", [pa.array(pop[:300] << 54), pa.array(pop[300:] << 54)])
    ref = build(cfg(str(small), root, input__popularity_column="popularity"), log=quiet)
    res = build(cfg(str(huge), str(tmp_path / "out2"), input__popularity_column="popularity"),
                log=quiet)
    assert res.metrics["head"]["items"] == ref.metrics["head"]["items"] > 0
    assert res.metrics["tail"]["items"] == ref.metrics["tail"]["items"] > 0


@pytest.mark.parametrize("kind", ["not_a_number", "timestamp", "list"])
def test_popularity_of_an_unusable_type_is_a_named_error(tmp_path, root, kind):
    """Popularity Arrow cannot read as numbers fails before the fit, naming the key, the
    column, its type (and the file and the value, for a string that is not a number)."""
    good = pa.array(np.arange(300) % 7)
    if kind == "not_a_number":
        bad = [str(i) for i in range(300)]
        bad[37] = "abc"
        d = pop_catalog(tmp_path, kind, [pa.array([str(i) for i in range(300)]), pa.array(bad)])
        want = (rf"^input\.popularity_column='popularity': the column of {d}/part-1\.parquet "
                r"\(string\) holds values that are not numbers \(.*'abc'.*\); popularity must "
                r"be numeric: fix those values, or unset input\.popularity_column$")
    else:
        col_type = pa.timestamp("ms") if kind == "timestamp" else pa.list_(pa.int64())
        bad = good.cast(col_type) if kind == "timestamp" else pa.array(
            [[i] for i in range(300)], col_type)
        d = pop_catalog(tmp_path, kind, [bad, bad])
        read_as = "timestamp[ms]" if kind == "timestamp" else "list<element: int64>"
        want = (rf"^{d}/part-0\.parquet: column 'popularity' \(set by "
                rf"input\.popularity_column\) has type {re.escape(read_as)}, not a number; .*its "
                r"columns are \['item_id', 'embedding', 'popularity'\]: cast the column to a "
                r"number, or unset input\.popularity_column$")
    with pytest.raises(InputError, match=want):
        build(cfg(str(d), root, input__popularity_column="popularity"), log=quiet)
    assert nothing_committed(root)


@pytest.mark.parametrize("column", ["item_id", "embedding"])
def test_popularity_column_that_is_the_id_or_embedding_column_is_a_config_error(
        tmp_path, root, column):
    """input.popularity_column naming the id or the embedding column is a ConfigError (the
    scan read the ids as popularity), status 2 from the CLI; nothing is written."""
    d = two_files(tmp_path)
    key = "input.id_column" if column == "item_id" else "input.embedding_column"
    want = (f"input.popularity_column={column!r} names the same column as {key}; each needs a "
            "column of its own: set input.popularity_column to another column, or null for none")
    with pytest.raises(ConfigError) as exc:
        build(cfg(str(d), root, input__popularity_column=column), log=quiet)
    assert str(exc.value) == want
    assert nothing_committed(root)
    if column == "item_id":
        run = cli_build(REPO / "conf" / "demo.yaml", "engine=local", f"input.path={d}",
                        f"output.root={root}", f"input.popularity_column={column}", timeout=120)
        # found as the config is read (`semid validate` finds it too), so named with its
        # file and the override that set it
        conf = REPO / "conf" / "demo.yaml"
        assert named_error(run) == (f"semid build: error: {conf} with override "
                                    f"input.popularity_column={column}: {want}")
        assert nothing_committed(root)


def brute_first_copies(id_lists: list[list], shards: list[Shard]) -> dict[int, list]:
    seen: dict = {}
    out: dict[int, list] = {}
    for shard, ids in zip(shards, id_lists):
        where = [(p.path, p.row_offset + r) for p in shard.pieces for r in range(p.num_rows)]
        for off, v in enumerate(ids):
            if v is None:
                continue
            if v in seen:
                path, row = seen[v]
                out.setdefault(shard.index, []).append(
                    (off, f"duplicate item_id (first at {path}:{row})"))
            else:
                seen[v] = where[off]
    return out


@pytest.mark.parametrize("kind", ["int", "str"])
def test_first_copy_rejects_matches_a_brute_force_scan(kind):
    """The first copies are named by file and row there, also in shards of several files."""
    rng = np.random.default_rng(3)
    layout = [[(0, 0)], [(0, 7)], [(0, 30), (1, 1)], [(2, 0)], [(2, 25), (3, 4), (4, 12)],
              [(4, 12)]]  # a shard's pieces: (file, rows)
    shards, id_lists, file_rows = [], [], Counter()
    for i, pieces in enumerate(layout):
        parts = []
        for f, n in pieces:
            parts.append(Piece(f"cat/part-{f}.parquet", (0,), file_rows[f], n))
            file_rows[f] += n
        n = sum(p.num_rows for p in parts)
        vals = rng.integers(0, 40, n).tolist()
        vals = [None if rng.random() < 0.1 else (v if kind == "int" else f"k{v}") for v in vals]
        shards.append(Shard(i, tuple(parts)))
        id_lists.append(vals)
    arrays = [pa.array(v, pa.int64() if kind == "int" else pa.string()) for v in id_lists]
    dups, rows = find_duplicates(arrays)
    seen = Counter(v for vals in id_lists for v in vals if v is not None)
    assert dups.to_pylist() == sorted(v for v, c in seen.items() if c > 1)
    assert rows == sum(c for c in seen.values() if c > 1)
    got = first_copy_rejects(arrays, shards, dups)
    want = brute_first_copies(id_lists, shards)
    assert sorted(got) == sorted(want)
    for idx, t in got.items():
        assert list(zip(t.column("offset").to_pylist(), t.column("reason").to_pylist())) \
            == want[idx]


def test_float64_values_under_float32s_range_are_too_small_not_zero(tmp_path, root):
    """A float64 embedding of values near 1e-60 is all zero once cast to float32: it is
    rejected as too small (it was encoded as a zero vector, every such row in one SID), under
    either input.on_zero_vector; a row of true zeros stays a zero vector."""
    x = base_x().astype(np.float64)
    x[[30, 31, 310]] *= 1e-60
    x[77] = 0.0
    path = write_file(tmp_path / "cat" / "p.parquet", range(N), as_rows(x),
                      value_type=pa.float64())
    too_small = "embedding too small for float32 arithmetic (squared norm under 1.2e-38)"
    for policy, zero in (("keep", []), ("reject", [(77, "all-zero embedding")])):
        out = f"{root}-{policy}"
        data, rej = committed(out, build(cfg(str(path.parent), out,
                                             input__on_zero_vector=policy), log=quiet))
        want = sorted([(30, too_small), (31, too_small), (310, too_small)] + zero)
        assert list(zip(rej.column("row").to_pylist(), rej.column("reason").to_pylist())) == want
        assert data.num_rows == N - len(want)


def test_integer_embeddings_beyond_2_24_round_to_float32(tmp_path, root):
    """int64 and int32 embeddings whose values float32 cannot hold exactly (above 2**24)
    round to the nearest float32, as float64 values do (the cast refused them: a traceback):
    the codes are those of the float32 catalog of the rounded values."""
    x = base_x(seed=11)
    big = np.round(x * 2.0**40).astype(np.int64) + 1  # odd: no float32 holds them
    ref_path = write_file(tmp_path / "f32" / "p.parquet", range(N), as_rows(big.astype(np.float32)))
    ref_root = str(tmp_path / "f32_out")
    ref, _ = committed(ref_root, build(cfg(str(ref_path.parent), ref_root), log=quiet))
    assert np.abs(big).max() > 2**24 and not np.array_equal(big.astype(np.float32), big)
    path = tmp_path / "i64" / "p.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(range(N), I64),
                             "embedding": pa.array(list(big), pa.list_(pa.int64()))}), path)
    data, rej = committed(root, build(cfg(str(path.parent), root), log=quiet))
    assert rej.num_rows == 0 and codes_by_id(data).equals(codes_by_id(ref))
    small = np.round(x * 2.0**22).astype(np.int32)  # int32: one value past 2**24
    small[3, 0] = 2**24 + 1
    path32 = write_file(tmp_path / "i32" / "p.parquet", range(N), as_rows(small),
                        value_type=pa.int32())
    root32 = str(tmp_path / "i32_out")
    data32, rej32 = committed(root32, build(cfg(str(path32.parent), root32), log=quiet))
    assert rej32.num_rows == 0 and data32.num_rows == N


# -- embedding value types, id types --------------------------------------------------------

@pytest.fixture(scope="module")
def integral(tmp_path_factory):
    """Integer-valued embeddings (exact in every value type) and the float32 reference."""
    x = np.round(base_x(seed=9) * 4).astype(np.float32)
    base = tmp_path_factory.mktemp("types")
    path = write_file(base / "f32" / "p.parquet", range(N), as_rows(x))
    root = str(base / "f32_out")
    data, _ = committed(root, build(cfg(str(path.parent), root), log=quiet))
    return x, base, codes_by_id(data)


@pytest.mark.parametrize("value_type", [pa.float64(), pa.float16(), pa.int32(), pa.int8()],
                         ids=str)
def test_other_embedding_types_are_cast_and_give_the_float32_codes(integral, value_type):
    x, base, ref = integral
    name = str(value_type)
    path = write_file(base / name / "p.parquet", range(N), as_rows(x), value_type=value_type)
    root = str(base / f"{name}_out")
    data, rej = committed(root, build(cfg(str(path.parent), root), log=quiet))
    assert rej.num_rows == 0
    assert codes_by_id(data).equals(ref)


def test_string_ids_work_end_to_end(tmp_path, root):
    x = base_x()
    ids: list = [f"sku-{i:05d}" for i in range(N)]
    ids[7] = None
    ids[100] = ids[40]  # a duplicate string id
    path = write_file(tmp_path / "cat" / "p.parquet", ids, as_rows(x), id_type=pa.string())
    res = build(cfg(str(path.parent), root, input__on_duplicate="keep_first"), log=quiet)
    data, rej = committed(root, res)
    assert data.schema.field("item_id").type == pa.string()
    assert rej.column("item_id").to_pylist() == [None, "sku-00040"]
    assert rej.column("reason").to_pylist() == [
        "null item_id", f"duplicate item_id (first at {path}:40)"]
    assert data.num_rows == N - 2 and len(set(data.column("item_id").to_pylist())) == N - 2
    again = build(cfg(str(path.parent), root, input__on_duplicate="keep_first",
                      encode__from_version="latest"), log=quiet)
    data2, _ = committed(root, again)
    assert codes_by_id(data2).equals(codes_by_id(data))
    # string ids (one null) checked by tasks in hash buckets: the same rejects; with 300
    # buckets of 2 ids many hold no duplicate, or no id at all
    for gather in (100, 2):
        root2 = str(tmp_path / f"bucketed-{gather}")
        res3 = build(cfg(str(path.parent), root2, input__on_duplicate="keep_first",
                         driver__gather_rows=gather), log=quiet)
        data3, rej3 = committed(root2, res3)
        assert rej3.equals(rej) and codes_by_id(data3).equals(codes_by_id(data))


def test_dictionary_encoded_and_string_view_ids_are_string_ids(tmp_path, root):
    """String ids stored dictionary-encoded (pandas' categoricals) or as string_view build
    like plain strings, mixed in one catalog; other id types stay an error naming the key
    and the columns there are."""
    x = base_x()
    d = tmp_path / "ids"
    d.mkdir()
    names = [f"sku-{i:05d}" for i in range(N)]
    for f, ids in enumerate((pa.array(names[:300]).dictionary_encode(),
                             pa.array(names[300:], pa.string_view()))):
        pq.write_table(pa.table({"item_id": ids, "embedding": emb_array(
            as_rows(x[f * 300:(f + 1) * 300]))}), d / f"part-{f}.parquet")
    data, rej = committed(root, build(cfg(str(d), root), log=quiet))
    assert data.schema.field("item_id").type == pa.string() and rej.num_rows == 0
    assert sorted(data.column("item_id").to_pylist()) == names
    path = write_file(tmp_path / "bin" / "part-0.parquet", [b"a"] * N, as_rows(x),
                      id_type=pa.binary())
    with pytest.raises(InputError, match=rf"^{path}: column 'item_id' \(set by "
                                         r"input\.id_column\) has type binary; item ids must "
                                         r"be integers or strings .*; its columns are "
                                         r"\['item_id', 'embedding'\]: cast the column"):
        build(cfg(str(path.parent), str(tmp_path / "bin_out")), log=quiet)


def test_ids_that_are_not_utf8_or_do_not_fit_int64_name_their_file(tmp_path, root):
    """A string id of bytes that are not UTF-8 (pyarrow writes them unchecked) is an error
    naming the file (it was committed: a table no reader could take as strings); uint64 ids
    from 2**63 on do not fit int64: an error naming the file too."""
    x = as_rows(base_x())
    raw = [f"id-{i}".encode() for i in range(N)]
    raw[305] = b"\xff\xfe"  # in the second shard: its row in the file is named
    path = tmp_path / "utf8" / "p.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(raw, pa.binary()).view(pa.string()),
                             "embedding": emb_array(x)}), path, row_group_size=100)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: the item id at row 305 is "
                                         r"not valid UTF-8 \(b'\\xff\\xfe'\); write the ids as "
                                         r"UTF-8 strings$"):
        build(cfg(str(path.parent), root), log=quiet)
    assert nothing_committed(root)
    small = tmp_path / "utf8-small"  # 20 files of 30 rows, 6 to a shard: read as one table
    small.mkdir()
    for f in range(20):
        pq.write_table(pa.table({"item_id": pa.array(raw[30 * f:30 * f + 30], pa.binary())
                                 .view(pa.string()), "embedding": emb_array(x[30 * f:30 * f + 30])
                                 }), small / f"part-{f:02d}.parquet")
    with pytest.raises(InputError, match=rf"^{re.escape(str(small / 'part-10.parquet'))}: the "
                                         r"item id at row 5 is not valid UTF-8"):
        build(cfg(str(small), str(tmp_path / "small-out")), log=quiet)
    big = write_file(tmp_path / "u64" / "p.parquet", [2**63 + i for i in range(N)], x,
                     id_type=pa.uint64())
    with pytest.raises(InputError, match=rf"^{re.escape(str(big))}: item ids of type uint64 do "
                                         r"not fit int64 \(.*\); store the ids as strings"):
        build(cfg(str(big.parent), root), log=quiet)
    assert nothing_committed(root)


def test_mixing_integer_and_string_id_files_is_a_clear_error(tmp_path, root):
    x = base_x()
    d = tmp_path / "mixed"
    a = write_file(d / "part-0.parquet", range(300), as_rows(x[:300]))
    b = write_file(d / "part-1.parquet", [f"s{i}" for i in range(300, N)], as_rows(x[300:]),
                   id_type=pa.string())
    with pytest.raises(InputError, match="mix item id types") as exc:
        build(cfg(str(d), root), log=quiet)
    msg = str(exc.value)
    assert str(a) in msg and str(b) in msg and "int64" in msg and "string" in msg
    assert nothing_committed(root)


def test_int32_and_int64_id_files_mix_as_int64(tmp_path, root):
    x = base_x()
    d = tmp_path / "ints"
    write_file(d / "part-0.parquet", range(300), as_rows(x[:300]), id_type=pa.int32())
    write_file(d / "part-1.parquet", range(300, N), as_rows(x[300:]))
    data, _ = committed(root, build(cfg(str(d), root), log=quiet))
    assert data.schema.field("item_id").type == pa.int64()
    assert sorted(data.column("item_id").to_pylist()) == list(range(N))


# -- unreadable files, missing columns, empty catalogs ---------------------------------------

def two_files(tmp_path: Path) -> Path:
    return Path(write_catalog(tmp_path / "cat", base_x(), files=2))


@pytest.mark.parametrize("where", ["catalog", "inside", "symlink"])
def test_a_table_inside_its_catalog_is_a_config_error_before_anything_is_written(tmp_path,
                                                                               where):
    """output.root at input.path (or below it) put the table's files among the catalog's:
    the first build committed, the next read the table's Parquet files as catalog files (an
    error about the catalog's columns). Refused before any file is written, naming both
    keys (also through a symlink to the catalog); a catalog inside the table's folder, whose
    files are not the table's, builds."""
    d = two_files(tmp_path)
    roots = {"catalog": d, "inside": d / "out", "symlink": tmp_path / "link" / "out"}
    (tmp_path / "link").symlink_to(d)
    root = roots[where]
    before = sorted(p.name for p in d.rglob("*"))
    message = (r"output\.root=.* and output\.table=sids put the table at .*, inside "
               r"input\.path=.*: the next build would read the table's files as catalog "
               r"files; write the table outside the catalog")
    with pytest.raises(ConfigError, match=message):
        build(cfg(str(d), str(root)), log=quiet)
    assert sorted(p.name for p in d.rglob("*")) == before
    config = tmp_path / "inside.yaml"  # `semid validate` says so too, naming the file
    config.write_text(json.dumps(cfg(str(d), str(root)).to_dict()))
    checked = subprocess.run([sys.executable, "-m", "semid_dist.cli", "validate", str(config)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2 and not checked.stdout
    assert re.fullmatch(f"semid validate: error: {re.escape(str(config))}: {message}.*\n",
                        checked.stderr), checked.stderr
    hidden = d / "_semid"  # a folder of the catalog its scan skips: the table may go there
    data, _ = committed(str(hidden), build(cfg(str(d), str(hidden)), log=quiet))
    assert data.num_rows == N
    shutil.rmtree(hidden)
    table = tmp_path / "t"  # the catalog inside the table's folder: a build as any other
    shutil.copytree(d, table / "sids" / "catalog")
    data, _ = committed(str(table), build(cfg(str(table / "sids" / "catalog"), str(table)),
                                          log=quiet))
    assert data.num_rows == N


@pytest.mark.parametrize("key", ["input", "output"])
def test_a_url_of_no_file_system_fsspec_knows_is_a_config_error(tmp_path, key):
    """An unknown protocol in input.path or output.root: one line naming the key (it was
    fsspec's ValueError traceback), from the config's parse, so nothing is written; the
    same words from `resolve` for a URL no config key gave (a command's --root)."""
    d = two_files(tmp_path)
    catalog, root = ("foo://cat", str(tmp_path / "out")) if key == "input" else (str(d), "foo://t")
    named = "input.path" if key == "input" else "output.root"
    with pytest.raises(ConfigError, match=rf"^{named}: foo://\w+: foo:// is no file system "
                                          r"fsspec knows; give a local path or a URL such as "
                                          r"file://"):
        build(cfg(catalog, root), log=quiet)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"^foo://t: foo:// is no file system fsspec knows"):
        TableStore("foo://t", "sids")


def test_empty_zero_byte_file_is_a_named_error(tmp_path, root):
    d = two_files(tmp_path)
    (d / "part-zzz.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"part-zzz\.parquet' is empty \(0 bytes\); remove it"):
        build(cfg(str(d), root), log=quiet)
    assert nothing_committed(root)


@pytest.mark.parametrize("damage", ["garbage", "truncated_footer"])
def test_corrupt_parquet_file_is_a_named_error(tmp_path, root, damage):
    d = two_files(tmp_path)
    victim = d / "part-001.parquet"
    data = victim.read_bytes()
    victim.write_bytes(b"this is not parquet at all" * 20 if damage == "garbage"
                       else data[:-50])
    with pytest.raises(InputError, match=r"part-001\.parquet' is not readable Parquet.*repair"):
        build(cfg(str(d), root), log=quiet)
    assert nothing_committed(root)


def test_corrupt_data_page_fails_on_its_checksum(tmp_path, root):
    d = tmp_path / "cat"
    d.mkdir()
    x = base_x()
    t = pa.table({"item_id": pa.array(np.arange(N)),
                  "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)})
    victim = d / "p.parquet"
    pq.write_table(t, victim, row_group_size=300, write_page_checksum=True, compression="none")
    raw = bytearray(victim.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # inside the embedding pages; the footer stays intact
    victim.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"p\.parquet': cannot read row groups .*repair or "
                                         "remove the file"):
        build(cfg(str(d), root), log=quiet)
    assert nothing_committed(root)


@pytest.mark.parametrize("key, value, column", [
    ("input__embedding_column", "vector", "vector"),
    ("input__id_column", "sku", "sku"),
    ("input__popularity_column", "clicks", "clicks"),
])
def test_missing_column_names_it_and_the_columns_there_are(tmp_path, root, key, value, column):
    d = two_files(tmp_path)
    with pytest.raises(InputError) as exc:
        build(cfg(str(d), root, **{key: value}), log=quiet)
    msg = str(exc.value)
    assert f"no column {column!r}" in msg and key.replace("__", ".") in msg
    assert all(c in msg for c in ("item_id", "embedding", "popularity"))
    assert nothing_committed(root)


def test_duplicate_column_names_name_the_file_and_the_column(tmp_path, root):
    d = two_files(tmp_path)
    x = base_x()[:50]
    victim = d / "part-002.parquet"
    pq.write_table(pa.Table.from_arrays(
        [pa.array(np.arange(N, N + 50)), pa.array(np.arange(50)), emb_array(as_rows(x))],
        names=["item_id", "item_id", "embedding"]), victim)
    with pytest.raises(InputError, match=rf"^{victim}: column 'item_id' \(set by "
                                         r"input\.id_column\) appears 2 times; write the file "
                                         "with one column of each name$"):
        build(cfg(str(d), root), log=quiet)
    assert nothing_committed(root)


def test_folders_above_the_catalog_may_start_with_underscore_or_dot(tmp_path, root):
    """Only the parts of a path below input.path are skipped for a leading '_' or '.'
    (`_SUCCESS`, `.crc`, `_temporary/`): a catalog under /data/_shared or ~/.cache is read."""
    d = tmp_path / "_under" / ".dot" / "cat"
    write_catalog(d, base_x(), files=2)
    for junk in ("_temporary/part-9.parquet", ".part-0.parquet", "_x.parquet", "a/.b/c.parquet"):
        (d / junk).parent.mkdir(parents=True, exist_ok=True)
        (d / junk).write_bytes(b"not parquet")
    assert catalog_files(str(d))[0] == [f"{d}/part-000.parquet", f"{d}/part-001.parquet"]
    assert plan_catalog(str(d)).num_rows == N
    data, _ = committed(root, build(cfg(str(d), root), log=quiet))
    assert data.num_rows == N


def test_parquet_files_in_any_case_are_read_and_other_files_named_in_a_warning(tmp_path,
                                                                               root):
    """`.PARQUET` is read like `.parquet`; a file of another name (`.parq`, `notes.txt`) is
    not, and the build's log says so, naming them (it skipped them without a word: rows
    lost)."""
    x = base_x()
    d = tmp_path / "cat"
    write_file(d / "a.parquet", range(200), as_rows(x[:200]))
    write_file(d / "b.PARQUET", range(200, 400), as_rows(x[200:400]))
    write_file(d / "c.parq", range(400, N), as_rows(x[400:]))
    (d / "docs").mkdir()
    (d / "docs" / "notes.txt").write_text("catalog of 2026-12-06")
    (d / "_SUCCESS").write_bytes(b"")
    assert catalog_files(str(d))[0] == [f"{d}/a.parquet", f"{d}/b.PARQUET"]
    lines: list[str] = []
    data, _ = committed(root, build(cfg(str(d), root), log=lines.append))
    assert sorted(data.column("item_id").to_pylist()) == list(range(400))
    warned = [line for line in lines if "not named *.parquet" in line]
    assert warned == ["warning: 2 file(s) below input.path are not named *.parquet and are not "
                      "read (c.parq, docs/notes.txt); rename the catalog's files to *.parquet, "
                      "or "
                      "move the others out"]


def test_fingerprint_changes_when_a_file_is_rewritten_with_the_same_size(tmp_path):
    """A file rewritten with the same rows and size (new embeddings) is another input: the
    fingerprint (and so the run key a re-run resumes by) changes; an untouched one's not."""
    d = tmp_path / "cat"
    write_catalog(d, base_x(seed=5), files=2)
    victim = d / "part-001.parquet"
    size, first = victim.stat().st_size, plan_catalog(str(d))
    assert plan_catalog(str(d)).fingerprint == first.fingerprint
    x2 = base_x(seed=5)
    x2[:, 0] += 1.0  # other values, the same size once written
    write_catalog(tmp_path / "other", x2, files=2)
    victim.write_bytes((tmp_path / "other" / "part-001.parquet").read_bytes())
    stat = victim.stat()
    assert stat.st_size == size
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # (coarse clocks)
    again = plan_catalog(str(d))
    assert again.num_rows == first.num_rows and again.shards == first.shards
    assert again.fingerprint != first.fingerprint


def test_empty_catalogs_are_named_errors(tmp_path, root):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "README.txt").write_text("no parquet here")
    with pytest.raises(InputError, match=r"holds no \*\.parquet files"):
        build(cfg(str(empty_dir), root), log=quiet)
    with pytest.raises(InputError, match="does not exist; point it at a Parquet file or a "
                                         "directory of Parquet files$"):
        build(cfg(str(tmp_path / "nowhere"), root), log=quiet)
    with pytest.raises(InputError, match=r"input.path '.*/\*\.parquet' does not exist; if it "
                                         r"is a wildcard, wildcards are not expanded: give the "
                                         r"directory"):
        build(cfg(str(empty_dir / "*.parquet"), root), log=quiet)
    zero = tmp_path / "zero_rows"
    zero.mkdir()
    pq.write_table(pa.table({"item_id": pa.array([], pa.int64()),
                             "embedding": pa.array([], pa.list_(pa.float32(), D))}),
                   zero / "part-0.parquet")
    with pytest.raises(InputError, match=r"catalog at '.*zero_rows' has no rows"):
        build(cfg(str(zero), root), log=quiet)
    assert nothing_committed(root)
    # a 0-row file next to real ones is just an empty part of the catalog
    d = two_files(tmp_path)
    pq.write_table(pa.table({"item_id": pa.array([], pa.int64()),
                             "embedding": pa.array([], pa.list_(pa.float32(), D)),
                             "popularity": pa.array([], pa.int64())}), d / "part-009.parquet")
    data, _ = committed(root, build(cfg(str(d), root), log=quiet))
    assert data.num_rows == N


@pytest.mark.parametrize("rows, bad, over, match", [
    # counted after validation: 20 rows of which 6 are bad leave 14 < 16; fixed, 20 would do
    (20, 6, {}, r"holds 14 valid rows, fewer than the largest codebook \(16\); 6 of the 20 "
                rf"rows it drew are bad \(6 {re.escape(NON_FINITE)}: rows the encode rejects, "
                r"see README's Bad input\); fix the catalog's bad rows, or use smaller "
                r"quantizer\.layers \(at most 14 codes\)$"),
    # drawn enough but too many bad: a larger sample (more of the catalog) helps too
    (40, 24, {"fit__sample_size": 20}, r"holds \d+ valid rows, .*; fix the catalog's bad rows, "
                                       r"or use smaller quantizer\.layers \(at most \d+ "
                                       r"codes\), or raise fit\.sample_size$"),
    # one valid row makes no codebook (2 codes at least)
    (16, 15, {"input__max_reject_fraction": 1.0},
     r"holds 1 valid row, .*15 of the 16 rows it drew are bad .*; fix the catalog's bad "
     r"rows$"),
    # drawn by item id: the bad rows are never drawn, but take their share of the draw
    (40, 30, {"fit__sample_size": 20, "fit__sample_by": "id",
              "input__max_reject_fraction": 1.0},
     r"holds 10 valid rows, fewer than the largest codebook \(16\); the catalog holds 30 "
     rf"bad rows \(30 {re.escape(NON_FINITE)}: rows the encode rejects, see README's Bad "
     r"input\), which take their share of the draw by item id; fix the catalog's bad rows, "
     r"or use smaller quantizer\.layers \(at most 10 codes\)$")])
def test_fit_sample_of_fewer_valid_rows_than_the_largest_codebook(tmp_path, root, rows, bad,
                                                                 over, match):
    """The fit sample holds fewer valid rows than the largest codebook: the error names the
    fixes that would reach it (the bad rows only where fixing them would)."""
    x = base_x()[:rows]
    x[:bad, 0] = np.nan
    cat = write_catalog(tmp_path / "tiny", x)
    with pytest.raises(InputError, match=match):
        build(cfg(cat, root, **{"quantizer__layers": [16, 4],
                                "input__max_reject_fraction": 0.5, **over}), log=quiet)
    assert nothing_committed(root)


@pytest.mark.parametrize("rows, match", [
    (12, r"^the catalog holds 12 rows, fewer than the largest codebook's 16 codes "
         r"\(quantizer\.layers=\[16, 4\]\); use smaller quantizer\.layers \(at most 12 "
         r"codes\), or use a larger catalog$"),
    (1, r"^the catalog holds 1 row, fewer than .*\); use a larger catalog$")])
def test_catalog_of_fewer_rows_than_codes_is_refused_before_anything_is_written(
        tmp_path, root, rows, match):
    """No fit sample of a catalog of fewer rows than a codebook has codes could fit it: the
    build and its dry run say so before a version starts (the build failed at its sample
    step, a version's folder left; the dry run passed)."""
    from semid_dist.plan import dry_run

    cat = write_catalog(tmp_path / "tiny", base_x()[:rows])
    config = cfg(cat, root, quantizer__layers=[16, 4])
    with pytest.raises(InputError, match=match):
        dry_run(config, log=quiet)
    with pytest.raises(InputError, match=match):
        build(config, log=quiet)
    assert not (Path(root) / "sids" / "versions").exists() or not any(
        (Path(root) / "sids" / "versions").iterdir())


def test_fit_sample_size_below_the_largest_codebook_is_a_config_error(tmp_path):
    """Knowable from the config: `semid validate` and the dry run refused nothing, the build
    failed at its sample step; a config that reuses codebooks fits nothing."""
    with pytest.raises(ConfigError, match=r"^fit\.sample_size=10 is below the largest "
                                          r"codebook's 16 codes \(quantizer\.layers=\[16, 4\]\)"
                                          r": .*raise fit\.sample_size \(to 16 or more\)"):
        cfg(str(tmp_path / "cat"), str(tmp_path / "out"), quantizer__layers=[16, 4],
            fit__sample_size=10)
    cfg(str(tmp_path / "cat"), str(tmp_path / "out"), quantizer__layers=[16, 4],
        fit__sample_size=10, encode__from_version="latest")


@pytest.mark.parametrize("key, value, match", [
    ("input__on_duplicate", "drop", r"input\.on_duplicate: 'drop' is not one of reject \| "
                                    r"keep_first \| fail"),
    ("input__on_zero_vector", "skip", r"input\.on_zero_vector: 'skip' is not one of keep"),
    ("input__on_bad_rows", "ignore", r"input\.on_bad_rows: 'ignore' is not one of"),
    ("input__max_reject_fraction", 1.5, r"input\.max_reject_fraction"),
    ("input__on_dupes", "reject", r"input\.on_dupes"),
])
def test_bad_config_value_is_a_config_error_naming_the_key(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        cfg(str(tmp_path / "cat"), str(tmp_path / "out"), **{key: value})


def test_spark_engine_without_pyspark_names_the_extra(tmp_path, root, monkeypatch):
    """pyspark is the [spark] extra: without it `engine: spark` is a config error naming
    the install, raised before anything is read or written."""
    monkeypatch.setitem(sys.modules, "pyspark", None)  # `import pyspark` raises ImportError
    cat = write_catalog(tmp_path / "cat", base_x()[:300])
    with pytest.raises(ConfigError, match=r"engine: spark needs pyspark, which this Python "
                                          r"cannot import \(.*\): it is the \[spark\] extra, "
                                          r"pip install 'semid_dist\[spark\]'"):
        build(cfg(cat, root, engine="spark"), log=quiet)
    assert not Path(root).exists()
