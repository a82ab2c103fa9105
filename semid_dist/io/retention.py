"""Retention policy for `TableStore.gc` (run by `semid_dist.cleanup`): which version
directories go (`gc_plan`), from the versions' ids (their UTC start time), manifests (the
versions their files live in) and the builds still running."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from semid_dist.errors import StoreError
from semid_dist.io.store import VERSION_TIME_FORMAT


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
    kept = _newest(committed, keep)
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


def _newest(committed: list[str], keep: int) -> set[str]:
    """The `keep` newest of `committed` (sorted ids: oldest first)."""
    return set(committed[max(len(committed) - keep, 0):] if keep else [])


def kept_reasons(kept: list[str], latest: str | None,
                 manifests: Mapping[str, Mapping[str, Any] | None], keep: int,
                 live: Mapping[str, set[str]] | None = None) -> dict[str, str]:
    """Why `gc_plan` kept each committed version of `kept` that is not among the `keep`
    newest: every reason that holds, `_latest`, read by a running build, its files serve
    kept versions (named). {version id: reasons, joined by "; "}."""
    committed = sorted(v for v in manifests if v in set(kept))
    newest = _newest(committed, keep)
    reasons: dict[str, str] = {}
    for vid in committed:
        if vid in newest:
            continue
        users = [v for v in committed
                 if (m := manifests.get(v)) is not None and vid in referenced_versions(m)]
        why = (["_latest"] if vid == latest else []) + (
            ["read by a running build"]
            if any(vid in reads for reads in (live or {}).values()) else []) + (
            [f"its files serve {', '.join(users)}"] if users else [])
        reasons[vid] = "; ".join(why) or "reason not known"
    return reasons

