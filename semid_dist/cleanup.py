"""`TableStore.gc`: deletes what the retention policy (`semid_dist.io.retention.gc_plan`)
lets go, around the builds still running (`semid_dist.resume`), and the work files builds
killed after their commit left."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.retention import gc_plan, kept_reasons
from semid_dist.io.store import MANIFEST, RUN_FILE, STAGING, TableStore
from semid_dist.resume import leftover_staging, live_runs


def collect_garbage(store: TableStore, keep: int, *, min_age_hours: float = 24.0,
                    dry_run: bool = False, now: dt.datetime | None = None,
                    on_wait: Callable[[bool], None] | None = None) -> dict[str, Any]:
    """`TableStore.gc`: delete old versions by the `gc_plan` policy; returns what was (or,
    with `dry_run`, would be) deleted and kept.

    A committed version loses its manifest first (it stops existing for readers at once),
    then its files. `_latest` is re-read before deleting: if it names a version planned for
    deletion (it moved meanwhile), nothing is deleted. A kept committed version's leftover
    work files (`leftover_staging`) are removed too.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    names = store.version_dirs()
    manifests = _manifests(store, names)
    live = live_runs(store, [v for v in names if v not in manifests])
    latest = store.head()  # a damaged `_latest` raises: nothing is deleted
    delete, kept = gc_plan(names, latest, manifests, keep, now, min_age_hours, live)
    if not dry_run and delete:
        with store.table_lock(on_wait):  # no build chooses a version meanwhile (`resume`)
            if store.head() in delete:
                raise StoreError(f"gc: _latest of {store.url} moved to a version planned "
                                 "for deletion while planning; nothing was deleted, run gc "
                                 "again")
            # builds that started meanwhile: their versions and what they read stay, and
            # are reported kept as any running build's
            started = live_runs(store, [v for v in store.version_dirs() if v not in manifests])
            taken = set(started).union(*started.values())
            kept = sorted({*kept, *(v for v in delete if v in taken), *started})
            live = {**live, **started}
            delete = [v for v in delete if v not in taken]
            for vid in delete:  # each stops existing for readers and for a re-run
                unlist(store, vid, committed=vid in manifests)
        for vid in delete:
            delete_version(store, vid)
    leftovers = leftover_staging(store, [v for v in kept if v in manifests])
    if not dry_run:
        for vid in leftovers:
            store.remove_staging(vid)
    return {"table": store.url, "latest": latest, "keep": keep, "dry_run": dry_run,
            "min_age_hours": min_age_hours,
            "deleted": [v for v in delete if v in manifests],
            "deleted_uncommitted": [v for v in delete if v not in manifests],
            "kept": [v for v in kept if v in manifests],
            "kept_because": kept_reasons(kept, latest, manifests, keep, live),
            "kept_uncommitted": [v for v in kept if v not in manifests],
            "staging_removed": leftovers}


def _manifests(store: TableStore, names: list[str]) -> dict[str, dict[str, Any] | None]:
    """{id: manifest} of the committed ones of `names` (None: unreadable or not a mapping)."""
    out: dict[str, dict[str, Any] | None] = {}
    for vid in names:
        if store.is_committed(vid):
            try:
                body = json.loads(store.read_bytes(vid, MANIFEST))
                out[vid] = body if isinstance(body, dict) else None
            except (ValueError, OSError):
                out[vid] = None
    return out


def unlist(store: TableStore, vid: str, *, committed: bool) -> None:
    """Remove what makes a version visible: a committed one's manifest (to readers), an
    uncommitted one's run file (to a re-run that would continue it)."""
    path = (fsio.join(store.version_dir(vid), MANIFEST) if committed
            else fsio.join(store.version_dir(vid), STAGING, RUN_FILE))
    if store.fs.exists(path):
        store.fs.rm(path)


def delete_version(store: TableStore, vid: str) -> None:
    """Remove version `vid`'s folder and everything in it (after `unlist`)."""
    vdir = store.version_dir(vid)
    if store.fs.exists(vdir):
        store.fs.rm(vdir, recursive=True)
