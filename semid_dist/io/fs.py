"""fsspec helpers: resolve URLs, write files so readers never see a half-written one."""

from __future__ import annotations

import io
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem


def resolve(url: str) -> tuple[AbstractFileSystem, str]:
    """URL (file://, s3://, memory://, plain path ...) -> (filesystem, path inside it)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so the final name appears only complete (tmp + rename where possible)."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:  # object stores publish a PUT atomically
        fs.pipe_file(path, data)


def write_parquet(fs: AbstractFileSystem, path: str, table: pa.Table,
                  *, row_group_rows: int = 65536) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows,
                   write_page_checksum=True)
    write_bytes(fs, path, buf.getvalue())


def read_parquet(fs: AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
