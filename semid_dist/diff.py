"""Drift between two versions of a SID table as an engine job (`semid versions diff`, and
every build that has a parent).

Neither table is collected on the driver: item ids are hash-partitioned into B buckets,
one `stages.drift_bucket` task per bucket reads the data parts of both versions, keeps its
bucket's rows (five columns), joins them and returns counts; the driver only adds counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from semid_dist.codes.drift import drift_buckets, drift_figures, merge_drift
from semid_dist.errors import StoreError
from semid_dist.io.store import FileEntry, TableStore, table_rows
from semid_dist.stages import drift_bucket
from semid_dist.summary import format_drift_line

DRIFT_FILE = "drift.json"


class Mapper(Protocol):
    """What drift needs of an engine: `map(fn, items) -> [fn(*item) for item in items]`."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]: ...


class InProcess:
    """The local engine's `map` without a build config (for `semid versions diff`)."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        return [fn(*item) for item in items]


def version_drift(store: TableStore, from_version: str, to_version: str, *,
                  engine: Mapper | None = None, to_parts: list[FileEntry] | None = None,
                  buckets: int | None = None) -> dict[str, Any]:
    """Share of items whose SID changed from `from_version` to `to_version`, per layer and
    overall, over the items in both; plus the counts of items in only one of them.

    from_version: a committed version (or 'latest'). to_version: a committed version, or,
    with `to_parts` (its data parts, as written), a version not committed yet (a build
    computes its drift before the manifest). buckets: id buckets (default: about a million
    rows of both versions per bucket). engine: runs the bucket tasks (default in-process).
    """
    src = store.resolve(from_version)
    old_parts = store.part_paths(src)
    if to_parts is None:
        dst = store.resolve(to_version)
        new_parts = store.part_paths(dst)
        new_rows = table_rows(store.manifest(dst)["rows"])
    else:
        dst = to_version
        new_parts = [store.entry_path(dst, e) for e in to_parts if e.path.startswith("data/")]
        new_rows = sum(e.rows for e in to_parts if e.path.startswith("data/"))
    if not old_parts or not new_parts:
        raise StoreError(f"cannot compare {src} and {dst} of {store.url}: one of them has no "
                         "data parts")
    n = buckets or drift_buckets(table_rows(store.manifest(src)["rows"]) + new_rows)
    tasks = [(store.root, store.table, old_parts, new_parts, b, n) for b in range(n)]
    counts = merge_drift((engine or InProcess()).map(drift_bucket, tasks))
    return drift_figures(counts, from_version=src, to_version=dst, buckets=n)


def parent_drift(engine: Mapper, store: TableStore, parent: str | None, vid: str,
                 data_files: list[FileEntry], log: Callable[[str], None],
                 ) -> dict[str, Any] | None:
    """A build's drift against its parent (None without one). A parent that cannot be
    compared (removed by gc meanwhile, item ids of another type) is logged and skipped."""
    if parent is None:
        return None
    try:
        drift = version_drift(store, parent, vid, engine=engine, to_parts=data_files)
    except (StoreError, FileNotFoundError) as exc:
        log(f"drift: skipped ({exc})")
        return None
    log("drift: " + format_drift_line(drift))
    return drift

