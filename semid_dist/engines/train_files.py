"""What a Ray Train fit's workers hand the driver beside the fit's output (`out`), since
their own logs and exceptions reach no console the build shows: rank 0's progress lines
(`ProgressFile`, relayed by the driver as they come: `relayed_progress`) and the named
error that ended the fit (`named_error_to`, raised again by the driver:
`raise_named_error`). Plain files on the fit's staging storage: no Ray call."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from semid_dist import errors
from semid_dist.errors import FitDiverged, SemidError
from semid_dist.io import fs as fsio

ERROR_SUFFIX = ".error.json"  # beside a fit's output: the named error that ended it
PROGRESS_SUFFIX = ".progress"  # beside it: rank 0's progress lines so far
RELAY_S = 1.0  # how often the driver looks for new progress lines


def clear(out: str) -> None:
    """Remove what an earlier run of this version's fit left beside `out`."""
    fs, path = fsio.resolve(out)
    for suffix in (ERROR_SUFFIX, PROGRESS_SUFFIX):
        with suppress(FileNotFoundError):
            fs.rm_file(path + suffix)


def _lines(fs: Any, path: str) -> list[str]:
    try:
        return fs.cat_file(path).decode("utf-8").splitlines()
    except Exception as exc:  # none yet, unreadable, or the storage does not answer: progress
        if not (isinstance(exc, ValueError) or fsio.storage_failure(exc)):  # is best effort
            raise
        return []


class ProgressFile:
    """The fit's progress lines (a layer's, an epoch's: what the local engine logs), which
    rank 0 writes whole beside the fit's output after each one. A worker group restarted
    after a failure goes on from the lines written so far. Best effort: a line the storage
    does not take is left for the next one to carry (the fit goes on)."""

    def __init__(self, out: str, rank: int) -> None:
        self.rank = rank
        self.fs, path = fsio.resolve(out)
        self.path = path + PROGRESS_SUFFIX
        self.lines = _lines(self.fs, self.path) if rank == 0 else []

    def __call__(self, msg: str) -> None:
        if self.rank != 0:
            return
        self.lines.append(msg)
        try:
            fsio.write_bytes(self.fs, self.path, ("\n".join(self.lines) + "\n").encode())
        except Exception as exc:  # (a storage that does not answer: the fit's output, written
            if not fsio.storage_failure(exc):  # at its end, says so)
                raise


@contextlib.contextmanager
def relayed_progress(out: str, log: Callable[[str], None]) -> Iterator[None]:
    """Log the fit's progress lines (`ProgressFile`) as `fit: ...` while the block runs
    (from a thread reading the file every `RELAY_S` seconds, so `log` is called from it),
    and those left once it has ended. Before, a Ray fit said nothing between its start and
    its end: at a learned quantizer's defaults, hours."""
    fs, path = fsio.resolve(out)
    path += PROGRESS_SUFFIX
    said, stop = 0, threading.Event()

    def relay() -> None:
        nonlocal said
        lines = _lines(fs, path)
        for line in lines[said:]:
            log(f"fit: {line}")
        said = max(said, len(lines))

    def run() -> None:
        while not stop.wait(RELAY_S):
            relay()
        relay()  # (the lines written since its last look)

    thread = threading.Thread(target=run, name="semid-fit-progress", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:  # (a stopped or failed fit: its last lines are not waited for)
        stop.set()
        thread.join(timeout=1)
        raise
    stop.set()
    thread.join(timeout=10)


@contextlib.contextmanager
def named_error_to(out: str, rank: int) -> Iterator[None]:
    """A diverged fit (`FitDiverged`) ends the workers' loop as a result, which rank 0
    writes beside the fit's output for the driver to raise (`raise_named_error`): raised in
    the loop, Ray Train ran it again `fit.max_failures` times and ended the build with its
    own traceback. Every worker meets it at the same epoch (its figures are all-reduced),
    so none waits for the others in a collective; any other error is raised as before."""
    try:
        yield
    except FitDiverged as exc:
        if rank == 0:
            fs, path = fsio.resolve(out)
            body = {"error": type(exc).__name__, "message": str(exc)}
            fsio.write_bytes(fs, path + ERROR_SUFFIX, json.dumps(body).encode())


def raise_named_error(out: str) -> None:
    """The named error `named_error_to` wrote beside `out`, if any, raised here."""
    fs, path = fsio.resolve(out)
    try:  # (a read, not `exists`: an object store's listing cache may not hold it yet)
        body = json.loads(fs.cat_file(path + ERROR_SUFFIX))
    except FileNotFoundError:
        return
    message = str(body.get("message", "the fit failed"))
    kind = getattr(errors, str(body.get("error")), None)
    if not (isinstance(kind, type) and issubclass(kind, SemidError)):
        kind = SemidError
    try:
        error = kind(message)
    except TypeError:  # (one that takes more than its message)
        error = SemidError(message)
    raise error
