"""Allocator setting for encode workers (`encode.reuse_memory`, off by default).

An encode worker decodes a shard's Parquet row groups into fresh Arrow buffers (35 MiB for
65,536 x 128 float32), frees them, and decodes the next shard. On the 2-core VMs of
docs/BENCHMARKS.md touching fresh pages is dear, so what counts is whether the pool hands
the freed pages back for the next shard.

With the setting on, Arrow's jemalloc pool is set to keep freed pages for a while
(`DECAY_MS`). It once made the local encode stage 1.2x faster than Arrow's default pool
(mimalloc), when shards were read through a Python file object. Since shards are read by
Arrow's own file reader and the validated matrix lives in Arrow's pool
(`validate._pool_matrix`), mimalloc reuses its pages and jemalloc does not: in a loop over
the 23 shards of a 1.5M x 128 catalog, a shard's read page-faulted ~29,000 times (116 MiB)
under jemalloc against ~600 under mimalloc, and the whole shard 36,000 against 7,000 times,
with 1.5x the system time. Hence the default pool. Raising glibc's mmap / trim thresholds
as well (so that numpy's and torch's buffers were kept too) fragmented the heap, and peak
memory then grew with the catalog (1.22x at 4N against 1.14x).
"""

from __future__ import annotations

DECAY_MS = 10_000  # jemalloc's dirty / muzzy page decay for the arenas it creates

_previous_pool = None  # Arrow's pool before keep_freed_memory, while the setting is on


def keep_freed_memory() -> bool:
    """Switch Arrow to jemalloc with a `DECAY_MS` decay (a second call while on does
    nothing). Returns False, changing nothing, where pyarrow was built without jemalloc."""
    global _previous_pool
    import pyarrow as pa

    if _previous_pool is not None:
        return True
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    pa.jemalloc_set_decay_ms(DECAY_MS)
    _previous_pool = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    return True


def release_freed_memory() -> None:
    """Undo `keep_freed_memory` once the shards are done (the local engine encodes in the
    driver, whose reduce then runs on the default pool again): Arrow's pool back, and
    jemalloc's kept pages released."""
    global _previous_pool
    import pyarrow as pa

    if _previous_pool is None:
        return
    pa.set_memory_pool(_previous_pool)
    _previous_pool = None
    pa.jemalloc_set_decay_ms(0)
