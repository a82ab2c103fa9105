"""Synthetic catalog generator: schema, size, determinism, bounded chunks, long tails."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.bench.synthetic import CatalogSpec, embeddings, iter_chunks, write_catalog
from semid_dist.io.catalog import plan_catalog

SPEC = CatalogSpec(dim=24, clusters=256, groups=16, seed=5)


def read(path: str) -> pa.Table:
    return pq.read_table(path)


def ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[str, object]:
    path = str(tmp_path_factory.mktemp("syn") / "cat")
    return path, write_catalog(path, SPEC, 20_000, chunk_rows=3000, chunks_per_file=3)


def test_schema_and_rows(catalog):
    path, info = catalog
    t = read(path)
    assert t.schema.field("item_id").type == pa.int64()
    assert t.schema.field("popularity").type == pa.int64()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 24)
    assert t.num_rows == info.rows == 20_000
    ids = t.column("item_id").to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(20_000))
    assert t.column("popularity").to_numpy().min() >= 0
    assert np.isfinite(t.column("embedding").combine_chunks().flatten().to_numpy()).all()
    plan = plan_catalog(path, target_rows=3000)  # the pipeline reads it as a catalog
    assert plan.num_rows == 20_000


def test_bounded_chunks_one_row_group_each(catalog):
    path, info = catalog
    files = sorted(Path(path).glob("*.parquet"))
    assert info.row_groups == 7 and info.files == len(files) == 3  # ceil(7 / 3)
    sizes = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_row_groups <= 3
        sizes += [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert max(sizes) <= 3000 and sum(sizes) == 20_000


def test_deterministic_for_a_seed(tmp_path):
    a = write_catalog(str(tmp_path / "a"), SPEC, 5000, chunk_rows=2000)
    b = write_catalog(str(tmp_path / "b"), SPEC, 5000, chunk_rows=2000)
    c = write_catalog(str(tmp_path / "c"), CatalogSpec(dim=24, clusters=256, groups=16, seed=6),
                      5000, chunk_rows=2000)
    ta, tb, tc = read(a.path), read(b.path), read(c.path)
    assert ta.equals(tb)
    assert not ta.column("embedding").equals(tc.column("embedding"))
    x = embeddings(SPEC, 5000, chunk_rows=2000)  # the in-memory copy is the same data
    assert np.array_equal(x, ta.column("embedding").combine_chunks().flatten().to_numpy()
                          .reshape(-1, 24))


def test_a_later_draw_is_new_items_of_the_same_mixture(tmp_path):
    """A delta catalog for an incremental run: `draw` gives new items around the same
    centres, `first_id` their ids (overlapping the first catalog's: changed items)."""
    from semid_dist.bench.synthetic import _Mixture

    later = dataclasses.replace(SPEC, draw=1)
    a = read(write_catalog(str(tmp_path / "a"), SPEC, 4000, chunk_rows=2000).path)
    b = read(write_catalog(str(tmp_path / "b"), later, 4000, chunk_rows=2000,
                           first_id=3000).path)
    assert np.array_equal(b.column("item_id").to_numpy(), np.arange(3000, 7000))
    xa, xb = (t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 24)
              for t in (a, b))
    assert not np.isclose(xa, xb).all(axis=1).any()  # no item drawn again
    assert np.array_equal(_Mixture(SPEC).centres, _Mixture(later).centres)
    assert np.array_equal(embeddings(later, 4000, chunk_rows=2000), xb)


def test_long_tailed_popularity_and_norm(catalog):
    path, _ = catalog
    t = read(path)
    pop = t.column("popularity").to_numpy().astype(np.float64)
    top = np.sort(pop)[::-1][: len(pop) // 100]
    assert top.sum() / pop.sum() > 0.10  # top 1 % of items hold > 10 % of popularity
    x = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 24)
    norm = np.linalg.norm(x, axis=1)
    spearman = np.corrcoef(ranks(norm), ranks(pop))[0, 1]
    assert spearman > 0.3  # popular items have larger norms


def test_clusters_are_long_tailed():
    """Items concentrate on few fine centres: the nearest-centre counts are skewed."""
    from semid_dist.bench.synthetic import _Mixture
    from semid_dist.quantize.encode import nearest

    mix = _Mixture(SPEC)
    x = embeddings(SPEC, 10_000)
    unit = mix.centres / np.linalg.norm(mix.centres, axis=1, keepdims=True)
    labels, _ = nearest(x / np.linalg.norm(x, axis=1, keepdims=True), unit)
    counts = np.sort(np.bincount(labels, minlength=len(unit)))[::-1]
    assert counts[: len(unit) // 10].sum() > 0.3 * len(x)  # top 10 % of clusters: > 30 %


def test_memory_stays_near_one_chunk(tmp_path):
    rows, chunk, d = 60_000, 2000, 32
    spec = CatalogSpec(dim=d, clusters=64, groups=8, seed=1)
    write_catalog(str(tmp_path / "warm"), spec, 10, chunk_rows=chunk)  # imports, caches
    tracemalloc.start()
    try:
        write_catalog(str(tmp_path / "m"), spec, rows, chunk_rows=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * chunk * d * 4 < rows * d * 4 / 3  # a few chunks, never the catalog


def test_bad_sizes():
    with pytest.raises(ValueError, match="chunk_rows >= 1, got 10, 0"):
        list(iter_chunks(SPEC, 10, chunk_rows=0))
    with pytest.raises(ValueError, match="chunks_per_file must be >= 1, got 0"):
        write_catalog("memory://x", SPEC, 10, chunks_per_file=0)
    with pytest.raises(ValueError, match="compression 'bogus' is not one of snappy"):
        write_catalog("memory://bad-codec", SPEC, 10, compression="bogus")
    import fsspec

    assert not fsspec.filesystem("memory").exists("/bad-codec")  # nothing made first


def test_a_catalog_written_over_another_replaces_its_parts(tmp_path):
    """The earlier catalog's part files go (a 2,000-row catalog written over a 5,000-row one
    left three of its files: 5,000 rows, 3,000 of another seed)."""
    out = tmp_path / "cat"
    write_catalog(str(out), SPEC, 5000, chunk_rows=1000, chunks_per_file=1)
    (out / "notes.txt").write_text("kept")  # not a part file
    info = write_catalog(str(out), dataclasses.replace(SPEC, seed=7), 2000, chunk_rows=1000,
                         chunks_per_file=1)
    assert info.files == 2 and sorted(p.name for p in out.glob("*.parquet")) == [
        "part-00000.parquet", "part-00001.parquet"]
    assert sum(s.num_rows for s in plan_catalog(str(out)).shards) == 2000
    assert (out / "notes.txt").exists()


def test_scale_job_arguments_are_checked_before_any_work(capsys):
    from semid_dist.bench.scale import parser

    for bad in (["--delta-rows", "-10"], ["--rows", "-1"], ["--rows", "0"], ["--dim", "x"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
        assert "error: argument" in capsys.readouterr().err
    assert parser().parse_args(["--delta-rows", "0"]).delta_rows == 0
