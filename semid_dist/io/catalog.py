"""The catalog: Parquet files at an fsspec URL, split into shards of whole row groups.

A shard is plain data (its pieces: file, row groups, row offset), so every engine splits a
catalog identically and every per-shard output (data part, rejects, statistics) has a stable
name. Files of fewer rows than a shard's share one: a catalog of many small files is encoded
in shards of ~`encode.shard_rows` rows all the same (a shard per file made as many tasks,
staged files and table parts as files).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.errors import EmptyCatalog, InputError, one_line
from semid_dist.io import fs as fsio


@dataclass(frozen=True)
class Piece:
    """Consecutive row groups of one catalog file, inside a shard."""

    path: str
    row_groups: tuple[int, ...]
    row_offset: int  # first row's index inside its file
    num_rows: int


@dataclass(frozen=True)
class Shard:
    """Consecutive rows of the catalog, in its files' order: row groups of one file, or
    several whole files of fewer rows than a shard's, together at most a shard's
    (`plan_catalog`)."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.pieces)

    def starts(self) -> np.ndarray:
        """Each piece's first row inside the shard, and the shard's rows after the last."""
        return np.cumsum([0] + [p.num_rows for p in self.pieces])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(piece index, row inside its file) of each row inside the shard."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.starts()
        at = np.searchsorted(starts, rows, side="right") - 1
        offsets = np.array([p.row_offset for p in self.pieces], dtype=np.int64)
        return at, offsets[at] + rows - starts[at]


@dataclass(frozen=True)
class CatalogPlan:
    url: str
    shards: tuple[Shard, ...]
    schema: pa.Schema
    fingerprint: str
    schemas: tuple[tuple[str, pa.Schema], ...] = ()  # each distinct schema, with a file having it
    # files below input.path that are not read: not named *.parquet, nor hidden (`_`, `.`);
    # relative to input.path
    skipped: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def _input_error(message: str) -> InputError:
    """An InputError whose message holds no credentials (paths of `http://user:pw@...`)."""
    return InputError(fsio.redact_url(message))


@contextmanager
def _reachable(url: str) -> Iterator[None]:
    """A catalog whose server does not answer, as an InputError naming input.path."""
    try:
        yield
    except Exception as exc:  # (gaierror: no such host; an object store's client's own)
        if not (isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))
                or fsio.no_answer(exc)):
            raise
        raise _not_reached(url, exc) from None


def _not_reached(url: str, exc: BaseException) -> InputError:
    return _input_error(f"input.path {url!r} cannot be reached ({type(exc).__name__}: "
                        f"{one_line(exc)}); check its host and port, the network and the "
                        "credentials")


def catalog_files(url: str) -> tuple[list[str], list[str]]:
    """(the catalog's files, in path order: input.path itself when it is a file, else the
    files below it named *.parquet (in any case: `.PARQUET` too) that are not hidden; the
    other files below it that are not hidden, as paths relative to it: not read)."""
    with _reachable(url):
        return _catalog_files(url)


def check_input_exists(url: str) -> None:
    """An InputError naming the fix where nothing is at `url` (input.path): said before an
    engine starts (a Spark build said so after its JVM's start, ~5 s)."""
    with _reachable(url):
        _check_exists(url, *fsio.resolve(url))


def _catalog_files(url: str) -> tuple[list[str], list[str]]:
    fs, path = fsio.resolve(url)
    _check_exists(url, fs, path)
    if fs.isfile(path):
        return [path], []
    visible = sorted(p for p in fs.find(path) if not hidden(p, path))
    files = [p for p in visible if p.lower().endswith(".parquet")]
    if not files:
        raise _input_error(f"input.path {url!r} holds no *.parquet files (names starting with "
                         "'_' or '.' are skipped); point it at the catalog's Parquet files")
    base = path.rstrip("/") + "/"
    return files, [p[len(base):] if p.startswith(base) else p for p in visible
                   if not p.lower().endswith(".parquet")]


def _check_exists(url: str, fs, path: str) -> None:
    if fs.exists(path):
        return
    _check_http_host(url)  # (fsspec's HTTP file system says "not there" for both)
    where = (urllib.parse.urlsplit(url).path if url.lower().startswith(("http://", "https://"))
             else url)  # (an HTTP URL's query aside)
    wildcard = any(c in where for c in "*?[")
    raise _input_error(
        f"input.path {url!r} does not exist; "
        + ("if it is a wildcard, wildcards are not expanded: give the directory of the "
           "Parquet files (every *.parquet below it is read; hidden and _-prefixed "
           "files, such as Spark's _SUCCESS and .crc files, are not) or one file"
           if wildcard else "point it at a Parquet file or a directory of Parquet files"))


def _check_http_host(url: str) -> None:
    """An http(s):// catalog whose server does not answer (no such host, nothing listening):
    the InputError of `_reachable`, not "does not exist"."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        refusal = fsio.tcp_refusal(f"{parts.hostname}:{port}")
        if refusal is not None:
            raise _not_reached(url, refusal)


def hidden(file: str, root: str) -> bool:
    """Whether a part of `file`'s path below `root` (input.path) starts with '_' or '.'
    (`_SUCCESS`, `.part-0.parquet.crc`, `_temporary/`); the folders above the catalog, as in
    `/data/_shared/catalog` or `~/.cache/catalog`, do not count."""
    base = root.rstrip("/") + "/"
    below = file[len(base):] if file.startswith(base) else file  # (not below: all of it)
    return any(part.startswith(("_", ".")) for part in below.split("/"))


# Keys of fsspec's `info` that change when an object is rewritten, most specific first:
# S3's ETag, Azure's etag, GCS's md5Hash and generation, a local file's mtime, S3's and
# Azure's modification times, GCS's updated.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified",
                 "last_modified", "updated")


def _file_version(info: dict) -> str | None:
    """What tells this version of a file from a rewrite of it with the same size (fsspec's
    `info`; None where the file system gives none of `_VERSION_KEYS`)."""
    for key in _VERSION_KEYS:
        if info.get(key) is not None:
            return str(info[key])
    return None


def _footer(fs, url: str, path: str, size: int | None) -> pq.FileMetaData:
    shown = fsio.shown_path(url, path)
    if size == 0:
        raise _input_error(f"catalog file {shown!r} is empty (0 bytes); remove it or re-export "
                           "it")
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, PermissionError) or fsio.no_answer(exc):
            raise  # (the storage's own, each one line: no access, no answer; not the bytes)
        raise _input_error(f"catalog file {shown!r} is not readable Parquet ({exc}); "
                           "remove or repair it, then re-run") from None


class _FileFacts(NamedTuple):
    """What the plan needs of a catalog file (its footer is not kept: a catalog of 100,000
    files holds this, not 100,000 footers)."""

    schema: pa.Schema
    rows: int
    groups: list[int]  # each row group's rows
    size: int | None
    version: str | None  # `_file_version`: a rewritten file (same rows and size) is another


def _file_facts(fs, url: str, path: str) -> _FileFacts:
    info = fs.info(path)
    meta = _footer(fs, url, path, info.get("size"))
    return _FileFacts(meta.schema.to_arrow_schema(), meta.num_rows,
                      [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
                      info.get("size"), _file_version(info))


# Footers read at once from an object store or a cluster's file system: each file's two or
# three requests take tens of milliseconds there, so one at a time 10,000 files took
# minutes before the build said a word. Any other file system one at a time: a local or
# in-memory one keeps no one waiting (16 threads read 3,000 local footers in 1.9 s, one
# thread in 1.2 s: the GIL), an FTP or SFTP one holds one connection, a tar archive one
# file position (its reads in threads got each other's bytes), and a cache in front of a
# file system (`simplecache::`) names only itself.
FOOTER_THREADS, FOOTERS_AHEAD = 16, 64
_AT_ONCE = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "http", "https", "hdfs",
            "viewfs", "webhdfs"}


def _in_order(read: Callable[[str], _FileFacts], files: list[str], *,
              fs: fsspec.AbstractFileSystem) -> Iterator[_FileFacts]:
    """read(file) of each file, in the files' order: on the file systems of `_AT_ONCE`
    FOOTER_THREADS at a time and at most FOOTERS_AHEAD ahead of the caller, else one at a
    time. The first file that fails, in that order, raises (the files after it may be read
    or not). The threads are daemons and no one waits for them: an error or a Ctrl-C does
    not wait on the reads in flight (a store that stopped answering holds them for minutes)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if len(files) < 2 or not protocols & _AT_ONCE:
        yield from map(read, files)
        return
    work: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while (job := work.get()) is not None:
            path, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(read(path))
                except BaseException as exc:  # (handed to the caller as it is)
                    future.set_exception(exc)

    threads = min(FOOTER_THREADS, len(files))
    for i in range(threads):
        threading.Thread(target=worker, name=f"semid-plan-{i}", daemon=True).start()

    def submit(path: str) -> Future:
        future: Future = Future()
        work.put((path, future))
        return future

    ahead: deque[Future] = deque()
    try:
        todo = iter(files)
        ahead.extend(submit(path) for path in itertools.islice(todo, FOOTERS_AHEAD))
        while ahead:
            facts = ahead.popleft().result()
            if (path := next(todo, None)) is not None:
                ahead.append(submit(path))
            yield facts
    finally:
        for future in ahead:
            future.cancel()
        for _ in range(threads):
            work.put(None)


# How files are cut into shards, in the fingerprint: a run killed under another rule is not
# resumed (its staged shards hold other rows).
_LAYOUT = "small files packed"


# Seconds between the plan's progress lines while it reads footers (none before the first
# PLAN_LINE_S: a catalog planned in less says nothing more).
PLAN_LINE_S = 10.0


def plan_catalog(url: str, *, target_rows: int = 65536,
                 log: Callable[[str], None] | None = None) -> CatalogPlan:
    """Read the Parquet footers and cut the catalog into shards of ~target_rows rows: a
    file of at least target_rows rows into runs of its row groups, each closed at target_rows
    or at the file's end; consecutive smaller files whole into shards of them, of at most
    target_rows rows (closed before a file that would pass it, or before a larger file). The
    fingerprint covers each file's path, rows, size and version (ETag, mtime, ...), so a
    re-run over rewritten files does not resume the killed run's version. log: a line every
    PLAN_LINE_S while the footers are read (10,000 files on an object store take minutes)."""
    with _reachable(url):
        fs, _ = fsio.resolve(url)
    shards: list[Shard] = []
    schema = None
    distinct: list[tuple[str, pa.Schema]] = []
    digest = hashlib.sha256(_LAYOUT.encode())
    files, skipped = catalog_files(url)
    pack: list[Piece] = []  # small files' pieces, in the open shard
    packed = 0  # their rows
    started = said = time.monotonic()
    facts = _in_order(lambda p: _file_facts(fs, url, p), files, fs=fs)
    for done, (path, file) in enumerate(zip(files, facts), 1):
        if log is not None and (now := time.monotonic()) - said >= PLAN_LINE_S:
            log(f"plan: read the footers of {done:,} of {len(files):,} catalog files "
                f"({now - started:.0f} s)")
            said = now
        schema = schema or file.schema
        if not any(file.schema.equals(s) for _, s in distinct):
            distinct.append((fsio.shown_path(url, path), file.schema))  # (for messages)
        digest.update(json.dumps([fsio.redact_url(path), file.rows, file.size,
                                  file.version]).encode())
        if 0 < file.rows < target_rows:  # a small file: whole, beside the next ones
            if packed + file.rows > target_rows:  # (no shard of small files holds more
                shards.append(Shard(len(shards), tuple(pack)))  # rows than a shard: the
                pack, packed = [], 0  # memory of one is sized by it)
            pack.append(Piece(path, tuple(range(len(file.groups))), 0, file.rows))
            packed += file.rows
            continue
        if pack and file.rows:  # (the shards stay in the rows' order)
            shards.append(Shard(len(shards), tuple(pack)))
            pack, packed = [], 0
        groups: list[int] = []
        rows, offset = 0, 0
        for rg, rg_rows in enumerate(file.groups):
            groups.append(rg)
            rows += rg_rows
            if rows >= target_rows or (rg == len(file.groups) - 1 and rows):
                shards.append(Shard(len(shards), (Piece(path, tuple(groups), offset, rows),)))
                offset += rows
                groups, rows = [], 0
    if pack:
        shards.append(Shard(len(shards), tuple(pack)))
    if schema is None:
        raise _input_error(f"input.path {url!r} holds no Parquet files")
    if not shards:  # every file has 0 rows: nothing to sample or encode
        raise EmptyCatalog(fsio.redact_url(
            f"catalog at {url!r} has no rows ({len(files)} Parquet file(s), all empty); export "
            "the catalog again or point input.path at a full one"),
            url=fsio.redact_url(url), files=len(files), schemas=tuple(distinct))
    return CatalogPlan(url, tuple(shards), schema, digest.hexdigest(), tuple(distinct),
                       tuple(skipped))


# A shard's reader already runs beside one other per core (the engines' tasks and actors,
# the local engine's read-ahead thread), and Arrow's decoding threads beside it hold pages
# of their own. On the 2-core EPYC VM (3 x 256, 1.5M items in 23 shards, runs in turns),
# decoding in the reader's thread took the local build's encode-stage peak to 609-636 MiB
# from 768-797 (three builds each, committed in 12.2-12.7 s either way). The read-ahead
# thread's read then takes 126-135 ms a shard against 99-113, about as long as the kernel's
# step: the local engine's encode stage alone ran at 273-316k items/s against 296-337k
# (six runs each; medians 309k and 312k). Ray's ran at 350-386k against 342-377k (six
# each), Spark's at 325-343k against 320-336k (two each).
READ_THREADS = False


_NUMBER = re.compile(r"(\d+)")


def numbers_out_of_order(files: Iterable[str]) -> tuple[str, str] | None:
    """The first two of `files` (in path order, the catalog's) whose paths differ only in
    their numbers and order them the other way (`part-10` before `part-2`: numbers without
    leading zeros), or None."""
    last: dict[tuple[str, ...], tuple[tuple[int, ...], str]] = {}  # same text -> latest
    for path in files:
        parts = _NUMBER.split(path)
        text, numbers = tuple(parts[0::2]), tuple(int(n) for n in parts[1::2])
        if text in last and last[text][0] > numbers:
            return last[text][1], path
        last[text] = numbers, path
    return None


def read_shard(url: str, shard: Shard, columns: list[str]) -> list[pa.Table]:
    """Read the shard's row groups (only `columns`), a table per piece (files may differ in
    their types), verifying page checksums where the writer recorded them (corrupt pages then
    fail loudly instead of decoding to garbage). The columns are decoded in the calling
    thread (`READ_THREADS`)."""
    fs, _ = fsio.resolve(url)
    return [_read_piece(url, fs, piece, columns) for piece in shard.pieces]


def read_pieces(url: str, shard: Shard, columns: list[str],
                wanted: list[bool]) -> list[pa.Table | None]:
    """`read_shard`'s tables of the pieces `wanted` says, None for the others."""
    fs, _ = fsio.resolve(url)
    return [_read_piece(url, fs, piece, columns) if want else None
            for piece, want in zip(shard.pieces, wanted)]


def read_piece(url: str, piece: Piece, columns: list[str]) -> pa.Table:
    """One piece of a shard, as `read_shard` reads it."""
    return _read_piece(url, fsio.resolve(url)[0], piece, columns)


def _read_piece(url: str, fs, piece: Piece, columns: list[str]) -> pa.Table:
    groups = list(piece.row_groups)
    try:
        with fsio.parquet_file(fs, piece.path) as pf:  # (a local file: no Python file object
            # per page read)
            return pf.read_row_groups(groups, columns=columns, use_threads=READ_THREADS)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _input_error(f"catalog file {fsio.shown_path(url, piece.path)!r}: cannot read "
                           f"row groups {groups} ({exc}); repair or remove the file") from None


def shard_to_dict(shard: Shard) -> dict:
    return asdict(shard)


def shard_from_dict(data: dict) -> Shard:
    return Shard(int(data["index"]), tuple(
        Piece(str(p["path"]), tuple(int(g) for g in p["row_groups"]), int(p["row_offset"]),
              int(p["num_rows"])) for p in data["pieces"]))
