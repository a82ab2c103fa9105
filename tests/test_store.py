"""io/store.py: versioned table store on real fsspec filesystems (memory:// and local)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.errors import StoreError
from semid_dist.io.fs import shown_path
from semid_dist.io.store import LATEST, MANIFEST, TableStore, new_version_id

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


@pytest.fixture(autouse=True)
def clean_memory_fs():
    fsspec.filesystem("memory").store.clear()
    yield
    fsspec.filesystem("memory").store.clear()


@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path):
    if request.param == "memory":
        return "memory://store-root"
    return str(tmp_path / "store-root")


def data_table(start: int, n: int) -> pa.Table:
    return pa.table({"item_id": pa.array(range(start, start + n), pa.int64()),
                     "codes": pa.array([[i % 7, i % 3] for i in range(start, start + n)],
                                       pa.list_(pa.int32()))})


def rejects_table(n: int) -> pa.Table:
    return pa.table({"item_id": pa.array([f"r{i}" for i in range(n)]),
                     "source_file": pa.array(["f.parquet"] * n),
                     "row": pa.array(range(n), pa.int64()),
                     "reason": pa.array(["null embedding"] * n)})


def write_version(store: TableStore, vid: str, sizes=(30, 20), rejects: int = 2):
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(store.write_table(vid, f"data/part-{i:05d}.parquet", data_table(start, n)))
        start += n
    if rejects:
        files.append(store.write_table(vid, "rejects/part-00000.parquet", rejects_table(rejects)))
    rows = {"input": sum(sizes) + rejects, "encoded": sum(sizes), "rejected": rejects}
    return files, {"rows": rows, "parent": None, "created_at": "now"}


def vid_at(seconds: int) -> str:
    return new_version_id(T0 + dt.timedelta(seconds=seconds))


def test_uncommitted_version_is_invisible(root):
    store = TableStore(root, "sids")
    assert store.versions() == [] and store.latest() is None
    vid = vid_at(0)
    write_version(store, vid)
    assert store.fs.exists(store.version_dir(vid))  # the files really are there
    assert store.versions() == []
    assert store.latest() is None
    with pytest.raises(StoreError, match="has no committed version yet; run `semid build`"):
        store.resolve("latest")
    uncommitted = f"version '{vid}' of table .* is not committed \\(a build running, failed"
    with pytest.raises(StoreError, match=uncommitted):
        store.resolve(vid)
    with pytest.raises(StoreError, match=uncommitted):
        store.read_data(vid)


def test_commit_writes_manifest_and_moves_latest(root):
    store = TableStore(root, "sids")
    v1, v2, v3 = vid_at(0), vid_at(60), vid_at(120)
    files1, man1 = write_version(store, v1)
    store.commit(v1, man1, files1)
    assert store.versions() == [v1] and store.latest() == v1
    files2, man2 = write_version(store, v2, sizes=(5,), rejects=0)
    write_version(store, v3)  # staged, never committed
    store.commit(v2, dict(man2, parent=v1), files2)
    assert store.versions() == [v1, v2]
    assert store.latest() == v2 == store.resolve("latest") == store.resolve(None)
    assert store.resolve(v1) == v1
    # 'latest' as the caller read it before v2's commit (a build resolving it once)
    assert store.resolve("latest", head=v1) == v1 and store.resolve(v2, head=v1) == v2
    raw = store.fs.cat_file(f"{store.base}/{LATEST}").decode().strip()
    assert raw == v2
    m = store.manifest(v2)
    assert m["version_id"] == v2 and m["parent"] == v1 and m["rows"] == man2["rows"]
    assert [f["path"] for f in m["files"]] == [f.path for f in files2]
    for entry in store.manifest(v1)["files"]:
        data = store.read_bytes(v1, entry["path"])
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert pq.read_table(io.BytesIO(data)).num_rows == entry["rows"]
    assert json.loads(store.read_bytes(v2, MANIFEST)) == m
    # the older version is untouched by the newer commit
    assert store.read_data(v1).num_rows == 50


@pytest.mark.parametrize("rows_patch, files_patch", [
    ({"input": 53}, None),                      # input != encoded + rejected
    ({"encoded": 49, "input": 51}, None),       # reconciles, but data files hold 50
    ({"rejected": 3, "input": 53}, None),       # reject files hold 2
    (None, "drop_rejects"),                     # a reject file missing from the list
    (None, "drop_data"),                        # a data file missing from the list
])
def test_unreconciled_commit_is_refused_and_latest_stays(root, rows_patch, files_patch):
    store = TableStore(root, "sids")
    v1, v2 = vid_at(0), vid_at(1)
    files1, man1 = write_version(store, v1)
    store.commit(v1, man1, files1)
    files2, man2 = write_version(store, v2)
    if rows_patch:
        man2 = dict(man2, rows=dict(man2["rows"], **rows_patch))
    if files_patch == "drop_rejects":
        files2 = [f for f in files2 if not f.path.startswith("rejects/")]
    if files_patch == "drop_data":
        files2 = files2[1:]
    with pytest.raises(StoreError) as exc:
        store.commit(v2, man2, files2)
    assert v2 in str(exc.value)
    assert store.latest() == v1
    assert store.versions() == [v1]
    assert not store.fs.exists(f"{store.version_dir(v2)}/{MANIFEST}")


def test_resolve_error_messages(root):
    store = TableStore(root, "sids")
    with pytest.raises(StoreError) as exc:
        store.resolve("latest")
    assert "no committed version" in str(exc.value) and store.url in str(exc.value)
    v1 = vid_at(0)
    files, man = write_version(store, v1)
    store.commit(v1, man, files)
    with pytest.raises(StoreError) as exc:
        store.resolve("20990101T000000Z-abcdef")
    msg = str(exc.value)
    assert "20990101T000000Z-abcdef" in msg and v1 in msg
    assert "does not exist (never built, or removed by `semid versions gc`)" in msg
    v2 = vid_at(1)  # started, not committed
    store.write_file(v2, "codebooks/x", b"x")
    with pytest.raises(StoreError, match=f"version '{v2}' of table .* is not committed "
                       r"\(a build running, failed or killed, or gc removing it\) \(newest "
                       "committed: "):
        store.resolve(v2)
    v3 = vid_at(2)
    files, man = write_version(store, v3)
    store.commit(v3, man, files)
    with pytest.raises(StoreError, match=rf"\(newest committed: {v3}, {v1}\)$"):  # newest first
        store.resolve("20990101T000000Z-abcdef")


def test_a_version_given_as_a_path_is_refused(root):
    """`--version ../../other/sids/versions/<id>` read (and `semid report` rewrote) another
    table's version: a version is one folder name under this table's versions/."""
    store, other = TableStore(root, "sids"), TableStore(root, "other")
    v1 = vid_at(0)
    for s in (store, other):
        files, man = write_version(s, v1)
        s.commit(v1, man, files)
    assert store.resolve(v1) == v1
    for bad in (f"../../other/versions/{v1}", f"../versions/{v1}", f"./{v1}", "..", ".", "",
                f"{v1}/"):
        with pytest.raises(StoreError, match=r"is not a version id: give one as `semid "
                                             r"versions list` prints it"):
            store.resolve(bad)


def test_read_data_returns_the_manifest_files_only(root):
    store = TableStore(root, "sids")
    vid = vid_at(0)
    files, man = write_version(store, vid, sizes=(7, 11, 4), rejects=3)
    # a leftover file from a failed attempt, not in the manifest
    store.write_table(vid, "data/part-99999.parquet", data_table(1000, 9))
    store.commit(vid, man, files)
    got = store.read_data("latest")
    assert got.num_rows == 22
    assert got.column("item_id").to_pylist() == list(range(22))
    assert got.to_pylist() == data_table(0, 22).to_pylist()
    rej = store.read_data(vid, kind="rejects")
    assert rej.to_pylist() == rejects_table(3).to_pylist()


def test_tables_are_separate(root):
    a, b = TableStore(root, "a"), TableStore(root, "b")
    vid = vid_at(0)
    files, man = write_version(a, vid)
    a.commit(vid, man, files)
    assert a.versions() == [vid] and b.versions() == [] and b.latest() is None
    assert TableStore(root, "a").latest() == vid  # a fresh handle sees the committed state


def test_write_file_entry_matches_bytes(root):
    store = TableStore(root, "sids")
    entry = store.write_file("v", "codebooks/codebooks.json", b'{"a": 1}', rows=0)
    assert entry.bytes == 8 and entry.sha256 == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert store.read_bytes("v", "codebooks/codebooks.json") == b'{"a": 1}'


def test_a_page_that_fails_its_checksum_is_a_named_error(tmp_path):
    """Files the job writes carry page checksums, verified as they are read back (a
    damaged page read as other numbers, silently)."""
    import numpy as np

    from semid_dist import shuffle
    from semid_dist.io import fs as fsio

    store = TableStore(str(tmp_path), "sids")
    store.write_table("v", "part.parquet", pa.table({"a": np.arange(100_000)}))
    fs, path = store.fs, fsio.join(store.version_dir("v"), "part.parquet")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2:len(data) // 2 + 50] = bytes(50)  # inside a data page
    fs.pipe_file(path, bytes(data))
    with pytest.raises(IsADirectoryError), fsio.damaged_parquet(path):  # the file system's
        raise IsADirectoryError(21, "Is a directory")  # own errors are not "damaged"
    for read in (lambda: fsio.read_parquet(fs, path),
                 lambda: shuffle.read_columns(fs, path, ["a"])):
        with pytest.raises(StoreError, match=r"part.parquet cannot be read as Parquet \(.*CRC "
                                             r"checksum verification failed.*\): the file is "
                                             r"damaged"):
            read()
    # a file not there, on an object store (whose client's errors have no errno): missing,
    # not "damaged" (memory://, as an object store's client raises it)
    memory, gone = fsio.resolve(f"memory://checksum-{tmp_path.name}/gone.parquet")
    for read in (lambda: fsio.read_parquet(memory, gone),
                 lambda: shuffle.read_columns(memory, gone, ["a"])):
        with pytest.raises(FileNotFoundError):
            read()


def test_a_local_write_onto_a_folder_fails_and_leaves_nothing(tmp_path):
    """fsspec's mv moved the written file into a folder of the target's name: the write
    "succeeded" and the file was not where it was meant to be."""
    from semid_dist.io import fs as fsio

    target = tmp_path / "report.html"
    target.mkdir()
    fs, path = fsio.resolve(str(target))
    with pytest.raises(IsADirectoryError):
        fsio.write_bytes(fs, path, b"<html>")
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html"]


def test_local_writes_leave_no_temporary_files(tmp_path):
    store = TableStore(str(tmp_path / "r"), "sids")
    vid = vid_at(0)
    files, man = write_version(store, vid)
    store.commit(vid, man, files)
    names = [p.name for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert not [n for n in names if ".tmp" in n]
    assert sorted(names) == sorted([MANIFEST, LATEST] + [f.path.split("/")[-1] for f in files])


def test_new_version_ids_sort_by_time():
    times = [T0 + dt.timedelta(seconds=s)
             for s in (0, 0.000001, 0.001, 1, 59, 3600, 86400 * 40, 86400 * 400)]
    ids = [new_version_id(t) for t in times]
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)
    for t, vid in zip(times, ids):
        assert re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{6}", vid)
        assert vid.startswith(t.strftime("%Y%m%dT%H%M%S%fZ"))
    assert new_version_id(T0) != new_version_id(T0)  # random part separates same-second ids


def test_missing_latest_stands_for_the_newest_committed_version(root):
    store = TableStore(root, "sids")
    old, new = vid_at(1), vid_at(2)
    for v in (old, new):
        files, man = write_version(store, v)
        store.commit(v, man, files)
    store.fs.rm(f"{store.base}/{LATEST}")  # as a first build killed before `_latest` leaves it
    assert store.latest() is None and store.head() == new
    assert store.resolve(None) == new and store.manifest()["version_id"] == new
    newer = vid_at(3)
    files, man = write_version(store, newer)
    assert store.commit(newer, man, files) and store.latest() == newer  # the next commit sets it


def test_an_expected_latest_moves_only_from_the_version_latest_still_means(root):
    """`expect_latest` (an incremental version's commit: what `latest` meant as its build
    started): `_latest` moves only while latest still means it. Without a `_latest` file
    latest means the newest committed version besides the one committing, which is then
    written into `_latest` where it must stay (readers would take the newer id); a full
    build's commit does not move latest back either."""
    store = TableStore(root, "sids")

    def commit(vid: str, **expect) -> bool:
        files, man = write_version(store, vid)
        return store.commit(vid, man, files, **expect)

    parent, sibling, late = vid_at(1), vid_at(2), vid_at(3)
    assert commit(parent)
    assert commit(sibling, expect_latest=parent)
    assert not commit(late, expect_latest=parent)  # `sibling` committed while it was built
    assert store.latest() == sibling and store.versions() == [parent, sibling, late]
    assert commit(vid_at(4), expect_latest=sibling)  # (an older from_version on purpose)
    store.fs.rm(f"{store.base}/{LATEST}")
    newest = store.head()  # (vid_at(4))
    blocked = vid_at(5)
    assert not commit(blocked, expect_latest=sibling)
    assert store.latest() == newest and store.head() == newest  # pinned: not `blocked`
    store.fs.rm(f"{store.base}/{LATEST}")  # latest means `blocked` now, the newest
    older = vid_at(0)  # a full build started before every other
    assert not commit(older) and store.latest() is None and store.head() == blocked


@pytest.mark.parametrize("content", [b"garbage", b"20260102T030404000000Z-000000", b"../x",
                                     b"\xff\xfe"])
def test_a_latest_naming_no_committed_version_is_a_named_error(root, content):
    store = TableStore(root, "sids")
    v = vid_at(1)
    files, man = write_version(store, v)
    store.commit(v, man, files)
    store.fs.pipe(f"{store.base}/{LATEST}", content)
    for read in (store.head, lambda: store.resolve("latest"), store.manifest):
        with pytest.raises(StoreError, match=r"_latest names .* not a committed version.*"
                                             rf"write into it .*newest committed: {v}"):
            read()
    newer = vid_at(2)  # a commit does not move a damaged `_latest` (as if its id sorted first)
    files, man = write_version(store, newer)
    with pytest.raises(StoreError, match=f"version {newer} is committed, but _latest was not "
                                         "moved: .*not a committed version"):
        store.commit(newer, man, files)
    assert store.versions() == [v, newer]


def test_a_damaged_manifest_or_missing_part_is_a_named_error(root):
    store = TableStore(root, "sids")
    v = vid_at(1)
    files, man = write_version(store, v)
    store.commit(v, man, files)
    store.check_files(v)  # intact
    part = f"{store.version_dir(v)}/data/part-00001.parquet"
    store.fs.rm(part)
    with pytest.raises(StoreError, match=rf"version {v} is damaged: its manifest lists "
                                         rf".*data/part-00001.parquet, which is missing"):
        store.check_files(v)
    path = f"{store.version_dir(v)}/{MANIFEST}"
    store.fs.pipe(path, store.fs.cat_file(path)[:40])  # truncated
    with pytest.raises(StoreError, match=rf"the manifest of version {v} .*{MANIFEST}\) cannot be "
                                         rf"read .*restore the file, or remove versions/{v}"):
        store.manifest(v)


def test_a_committed_file_that_changed_or_is_gone_is_a_named_error(root):
    """A committed version's files are read against its manifest's checksums (a report
    rendered a `{}` metrics.json with a KeyError traceback); a data part that is no Parquet
    any more is named too (ArrowInvalid traceback)."""
    store = TableStore(root, "sids")
    v = vid_at(1)
    files, man = write_version(store, v)
    files.append(store.write_file(v, "metrics.json", b'{"rows": 1}'))
    store.commit(v, man, files)
    assert store.read_json(v, "metrics.json") == {"rows": 1}
    store.fs.pipe(f"{store.version_dir(v)}/metrics.json", b"{}")
    for read in (lambda: store.read_json(v, "metrics.json"),
                 lambda: store.read_bytes(v, "metrics.json")):
        with pytest.raises(StoreError, match=rf"version {v} is damaged: .*/metrics.json does not "
                                             r"match the checksum its manifest records"):
            read()
    fresh = TableStore(root, "sids")  # the manifest's checksums: read once per store
    reads = []
    cat_file = fresh.fs.cat_file
    fresh.fs.cat_file = lambda path, *a, **k: reads.append(path) or cat_file(path, *a, **k)
    try:
        for _ in range(3):
            with pytest.raises(StoreError, match="does not match the checksum"):
                fresh.read_bytes(v, "metrics.json")
    finally:
        del fresh.fs.cat_file
    assert sum(p.endswith(MANIFEST) for p in reads) == 1, reads
    store.fs.rm(f"{store.version_dir(v)}/metrics.json")
    with pytest.raises(StoreError, match=r"its manifest lists .*/metrics.json, which is missing"):
        store.read_bytes(v, "metrics.json")
    with pytest.raises(FileNotFoundError):  # a file the manifest does not list: the caller's
        store.read_bytes(v, "stats/partial_all.npz")
    store.fs.rm(store.version_dir(v), recursive=True)  # as `versions gc` does, while it reads
    with pytest.raises(StoreError, match=rf"^version {v} was removed while it was read \(by "
                                         r"`semid versions gc`\?\); run the command again$"):
        store.read_bytes(v, "data/part-00000.parquet")
    files, man = write_version(store, v)
    store.commit(v, man, files)
    store.fs.pipe(f"{store.version_dir(v)}/data/part-00001.parquet", b"junk\n")
    with pytest.raises(StoreError, match=r"data/part-00001.parquet cannot be read as Parquet "
                                         r"\(.*\): the file is damaged"):
        store.read_data(v)


def test_a_latest_that_is_a_directory_is_the_named_error(tmp_path):
    store = TableStore(str(tmp_path / "store-root"), "sids")
    v = vid_at(1)
    files, man = write_version(store, v)
    store.commit(v, man, files)
    (tmp_path / "store-root" / "sids" / LATEST).unlink()
    (tmp_path / "store-root" / "sids" / LATEST).mkdir()
    with pytest.raises(StoreError, match=r"_latest names '_latest/ \(a directory\)', which is not"):
        store.manifest()


@pytest.mark.parametrize("url, path, shown", [
    ("s3://b/cat", "b/cat/p.parquet", "s3://b/cat/p.parquet"),
    ("ftp://u:pw@host:21/dir", "/dir/p.parquet", "ftp://***@host:21/dir/p.parquet"),
    ("hdfs://nn:8020/data", "/data/p.parquet", "hdfs://nn:8020/data/p.parquet"),
    ("memory://cat", "/cat/p.parquet", "memory:///cat/p.parquet"),
    ("simplecache::s3://b/c", "b/c/p.parquet", "s3://b/c/p.parquet"),
    ("/tmp/x", "/tmp/x/p.parquet", "/tmp/x/p.parquet"),
    ("http://u:p@h/x.parquet", "http://u:p@h/x.parquet", "http://***@h/x.parquet"),
    ("zip://in::s3://b/a.zip", "cat/p.parquet", "zip://cat/p.parquet::s3://b/a.zip")])
def test_a_catalog_file_is_shown_by_a_url_that_names_it(url, path, shown):
    """fsspec's paths drop the scheme (and for ftp / hdfs the host): the rejects and the
    catalog's errors name a file by a URL that opens it, credentials masked."""
    assert shown_path(url, path) == shown
