"""Partition the rows of many Parquet files (or of tables tasks computed) into buckets,
through storage.

A job that needs every row of one bucket together (drift: an item's rows of two versions;
the SID -> items lookup: a SID's items; the duplicate check: an id's copies; the collision
suffixes: a SID's colliding items) splits the work into B buckets of about a million
rows. Reading every file once per bucket reads the data B times, so its time grows with the
square of the table. Here each file is read once: the files are grouped (`group_files`,
consecutive files of about as many rows as a bucket), and one task per group
(`split_files`; `split_tables` for rows a task computed) reads its files, sorts their rows
by bucket (a hash, or a key range) and writes them to a scratch file as B Arrow IPC streams
back to back, returning the streams' byte offsets. A bucket's task then reads its stream
from every split file (`read_bucket`, `Streams`): one ranged read per group, no Parquet
footer to parse. Grouping keeps the reads few and large on an object store: G groups make
G x B reads, against one per data part and bucket. The scratch folder is any URL the tasks
can reach; it need not be on the data's filesystem.

Rows keep their file's order inside a bucket, a bucket's stream in a split file holds one
record batch per file in the group's order, and a bucket's streams are read in the order of
the groups, so a bucket holds the same rows in the same order as a filter of the files read
one after the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa

from semid_dist.io import fs as fsio

T = TypeVar("T")
BucketFn = Callable[[pa.Table, int], np.ndarray]  # (rows, buckets) -> (n,) int64 bucket


@dataclass(frozen=True)
class Split:
    """A split file: its URL and the B + 1 byte offsets of its bucket streams (bucket b is
    bytes offsets[b]:offsets[b + 1]). offsets None: a Parquet file not split, all of it in
    bucket 0 (one bucket needs no split), and `path` is its path in the data's filesystem."""

    path: str
    offsets: tuple[int, ...] | None = None


def read_columns(fs, path: str, columns: Sequence[str]) -> pa.Table:
    """A Parquet file's `columns` that it has (others are skipped), decoded in the calling
    thread (`fsio.parquet_file`: no thread of Arrow's left with its pages)."""
    with fsio.damaged_parquet(path), fsio.parquet_file(fs, path) as pf:
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=present, use_threads=False)


def group_files(paths: Sequence[T], rows: Sequence[int], *, target_rows: int
                ) -> list[list[T]]:
    """Consecutive runs of `paths` (in order; files, or any items of `rows` rows each) of at
    most `target_rows` rows together (a file of more rows is a group of its own; a file of
    no rows joins the group before it), for one split task each."""
    groups: list[list[T]] = []
    held = 0
    for path, n in zip(paths, rows, strict=True):
        if not groups or (n > 0 and held + n > target_rows):
            groups.append([])
            held = 0
        groups[-1].append(path)
        held += n
    return groups


def split_files(fs, paths: Sequence[str], columns: Sequence[str], bucket_of: BucketFn,
                buckets: int, out_url: str) -> Split:
    """Read `columns` of the Parquet files at `paths` (in `fs`, rows in their order) and
    write them to the URL `out_url`, split into `buckets` streams by `bucket_of`. Returns
    the split. Each file is sorted by bucket on its own (the sort and gather work on one
    part's rows at a time), and a bucket's stream holds one record batch per file."""
    if not paths:
        raise ValueError("split_files needs at least one file")
    return split_tables((read_columns(fs, path, columns) for path in paths), bucket_of,
                        buckets, out_url)


def split_tables(tables: Iterable[pa.Table], bucket_of: BucketFn, buckets: int,
                 out_url: str) -> Split:
    """`split_files` of tables already in memory (all of one schema, at least one): written
    to `out_url` as `buckets` streams, a bucket's stream holding one record batch per table
    in their order."""
    # each table with its rows' order by bucket; a bucket's rows are taken as it is written,
    # so no sorted copy of a whole table is made
    parts = []
    for t in tables:
        which = bucket_of(t, buckets)
        order = np.argsort(which, kind="stable")
        parts.append((t, order, np.searchsorted(which[order], np.arange(buckets + 1))))
    if not parts:
        raise ValueError("split_tables needs at least one table")
    schema = parts[0][0].schema
    out_fs, out_path = fsio.resolve(out_url)
    offsets = [0]
    with fsio.staged_output(out_fs, out_path) as sink:  # not in memory beside the rows
        for b in range(buckets):
            with pa.ipc.new_stream(sink, schema) as writer:
                for t, order, bounds in parts:
                    writer.write_table(t.take(pa.array(order[bounds[b]:bounds[b + 1]])))
            offsets.append(sink.tell())
    return Split(out_url, tuple(offsets))


@dataclass(frozen=True)
class Streams:
    """Some streams of split files, read as one table: (url, start, end) byte ranges, each
    an Arrow IPC stream (e.g. one bucket of every split, or one reader's share of them)."""

    ranges: tuple[tuple[str, int, int], ...]

    @classmethod
    def of_bucket(cls, splits: Sequence[Split], bucket: int) -> Streams:
        """Bucket `bucket`'s stream of every split (split files only), in their order."""
        return cls(tuple((s.path, s.offsets[bucket], s.offsets[bucket + 1]) for s in splits))

    def read(self, schema: pa.Schema | None = None) -> pa.Table:
        """The streams' rows in order; `schema`'s empty table when there are none."""
        if not self.ranges:
            if schema is None:
                raise ValueError("no streams to read and no schema for an empty table")
            return schema.empty_table()
        return pa.concat_tables([read_stream(*r) for r in self.ranges])


def read_stream(url: str, start: int, end: int) -> pa.Table:
    """The Arrow IPC stream at bytes start:end of the file at `url` (one bucket of a split)."""
    fs, path = fsio.resolve(url)
    return pa.ipc.open_stream(fs.cat_file(path, start=start, end=end)).read_all()


def remove(url: str) -> None:
    """Remove a scratch folder and what it holds, if it exists."""
    fs, path = fsio.resolve(url)
    fs.invalidate_cache(path)  # an object store's cached listing may predate other tasks' files
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_bucket(fs, splits: Sequence[Split], bucket: int, columns: Sequence[str]
                ) -> pa.Table | None:
    """Bucket `bucket`'s rows of every split, in the splits' order (None without splits).
    A split stream holds the columns chosen when it was split; `columns` are read from a
    file not split (in `fs`)."""
    parts = []
    for s in splits:
        if s.offsets is None:
            parts.append(read_columns(fs, s.path, columns))
            continue
        parts.append(read_stream(s.path, s.offsets[bucket], s.offsets[bucket + 1]))
    return pa.concat_tables(parts) if parts else None
