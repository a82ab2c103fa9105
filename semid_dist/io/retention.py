"""`TableStore.gc` (`collect`) and its retention policy: which version directories go
(`gc_plan`), from the versions' ids (their UTC start time), manifests (the versions their
files live in) and the builds still running (`semid_dist.resume`)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.store import MANIFEST, VERSION_TIME_FORMAT, TableStore
from semid_dist.resume import leftover_staging, live_runs


def version_time(version_id: str) -> dt.datetime | None:
    """UTC start time encoded in a version id, or None when the id does not start with one."""
    try:
        return dt.datetime.strptime(version_id.split("-", 1)[0], VERSION_TIME_FORMAT).replace(
            tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def referenced_versions(manifest: Mapping[str, Any]) -> set[str]:
    """Other versions a manifest's files live in (entries with an optional `"version"` key)."""
    own = manifest.get("version_id")
    return {str(e["version"]) for e in manifest.get("files", [])
            if e.get("version") and e["version"] != own}


def gc_plan(versions: list[str], latest: str | None,
            manifests: Mapping[str, Mapping[str, Any] | None], keep: int, now: dt.datetime,
            min_age_hours: float, live: Mapping[str, set[str]] | None = None,
            ) -> tuple[list[str], list[str]]:
    """Retention policy for `TableStore.gc`: which version directories go -> (delete, keep),
    both sorted.

    versions: every directory under `versions/` (committed or not); latest: the version
    `_latest` stands for (`TableStore.head`); manifests: {version id: manifest} of the
    committed versions (a value of None means the manifest exists but cannot be read).
    Kept: the `keep` newest committed versions, `latest`, and every version a kept manifest
    references (file entries with a `"version"` key), transitively; uncommitted directories
    younger than `min_age_hours` (by the UTC time their id starts with) or with an id that
    holds no time (a build may still be writing them), and those in `live` ({version a
    running build writes: the committed versions it reads}: a resumed run keeps its first
    run's id) with the versions they read. Everything else is deleted. An
    infinite `min_age_hours` keeps every uncommitted directory.
    """
    if keep < 0:
        raise StoreError(f"gc: keep={keep} must be >= 0 (the number of newest committed "
                         "versions to keep)")
    committed = sorted(v for v in versions if v in manifests)
    live = live or {}
    kept = set(committed[len(committed) - keep:] if keep else [])
    kept |= set().union(*live.values()) & set(manifests)  # what running builds read
    if latest is not None:
        kept.add(latest)
    todo = sorted(kept)
    while todo:  # a kept version keeps every version its files live in
        vid = todo.pop()
        if vid not in manifests:
            continue
        manifest = manifests[vid]
        if manifest is None:
            raise StoreError(f"gc: the manifest of kept version {vid} cannot be read, so the "
                             "versions it references are unknown; repair or remove "
                             f"versions/{vid} by hand, then run gc again")
        for ref in referenced_versions(manifest) - kept:
            kept.add(ref)
            todo.append(ref)
    if min_age_hours < 0 or min_age_hours != min_age_hours:
        raise StoreError(f"gc: min_age_hours={min_age_hours} must be >= 0")
    cutoff = (now - dt.timedelta(hours=min_age_hours) if min_age_hours < 1e6
              else dt.datetime.min.replace(tzinfo=dt.timezone.utc))  # (over a century: all)
    delete = []
    for vid in versions:
        if vid in kept:
            continue
        if vid not in manifests:
            started = version_time(vid)
            if started is None or started > cutoff or vid in live:
                kept.add(vid)
                continue
        delete.append(vid)
    present = set(versions)
    return sorted(delete), sorted(v for v in kept if v in present)


def collect(store: TableStore, keep: int, *, min_age_hours: float = 24.0,
            dry_run: bool = False, now: dt.datetime | None = None) -> dict[str, Any]:
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
        with store.table_lock():  # no build chooses a version meanwhile (`resume`)
            if store.head() in delete:
                raise StoreError(f"gc: _latest of {store.url} moved to a version planned "
                                 "for deletion while planning; nothing was deleted, run gc "
                                 "again")
            # builds that started meanwhile: their versions and what they read stay
            started = live_runs(store, [v for v in store.version_dirs() if v not in manifests])
            taken = set(started).union(*started.values())
            delete = [v for v in delete if v not in taken]
            for vid in delete:  # each stops existing for readers and for a re-run
                store.unlist(vid, committed=vid in manifests)
        for vid in delete:
            store.delete_version(vid)
    leftovers = leftover_staging(store, [v for v in kept if v in manifests])
    for vid in leftovers if not dry_run else ():
        store.remove_staging(vid)
    return {"table": store.url, "latest": latest, "keep": keep, "dry_run": dry_run,
            "min_age_hours": min_age_hours,
            "deleted": [v for v in delete if v in manifests],
            "deleted_uncommitted": [v for v in delete if v not in manifests],
            "kept": [v for v in kept if v in manifests],
            "kept_uncommitted": [v for v in kept if v not in manifests],
            "staging_removed": leftovers}


def _manifests(store: TableStore, names: list[str]) -> dict[str, dict[str, Any] | None]:
    """{id: manifest} of the committed ones of `names` (None: unreadable or not a mapping)."""
    out: dict[str, dict[str, Any] | None] = {}
    for vid in names:
        if store.fs.exists(fsio.join(store.version_dir(vid), MANIFEST)):
            try:
                body = json.loads(store.read_bytes(vid, MANIFEST))
                out[vid] = body if isinstance(body, dict) else None
            except (ValueError, OSError):
                out[vid] = None
    return out
