"""Retention: the pure `gc_plan` policy, `TableStore.gc` on real filesystems and the
`semid versions gc` command."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import fsspec
import pytest

from semid_dist.cli import main
from semid_dist.errors import StoreError
from semid_dist.io.retention import VERSION_TIME_FORMAT, gc_plan, kept_reasons, version_time
from semid_dist.io.store import MANIFEST, TableStore, new_version_id
from semid_dist.summary import format_gc
from tests.test_store import write_version

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def vid(hours_ago: float, tag: str = "aaaaaa") -> str:
    t = NOW - dt.timedelta(hours=hours_ago)
    return f"{t.strftime(VERSION_TIME_FORMAT)}-{tag}"


def manifest(v: str, refs: tuple[str, ...] = ()) -> dict:
    files = [{"path": "data/part-0.parquet", "rows": 1}]
    files += [{"path": f"data/part-{r}.parquet", "rows": 1, "version": r} for r in refs]
    return {"version_id": v, "files": files}


# -- gc_plan: pure policy -------------------------------------------------------------------

def test_keeps_the_newest_n_and_latest():
    vs = [vid(h) for h in (100, 90, 80, 70, 60)]
    mans = {v: manifest(v) for v in vs}
    delete, keep = gc_plan(vs, vs[-1], mans, 2, NOW, 24)
    assert keep == vs[-2:] and delete == vs[:3]
    # _latest is kept even when it is not among the newest (it never goes backwards in
    # practice, but gc must not depend on that)
    delete, keep = gc_plan(vs, vs[0], mans, 2, NOW, 24)
    assert keep == [vs[0], *vs[-2:]] and delete == vs[1:3]
    assert kept_reasons(keep, vs[0], mans, 2) == {vs[0]: "_latest"}
    assert kept_reasons(keep, vs[0], mans, 2, {"x": {vs[0]}}) == {
        vs[0]: "_latest; read by a running build"}
    assert kept_reasons(keep, vs[-1], mans, 2, {"x": {vs[0]}}) == {
        vs[0]: "read by a running build"}
    assert kept_reasons(keep, vs[-1], mans, 2) == {vs[0]: "reason not known"}  # (not gc's)
    served = {**mans, vs[-1]: manifest(vs[-1], refs=(vs[0],))}  # all that holds, each named
    assert kept_reasons(keep, vs[0], served, 2, {"x": {vs[0]}}) == {
        vs[0]: f"_latest; read by a running build; its files serve {vs[-1]}"}
    delete, keep = gc_plan(vs, vs[-1], mans, 0, NOW, 24)
    assert keep == [vs[-1]] and delete == vs[:-1]
    for n in range(1, 12):  # more than there are keeps them all (6-9 of 5 kept 1-4)
        delete, keep = gc_plan(vs, None, mans, n, NOW, 24)
        assert keep == vs[-n:] and delete == vs[:-n], n


def test_referenced_versions_are_kept_transitively():
    a, b, c, d, e = (vid(h) for h in (100, 90, 80, 70, 60))
    mans = {a: manifest(a), b: manifest(b), c: manifest(c, refs=(b,)), d: manifest(d),
            e: manifest(e, refs=(c,))}
    delete, keep = gc_plan([a, b, c, d, e], e, mans, 1, NOW, 24)
    assert keep == [b, c, e] and delete == [a, d]
    # an entry naming its own version is no reference
    mans[e] = manifest(e, refs=(e,))
    delete, keep = gc_plan([a, b, c, d, e], e, mans, 1, NOW, 24)
    assert keep == [e] and delete == [a, b, c, d]


def test_uncommitted_directories_go_only_when_old():
    done = vid(200)
    old, young, future = vid(30, "bbbbbb"), vid(5, "cccccc"), vid(-1, "dddddd")
    names = sorted([done, old, young, future, "not-a-version-id"])
    delete, keep = gc_plan(names, done, {done: manifest(done)}, 1, NOW, 24)
    assert delete == [old]
    assert keep == sorted([done, young, future, "not-a-version-id"])
    delete, _ = gc_plan(names, done, {done: manifest(done)}, 1, NOW, 2)
    assert delete == sorted([old, young])
    # a kept manifest that references an uncommitted directory keeps it
    mans = {done: manifest(done, refs=(old,))}
    delete, keep = gc_plan(names, done, mans, 1, NOW, 24)
    assert old in keep and delete == []


def test_unreadable_kept_manifest_and_bad_keep_are_errors():
    a, b = vid(50), vid(40)
    with pytest.raises(StoreError, match=f"manifest of kept version {b} cannot be read"):
        gc_plan([a, b], b, {a: manifest(a), b: None}, 1, NOW, 24)
    delete, _ = gc_plan([a, b], b, {a: None, b: manifest(b)}, 1, NOW, 24)
    assert delete == [a]  # an unreadable manifest of a version that goes is no obstacle
    with pytest.raises(StoreError, match="keep=-1"):
        gc_plan([a], a, {a: manifest(a)}, -1, NOW, 24)


def test_version_time_parses_ids():
    assert version_time(vid(3)) == NOW - dt.timedelta(hours=3)
    assert version_time("garbage") is None
    assert version_time(new_version_id(NOW)) == NOW


# -- TableStore.gc on real filesystems -----------------------------------------------------

@pytest.fixture(params=["memory", "local"])
def root(request, tmp_path):
    if request.param == "memory":  # a fresh root: the memory filesystem is process-wide
        url = f"memory://gc-{uuid.uuid4().hex[:8]}"
        yield url
        fsspec.filesystem("memory").rm(url, recursive=True)
    else:
        yield str(tmp_path / "gc-root")


def committed(store: TableStore, hours_ago: float, tag: str) -> str:
    v = vid(hours_ago, tag)
    files, man = write_version(store, v)
    store.commit(v, man, files)
    return v


def test_store_gc_deletes_old_versions_and_leftovers(root):
    store = TableStore(root, "sids")
    vs = [committed(store, h, f"{i:06x}") for i, h in enumerate((100, 90, 80, 70))]
    leftover, running = vid(48, "eeeeee"), vid(1, "ffffff")
    write_version(store, leftover)
    write_version(store, running)
    plan = store.gc(2, dry_run=True, now=NOW)
    assert plan["deleted"] == vs[:2] and plan["deleted_uncommitted"] == [leftover]
    assert store.version_dirs() == sorted([*vs, leftover, running])  # dry run: nothing goes
    report = store.gc(2, now=NOW)
    assert report["deleted"] == vs[:2] and report["kept"] == [vs[2], vs[3]]
    assert report["kept_uncommitted"] == [running]
    assert store.versions() == vs[2:] and store.latest() == vs[3]
    assert store.version_dirs() == sorted([vs[2], vs[3], running])
    assert store.read_data(vs[2]).num_rows == 50  # kept versions are intact
    again = store.gc(2, now=NOW)
    assert again["deleted"] == [] and again["deleted_uncommitted"] == []


def test_store_gc_removes_the_manifest_first(tmp_path, monkeypatch):
    store = TableStore(str(tmp_path / "r"), "sids")
    old, new = committed(store, 50, "aaaaaa"), committed(store, 40, "bbbbbb")
    calls = []
    real_rm = store.fs.rm

    def rm(path, recursive=False, **kw):
        calls.append((path, recursive))
        if len(calls) == 1:  # after the manifest is gone the version no longer exists
            real_rm(path, recursive=recursive, **kw)
            assert store.versions() == [new]
            return None
        return real_rm(path, recursive=recursive, **kw)

    monkeypatch.setattr(store.fs, "rm", rm)
    store.gc(1, now=NOW)
    assert calls[0] == (f"{store.version_dir(old)}/{MANIFEST}", False)
    assert calls[1] == (store.version_dir(old), True)
    assert store.version_dirs() == [new]


def test_store_gc_keeps_versions_that_kept_manifests_reference(root):
    store = TableStore(root, "sids")
    base = committed(store, 100, "aaaaaa")
    middle = committed(store, 90, "bbbbbb")
    # a newer version whose manifest lists a data part that lives in `base`
    top = vid(80, "cccccc")
    files, man = write_version(store, top)
    store.commit(top, man, files)
    body = json.loads(store.read_bytes(top, MANIFEST))
    body["files"].append({"path": "data/part-00000.parquet", "rows": 30, "bytes": 0,
                          "sha256": "", "version": base})
    store.write_file(top, MANIFEST, json.dumps(body).encode())
    report = store.gc(1, now=NOW)
    assert report["deleted"] == [middle] and report["kept"] == [base, top]
    assert report["kept_because"] == {base: f"its files serve {top}"}  # (--keep 1: not said)
    assert f"          {base} beyond --keep 1: its files serve {top}" in format_gc(report)
    paths = store.part_paths(top)
    assert any(p.startswith(store.version_dir(base)) for p in paths)
    assert store.read_data(top).num_rows == 80  # its own 50 rows + 30 from `base`


def test_cli_gc_and_errors(tmp_path, capsys):
    root = str(tmp_path / "cli")
    store = TableStore(root, "t")
    vs = [committed(store, h, f"{i:06x}") for i, h in enumerate((30, 20, 10))]
    args = ["versions", "gc", "--root", root, "--table", "t"]
    assert main([*args, "--keep", "1", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["deleted"] == vs[:2] and out["dry_run"] and store.versions() == vs
    assert main([*args, "--keep", "1"]) == 0
    text = capsys.readouterr().out
    assert "deleted 2 committed version(s)" in text and vs[0] in text
    assert store.versions() == [vs[2]] and store.latest() == vs[2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--keep N" in err and err.count("\n") == 1
    assert main([*args, "--keep", "-1"]) == 2
    assert capsys.readouterr().err.startswith(
        "semid versions gc: error: needs --keep N, not -1 (N >= 0: ")


def test_gc_with_latest_missing_keeps_the_newest_and_with_latest_damaged_deletes_nothing(root):
    store = TableStore(root, "sids")
    vs = [committed(store, h, f"{i:06x}") for i, h in enumerate((100, 90, 80))]
    store.fs.rm(f"{store.base}/_latest")  # stands for the newest committed version
    report = store.gc(0, now=NOW)
    assert report["deleted"] == vs[:2] and store.versions() == [vs[2]]
    more = [committed(store, h, f"{i:06x}") for i, h in enumerate((70, 60), 3)]
    for content in (b"garbage", vs[0].encode(), b""):  # damaged; empty: as if missing
        store.fs.pipe(f"{store.base}/_latest", content)
        if content:
            for dry_run in (True, False):
                with pytest.raises(StoreError, match="_latest names .* not a committed version"):
                    store.gc(0, dry_run=dry_run, now=NOW)
            assert store.versions() == [vs[2], *more]  # nothing deleted
    assert store.gc(0, dry_run=True, now=NOW)["kept"] == [more[-1]]


def test_gc_keeps_an_old_version_whose_build_still_runs(tmp_path, capsys):
    from semid_dist.io.store import RUN_FILE, STAGING
    from semid_dist.resume import claim_version

    store = TableStore(str(tmp_path / "live"), "t")
    done = committed(store, 100, "000001")
    old = vid(48, "00000a")  # a resumed run keeps its first run's id, however old
    write_version(store, old)
    store.write_file(old, f"{STAGING}/{RUN_FILE}", json.dumps({"key": "k"}).encode())
    assert claim_version(store, "k")[:2] == (old, True)  # this process's now, and running
    report = store.gc(0, now=NOW)
    assert report["deleted_uncommitted"] == [] and report["kept_uncommitted"] == [old]
    assert store.gc(0, min_age_hours=float("inf"), now=NOW)["kept_uncommitted"] == [old]
    store.write_file(old, f"{STAGING}/{RUN_FILE}", json.dumps({"key": "k"}).encode())  # gone
    assert store.gc(0, now=NOW)["deleted_uncommitted"] == [old]
    assert store.version_dirs() == [done]
    # the commands' --table is one directory name too; a damaged _latest still lists
    assert main(["versions", "list", "--root", str(tmp_path), "--table", ".."]) == 2
    assert "--table: '..' is not a table name" in capsys.readouterr().err
    store.fs.pipe(f"{store.base}/_latest", b"garbage")
    assert main(["versions", "list", "--root", store.root, "--table", "t"]) == 0
    out = capsys.readouterr()
    assert done in out.out and "warning: " in out.err and "not a committed version" in out.err


def test_gc_keeps_the_versions_a_running_build_reads(tmp_path):
    from semid_dist.resume import claim_version, heartbeat

    store = TableStore(str(tmp_path / "reads"), "t")
    parent, newer = committed(store, 100, "000001"), committed(store, 90, "000002")
    vid = claim_version(store, "k", parent=parent).version  # an incremental build from `parent`
    report = store.gc(0, now=NOW)
    assert report["deleted"] == [] and report["kept"] == [parent, newer]
    assert report["kept_because"] == {parent: "read by a running build", newer: "_latest"}
    assert report["kept_uncommitted"] == [vid]
    with pytest.raises(RuntimeError), heartbeat(store, vid, "k", (parent,), parent=parent):
        raise RuntimeError("the build failed")  # it gives its version up
    report = store.gc(0, min_age_hours=float("inf"), now=NOW)
    assert report["deleted"] == [parent] and report["kept_uncommitted"] == [vid]


def test_gc_keeps_and_reports_what_a_build_started_while_it_waited_reads(tmp_path,
                                                                        monkeypatch):
    """A build that starts while gc waits for the table's lock (planned before it) keeps
    the version it reads, which gc reports kept, with the reason, and the build's own as
    kept uncommitted (neither was in the report: its counts did not add up)."""
    from semid_dist.io import locks
    from semid_dist.io.store import LATEST_LOCK
    from semid_dist.resume import claim_version

    store = TableStore(str(tmp_path / "out"), "t")
    parent, newer = committed(store, 100, "000001"), committed(store, 90, "000002")
    lock = tmp_path / "out" / "t" / LATEST_LOCK
    lock.write_text("4242-alive")  # a build committing: gc has planned and waits
    monkeypatch.setattr(locks, "WAIT_NOTICE_S", 0.05)
    started: list[str] = []

    def a_build_starts(broken: bool) -> None:
        lock.unlink()  # the committing build lets go; an incremental one from `parent` starts
        started.append(claim_version(store, "k", parent=parent).version)

    report = store.gc(0, now=NOW, on_wait=a_build_starts)
    assert report["deleted"] == [] and report["kept"] == [parent, newer]
    assert report["kept_because"] == {parent: "read by a running build", newer: "_latest"}
    assert report["kept_uncommitted"] == started and len(started) == 1
    assert store.versions() == [parent, newer]
    assert f"{parent} beyond --keep 0: read by a running build" in format_gc(report)


def test_a_resumed_version_keeps_the_latest_its_first_run_started_from(tmp_path):
    """The version `latest` meant as a build started is recorded with its version, and a
    resumed run keeps its first run's: an incremental version then moves `_latest` only from
    that one, not from one committed between the two runs."""
    from semid_dist.resume import claim_version, heartbeat

    store = TableStore(str(tmp_path / "resume"), "t")
    parent = committed(store, 100, "000001")
    first = claim_version(store, "k", parent=parent, latest=parent)
    assert first.latest == parent and not first.resuming
    with pytest.raises(RuntimeError), heartbeat(store, first.version, "k", parent=parent,
                                                latest=parent):
        raise RuntimeError("killed")  # the build is gone
    again = claim_version(store, "k", parent=parent, latest="20990101T000000000000Z-aaaaaa")
    assert again.resuming and again.version == first.version and again.latest == parent


def test_gc_removes_a_committed_versions_work_files_once_its_build_is_gone(tmp_path, capsys):
    """A build killed after writing its manifest leaves its `_staging` folder in a committed
    version: gc removes the folder (nothing else) once the build is gone, not while it runs."""
    from semid_dist.io.store import STAGING
    from semid_dist.resume import claim_version, heartbeat

    store = TableStore(str(tmp_path / "staging"), "t")
    vid = claim_version(store, "k").version
    files, man = write_version(store, vid)
    store.write_file(vid, f"{STAGING}/codes-000000.parquet", b"work file")
    store.commit(vid, man, files)
    staging = f"{store.version_dir(vid)}/{STAGING}"
    report = store.gc(5)  # its build (this process) has not given it up: gc keeps them
    assert report["staging_removed"] == [] and store.fs.exists(staging)
    with pytest.raises(RuntimeError), heartbeat(store, vid, "k", parent=None):
        raise RuntimeError("killed")  # the build is gone
    assert main(["versions", "gc", "--root", store.root, "--table", "t", "--keep", "5",
                 "--dry-run"]) == 0
    assert ("would remove the work files (_staging) a killed build left in committed "
            f"version(s): {vid}") in capsys.readouterr().out and store.fs.exists(staging)
    report = store.gc(5)
    assert report["staging_removed"] == [vid] and report["kept"] == [vid]
    assert not store.fs.exists(staging)
    store.check_files(vid)  # every file the manifest lists is there
    assert store.read_data(vid).num_rows == 50 and store.gc(5)["staging_removed"] == []


def test_commands_on_a_damaged_version_name_the_file(tmp_path, capsys):
    """versions show on a version missing a data part or with an unreadable metrics.json,
    and report on a manifest of the wrong shape: one named line each, status 2."""
    store = TableStore(str(tmp_path / "damaged"), "t")
    v = committed(store, 10, "000001")
    args = ["--root", store.root, "--table", "t"]
    store.fs.rm(f"{store.version_dir(v)}/data/part-00001.parquet")
    assert main(["versions", "show", *args]) == 2
    assert "data/part-00001.parquet, which is missing" in capsys.readouterr().err
    v2 = committed(store, 5, "000002")
    store.write_file(v2, "metrics.json", b'{"rows": ')  # truncated
    with pytest.raises(StoreError, match=rf"version {v2} is damaged: .*metrics.json cannot be "
                                         r"read \(JSONDecodeError"):
        store.read_json(v2, "metrics.json")
    store.fs.pipe(f"{store.version_dir(v2)}/_manifest.json", b"{}")
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert f"the manifest of version {v2}" in err and "cannot be read" in err
    assert not store.fs.exists(f"{store.version_dir(v2)}/report")  # nothing written


def test_gc_says_when_it_waits_for_the_tables_lock(tmp_path, capsys, monkeypatch):
    """A build committing (or a lock a killed one left, broken after a minute): gc waited
    without a word."""
    import time

    from semid_dist.io import locks
    from semid_dist.io.store import LATEST_LOCK

    store = TableStore(str(tmp_path / "out"), "t")
    old = committed(store, 10, "000001")
    new = committed(store, 5, "000002")
    lock = tmp_path / "out" / "t" / LATEST_LOCK
    lock.write_text("4242-alive")  # held by a live build, which lets go after a moment
    monkeypatch.setattr(locks, "WAIT_NOTICE_S", 0.05)
    tries: list[float] = []
    break_stale = locks._break_stale_lock

    def holder_lets_go(path: str) -> bool:  # (each try gc makes while the lock is held)
        tries.append(time.monotonic())
        if tries[-1] - tries[0] > 0.1:  # past WAIT_NOTICE_S since the first try: said
            lock.unlink(missing_ok=True)
        return break_stale(path)

    monkeypatch.setattr(locks, "_break_stale_lock", holder_lets_go)
    assert main(["versions", "gc", "--root", store.root, "--table", "t", "--keep", "0"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"semid versions gc: waiting for the lock of {store.url} (a build is committing or "
        "starting; a lock older than 60 s is a dead build's and is broken)")
    assert store.versions() == [new] and old not in store.version_dirs()


def test_gc_says_when_it_breaks_a_lock_a_dead_process_left(tmp_path, capsys):
    """A lock file older than LOCK_STALE_S (its holder was killed): gc breaks it and says so
    (it broke it without a word, after a minute of 'waiting')."""
    import os
    import time

    from semid_dist.io import locks
    from semid_dist.io.store import LATEST_LOCK

    store = TableStore(str(tmp_path / "out"), "t")
    old = committed(store, 10, "000001")
    new = committed(store, 5, "000002")
    lock = tmp_path / "out" / "t" / LATEST_LOCK
    lock.write_text("4242-dead")
    then = time.time() - locks.LOCK_STALE_S - 5
    os.utime(lock, (then, then))
    assert main(["versions", "gc", "--root", store.root, "--table", "t", "--keep", "0"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"semid versions gc: broke the lock of {store.url}: it was older than 60 s, so left "
        "by a build or gc that died")
    assert store.versions() == [new] and old not in store.version_dirs() and not lock.exists()


def test_a_diff_whose_version_gc_removes_meanwhile_says_so(small_catalog, tmp_path, capsys,
                                                          monkeypatch):
    """`versions diff` of latest against its parent while a `versions gc --keep 0` removes the
    parent: FileNotFoundError traceback."""
    from semid_dist import diff
    from semid_dist.pipeline import build
    from tests.conftest import small_config

    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    parent = build(small_config(catalog, root), log=lambda m: None).version_id
    build(small_config(catalog, root, seed=8), log=lambda m: None)
    store = TableStore(root, "sids")
    bucket = diff.drift_bucket

    def gc_first(*args):  # the gc runs between the diff's plan and its reads
        store.gc(0, min_age_hours=0)
        return bucket(*args)

    monkeypatch.setattr(diff, "drift_bucket", gc_first)
    assert main(["versions", "diff", "--root", root, "--table", "sids"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"semid versions diff: error: version {parent} was removed while it was read (by `semid "
        "versions gc`?); run the command again")
