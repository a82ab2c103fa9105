"""Which version a build writes: a new one, or the one a killed run of the same build left.

A build records in its version's staging folder (`run.json`) its run key (the resolved config
and the input fingerprint) and its owner: the machine (host name, boot id and PID namespace),
the process id with its start time, and a heartbeat the build renews every `BEAT_S` seconds
while it runs. A re-run continues the newest uncommitted version of the same key that is
newer than `_latest` only when that version's owner is gone (`owner_alive`): its build
failed (it gives the version up), its process no longer runs (the same machine, where
/proc tells), or its heartbeat is older than `OWNER_STALE_S` (another machine, or no
/proc). So a build started while the same build runs (a nightly job that overlaps the
previous night's) writes a version of its own instead of the live one's files. Choosing or
creating the version happens under the table's lock (`TableStore.table_lock`), so two
builds started together on one machine, or on a shared POSIX filesystem, cannot both take
the same version; on object stores that lock is per process (see README).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.locks import lock_line
from semid_dist.io.store import RUN_FILE, STAGING, TableStore, new_version_id

if TYPE_CHECKING:
    from semid_dist.config import BuildConfig
    from semid_dist.io.catalog import CatalogPlan

BEAT_S = 10.0  # a running build renews its heartbeat this often
OWNER_STALE_S = 60.0  # a heartbeat older than this is a dead build's (clocks in sync)
# a heartbeat further ahead than this is no build's (garbage): a clock that runs ahead (not
# in sync, against the rule above) still keeps its live build
OWNER_AHEAD_S = 3600.0


SETTINGS_FILE = "run_settings.json"  # in a version's _staging: the settings of its run


def run_key(cfg: BuildConfig, plan: CatalogPlan) -> str:
    """What makes two runs the same run: the resolved config and the input fingerprint."""
    body = json.dumps([cfg.to_dict(), plan.fingerprint], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def run_settings(cfg: BuildConfig, plan: CatalogPlan) -> dict[str, Any]:
    """What `run_key` hashes, by setting: {"config": {dotted key: value}, "input": the input
    fingerprint}, kept in the version's _staging (credentials in a URL masked, as in the
    manifest) so that a later run with other settings can say what differs
    (`other_run_line`)."""
    from semid_dist.config import settings_of

    return {"config": fsio.redact(settings_of(cfg)), "input": plan.fingerprint}


def other_run_line(store: TableStore, vid: str, settings: dict[str, Any]) -> str:
    """The line a build of `settings` (`run_settings`) says of unfinished run `vid` (stopped
    or failed: `killed_runs`' `other`), whose settings differ and which it does not continue
    (a re-run with a lower encode.chunk_rows after a kill for memory started afresh, without
    a word)."""
    try:
        theirs = json.loads(store.read_bytes(vid, f"{STAGING}/{SETTINGS_FILE}"))
        ours, old = settings["config"], theirs["config"]
        changed = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(ours.get(k))}"
                   for k in sorted({*ours, *old}) if ours.get(k) != old.get(k)]
        if theirs["input"] != settings["input"]:
            changed.append("the catalog's files (or the rule cutting them into shards)")
        what = (", ".join(changed[:4]) + (f" and {len(changed) - 4} more"
                                          if len(changed) > 4 else "")) or "none recorded"
    except (OSError, ValueError, KeyError, TypeError):  # (a run of an older semid_dist)
        what = "not recorded"
    return (f"plan: the unfinished run in version {vid} (stopped or failed) is not continued: "
            f"its settings differ ({what}); a new version starts (that run's settings would "
            f"continue it; gc removes {vid}'s folder after --min-age-hours)")


def _machine() -> str:
    """This machine and PID namespace: the host name, the boot id and the namespace of the
    process ids (containers on one host with one host name see different processes)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


def _started(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), "gone" for one that
    has exited (or exited and was not reaped), None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        return None
    return "gone" if fields[0] in ("Z", "X") else fields[19]


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"machine": _machine(), "pid": pid, "started": _started(pid), "beat": time.time()}


def owner_alive(owner: Any, now: float) -> bool:
    """Whether the build that wrote `owner` (a run file's record) may still be running: on
    this machine, by its process (where /proc tells); elsewhere, by its heartbeat: at most
    `OWNER_STALE_S` old, and not over `OWNER_AHEAD_S` ahead of `now`."""
    if not isinstance(owner, dict):  # given up, or a run of an older semid_dist
        return False
    try:
        beat, pid = float(owner.get("beat", 0)), int(owner.get("pid", 0))
    except (TypeError, ValueError, OverflowError):  # a damaged record: not a live build's
        return False
    if not math.isfinite(beat):
        return False
    fresh = -OWNER_AHEAD_S < now - beat < OWNER_STALE_S
    if owner.get("machine") != _machine() or pid <= 0 or _started(os.getpid()) is None:
        return fresh
    started = _started(pid)
    return started != "gone" and owner.get("started") in (None, started)


def _run_path(store: TableStore, vid: str) -> str:
    return fsio.join(store.version_dir(vid), STAGING, RUN_FILE)


def read_run(store: TableStore, vid: str) -> dict[str, Any] | None:
    """A version's run file ({"key", "owner"}), None when it is missing or unreadable."""
    try:
        run = json.loads(store.fs.cat_file(_run_path(store, vid)))
    except (FileNotFoundError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def resumable_version(store: TableStore, key: str) -> str | None:
    """The newest uncommitted version started by the same run (same `run_key`) whose build is
    gone, when it is newer than `_latest`: re-running a killed build continues it."""
    return killed_runs(store, key).resumable


# uncommitted versions before `_latest` whose run files `killed_runs` reads, at most (one
# read each, under the table's lock, on every build)
PASSED_LOOKBACK = 4


class Killed(NamedTuple):
    """The unfinished runs (stopped or failed) a build of one run key finds (`killed_runs`)."""

    resumable: str | None  # its own, newer than `_latest`: continued
    overtaken: str | None  # else its own that sorts before `_latest`: not continued, said
    other: str | None  # else the newest of other settings since `_latest`: said (its line)


def killed_runs(store: TableStore, key: str) -> Killed:
    """The uncommitted versions whose builds are gone that matter to a build of run `key`:
    its own newest one newer than `_latest` (`resumable_version`); else its own newest one
    that sorts before `_latest`, among the `PASSED_LOOKBACK` newest there (a version was
    committed after it started: not continued, and a re-run's log says so); and the newest
    one of another run key newer than `_latest` (not continued; the log names what
    differs: `other_run_line`)."""
    latest, now = store.head() or "", time.time()
    before, other = 0, None
    for vid in reversed(store.uncommitted()):
        if vid <= latest:
            if before == PASSED_LOOKBACK:
                break
            before += 1
        run = read_run(store, vid)
        if run is None or owner_alive(run.get("owner"), now):
            continue
        if run.get("key") == key:
            return Killed(vid, None, None) if vid > latest else Killed(None, vid, other)
        if vid > latest and other is None:
            other = vid
    return Killed(None, None, other)


def overtaken_line(old: str) -> str:
    """What a build says of the unfinished run (stopped or failed) of the same command it
    does not continue."""
    return (f"plan: the unfinished run of this build in version {old} is not continued: a "
            "version was committed after it started (a version continued would sort before "
            f"_latest); a new version starts (gc removes {old}'s folder after "
            "--min-age-hours)")


class Claim(NamedTuple):
    version: str  # the version this build writes
    resuming: bool  # whether it continues a killed run's
    parent: str | None  # its parent: a resumed version keeps the one its first run started from
    reads: tuple[str, ...]  # the committed versions it reads (`gc` keeps them while it runs)
    latest: str | None  # the version `latest` meant as its first run started


def claim_version(store: TableStore, key: str, log: Callable[[str], None] | None = None, *,
                  parent: str | None = None, reads: tuple[str, ...] = (),
                  latest: str | None = None, settings: dict[str, Any] | None = None
                  ) -> Claim:
    """The version this build writes, chosen and recorded as this process's under the
    table's lock (a wait for it is logged), with its parent and the other committed versions
    it reads (`reads`: the codebooks' version), which `gc` keeps while it runs, and the
    version `latest` meant as the build started (`latest`). A resumed version keeps the
    parent (`_first_parent`) and the `latest` its first run recorded. A root it cannot
    write to (the build's first write) is a StoreError naming output.root. `settings`
    (`run_settings`): kept beside the run file; an unfinished run of others is named."""
    def waiting(broken: bool) -> None:
        if log is not None:
            log(f"plan: {lock_line(fsio.redact_url(store.url), broken)}")

    step = "write"  # taking the lock writes its file
    try:
        with store.table_lock(waiting):
            step = "read"
            vid, old, other = killed_runs(store, key)
            resuming = vid is not None
            if vid is not None:
                parent = _first_parent(store, vid, parent, log)
                latest = (read_run(store, vid) or {}).get("latest", latest)
            elif old is not None and log is not None:
                log(overtaken_line(old))
            elif other is not None and settings is not None and log is not None:
                log(other_run_line(store, other, settings))
            vid = vid or new_version_id()
            reads = tuple(sorted({*reads, parent} - {None}))
            step = "write"
            if settings is not None and not resuming:  # (before the run file names it)
                store.write_file(vid, f"{STAGING}/{SETTINGS_FILE}",
                                 json.dumps(settings).encode())
            _write_run(store, vid, key, reads, parent=parent, latest=latest)
    except OSError as exc:
        if step == "read" or fsio.no_answer(exc):  # not a question of writing
            raise
        raise _unwritable(store, exc) from None
    return Claim(vid, resuming, parent, reads, latest)


def planned_parent(store: TableStore, key: str, parent: str | None) -> str | None:
    """The parent a build of run `key` will have, read before it claims its version (the
    checks before anything is written use it): a resumable version's first parent
    (`_first_parent`), else `parent`."""
    vid = resumable_version(store, key)
    return parent if vid is None else _first_parent(store, vid, parent, None)


def _first_parent(store: TableStore, vid: str, parent: str | None,
                  log: Callable[[str], None] | None) -> str | None:
    """The parent of resumed version `vid`: the one its first run started from (its
    codebooks may be warm-started from it, and its id sorts before `vid`'s), not a version
    another build committed meanwhile (`parent`, the `_latest` of now); `parent` where `gc`
    has removed that one since, or the run file (of an older release) records none."""
    run = read_run(store, vid) or {}
    first = run.get("parent", parent)
    if first == parent or not (first is None or isinstance(first, str)):
        return parent
    if first is None or store.is_committed(first):
        if log is not None:
            log(f"plan: version {vid} keeps the parent its first run started from, "
                f"{first or 'none'} (committed since: {parent})")
        return first
    if log is not None:
        log(f"plan: the parent version {vid} started from, {first}, is no longer committed "
            f"(removed by `semid versions gc`?); its parent is now {parent or 'none'}")
    return parent


def live_runs(store: TableStore, versions: list[str]) -> dict[str, set[str]]:
    """{version: the committed versions its build reads} for those of the uncommitted
    `versions` whose build may still be running: `gc` keeps both, however old."""
    now, out = time.time(), {}
    for vid in versions:
        run = read_run(store, vid)
        if run is not None and owner_alive(run.get("owner"), now):
            reads = run.get("reads")
            out[vid] = {str(v) for v in reads} if isinstance(reads, list) else set()
    return out


def leftover_staging(store: TableStore, committed: list[str]) -> list[str]:
    """Those of the `committed` versions that still hold a `STAGING` folder whose build is
    gone (killed after writing the manifest, before removing its work files): `gc` removes
    the folders. One whose build still runs (it is removing them) is left to it."""
    now, out = time.time(), []
    for vid in committed:
        if store.fs.exists(fsio.join(store.version_dir(vid), STAGING)):
            run = read_run(store, vid)
            if run is None or not owner_alive(run.get("owner"), now):
                out.append(vid)
    return out


def check_writable(store: TableStore, key: str = "output.root") -> None:
    """For a dry run, which writes nothing, and an experiment job's --root (`key`, the
    setting the error names): on a local file system, the nearest existing folder of the
    table's must be a folder this process can write to, or the build's first write
    (`claim_version`) fails, as `_unwritable` says. Object stores are left to it."""
    if not fsio.is_local(store.fs):
        return
    path = store.base
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise _unwritable(store, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                                    path), key)
    if not os.access(path, os.W_OK | os.X_OK):
        raise _unwritable(store, PermissionError(errno.EACCES, os.strerror(errno.EACCES), path),
                          key)


def _unwritable(store: TableStore, exc: OSError, key: str = "output.root") -> StoreError:
    fix = fsio.storage_advice(exc, table=True)
    return StoreError(f"{key} {fsio.redact_url(store.root)!r}: cannot write the table "
                      f"{store.table!r} there ({exc}); "
                      f"{fix or f'point {key} at a folder or bucket this job can write to'}")


def _write_run(store: TableStore, vid: str, key: str, reads: tuple[str, ...] = (), *,
               parent: str | None, owned: bool = True, latest: str | None = None) -> None:
    run = {"key": key, "owner": _owner() if owned else None, "reads": list(reads),
           "parent": parent, "latest": latest}
    store.write_file(vid, f"{STAGING}/{RUN_FILE}", json.dumps(run).encode())


@contextlib.contextmanager
def heartbeat(store: TableStore, vid: str, key: str, reads: tuple[str, ...] = (), *,
              parent: str | None, latest: str | None = None) -> Iterator[None]:
    """Renew this build's heartbeat in its run file every `BEAT_S` seconds for the block; a
    block that raises (a failed or interrupted build) gives the version up, so a re-run,
    in this process too, continues it. A run file that is gone (the version folder removed
    by hand) is not written again."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                if store.fs.exists(_run_path(store, vid)):
                    _write_run(store, vid, key, reads, parent=parent, latest=latest)
            except Exception:  # noqa: BLE001 (any store's error) the next beat tries again
                pass

    thread = threading.Thread(target=beat, name="semid-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):  # unwritable now: a re-run waits for it to go stale
            if store.fs.exists(_run_path(store, vid)):  # (not where the folder is gone)
                _write_run(store, vid, key, parent=parent, owned=False, latest=latest)
        raise
    finally:
        stop.set()
        thread.join()
