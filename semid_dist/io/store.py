"""Versioned, immutable SID table store on any fsspec filesystem.

Layout under `<root>/<table>/`: `versions/<version_id>/...` and `_latest`. A version exists
for readers only once its `_manifest.json` is written, which happens last; `_latest` is
replaced atomically after that. Nothing of an older version is touched by a build.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.errors import StoreError
from semid_dist.io import fs as fsio

MANIFEST = "_manifest.json"
LATEST = "_latest"


@dataclass(frozen=True)
class FileEntry:
    """A written file, relative to its version directory."""

    path: str
    rows: int
    bytes: int
    sha256: str


def new_version_id(now: dt.datetime | None = None) -> str:
    """Sortable id: UTC time to the second plus 6 random hex digits (`20261122T020000Z-ab12cd`)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


class TableStore:
    """Versions of one table at `<root>/<table>`."""

    def __init__(self, root: str, table: str) -> None:
        self.root, self.table = root, table
        self.fs, base = fsio.resolve(root)
        self.base = fsio.join(base, table)

    @property
    def url(self) -> str:
        return f"{self.root.rstrip('/')}/{self.table}"

    def version_dir(self, version_id: str) -> str:
        return fsio.join(self.base, "versions", version_id)

    def version_url(self, version_id: str) -> str:
        return f"{self.url}/versions/{version_id}"

    def write_table(self, version_id: str, rel: str, table: pa.Table) -> FileEntry:
        """Write a Parquet file inside a version; returns its manifest entry."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        return self.write_file(version_id, rel, buf.getvalue(), rows=table.num_rows)

    def write_file(self, version_id: str, rel: str, data: bytes, *, rows: int = 0) -> FileEntry:
        fsio.write_bytes(self.fs, fsio.join(self.version_dir(version_id), rel), data)
        return FileEntry(rel, rows, len(data), hashlib.sha256(data).hexdigest())

    def read_bytes(self, version_id: str, rel: str) -> bytes:
        return self.fs.cat_file(fsio.join(self.version_dir(version_id), rel))

    def latest(self) -> str | None:
        path = fsio.join(self.base, LATEST)
        if not self.fs.exists(path):
            return None
        return self.fs.cat_file(path).decode().strip() or None

    def versions(self) -> list[str]:
        """Committed versions (those with a manifest), oldest first."""
        vdir = fsio.join(self.base, "versions")
        if not self.fs.exists(vdir):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(vdir, detail=False))
        return [v for v in names if self.fs.exists(fsio.join(self.version_dir(v), MANIFEST))]

    def resolve(self, version: str | None) -> str:
        """'latest' / None / an id -> a committed version id, or StoreError."""
        if version in (None, "latest"):
            latest = self.latest()
            if latest is None:
                raise StoreError(f"table {self.url!r} has no committed version yet; "
                                 "run `semid build` first")
            return latest
        if not self.fs.exists(fsio.join(self.version_dir(version), MANIFEST)):
            known = ", ".join(self.versions()[-5:]) or "none"
            raise StoreError(f"version {version!r} of table {self.url!r} is not committed "
                             f"(latest committed: {known})")
        return version

    def manifest(self, version: str | None = None) -> dict[str, Any]:
        vid = self.resolve(version)
        return json.loads(self.read_bytes(vid, MANIFEST))

    def read_json(self, version: str | None, rel: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(self.resolve(version), rel))

    def read_data(self, version: str | None = None, kind: str = "data") -> pa.Table:
        """Read all `kind` files (data / rejects) of a committed version, as listed in its
        manifest."""
        vid = self.resolve(version)
        entries = [e for e in self.manifest(vid)["files"] if e["path"].startswith(kind + "/")]
        tables = [fsio.read_parquet(self.fs, fsio.join(self.version_dir(vid), e["path"]))
                  for e in entries]
        return pa.concat_tables(tables) if tables else pa.table({})

    def commit(self, version_id: str, manifest: dict[str, Any], files: list[FileEntry]) -> None:
        """Check row reconciliation, write the manifest last, then move `_latest`."""
        rows = manifest["rows"]
        data_rows = sum(f.rows for f in files if f.path.startswith("data/"))
        reject_rows = sum(f.rows for f in files if f.path.startswith("rejects/"))
        if rows["input"] != rows["encoded"] + rows["rejected"]:
            raise StoreError(f"refusing to commit {version_id}: rows do not reconcile "
                             f"(input {rows['input']} != encoded {rows['encoded']} + "
                             f"rejected {rows['rejected']})")
        if data_rows != rows["encoded"] or reject_rows != rows["rejected"]:
            raise StoreError(f"refusing to commit {version_id}: files hold {data_rows} data "
                             f"and {reject_rows} reject rows, expected {rows['encoded']} and "
                             f"{rows['rejected']}")
        body = dict(manifest, version_id=version_id, files=[asdict(f) for f in files])
        self.write_file(version_id, MANIFEST, json.dumps(body, indent=2).encode())
        fsio.write_bytes(self.fs, fsio.join(self.base, LATEST), version_id.encode())
