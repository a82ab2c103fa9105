"""Which version a build writes (`semid_dist.resume`): a killed run's version is continued
only when its build is gone; a build of the same config started while another runs writes a
version of its own."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import time

import pytest

from semid_dist.errors import StoreError
from semid_dist.io.store import MANIFEST, RUN_FILE, STAGING, TableStore, new_version_id
from semid_dist.pipeline import build
from semid_dist.resume import (
    OWNER_STALE_S,
    PASSED_LOOKBACK,
    Claim,
    claim_version,
    planned_parent,
    resumable_version,
)
from tests.conftest import run_together, small_config


def quiet(msg: str) -> None:
    pass


def run_file(store: TableStore, vid: str) -> str:
    return f"{store.version_dir(vid)}/{STAGING}/{RUN_FILE}"


def set_owner(store: TableStore, vid: str, **owner) -> None:
    run = json.loads(store.fs.cat_file(run_file(store, vid)))
    run["owner"].update(owner)
    store.fs.pipe(run_file(store, vid), json.dumps(run).encode())


def test_a_version_is_continued_only_when_its_build_is_gone(tmp_path):
    store = TableStore(str(tmp_path / "out"), "sids")
    vid, resuming, *_ = claim_version(store, "key-a")
    assert not resuming and store.uncommitted() == [vid]
    # this process owns it and runs: a build of the same key takes a new version
    assert resumable_version(store, "key-a") is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    set_owner(store, vid, pid=int(dead.stdout), started=None)  # a process that has exited
    assert resumable_version(store, "key-a") == vid
    assert resumable_version(store, "key-b") is None  # another run's
    again, resuming, *_ = claim_version(store, "key-a")
    assert again == vid and resuming  # and it is now this process's
    assert resumable_version(store, "key-a") is None
    # another machine's build: alive while its heartbeat is fresh
    set_owner(store, vid, machine="elsewhere/boot", beat=time.time() - 5)
    assert resumable_version(store, "key-a") is None
    set_owner(store, vid, beat=time.time() - OWNER_STALE_S - 1)
    assert resumable_version(store, "key-a") == vid
    set_owner(store, vid, beat=time.time() + 600)  # a clock that runs ahead: alive
    assert resumable_version(store, "key-a") is None
    set_owner(store, vid, beat=time.time() + 86400 * 365)  # far in the future: no build's
    assert resumable_version(store, "key-a") == vid
    # a run file written before owners were recorded: its build is taken as gone
    store.fs.pipe(run_file(store, vid), json.dumps({"key": "key-a"}).encode())
    assert resumable_version(store, "key-a") == vid
    newer = new_version_id()  # the newest of the key is the one continued
    store.write_file(newer, f"{STAGING}/{RUN_FILE}", json.dumps({"key": "key-a"}).encode())
    assert resumable_version(store, "key-a") == newer


def test_two_builds_of_one_config_at_once_write_two_intact_versions(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    results = run_together(*[lambda: build(small_config(catalog, root), log=quiet)] * 2)
    store = TableStore(root, "sids")
    ids = sorted(r.version_id for r in results)
    assert len(set(ids)) == 2 and store.versions() == ids and store.uncommitted() == []
    for vid in ids:  # every file as its manifest says
        for entry in store.manifest(vid)["files"]:
            data = store.read_bytes(vid, entry["path"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], (vid, entry["path"])
    a, b = (store.read_data(v).sort_by("item_id") for v in ids)
    assert a.column("sid").equals(b.column("sid"))  # same input, config and seed


def test_an_output_root_it_cannot_write_to_is_a_named_error(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = tmp_path / "a-file"
    root.write_text("not a folder")
    with pytest.raises(StoreError, match=rf"output.root '{root}': cannot write the table "
                                         r"'sids' there \(.*\); point output.root at a folder"):
        build(small_config(catalog, str(root)), log=quiet)
    assert root.read_text() == "not a folder"


def test_a_failed_build_gives_its_version_up_and_a_reused_pid_is_not_its_owner(tmp_path):
    from semid_dist.resume import heartbeat

    store = TableStore(str(tmp_path / "out"), "sids")
    vid = claim_version(store, "key-a").version
    with pytest.raises(RuntimeError), heartbeat(store, vid, "key-a", parent=None):
        raise RuntimeError("the build failed")
    assert resumable_version(store, "key-a") == vid  # in this process too
    vid, resuming, *_ = claim_version(store, "key-a")
    assert resuming and resumable_version(store, "key-a") is None
    set_owner(store, vid, started="1")  # this pid, but another process's start time
    assert resumable_version(store, "key-a") == vid


def test_a_failed_build_whose_version_folder_is_gone_does_not_write_it_again(tmp_path):
    """The table moved (or the folder removed) under a build: its last write, giving the
    version up, made a skeleton `_staging/run.json` there that a later build resumed."""
    import shutil

    from semid_dist.resume import heartbeat

    store = TableStore(str(tmp_path / "out"), "sids")
    vid = claim_version(store, "key-a").version
    with pytest.raises(RuntimeError), heartbeat(store, vid, "key-a", parent=None):
        shutil.rmtree(store.version_dir(vid))
        raise RuntimeError("the build failed")
    assert not (tmp_path / "out" / "sids" / "versions" / vid).exists()
    assert resumable_version(store, "key-a") is None


def test_a_wait_for_the_table_lock_is_logged(tmp_path, monkeypatch):
    from semid_dist.io import locks
    from semid_dist.io.store import LATEST_LOCK

    store = TableStore(str(tmp_path / "out"), "sids")
    lock = tmp_path / "out" / "sids" / LATEST_LOCK
    lock.parent.mkdir(parents=True)
    lock.write_text("4242-alive")  # held by a live build
    monkeypatch.setattr(locks, "WAIT_NOTICE_S", 0.05)
    lines: list[str] = []

    def log(line: str) -> None:  # told of the wait, the holder lets go
        lines.append(line)
        lock.unlink()

    vid, resuming, *_ = claim_version(store, "key-a", log)
    assert not resuming and store.uncommitted() == [vid]
    assert len(lines) == 1 and lines[0].startswith(f"plan: waiting for the lock of {store.url}")


def test_a_damaged_owner_record_is_no_live_build(tmp_path):
    store = TableStore(str(tmp_path / "out"), "sids")
    vid = claim_version(store, "key-a").version
    for owner in ({"pid": 1e400}, {"pid": float("-inf")}, {"beat": float("inf")},
                  {"pid": "abc"}, {"beat": [1]}):
        run = json.loads(store.fs.cat_file(run_file(store, vid)))
        run["owner"].update(owner, machine="elsewhere/boot")
        store.fs.pipe(run_file(store, vid), json.dumps(run).encode())
        assert resumable_version(store, "key-a") == vid, owner
        assert store.gc(5, min_age_hours=0)["deleted_uncommitted"] == [vid]
        vid = claim_version(store, "key-a").version  # a new one for the next case


def test_a_resumed_version_keeps_its_first_parent_where_it_can(tmp_path):
    """The parent a killed run recorded is the resumed version's (not the `_latest` of the
    re-run), where it is still committed; `_latest` where the run file records none (an
    older release's), a value that is no version id, or a version gc removed."""
    store = TableStore(str(tmp_path / "out"), "sids")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    first, now = new_version_id(start), new_version_id(start + dt.timedelta(seconds=1))
    for v in (first, now):  # committed: a manifest is what makes a version one
        store.write_file(v, MANIFEST, b"{}")
    lines: list[str] = []

    def resumed(run: dict) -> Claim:
        """Claim `now`'s child after a killed run whose run file is `run` (a given-up one)."""
        vid = new_version_id()
        store.write_file(vid, f"{STAGING}/{RUN_FILE}",
                         json.dumps({"key": "k", "owner": None, **run}).encode())
        lines.clear()
        planned = planned_parent(store, "k", now)  # what the checks before the claim use
        claim = claim_version(store, "k", lines.append, parent=now)
        assert claim.version == vid and claim.resuming and claim.parent == planned
        return claim

    kept = resumed({"parent": first})
    assert kept.parent == first and kept.reads == (first,)
    assert lines == [f"plan: version {kept.version} keeps the parent its first run started "
                     f"from, {first} (committed since: {now})"]
    assert json.loads(store.fs.cat_file(run_file(store, kept.version)))["parent"] == first
    assert resumed({"parent": None}).parent is None  # the table's first build: none
    assert resumed({}).parent == now and lines == []  # an older release's run file
    assert resumed({"parent": 5}).parent == now and lines == []  # garbage
    gone = resumed({"parent": new_version_id(start - dt.timedelta(seconds=1))})
    assert gone.parent == now and "is no longer committed" in lines[0]


def test_a_killed_run_a_later_commit_passed_is_not_continued_and_the_log_says_so(tmp_path):
    """A killed run of this build whose version sorts before `_latest` (a version committed
    after it started) is not continued: the re-run starts a new version, and says why (it
    started anew without a word); another build's killed run is not named."""
    store = TableStore(str(tmp_path / "out"), "sids")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    killed, other, later = (new_version_id(start + dt.timedelta(seconds=s)) for s in (0, 1, 2))
    for vid, key in ((killed, "k"), (other, "another")):
        store.write_file(vid, f"{STAGING}/{RUN_FILE}",
                         json.dumps({"key": key, "owner": None}).encode())
    store.write_file(later, MANIFEST, b"{}")
    assert store.head() == later and resumable_version(store, "k") is None
    lines: list[str] = []
    claim = claim_version(store, "k", lines.append, parent=later)
    assert not claim.resuming and claim.version > later
    assert lines == [f"plan: the unfinished run of this build in version {killed} is not "
                     "continued: a version was committed after it started (a version "
                     "continued would sort before _latest); a new version starts (gc removes "
                     f"{killed}'s folder after --min-age-hours)"]
    lines.clear()
    claim_version(store, "another-key", lines.append, parent=later)
    assert lines == []
    # only the PASSED_LOOKBACK newest uncommitted versions before _latest are read
    for s in range(PASSED_LOOKBACK):  # killed runs of another build, after `killed`
        vid = new_version_id(start + dt.timedelta(seconds=1, milliseconds=s + 1))
        store.write_file(vid, f"{STAGING}/{RUN_FILE}",
                         json.dumps({"key": "another", "owner": None}).encode())
    lines.clear()
    assert not claim_version(store, "k", lines.append, parent=later).resuming and lines == []
