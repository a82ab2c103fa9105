"""Fault injection for crash tests: `SEMID_FAULT=<point>` makes the process die at that
point with SIGKILL (no cleanup, no exception handlers), as a killed driver or worker would.

Points: `fit` (after the fit, before any codebook is written), `train_worker` (a Ray
Train worker dies once after its second layer of residual k-means, or second epoch of a
learned quantizer, before checkpointing it), `encode`
(after the first shard is encoded), `reduce` (after the merge, before any data part of the
catalog's shards is written; an incremental run has rewritten the parent's parts it carries
by then), `commit` (after every file is written, before the manifest), `latest` (after the
manifest, before `_latest` moves), `encode_worker` (a Ray Data / Spark encode worker dies
once on its first shard), `encode_worker_second` (the same on a worker's second shard of a
job, after the first one's result was sent). For the `*_worker` points `SEMID_FAULT_MARKER`
names the file that records that a worker already died.
Unset in production: `maybe_die` then costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SEMID_FAULT"
MARKER_ENV = "SEMID_FAULT_MARKER"


def maybe_die(point: str) -> None:
    """SIGKILL this process if `SEMID_FAULT` names `point`."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def die_once(point: str, *, after_s: float = 0.0) -> None:
    """Like `maybe_die`, but only the first time across processes (a worker that is
    restarted and retried must then succeed): the marker file records the death, which
    comes `after_s` seconds later (what the process sent meanwhile has then arrived)."""
    marker = os.environ.get(MARKER_ENV)
    if os.environ.get(ENV) != point or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    time.sleep(after_s)
    os.kill(os.getpid(), signal.SIGKILL)
