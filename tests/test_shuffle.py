"""shuffle: Parquet files split by bucket through real storage (local and memory fsspec)."""

from __future__ import annotations

import os
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.io import fs as fsio
from semid_dist.shuffle import Split, group_files, read_bucket, split_files


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
    whole = pa.concat_tables(tables)
    # one split per file, and the files in groups: the empty file last, first, or in the
    # middle of a group (a bucket's stream then holds a batch per file, in file order)
    for name, groups in (("each", [[p] for p in files]), ("first two", [files[:2], files[2:]]),
                         ("last two", [files[:1], files[1:]]), ("all", [files])):
        splits = [split_files(fs, g, ("key", "row", "tag", "absent"), _by_key, buckets,
                              f"{base}/{name}/{i}") for i, g in enumerate(groups)]
        assert len(splits) == len(groups)
        assert all(len(s.offsets) == buckets + 1 for s in splits)
        for b in range(buckets):
            got = read_bucket(fs, splits, b, ("key", "row", "tag"))
            assert got.column_names == ["key", "row", "tag"]  # the columns that exist
            want = whole.filter(pa.array(whole.column("key").to_numpy() % buckets == b))
            assert got.column("row").to_pylist() == want.column("row").to_pylist()
            assert got.column("tag").to_pylist() == want.column("tag").to_pylist()
    # a file not split is all of bucket 0, read with the columns asked for
    plain = read_bucket(fs, [Split(p) for p in files], 0, ("row", "key"))
    assert plain.column_names == ["row", "key"] and plain.equals(whole.select(["row", "key"]))
    assert read_bucket(fs, [], 0, ("row",)) is None


def test_files_are_grouped_in_order_up_to_the_target_rows():
    paths = [f"p{i}" for i in range(7)]
    rows = [300, 300, 500, 1500, 0, 100, 999]
    groups = group_files(paths, rows, target_rows=1000)
    assert [p for g in groups for p in g] == paths  # every file once, in order
    # p3 is over the target on its own; the empty p4 joins it rather than open a group
    assert groups == [["p0", "p1"], ["p2"], ["p3", "p4"], ["p5"], ["p6"]]
    # no group holds more than the target unless one file does; no two neighbours fit in one
    sizes = [sum(rows[paths.index(p)] for p in g) for g in groups]
    assert all(n <= 1000 or sum(rows[paths.index(p)] > 0 for p in g) == 1
               for n, g in zip(sizes, groups))
    assert all(a + b > 1000 for a, b in zip(sizes, sizes[1:]))
    assert group_files(paths, rows, target_rows=10**9) == [paths]
    assert group_files(paths, rows, target_rows=1) == [["p0"], ["p1"], ["p2"], ["p3", "p4"],
                                                       ["p5"], ["p6"]]
    assert group_files(["e0", "e1"], [0, 0], target_rows=1) == [["e0", "e1"]]
    assert group_files([], [], target_rows=10) == []


def test_split_files_needs_a_file(tmp_path):
    fs, base = fsio.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="at least one file"):
        split_files(fs, [], ("key",), _by_key, 2, f"{base}/split")


def test_staged_output_appears_only_complete(folder):
    """Split files are written through a local file (`fsio.staged_output`), not held in
    memory: the name appears only once the block ends, and a block that raises leaves the
    name as it was (here: an older file) and no local temporary."""
    fs, base = fsio.resolve(folder)
    path = f"{base}/out/split"
    with fsio.staged_output(fs, path) as f:
        f.write(b"first part, ")
        f.flush()
        assert not fs.exists(path)  # nothing under the final name while it is written
        f.write(b"second part")
        temporary = f.name
    assert fs.cat_file(path) == b"first part, second part"
    assert not os.path.exists(temporary)
    if fsio.is_local(fs):  # the mode a plain new file gets (the umask's), readable by others
        with open(f"{base}/plain", "wb"):
            pass
        assert os.stat(path).st_mode == os.stat(f"{base}/plain").st_mode
    with pytest.raises(OSError, match="disk full"):
        with fsio.staged_output(fs, path) as f:
            f.write(b"half of a new file")
            temporary = f.name
            raise OSError("disk full")
    assert fs.cat_file(path) == b"first part, second part"
    assert not os.path.exists(temporary)
