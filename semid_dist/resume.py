"""Which version a build writes: a new one, or the one a killed run of the same build left.

A build records in its version's staging folder (`run.json`) its run key (the resolved config
and the input fingerprint) and its owner: the machine (host name and boot id), the process
id with its start time, and a heartbeat the build renews every `BEAT_S` seconds while it
runs. A re-run continues the newest uncommitted version of the same key that is newer than
`_latest` only when that version's owner is gone: its build failed (it gives the version up),
its process is no longer running (same machine), or its heartbeat is older than
`OWNER_STALE_S` (another machine). So a build
started while the same build runs (a nightly job that overlaps the previous night's) writes
a version of its own instead of the live one's files. Choosing or creating the version
happens under the table's lock (`TableStore.table_lock`), so two builds started together
cannot both take the same version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import CatalogPlan
from semid_dist.io.store import STAGING, TableStore, new_version_id

RUN_FILE = "run.json"
BEAT_S = 10.0  # a running build renews its heartbeat this often
OWNER_STALE_S = 60.0  # a heartbeat older than this, from another machine, is a dead build's


def run_key(cfg: Any, plan: CatalogPlan) -> str:
    """What makes two runs the same run: the resolved config and the input fingerprint."""
    body = json.dumps([cfg.to_dict(), plan.fingerprint], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _machine() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _started(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), "zombie" for one
    that has exited but was not reaped, None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] in ("Z", "X") else fields[19]


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"machine": _machine(), "pid": pid, "started": _started(pid), "beat": time.time()}


def _alive(owner: dict[str, Any] | None, now: float) -> bool:
    """Whether the build that wrote `owner` may still be running."""
    if not owner:  # a run of an older semid_dist: no owner recorded
        return False
    if owner.get("machine") != _machine():
        return now - float(owner.get("beat", 0)) < OWNER_STALE_S
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    started = _started(pid)
    return started != "zombie" and (started is None or owner.get("started") in (None, started))


def _run_path(store: TableStore, vid: str) -> str:
    return f"{store.version_dir(vid)}/{STAGING}/{RUN_FILE}"


def _read_run(store: TableStore, vid: str) -> dict[str, Any] | None:
    path = _run_path(store, vid)
    try:
        return json.loads(store.fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def resumable_version(store: TableStore, key: str) -> str | None:
    """The newest uncommitted version started by the same run (same `run_key`) whose build is
    gone, when it is newer than `_latest`: re-running a killed build continues it."""
    latest, now = store.head() or "", time.time()
    for vid in reversed(store.uncommitted()):
        if vid <= latest:
            break
        run = _read_run(store, vid)
        if run is not None and run.get("key") == key and not _alive(run.get("owner"), now):
            return vid
    return None


def claim_version(store: TableStore, key: str) -> tuple[str, bool]:
    """(the version this build writes, whether it resumes a killed run's): chosen and
    recorded as this process's under the table's lock."""
    try:
        with store.table_lock():
            vid = resumable_version(store, key)
            resuming = vid is not None
            vid = vid or new_version_id()
            _write_run(store, vid, key)
    except OSError as exc:  # the build's first write: a root it cannot write to
        raise StoreError(f"output.root {fsio.redact_url(store.root)!r}: cannot write the "
                         f"table {store.table!r} there ({exc}); point output.root at a folder "
                         "or bucket this job can write to") from None
    return vid, resuming


def _write_run(store: TableStore, vid: str, key: str, *, owned: bool = True) -> None:
    store.write_file(vid, f"{STAGING}/{RUN_FILE}",
                     json.dumps({"key": key, "owner": _owner() if owned else None}).encode())


@contextmanager
def heartbeat(store: TableStore, vid: str, key: str) -> Iterator[None]:
    """Renew this build's heartbeat in its run file every `BEAT_S` seconds for the block; a
    block that raises (a failed or interrupted build) gives the version up, so a re-run,
    in this process too, continues it."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                _write_run(store, vid, key)
            except OSError:  # the next beat tries again; a resume waits for a stale one
                pass

    thread = threading.Thread(target=beat, name="semid-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):  # unwritable now: a re-run waits for it to go stale
            _write_run(store, vid, key, owned=False)
        raise
    finally:
        stop.set()
        thread.join()
