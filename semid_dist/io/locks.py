"""Locks for moving a table's `_latest` (`TableStore.advance_latest`) and choosing the
version a build writes (`semid_dist.resume`): a lock file on a local filesystem, shared by
every process on the machine, and a process-wide `threading.Lock` per key elsewhere (object
stores have no exclusive create; see `advance_latest` for their weaker rule)."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from semid_dist.errors import StoreError

LOCK_STALE_S = 60.0  # a lock file older than this is left over by a dead process
LOCK_TIMEOUT_S = 120.0  # give up taking the lock after this long
WAIT_NOTICE_S = 2.0  # a wait this long is said (`file_lock`'s on_wait)

_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


@contextmanager
def process_lock(key: str) -> Iterator[None]:
    """This process's one lock for `key`, held for the block."""
    with _PROCESS_LOCKS_GUARD:
        lock = _PROCESS_LOCKS.setdefault(key, threading.Lock())
    with lock:
        yield


@contextmanager
def file_lock(path: str, on_wait: Callable[[bool], None] | None = None) -> Iterator[None]:
    """Hold the local lock file `path` (created exclusively, holding a token of its own) for
    the block; a stale one (`LOCK_STALE_S`) is broken, and after `LOCK_TIMEOUT_S` a live
    one raises StoreError. The file is removed at the end only if it still holds the token.
    on_wait(broken): called with False once when the lock is still held by another after
    `WAIT_NOTICE_S`, with True when this process broke a stale one (`lock_line` says each)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex}".encode()
    start = time.monotonic()
    deadline = start + LOCK_TIMEOUT_S
    said = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _break_stale_lock(path):
                if on_wait is not None:
                    on_wait(True)
                continue  # (taken at once, as a rule: no wait to tell of)
            if on_wait is not None and not said and time.monotonic() - start > WAIT_NOTICE_S:
                on_wait(False)
                said = True
            if time.monotonic() > deadline:
                raise StoreError(f"could not lock {path} within {LOCK_TIMEOUT_S:.0f} s: "
                                 "another build is committing to this table (or choosing its "
                                 "version); retry, or delete the file if no build is "
                                 "running") from None
            time.sleep(random.uniform(0.002, 0.02))
            continue
        try:
            inode = _inode(os.fstat(fd))
            os.write(fd, token)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.unlink(path)  # (left, it held every later taker for LOCK_STALE_S)
                raise
            token = b""  # a full disk: the empty file is the lock (gc frees space under it)
        finally:
            os.close(fd)
        break
    try:
        yield
    finally:
        try:
            with open(path, "rb") as f:  # still ours: not broken as stale and taken again
                held, now = f.read(), _inode(os.fstat(f.fileno()))
            if held == token and (token != b"" or now == inode):
                os.unlink(path)
        except FileNotFoundError:
            pass


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def lock_line(url: str, broken: bool) -> str:
    """What a command waiting for a table's lock says (`file_lock`'s on_wait), and what it
    says when it broke a stale one."""
    if broken:
        return (f"broke the lock of {url}: it was older than {LOCK_STALE_S:.0f} s, so left by "
                "a build or gc that died")
    return (f"waiting for the lock of {url} (a build is committing or starting; a lock older "
            f"than {LOCK_STALE_S:.0f} s is a dead build's and is broken)")


def _break_stale_lock(path: str) -> bool:
    """Remove a lock file left by a dead holder (older than `LOCK_STALE_S`); whether this
    call removed it.

    The stale file is first renamed to a private name, so two processes cannot both remove
    it; if what was renamed turns out to be fresh (a live holder re-created the lock between
    the age check and the rename) it is linked back unless a new lock exists already.
    """
    try:
        if time.time() - os.stat(path).st_mtime < LOCK_STALE_S:
            return False
        grave = f"{path}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(path, grave)
    except FileNotFoundError:
        return False
    try:
        if time.time() - os.stat(grave).st_mtime < LOCK_STALE_S:
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
            return False
        return True
    finally:
        os.unlink(grave)
