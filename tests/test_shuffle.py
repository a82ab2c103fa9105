"""shuffle: Parquet files split by bucket through real storage (local and memory fsspec)."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.io import fs as fsio
from semid_dist.shuffle import Split, read_bucket, split_file


def _by_key(rows: pa.Table, buckets: int) -> np.ndarray:
    return rows.column("key").to_numpy() % buckets


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
    else:
        url = f"memory://shuffle-{uuid.uuid4().hex[:8]}"
        yield url
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_each_bucket_holds_its_rows_in_file_order(folder):
    fs, base = fsio.resolve(folder)
    rng = np.random.default_rng(0)
    files, tables = [], []
    for i, n in enumerate([40, 0, 75]):
        t = pa.table({"key": rng.integers(0, 1000, n), "row": np.arange(n) + 1000 * i,
                      "tag": pa.array([f"r{j}" for j in range(n)], pa.string()),
                      "other": np.zeros(n)})
        path = f"{base}/part-{i}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(t, f)
        files.append(path)
        tables.append(t)
    buckets = 4
    splits = [split_file(fs, p, ("key", "row", "tag", "absent"), _by_key, buckets,
                         f"{base}/split/{i}") for i, p in enumerate(files)]
    assert all(len(s.offsets) == buckets + 1 for s in splits)
    whole = pa.concat_tables(tables)
    for b in range(buckets):
        got = read_bucket(fs, splits, b, ("key", "row", "tag"))
        assert got.column_names == ["key", "row", "tag"]  # the columns asked for that exist
        want = whole.filter(pa.array(whole.column("key").to_numpy() % buckets == b))
        assert got.column("row").to_pylist() == want.column("row").to_pylist()
        assert got.column("tag").to_pylist() == want.column("tag").to_pylist()
    # a file not split is all of bucket 0, read with the columns asked for
    plain = read_bucket(fs, [Split(p) for p in files], 0, ("row", "key"))
    assert plain.column_names == ["row", "key"] and plain.equals(whole.select(["row", "key"]))
    assert read_bucket(fs, [], 0, ("row",)) is None
