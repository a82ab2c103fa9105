"""Allocator setting for encode workers (`encode.reuse_memory`, on by default).

An encode worker decodes a shard's Parquet row groups into fresh Arrow buffers (35 MiB for
65,536 x 128 float32), frees them, and decodes the next shard. On the 2-core VMs of
docs/BENCHMARKS.md touching fresh pages is dear, so what counts is whether the pool hands
the freed pages back for the next shard, and what that does to peak memory.

With the setting on, Arrow's jemalloc pool is set to keep freed pages for a while
(`DECAY_MS`); off, Arrow's default pool (mimalloc) is used. Measured on the local build of
the benchmarks' peak-memory row (d=128 3 x 256, 23 shards of 65,536 rows):
- mimalloc reuses more: ~7,000 page faults per shard against ~36,000 (a shard's read alone
  ~600 against ~29,000), with 1.5x less system time in a one-thread shard loop;
- jemalloc keeps peak memory flat with the catalog: 836 / 835 MiB at N / 4N items, against
  720 / 808 MiB (1.12x) under mimalloc, whose resident memory grew over the encode stage.
Flat memory is the default's promise at hundreds of millions of items, so jemalloc stays
the default; `encode.reuse_memory=false` trades it for fewer page faults. Raising glibc's
mmap / trim thresholds as well (so that numpy's and torch's buffers were kept too)
fragmented the heap, and peak memory then grew with the catalog (1.22x at 4N against
1.14x).
"""

from __future__ import annotations

import os

DECAY_MS = 10_000  # jemalloc's dirty / muzzy page decay for the arenas it creates

# Arrow's jemalloc reads this variable once, when its process first uses it: a worker
# process the engine starts with KEEP_PAGES_CONF in its environment never hands a freed page
# back, so each shard reuses the last one's (`worker_env`). Set at run time, the decay
# reaches only arenas created later, and Arrow's build sets 1 s for the first ones: a
# one-thread shard loop then faulted in ~29,000 fresh pages (116 MiB) per shard's read
# under the 10 s decay, and ~300 with this configuration from the start.
MALLOC_CONF_VAR = "JE_ARROW_MALLOC_CONF"
KEEP_PAGES_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def worker_env(reuse_memory: bool) -> dict[str, str]:
    """Environment variables for the encode worker processes an engine starts itself (the
    embedded Ray's, and the Python workers of a Spark session the engine starts):
    `KEEP_PAGES_CONF` under `encode.reuse_memory`, unless the user's environment sets
    Arrow's jemalloc configuration already."""
    if not reuse_memory or MALLOC_CONF_VAR in os.environ:
        return {}
    return {MALLOC_CONF_VAR: KEEP_PAGES_CONF}

_previous_pool = None  # Arrow's pool before keep_freed_memory, while the setting is on


def keep_freed_memory() -> bool:
    """Switch Arrow to jemalloc, with a `DECAY_MS` decay unless the process started with a
    jemalloc decay of its own (`worker_env`, or the user's), which stays (a second call while
    on does nothing). Returns False, changing nothing, where pyarrow was built without
    jemalloc."""
    global _previous_pool
    import pyarrow as pa

    if _previous_pool is not None:
        return True
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    if "decay_ms" not in os.environ.get(MALLOC_CONF_VAR, ""):
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
