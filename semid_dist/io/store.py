"""Versioned, immutable SID table store on any fsspec filesystem.

Layout under `<root>/<table>/`: `versions/<version_id>/...` and `_latest`. A version exists
for readers only once its `_manifest.json` is written, which happens last; `_latest` is
then moved forward under a lock (compare-and-swap: it only ever names the newest committed
version, never an older one, even when builds commit concurrently). Nothing of an older
version is touched by a build; old versions go only by `TableStore.gc` (policy: `gc_plan`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.errors import StoreError
from semid_dist.faults import maybe_die
from semid_dist.io import fs as fsio
from semid_dist.io.locks import file_lock, process_lock

MANIFEST = "_manifest.json"
LATEST = "_latest"
LATEST_LOCK = "_latest.lock"
VERSION_TIME_FORMAT = "%Y%m%dT%H%M%S%fZ"  # microseconds: quick successive builds sort in order
STAGING = "_staging"  # a version's work files while it is built, removed when it commits
RUN_FILE = "run.json"  # in STAGING: the build's run key and owner (`semid_dist.resume`)


@dataclass(frozen=True)
class FileEntry:
    """A file of a version, relative to its version directory; `version` names another
    version whose directory holds it (an incremental version references its parent's
    unchanged data parts instead of copying them)."""

    path: str
    rows: int
    bytes: int
    sha256: str
    version: str | None = None

    def as_json(self) -> dict[str, Any]:
        entry = asdict(self)
        if entry["version"] is None:
            del entry["version"]
        return entry


def table_rows(rows: Mapping[str, int]) -> int:
    """Items a version's table holds: the rows it encoded plus, for an incremental version,
    the parent's rows it carries over."""
    return int(rows["encoded"]) + int(rows.get("carried", 0))


def removed_while_read(version_id: str) -> StoreError:
    """The error of a reader whose committed version `semid versions gc` removed meanwhile
    (its files gone: not a damaged version)."""
    return StoreError(f"version {version_id} was removed while it was read (by `semid versions "
                      "gc`?); run the command again")


def new_version_id(now: dt.datetime | None = None) -> str:
    """Sortable id: UTC time to the microsecond plus 6 random hex digits
    (`20261122T020000123456Z-ab12cd`), so builds started one after another sort in order."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime(VERSION_TIME_FORMAT)}-{uuid.uuid4().hex[:6]}"


class TableStore:
    """Versions of one table at `<root>/<table>`."""

    def __init__(self, root: str, table: str) -> None:
        self.root, self.table = root, table
        self.fs, base = fsio.resolve(root)
        self.base = fsio.join(base, table)
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}  # `_own_files`

    @property
    def url(self) -> str:
        return f"{self.root.rstrip('/')}/{self.table}"

    def version_dir(self, version_id: str) -> str:
        return fsio.join(self.base, "versions", version_id)

    def version_url(self, version_id: str) -> str:
        return f"{self.url}/versions/{version_id}"

    def display_url(self, version_id: str) -> str:
        """`version_url` with any credentials masked: for logs, reports and printed paths."""
        return fsio.redact_url(self.version_url(version_id))

    def write_table(self, version_id: str, rel: str, table: pa.Table) -> FileEntry:
        """Write a Parquet file inside a version; returns its manifest entry. zstd with no
        dictionary encoding: a 65,536-row data part in 21 ms against 28 and 0.92 MB against
        1.06 (zstd packs the few distinct codes as a dictionary does); staged codes 6 vs 10."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", use_dictionary=False,
                       write_page_checksum=True)
        return self.write_file(version_id, rel, buf.getvalue(), rows=table.num_rows)

    def write_file(self, version_id: str, rel: str, data: bytes, *, rows: int = 0) -> FileEntry:
        fsio.write_bytes(self.fs, fsio.join(self.version_dir(version_id), rel), data)
        return FileEntry(rel, rows, len(data), hashlib.sha256(data).hexdigest())

    def read_bytes(self, version_id: str, rel: str) -> bytes:
        """A file of a version. Where the version is committed and its manifest lists the
        file, one missing or whose bytes do not match the manifest's sha256 is a StoreError
        naming it (a damaged version)."""
        path = fsio.join(self.version_dir(version_id), rel)
        entry = None if rel == MANIFEST else self._own_files(version_id).get(rel)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            if entry is None:
                raise
            if not self.fs.exists(fsio.join(self.version_dir(version_id), MANIFEST)):
                raise removed_while_read(version_id) from None
            raise StoreError(f"version {version_id} is damaged: its manifest lists "
                             f"{fsio.redact_url(self.version_url(version_id))}/{rel}, which is "
                             "missing; restore the file, or build a new version") from None
        if entry is not None and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise StoreError(f"version {version_id} is damaged: "
                             f"{fsio.redact_url(self.version_url(version_id))}/{rel} does not "
                             "match the checksum its manifest records; restore the file, or "
                             "build a new version")
        return data

    def _own_files(self, version_id: str) -> dict[str, dict[str, Any]]:
        """A committed version's manifest entries of its own files (not those it references
        in a parent), by path; none for a version not committed yet. Read once per version."""
        if version_id not in self._entries:
            if not self.fs.exists(fsio.join(self.version_dir(version_id), MANIFEST)):
                return {}
            self._entries[version_id] = {e.get("path"): e for e in self.manifest(version_id)[
                "files"] if isinstance(e, dict) and not e.get("version")}
        return self._entries[version_id]

    def latest(self) -> str | None:
        """What `_latest` holds, unchecked (None: no such file, or an empty one); `head` is
        the version it stands for."""
        path = fsio.join(self.base, LATEST)
        if not self.fs.exists(path):
            return None
        if self.fs.isdir(path):  # not what any build writes: `head` names it damaged
            return f"{LATEST}/ (a directory)"
        return self.fs.cat_file(path).decode(errors="replace").strip() or None

    def head(self) -> str | None:
        """The version `latest` means: the committed version `_latest` names; with no (or an
        empty) `_latest`, the newest committed version (a table's first build killed between
        its manifest and `_latest` leaves it so); None when nothing is committed. Raises
        StoreError when `_latest` names no committed version (a damaged or edited file): no
        reader or build guesses past it, and `gc` deletes nothing."""
        named = self.latest()
        if named is None:
            committed = self.versions()
            return committed[-1] if committed else None
        if "/" in named or not self.fs.exists(fsio.join(self.version_dir(named), MANIFEST)):
            known = ", ".join(self.versions()[-3:][::-1]) or "none"  # newest first
            raise StoreError(f"{fsio.redact_url(self.url)}/{LATEST} names {named[:80]!r}, which "
                             "is not a committed version of the table (the file is damaged or "
                             "was edited); write into it the id of the version to serve "
                             f"(newest committed: {known}; `semid versions list` lists them)")
        return named

    def is_committed(self, version_id: str) -> bool:
        """Whether the version has its manifest (is committed); one question to the store."""
        return self.fs.exists(fsio.join(self.version_dir(version_id), MANIFEST))

    def versions(self) -> list[str]:
        """Committed versions (those with a manifest), oldest first."""
        return [v for v in self.version_dirs() if self.is_committed(v)]

    def uncommitted(self) -> list[str]:
        """Version directories without a manifest (a build running, failed or killed),
        oldest first; invisible to readers."""
        return [v for v in self.version_dirs()
                if not self.is_committed(v)]

    def resolve(self, version: str | None, *, head: str | None = None) -> str:
        """'latest' / None / an id -> a committed version id, or StoreError. `head`: what
        'latest' means, where the caller has read it (`head()`; None: read here)."""
        if version in (None, "latest"):
            head = head or self.head()
            if head is None:
                raise StoreError(f"table {self.url!r} has no committed version yet; "
                                 "run `semid build` first")
            return head
        if not fsio.FOLDER_NAME.fullmatch(version):  # a path would reach outside versions/
            raise StoreError(f"version {version!r} is not a version id: give one as `semid "
                             "versions list` prints it (e.g. 20261122T020000123456Z-ab12cd), "
                             "or latest")
        if not self.fs.exists(fsio.join(self.version_dir(version), MANIFEST)):
            known = ", ".join(self.versions()[-5:][::-1]) or "none"  # newest first
            state = ("is not committed (a build running, failed or killed, or gc removing it)"
                     if self.fs.exists(self.version_dir(version))
                     else "does not exist (never built, or removed by `semid versions gc`)")
            raise StoreError(f"version {version!r} of table {self.url!r} {state} "
                             f"(newest committed: {known})")
        return version

    def manifest(self, version: str | None = None) -> dict[str, Any]:
        vid = self.resolve(version)
        try:
            body = json.loads(self.read_bytes(vid, MANIFEST))
            if not (isinstance(body, dict) and isinstance(body.get("files"), list)
                    and "version_id" in body):
                raise ValueError("not a manifest object with a version_id and a files list")
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"the manifest of version {vid} "
                             f"({fsio.redact_url(self.version_url(vid))}/{MANIFEST}) cannot be "
                             f"read ({exc}): the version is damaged; restore the file, or "
                             f"remove versions/{vid} by hand") from None
        return body

    def check_files(self, version: str, kind: str = "") -> None:
        """Raise StoreError naming the first file (of those under `kind`/, or any) that a
        committed version's manifest lists and that is missing: a damaged version, whose
        readers would otherwise fail midway. One listing per version the files live in (not
        a request per file, on an object store)."""
        entries = [e for e in self.manifest(version)["files"]
                   if e["path"].startswith(f"{kind}/" if kind else "")]
        listed: dict[str, set[str]] = {}  # one listing per version the files live in
        for entry in entries:
            vid = entry.get("version") or version
            if vid not in listed:
                folder = fsio.join(self.version_dir(vid), kind)
                listed[vid] = ({p.rstrip("/") for p in self.fs.find(folder)}
                               if self.fs.exists(folder) else set())
            path = fsio.join(self.version_dir(vid), entry["path"])
            if path not in listed[vid] and not self.fs.exists(path):
                raise StoreError(f"version {version} is damaged: its manifest lists "
                                 f"{fsio.redact_url(path)}, which is missing; restore the "
                                 "file, or build a new version")

    def read_json(self, version: str | None, rel: str) -> dict[str, Any]:
        """A JSON file of a committed version; StoreError naming it when it is missing or
        does not parse (a damaged version)."""
        vid = self.resolve(version)
        try:
            return json.loads(self.read_bytes(vid, rel))
        except (FileNotFoundError, ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"version {vid} is damaged: {fsio.redact_url(self.version_url(vid))}"
                             f"/{rel} cannot be read ({type(exc).__name__}: {exc}); restore "
                             "the file, or build a new version") from None

    def read_data(self, version: str | None = None, kind: str = "data") -> pa.Table:
        """Read all `kind` files (data / rejects) of a committed version, as listed in its
        manifest (an entry with a `"version"` key lives in that version's directory)."""
        vid = self.resolve(version)
        tables = [fsio.read_parquet(self.fs, path) for path in self.part_paths(vid, kind)]
        return pa.concat_tables(tables) if tables else pa.table({})

    def entry_path(self, version_id: str, entry: FileEntry) -> str:
        """Path (inside `self.fs`) of a file entry of `version_id`."""
        return fsio.join(self.version_dir(entry.version or version_id), entry.path)

    def part_paths(self, version: str | None, kind: str = "data") -> list[str]:
        """Paths (inside `self.fs`) of the `kind` files of a committed version."""
        return [path for path, _ in self.part_rows(version, kind)]

    def part_urls(self, version: str | None, kind: str = "data") -> list[str]:
        """The `kind` files of a committed version, its parent's it references among them,
        as another reader (Spark, DuckDB) reads the version by: absolute paths on this
        machine's file system, else URLs (`s3://...`). Listing its `data/` folder misses an
        incremental version's parts that live in its parent's."""
        paths = self.part_paths(version, kind)
        return paths if fsio.is_local(self.fs) else [self.fs.unstrip_protocol(p) for p in paths]

    def part_rows(self, version: str | None, kind: str = "data") -> list[tuple[str, int]]:
        """(path inside `self.fs`, rows) of each `kind` file of a committed version."""
        vid = self.resolve(version)
        return [(fsio.join(self.version_dir(e.get("version") or vid), e["path"]), e["rows"])
                for e in self.manifest(vid)["files"] if e["path"].startswith(kind + "/")]

    def commit(self, version_id: str, manifest: dict[str, Any], files: list[FileEntry], *,
               expect_latest: str | None = None) -> bool:
        """Check row reconciliation, write the manifest last, then move `_latest` forward.

        Reconciliation: input = encoded + rejected; the data files hold `table_rows` rows
        (encoded, plus the parent's rows an incremental version carries) and the reject
        files the rejected rows.

        The version is committed (visible to readers) once its manifest exists. `_latest` is
        then compare-and-swapped: it moves to `version_id` only if that id sorts after the
        version `_latest` names now (ids sort by build start time), so when builds commit
        concurrently `_latest` names the newest committed version and never goes back.
        `expect_latest` (an incremental version: the version `latest` meant as its build
        started): `_latest` moves only while `latest` still means it (`advance_latest`).
        Returns whether `_latest` moved (False: a newer version was committed meanwhile).
        """
        rows = manifest["rows"]
        data_rows = sum(f.rows for f in files if f.path.startswith("data/"))
        reject_rows = sum(f.rows for f in files if f.path.startswith("rejects/"))
        if rows["input"] != rows["encoded"] + rows["rejected"]:
            raise StoreError(f"refusing to commit {version_id}: rows do not reconcile "
                             f"(input {rows['input']} != encoded {rows['encoded']} + "
                             f"rejected {rows['rejected']})")
        if data_rows != table_rows(rows) or reject_rows != rows["rejected"]:
            raise StoreError(f"refusing to commit {version_id}: files hold {data_rows} data "
                             f"and {reject_rows} reject rows, expected {table_rows(rows)} and "
                             f"{rows['rejected']}")
        self._check_references(version_id, files)
        body = dict(manifest, version_id=version_id, files=[f.as_json() for f in files])
        self.write_file(version_id, MANIFEST, json.dumps(body, indent=2).encode())
        maybe_die("latest")
        try:
            return self.advance_latest(version_id, expect=expect_latest)
        except StoreError as exc:
            raise StoreError(f"version {version_id} is committed, but _latest was not moved: "
                             f"{exc}") from None
        except Exception as exc:  # a full disk, a read-only mount, a server gone
            if not fsio.storage_failure(exc):
                raise
            raise StoreError(f"version {version_id} is committed, but _latest was not moved "
                             f"({fsio.failure_text(exc)}): "
                             "readers of latest get the version before "
                             "it until a newer one commits; to serve it now, write its id into "
                             f"{fsio.redact_url(self.url)}/{LATEST} (unless that names a newer "
                             "version already)") from None

    def _check_references(self, version_id: str, files: list[FileEntry]) -> None:
        """Files of other versions must still be there (a `gc` may have run meanwhile)."""
        for ref in sorted({f.version for f in files if f.version}):
            if not self.fs.exists(fsio.join(self.version_dir(ref), MANIFEST)):
                raise StoreError(f"refusing to commit {version_id}: it references files of "
                                 f"version {ref}, which is no longer committed (removed by "
                                 "`semid versions gc`?); re-run the build from a kept version")
        for f in files:
            if f.version and not self.fs.exists(self.entry_path(version_id, f)):
                raise StoreError(f"refusing to commit {version_id}: {f.path} of version "
                                 f"{f.version} is missing; re-run the build from a kept version")

    # -- `_latest`: compare-and-swap under a lock ---------------------------------------

    def advance_latest(self, version_id: str, *, expect: str | None = None) -> bool:
        """Point `_latest` at `version_id` unless `latest` already means a version whose id
        sorts at or after it, or, with `expect`, unless `latest` no longer means `expect`
        (the version it meant as an incremental version's build started: an incremental
        version holds its parent's rows and its own delta only, so a version committed
        while it was built, a sibling's delta or a full re-index, is not replaced by it).
        Without a `_latest` file, `latest` means the newest committed version besides
        `version_id`; where that must stay, it is written into `_latest` (else readers
        would take `version_id`, the newest). Returns whether `_latest` moved.

        Local filesystems: the re-read and the write happen under `_latest.lock` (an
        exclusive create; a lock older than `locks.LOCK_STALE_S` is broken), so `_latest`
        never goes backwards across threads and processes on a filesystem that honours
        `O_EXCL`. Object stores have no portable exclusive create: the write happens only if
        the new id sorts after the re-read one, then `_latest` is re-read (up to 3 times, 50
        ms apart) and an older value a racing writer put there repaired; two processes that
        interleave inside one round trip can leave the older id until the next commit
        (threads of one process are serialized, which makes `memory://` exact). Readers that
        need certainty use `versions()[-1]`, which lists manifests.
        """
        with self.table_lock():
            current = self.latest()
            if current is not None:
                self.head()  # raises when `_latest` names no committed version
            now = current or self._newest(besides=version_id)
            if now is not None and (now >= version_id or expect not in (None, now)):
                if current is None and expect is not None:  # (else readers take the newest)
                    self._write_latest(now)
                return False
            self._write_latest(version_id)
            if fsio.is_local(self.fs) or "memory" in self._protocols():
                return True
        for _ in range(3):  # object stores: repair a racing older write, then give up
            time.sleep(0.05)
            current = self.latest()
            if current is not None and (current >= version_id or expect is not None):
                return current == version_id
            self._write_latest(version_id)
        return self.latest() == version_id

    def _newest(self, *, besides: str) -> str | None:
        """The newest committed version other than `besides`: what `latest` meant before
        that version's manifest was written, where there is no `_latest` file."""
        return next((v for v in reversed(self.versions()) if v != besides), None)

    def _write_latest(self, version_id: str) -> None:
        fsio.write_bytes(self.fs, fsio.join(self.base, LATEST), version_id.encode())

    def _protocols(self) -> tuple[str, ...]:
        protocol = self.fs.protocol
        return tuple(protocol) if isinstance(protocol, (tuple, list)) else (protocol,)

    def table_lock(self, on_wait: Callable[[bool], None] | None = None,
                   ) -> AbstractContextManager[None]:
        """The table's exclusive lock, which `_latest` moves under (and a build chooses its
        version under, `semid_dist.resume`): a lock file on local filesystems, a process-wide
        `threading.Lock` elsewhere (see `advance_latest` for the weaker object-store rule)."""
        if not fsio.is_local(self.fs):
            return process_lock(f"{self.fs.protocol}:{self.base}")
        return file_lock(os.path.join(self.base, LATEST_LOCK), on_wait)

    # -- retention -----------------------------------------------------------------------

    def version_dirs(self) -> list[str]:
        """Every directory under `versions/`, committed or not, sorted."""
        vdir = fsio.join(self.base, "versions")
        if not self.fs.exists(vdir):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(vdir, detail=False))

    def gc(self, keep: int, *, min_age_hours: float = 24.0, dry_run: bool = False,
           now: dt.datetime | None = None,
           on_wait: Callable[[bool], None] | None = None) -> dict[str, Any]:
        """Delete old versions by the `gc_plan` policy (`semid_dist.cleanup`); returns what
        was (or, with `dry_run`, would be) deleted and kept. on_wait: as `file_lock` takes it, for
        the table's lock."""
        from semid_dist.cleanup import collect_garbage  # (it builds on this module)

        return collect_garbage(self, keep, min_age_hours=min_age_hours, dry_run=dry_run,
                               now=now, on_wait=on_wait)

    def remove_staging(self, vid: str) -> None:
        """Remove version `vid`'s work files (`STAGING`), none part of a committed one; gone
        meanwhile is no error (a build's commit and a gc may remove them together)."""
        path = fsio.join(self.version_dir(vid), STAGING)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
