"""Drift between two versions of a SID table as an engine job (`semid versions diff`, and
every build that has a parent).

Neither table is collected on the driver: item ids are hash-partitioned into B buckets.
With more than one bucket, one `stages.drift_split` task per group of data parts of either
version (about a bucket's rows) writes their rows (five columns) split by bucket to a
scratch folder (`semid_dist.shuffle`), so each part is read once; then one
`stages.drift_bucket` task per bucket reads its rows of both versions, joins them and
returns counts; the driver only adds counts.
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import pyarrow as pa

from semid_dist import shuffle
from semid_dist.codes.drift import bucket_count, check_id_types, drift_figures, merge_drift
from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio
from semid_dist.io.store import STAGING, FileEntry, TableStore
from semid_dist.shuffle import Split
from semid_dist.stages import drift_bucket, drift_split
from semid_dist.summary import format_drift_line

DRIFT_FILE = "drift.json"
SCRATCH = "_scratch"  # in the table's folder: drift run by an engine splits data parts here


class Mapper(Protocol):
    """What drift needs of an engine: `map(fn, items) -> [fn(*item) for item in items]`."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]: ...


class InProcess:
    """The local engine's `map` without a build config (for `semid versions diff`)."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        return [fn(*item) for item in items]


def version_drift(store: TableStore, from_version: str, to_version: str, *,
                  engine: Mapper | None = None, to_parts: list[FileEntry] | None = None,
                  buckets: int | None = None, scratch: str | None = None) -> dict[str, Any]:
    """Share of items whose SID changed from `from_version` to `to_version`, per layer and
    overall, over the items in both; plus the counts of items in only one of them.

    from_version: a committed version (or 'latest'). to_version: a committed version, or,
    with `to_parts` (its data parts, as written), a version not committed yet (a build
    computes its drift before the manifest). buckets: id buckets (default: about a million
    rows of both versions per bucket). engine: runs the tasks (default in-process).
    scratch: a folder URL for the data parts split by bucket, which the tasks can reach;
    by default a local temporary folder when the tasks run in this process (`semid versions
    diff` writes nothing to the table), else a new folder under the table's `_scratch/`.
    Removed when done.
    """
    src = store.resolve(from_version)
    store.check_files(src, "data")
    old_parts = store.part_rows(src)
    if to_parts is None:
        dst = store.resolve(to_version)
        store.check_files(dst, "data")
        new_parts = store.part_rows(dst)
    else:
        dst = to_version
        new_parts = [(store.entry_path(dst, e), e.rows) for e in to_parts
                     if e.path.startswith("data/")]
    if not old_parts or not new_parts:
        raise StoreError(f"cannot compare {src} and {dst} of {store.url}: one of them has no "
                         "data parts")
    schemas = _schema(store, old_parts[0][0]), _schema(store, new_parts[0][0])
    # (before either version is read: a build of another catalog's ids)
    check_id_types(*(schema.field("item_id").type for schema in schemas))
    n = buckets or bucket_count(sum(r for _, r in old_parts + new_parts))
    mapper = engine or InProcess()
    if n == 1:
        old = [Split(p) for p, _ in old_parts]
        new = [Split(p) for p, _ in new_parts]
        counts = merge_drift(mapper.map(drift_bucket, [(store.root, store.table, old, new, 0)]))
    else:
        with _scratch_folder(store, scratch, in_process=engine is None) as folder:
            old, new = _split_versions(mapper, store, old_parts, new_parts, n, folder)
            counts = merge_drift(mapper.map(drift_bucket, [(store.root, store.table, old, new, b)
                                                           for b in range(n)]))
    layers = tuple(_code_layers(schema) for schema in schemas)
    return drift_figures(counts, from_version=src, to_version=dst, buckets=n, layers=layers)


def _code_layers(schema: pa.Schema) -> int | None:
    """The number of code layers of a version, from one data part's schema (None when its
    codes are plain lists, whose length a schema does not give)."""
    codes = schema.field("codes").type
    return codes.list_size if pa.types.is_fixed_size_list(codes) else None


def _schema(store: TableStore, path: str) -> pa.Schema:
    """A data part's Arrow schema (from its footer)."""
    with fsio.damaged_parquet(path), fsio.parquet_file(store.fs, path) as pf:
        return pf.schema_arrow


@contextlib.contextmanager
def _scratch_folder(store: TableStore, scratch: str | None, *, in_process: bool
                    ) -> Iterator[str]:
    """The folder URL for the split files (see `version_drift`), removed when done."""
    if scratch is None and in_process:
        with tempfile.TemporaryDirectory(prefix="semid-drift-") as folder:
            yield folder
        return
    folder = scratch or f"{store.url}/{SCRATCH}/drift-{uuid.uuid4().hex[:12]}"
    try:
        yield folder
    finally:
        shuffle.remove(folder)


def _split_versions(mapper: Mapper, store: TableStore, old_parts: list[tuple[str, int]],
                    new_parts: list[tuple[str, int]], buckets: int, folder: str
                    ) -> tuple[list[Split], list[Split]]:
    """Both versions' data parts ((path, rows) each) split by item-id bucket into `folder`:
    one task per group of consecutive parts of one version holding about a bucket's rows."""
    target = max(1, -(-sum(r for _, r in old_parts + new_parts) // buckets))
    old_groups = shuffle.group_files([p for p, _ in old_parts], [r for _, r in old_parts],
                                     target_rows=target)
    new_groups = shuffle.group_files([p for p, _ in new_parts], [r for _, r in new_parts],
                                     target_rows=target)
    splits = mapper.map(drift_split, [
        (store.root, store.table, group, buckets, f"{folder}/{side}-{i:06d}")
        for side, groups in (("from", old_groups), ("to", new_groups))
        for i, group in enumerate(groups)])
    return splits[:len(old_groups)], splits[len(old_groups):]


def parent_drift(engine: Mapper, store: TableStore, parent: str | None, vid: str,
                 data_files: list[FileEntry], log: Callable[[str], None],
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """(a build's drift against its parent, why it was skipped): (None, None) without a
    parent. A parent that cannot be compared (removed by gc meanwhile, item ids of another
    type) is logged and skipped, with the reason."""
    if parent is None:
        return None, None
    try:
        drift = version_drift(store, parent, vid, engine=engine, to_parts=data_files,
                              scratch=f"{store.version_url(vid)}/{STAGING}/drift")
    except (StoreError, FileNotFoundError) as exc:
        log(f"drift: skipped ({exc})")
        return None, fsio.redact_url(str(exc))  # (it goes into metrics.json)
    log("drift: " + format_drift_line(drift))
    return drift, None

