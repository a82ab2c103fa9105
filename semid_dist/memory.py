"""Memory settings of the build: Arrow's pool in encode workers (`encode.reuse_memory`, on
by default) and numpy's huge-page advice (`encode.huge_pages`, off by default).

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

numpy's huge-page advice (`encode.huge_pages`): numpy asks Linux to back each array of
4 MiB or more with transparent huge pages (`madvise(MADV_HUGEPAGE)`). On the 2-core
benchmark VM memory faulted in as huge pages cost ~15x as much as in 4 KiB pages: touching a
fresh 64 MiB array took 0.6-0.7 s with the advice and 35-55 ms without it (~40 against
~2.5 us per 4 KiB), and the encode kernel ran no faster on it once touched. The driver's
merges of the shard statistics and the workers' per-shard arrays are fresh memory, so the
build turns the advice off in its own process while it runs (`huge_pages`), gives the worker
processes an engine starts the variable that keeps numpy from advising huge pages
(`worker_env`), and turns it off in encode and Ray Train fit workers on a cluster the engine
did not start (`set_huge_pages`). Measured with the benchmark catalogs (Ray engine, d = 128,
two runs each, alternating): 3 x 4096 from 42.2-45.8k to 56.5-57.5k items/s; 3 x 256 from
267-280k to 296-347k; the local engine at 3 x 256 from 201-206k to 216-222k. The merges of a
3 x 4096 catalog's 7 shards took 2.4-3.4 s in a fresh process with the advice and
0.36-0.39 s without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DECAY_MS = 10_000  # jemalloc's dirty / muzzy page decay for the arenas it creates

# Arrow's jemalloc reads this variable once, when its process first uses it: a worker
# process the engine starts with KEEP_PAGES_CONF in its environment never hands a freed page
# back, so each shard reuses the last one's (`worker_env`). Set at run time, the decay
# reaches only arenas created later, and Arrow's build sets 1 s for the first ones: a
# one-thread shard loop then faulted in ~29,000 fresh pages (116 MiB) per shard's read
# under the 10 s decay, and ~300 with this configuration from the start.
MALLOC_CONF_VAR = "JE_ARROW_MALLOC_CONF"
KEEP_PAGES_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


# numpy reads this variable once, at import: "0" keeps it from advising huge pages
HUGE_PAGES_VAR = "NUMPY_MADVISE_HUGEPAGE"


def worker_env(reuse_memory: bool, huge_pages_on: bool) -> dict[str, str]:
    """Environment variables for the worker processes an engine starts itself (the embedded
    Ray's, and the Python workers of a Spark session the engine starts): `KEEP_PAGES_CONF`
    under `encode.reuse_memory`, and `HUGE_PAGES_VAR=0` unless `encode.huge_pages`; a
    variable the user's environment sets already is left to it."""
    env = {}
    if reuse_memory and MALLOC_CONF_VAR not in os.environ:
        env[MALLOC_CONF_VAR] = KEEP_PAGES_CONF
    if not huge_pages_on and HUGE_PAGES_VAR not in os.environ:
        env[HUGE_PAGES_VAR] = "0"
    return env


def _numpy_switch() -> Callable[[bool], bool] | None:
    """numpy's run-time switch of its huge-page advice (it returns the previous setting), or
    None where numpy has none."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # numpy 2 (and 1.26)
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # numpy 1
        except ImportError:
            return None
    return _set_madvise_hugepage


def set_huge_pages(on: bool) -> bool | None:
    """Turn numpy's huge-page advice on or off for the arrays this process allocates from now
    on. Returns the previous setting, or None, changing nothing, where `HUGE_PAGES_VAR` is in
    the environment (the user's choice, or `worker_env`'s) or numpy has no such switch."""
    switch = _numpy_switch()
    if HUGE_PAGES_VAR in os.environ or switch is None:
        return None
    return bool(switch(on))


@contextmanager
def huge_pages(on: bool) -> Iterator[None]:
    """numpy's huge-page advice on or off in this process for the block (`set_huge_pages`),
    then as it was: a build leaves the process that called it as it found it."""
    before = set_huge_pages(on)
    try:
        yield
    finally:
        if before is not None:
            _numpy_switch()(before)


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
