"""Storage that fails under a build or a command: a full disk (a real tmpfs of a few MB), a
read-only mount, a table this user may not read, `_latest` that cannot be written after the
manifest. Each is one line naming the file, the reason and the fix; the table's committed
versions stay as they were, nothing part-written is left, and the same command resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from semid_dist.cli import main
from semid_dist.errors import StoreError
from semid_dist.io.store import LATEST, LATEST_LOCK, TableStore
from semid_dist.pipeline import build
from tests.conftest import REPO, small_config


def _mount(folder: Path, *options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                   check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 24 MB tmpfs file system of its own; skips where this user may not mount one."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount(disk, "size=24m")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take the disk's free space but `leave` bytes with a file of zeros."""
    st = os.statvfs(disk)
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb") as f:
        try:
            f.write(bytes(max(st.f_bavail * st.f_frsize - leave, 0)))
        except OSError as exc:  # asked for it all: the disk is full
            assert exc.errno == errno.ENOSPC
    return filler


def _left_over(base: Path) -> list[str]:
    """Part-written files and lock files a failed write left in the table."""
    return sorted(str(p.relative_to(base)) for p in base.rglob("*")
                  if ".tmp-" in p.name or p.name == LATEST_LOCK or ".stale-" in p.name)


def _sids(store: TableStore, vid: str) -> dict[int, tuple[list[int], int]]:
    table = store.read_data(vid)
    return dict(zip(table["item_id"].to_pylist(),
                    zip(table["sid"].to_pylist(), table["suffix"].to_pylist())))


def test_a_full_disk_stops_the_build_in_one_line_and_the_rerun_resumes(small_catalog, small_disk,
                                                                      tmp_path, capsys):
    catalog, _ = small_catalog
    root = small_disk / "out"
    cfg = small_config(catalog, str(root))
    first = build(cfg, log=lambda msg: None).version_id
    store = TableStore(str(root), "sids")
    size = sum(p.stat().st_size for p in Path(store.version_dir(first)).rglob("*"))
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.to_dict()))
    filler = _fill(small_disk, size // 3)  # the scan's probe fits; the version does not
    assert main(["build", "--config", str(path), "seed=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("semid build: error: [Errno 28] No space left on device")
    assert str(root) in err[-1]  # the file, or the table it was writing
    second = store.uncommitted()[-1]
    assert err[-1].endswith("; nothing was committed (the table's versions are as they were): "
                            "free space on that file system (the table's: `semid versions gc` "
                            "removes old versions and the work files of builds that are gone), "
                            f"then run the same command again (it resumes version {second})")
    assert not any("Traceback" in line for line in err)
    assert store.versions() == [first] and store.latest() == first
    assert _left_over(Path(store.base)) == []
    filler.unlink()
    assert main(["build", "--config", str(path), "seed=8"]) == 0
    assert f"resuming version {second}" in capsys.readouterr().err
    assert store.versions() == [first, second] and store.latest() == second
    reference = build(small_config(catalog, str(tmp_path / "ref"), seed=8), log=lambda m: None)
    assert _sids(store, second) == _sids(TableStore(str(tmp_path / "ref"), "sids"),
                                         reference.version_id)
    # gc on a full disk: the way to free it (its lock file cannot hold its token)
    _fill(small_disk, 0)
    assert main(["versions", "gc", "--root", str(root), "--table", "sids", "--keep", "1",
                 "--min-age-hours", "0"]) == 0
    assert store.versions() == [second] and _left_over(Path(store.base)) == []


def test_a_read_only_table_is_one_line_for_every_command(small_catalog, small_disk, capsys):
    catalog, _ = small_catalog
    root = small_disk / "out"
    build(small_config(catalog, str(root)), log=lambda msg: None)
    vid = build(small_config(catalog, str(root), seed=8), log=lambda msg: None).version_id
    (Path(TableStore(str(root), "sids").version_dir(vid)) / "report" / "report.html").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    args = ["--root", str(root), "--table", "sids"]
    for command in (["versions", "gc", *args, "--keep", "0", "--min-age-hours", "0"],
                    ["report", *args]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "[Errno 30] Read-only file system" in err, err
    assert err.endswith("run semid report where the table can be written, or give --out a "
                        "folder of its own")
    assert main(["versions", "list", *args]) == 0 and vid in capsys.readouterr().out


def test_latest_that_cannot_be_written_after_the_manifest_says_the_version_is_committed(
        small_catalog, tmp_path, monkeypatch):
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    first = build(small_config(catalog, root), log=lambda msg: None).version_id
    store = TableStore(root, "sids")

    def full(self, version_id):  # the disk fills between the manifest and `_latest`
        raise OSError(errno.ENOSPC, "No space left on device", f"{self.base}/{LATEST}")

    monkeypatch.setattr(TableStore, "_write_latest", full)
    with pytest.raises(StoreError) as caught:
        build(small_config(catalog, root, seed=8), log=lambda msg: None)
    second = store.versions()[-1]
    assert str(caught.value) == (
        f"version {second} is committed, but _latest was not moved ([Errno 28] No space left "
        f"on device: '{store.base}/{LATEST}'): readers of latest get the version before it "
        f"until a newer one commits; to serve it now, write its id into {root}/sids/{LATEST} "
        "(unless that names a newer version already)")
    assert store.versions() == [first, second] and store.latest() == first
    assert not (Path(store.base) / LATEST_LOCK).exists()
    monkeypatch.undo()
    store.check_files(second)
    assert store.advance_latest(second) and store.head() == second


def test_a_table_this_user_may_not_read_is_an_error_not_an_empty_table(small_catalog, tmp_path):
    """Run without root's right to read everything (setpriv drops it): the store's existence
    checks said "no such file" for a folder it may not read, so `versions list` printed no
    versions, status 0."""
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    if os.geteuid() != 0 or not shutil.which("setpriv") or subprocess.run(
            [*drop, "true"], capture_output=True).returncode != 0:
        pytest.skip("dropping root's file-access capabilities needs root and setpriv")
    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    build(small_config(catalog, root), log=lambda msg: None)
    base = Path(root) / "sids"
    for locked in (base, base / "versions"):
        locked.chmod(0)
        try:
            for command in (["versions", "list"], ["versions", "show"], ["report"]):
                name = " ".join(command[:2] if command[0] == "versions" else command[:1])
                run = subprocess.run(
                    [*drop, sys.executable, "-m", "semid_dist.cli", *command, "--root", root,
                     "--table", "sids"], capture_output=True, text=True, cwd=REPO, timeout=120)
                assert run.returncode == 2, (command, run.stdout, run.stderr[-2000:])
                assert run.stderr.strip().splitlines() == [
                    f"semid {name}: error: [Errno 13] Permission denied: '{locked}': "
                    "give this user (or these credentials) access to it"], command
        finally:
            locked.chmod(0o755)


def test_part_written_files_are_removed_when_a_write_fails(small_disk):
    from semid_dist.io import fs as fsio

    fs, _ = fsio.resolve(str(small_disk))
    _fill(small_disk, 64 * 1024)
    with pytest.raises(OSError) as caught:
        fsio.write_bytes(fs, str(small_disk / "t" / "big.bin"), bytes(1 << 20))
    assert caught.value.errno == errno.ENOSPC
    assert list((small_disk / "t").iterdir()) == []


def test_a_write_that_fails_part_way_leaves_no_file_on_any_machine(tmp_path, monkeypatch):
    """The same as above where no tmpfs can be mounted: the disk fills half-way through the
    temporary file's write (the file system's own call, made to fail as a full disk does)."""
    from semid_dist.io import fs as fsio

    fs, _ = fsio.resolve(str(tmp_path))
    write = fs.pipe_file

    def fills_up(path, data, **kwargs):
        write(path, data[: len(data) // 2], **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "pipe_file", fills_up)
    with pytest.raises(OSError, match="No space left"):
        fsio.write_bytes(fs, str(tmp_path / "t" / "big.bin"), bytes(1 << 20))
    assert list((tmp_path / "t").iterdir()) == []


def test_a_storage_failure_that_names_no_file_names_the_table(tmp_path):
    """Some filesystems raise a full disk or a refused write without a file name (object
    stores, pyarrow's writers): the build's line names the table instead, and the version
    the same command resumes."""
    from semid_dist.plan import storage_failures

    store = TableStore(str(tmp_path / "out"), "sids")
    with pytest.raises(StoreError) as err, storage_failures(store, ["v1"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(
        f"[Errno {errno.ENOSPC}] No space left on device (writing the table {store.url}?); "
        "nothing was committed (the table's versions are as they were): ")
    assert str(err.value).endswith("then run the same command again (it resumes version v1)")
    with pytest.raises(StoreError) as err, storage_failures(store, []):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
    assert f"'{tmp_path / 'f'}'" in str(err.value) and "writing the table" not in str(err.value)
    assert "it resumes" not in str(err.value)


@pytest.mark.parametrize("argv, table", [(["bench"], False), (["validate", "c.yaml"], False),
                                         (["report", "--root", "r", "--table", "t"], True)])
def test_a_full_disk_names_gc_only_for_a_command_that_writes_a_table(argv, table, monkeypatch,
                                                                     capsys):
    """The full-disk line of a command: `semid versions gc` frees a table's file system, so
    only a command that writes into a table names it (a benchmark's work folder is not).
    The command's body is replaced by one that meets a full disk (a fault injected)."""
    from semid_dist import cli

    def full(args) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/semid/part.parquet")

    monkeypatch.setattr(cli, f"cmd_{argv[0]}", full)
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"semid {argv[0]}: error: [Errno 28] No space left on device: "
                           "'/data/semid/part.parquet': free space on that file system")
    assert ("semid versions gc" in line) == table
