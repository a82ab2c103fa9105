"""Seeded synthetic item catalogs, written straight to Parquet in bounded memory.

The model (all of it seeded by `CatalogSpec.seed`):
- embeddings: a two-level Gaussian mixture. `groups` coarse centres, `clusters` fine centres
  around them, items around the fine centres; cluster sizes follow a Zipf law
  (size of the cluster of rank r ~ r^-cluster_zipf), so a few clusters hold much of the
  catalog and many are tiny;
- popularity: discrete Pareto with tail index `popularity_alpha` (Zipf-like: the top 1 % of
  items hold a large share of all interactions; many items have 0);
- embedding norm grows with log-popularity (plus a small log-normal jitter), the way
  popular items often get larger norms from a trained two-tower model.

Rows are produced chunk by chunk (chunk i always comes from the generator seeded with
(seed, i)), one Parquet row group per chunk, `chunks_per_file` chunks per file: memory stays
at about one chunk whatever the catalog size. Columns: item_id int64 (0..n-1),
embedding fixed_size_list<float32, dim>, popularity int64.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.io import fs as fsio


@dataclass(frozen=True)
class CatalogSpec:
    """What a synthetic catalog looks like (not how big it is)."""

    dim: int = 128
    clusters: int = 2048  # fine mixture components
    groups: int = 64  # coarse centres the fine ones sit around
    cluster_zipf: float = 1.1  # cluster of rank r holds ~ r^-cluster_zipf of the items
    popularity_alpha: float = 1.2  # Pareto tail index (smaller = heavier tail)
    norm_spread: float = 0.5  # norm = (1 + norm_spread * log1p(pop) / log1p(1000)) * jitter
    spread: float = 0.6  # fine centres around their coarse centre (relative)
    noise: float = 0.35  # items around their fine centre (relative)
    seed: int = 0
    draw: int = 0  # which draw of items from the mixture (its centres depend on `seed` only)


COMPRESSIONS = ("snappy", "zstd", "gzip", "brotli", "lz4", "none")  # Parquet's codecs


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least` (the generator's and the scale job's sizes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is not >= {least}")
        return value
    return parse


@dataclass(frozen=True)
class CatalogInfo:
    path: str
    rows: int
    files: int
    row_groups: int
    chunk_rows: int
    bytes: int
    dim: int


class _Mixture:
    """The catalog-wide parameters: centres and cluster weights."""

    def __init__(self, spec: CatalogSpec) -> None:
        if spec.dim < 1 or spec.clusters < 1 or spec.groups < 1:
            raise ValueError(f"dim, clusters and groups must be >= 1, got {spec}")
        rng = np.random.default_rng([spec.seed, 0])
        d = spec.dim
        coarse = rng.standard_normal((spec.groups, d), dtype=np.float32) / math.sqrt(d)
        parent = rng.integers(spec.groups, size=spec.clusters)
        fine = rng.standard_normal((spec.clusters, d), dtype=np.float32) / math.sqrt(d)
        self.centres = coarse[parent] + np.float32(spec.spread) * fine
        weights = np.arange(1, spec.clusters + 1, dtype=np.float64) ** -spec.cluster_zipf
        self.cdf = np.cumsum(weights[rng.permutation(spec.clusters)])
        self.cdf /= self.cdf[-1]
        self.spec = spec


def _chunk(mix: _Mixture, index: int, start: int, rows: int) -> pa.Table:
    spec, d = mix.spec, mix.spec.dim
    rng = np.random.default_rng([spec.seed, 1, index] + ([spec.draw] if spec.draw else []))
    labels = np.minimum(np.searchsorted(mix.cdf, rng.random(rows), side="right"),
                        spec.clusters - 1)
    u = rng.random(rows)
    pop = np.floor(np.minimum((1.0 - u) ** (-1.0 / spec.popularity_alpha), 1e12)) - 1.0
    x = rng.standard_normal((rows, d), dtype=np.float32)
    x *= np.float32(spec.noise / math.sqrt(d))
    x += mix.centres[labels]
    norm = (1.0 + spec.norm_spread * np.log1p(pop) / math.log1p(1000.0)) * np.exp(
        0.1 * rng.standard_normal(rows))
    x *= (norm / np.maximum(np.linalg.norm(x, axis=1), 1e-12)).astype(np.float32)[:, None]
    return pa.table({
        "item_id": pa.array(np.arange(start, start + rows, dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), d),
        "popularity": pa.array(pop.astype(np.int64)),
    })


def iter_chunks(spec: CatalogSpec, rows: int, *, chunk_rows: int = 262_144,
                first_id: int = 0) -> Iterator[pa.Table]:
    """The catalog's rows as tables of at most `chunk_rows` rows, in item_id order (ids
    first_id, first_id + 1, ...)."""
    if rows < 0 or chunk_rows < 1:
        raise ValueError(f"rows must be >= 0 and chunk_rows >= 1, got {rows}, {chunk_rows}")
    mix = _Mixture(spec)
    for index, start in enumerate(range(0, rows, chunk_rows)):
        yield _chunk(mix, index, first_id + start, min(chunk_rows, rows - start))


def embeddings(spec: CatalogSpec, rows: int, *, chunk_rows: int = 262_144) -> np.ndarray:
    """The first `rows` embeddings of the catalog in memory: (rows, dim) float32."""
    out = np.empty((rows, spec.dim), dtype=np.float32)
    start = 0
    for t in iter_chunks(spec, rows, chunk_rows=chunk_rows):
        n = t.num_rows
        out[start:start + n] = t.column("embedding").combine_chunks().flatten().to_numpy(
        ).reshape(n, spec.dim)
        start += n
    return out


def write_catalog(url: str, spec: CatalogSpec, rows: int, *, chunk_rows: int = 262_144,
                  chunks_per_file: int = 4, compression: str = "snappy",
                  first_id: int = 0) -> CatalogInfo:
    """Write `rows` items (ids from `first_id`) as `part-NNNNN.parquet` files under `url` (a
    directory; fsspec URL or local path), one row group per chunk, `chunks_per_file` chunks
    per file. Memory stays at about one chunk (chunk_rows x dim float32). The part files of
    an earlier catalog there are removed first (a build would read them as this one's). The
    rows depend on the seed, the draw and `chunk_rows` (each chunk is drawn on its own)."""
    if chunks_per_file < 1:
        raise ValueError(f"chunks_per_file must be >= 1, got {chunks_per_file}")
    if compression.lower() not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    fs, root = fsio.resolve(url)
    fs.makedirs(root, exist_ok=True)
    stale = fs.glob(fsio.join(root, "part-*.parquet"))
    if stale:
        fs.rm(stale)
    files = groups = 0
    writer: pq.ParquetWriter | None = None
    sink = None
    try:
        for i, table in enumerate(iter_chunks(spec, rows, chunk_rows=chunk_rows,
                                              first_id=first_id)):
            if i % chunks_per_file == 0:
                if writer is not None:
                    writer.close()
                    sink.close()
                sink = fs.open(fsio.join(root, f"part-{files:05d}.parquet"), "wb")
                writer = pq.ParquetWriter(sink, table.schema, compression=compression)
                files += 1
            writer.write_table(table, row_group_size=table.num_rows)
            groups += 1
    finally:
        if writer is not None:
            writer.close()
            sink.close()
    size = sum(fs.size(fsio.join(root, f"part-{i:05d}.parquet")) for i in range(files))
    return CatalogInfo(path=url, rows=rows, files=files, row_groups=groups,
                       chunk_rows=chunk_rows, bytes=int(size), dim=spec.dim)


def default_chunk_rows(dim: int, *, budget_bytes: int = 256 * 2**20) -> int:
    """Rows per chunk so one chunk's float32 embeddings stay within `budget_bytes`
    (at most 262,144 rows)."""
    return max(1024, min(262_144, budget_bytes // (4 * max(dim, 1))))

