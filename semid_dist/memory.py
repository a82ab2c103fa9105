"""Memory settings of the build: Arrow's pool in encode workers (`encode.reuse_memory`, on
by default) and transparent huge pages (`encode.huge_pages`, off by default).

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

jemalloc's arenas (measured on the 2-core EPYC VM with a 10 ms RSS sampler, the same two
local builds, 375,000 and 1,500,000 items): jemalloc gives each thread that allocates one
of its 8 arenas (4 per core), and each arena keeps the pages freed in it. The local
engine's driver allocates from several threads (its main thread, its read-ahead thread,
Arrow's I/O and CPU threads), and the encode stage's resident memory rose over the stage,
as if more arenas came to hold a shard's pages (it rose less with one arena, below): the
longer build reached 804-849 MiB (in its encode shards, or in the SID -> items lookup's
750,000-row bucket) against 685-711 for the shorter one. One arena
(`JE_ARROW_MALLOC_CONF=narenas:1` in the driver's environment) lowered the peaks to 647-676
and 599-621 MiB, but that arena did not reuse freed pages for the next shard (in a probe of
32 MiB allocations in 2 threads, every task faulted its pages in afresh: 49,000 faults
against 7,700 with 8 arenas): a shard's read took 123 ms against 100 and its validation 25
against 10, the stage 5.0-5.2 s against 4.8-5.1. Two arenas (797-824 / 679-710 MiB), one
arena that keeps its pages (791-800 / 699-735) and one Arrow I/O thread
(`ARROW_IO_THREADS=1`: 775-806 at 1.5M items) did not lower them; a Ray encode worker's
peak was the same with one arena (683-691 MiB against 689). So the arenas stay jemalloc's
default, and one arena was a user's trade for the local engine (its variable, set by the
user, is also what an embedded Ray's workers and a Spark session's the engine starts get
instead of `KEEP_PAGES_CONF`). What the arenas keep should stop growing once all 8 hold a
shard's pages, whatever the catalog's size (not measured past 1.5M items here); the flat
836 / 835 MiB above were measured on the Xeon benchmark VM. Arrow's CPU threads were among
the driver's allocating threads: a shard's columns are now decoded in the thread that reads
it (`io.catalog.READ_THREADS`), and the longer build's encode stage then peaked at 609-636
MiB against 768-797 (the same host and sampler, three runs each, in turns), its read-ahead
thread's read taking 126-135 ms a shard against 99-113 while the build took as long
(committed in 12.2-12.7 s either way). With that (and the SID -> items lookup's leaner
grouping and split files), the two builds peaked at 634-679 / 576-595 MiB, and one arena
barely lowered them (625-633 / 588-592, two builds each) while it doubled a shard's
validation (25 ms against 12): it is no longer a trade worth making. Since the lookup's
split files carry one key per SID, the builds peak at 636-647 / 587-604 MiB, the longer one
in its encode stage or its report (`semid_dist.sid_items`).

Huge pages (`encode.huge_pages`): numpy asks Linux to back each array of 4 MiB or more with
transparent huge pages (`madvise(MADV_HUGEPAGE)`), and Arrow's default pool (mimalloc) asks
the same for the arenas it commits. On the 2-core benchmark VM memory faulted in as huge
pages cost ~15x as much as in 4 KiB pages: touching a fresh 64 MiB array took 0.6-0.7 s with
the advice and 35-55 ms without it (~40 against ~2.5 us per 4 KiB), and the encode kernel
ran no faster on it once touched. A fresh process's first read of a 65,536-row shard
(d = 128) took 0.27-1.24 s with 156-158 MiB of huge pages behind it, and 0.11-0.12 s with
none. The driver's merges of the shard statistics and the workers' per-shard arrays are
fresh memory too. So, with the setting off, the build turns transparent huge pages off for
its whole process while it runs (`huge_pages`: Linux's `PR_SET_THP_DISABLE`, kept by the
processes it starts meanwhile: an embedded Ray's, a Spark JVM's, and their workers) and
numpy's advice with them, gives the worker processes an engine starts the variable that
keeps numpy from advising (`worker_env`), and switches both in encode and Ray Train fit
workers on a cluster the engine did not start (`set_huge_pages`).

Measured with the benchmark catalogs (d = 128; runs alternating): numpy's advice off took
the Ray engine at 3 x 4096 from 42.2-45.8k to 56.5-57.5k items/s, at 3 x 256 from 267-280k
to 296-347k, and the local engine at 3 x 256 from 201-206k to 216-222k (two runs each); the
merges of a 3 x 4096 catalog's 7 shards took 2.4-3.4 s in a fresh process with the advice
and 0.36-0.39 s without it. Turning the whole process's huge pages off as well: Ray at
3 x 256 from 310-355k to 356-394k (three runs each), at 3 x 4096 from 58.6-59.1k to
60.5-62.3k, local at 3 x 256 from 235-245k to 246-247k (two runs each).
"""

from __future__ import annotations

import functools
import os
import sys
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


# <linux/prctl.h>: transparent huge pages off or not for the whole process, kept across
# fork and exec. The state read back is 1 when off, with 2 added where only advised regions
# may still get them (PR_THP_DISABLE_EXCEPT_ADVISED, newer kernels); restored as it was read.
_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE, _EXCEPT_ADVISED = 41, 42, 2


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl (looked up once), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


def _thp_state() -> int | None:
    """The process's switch as Linux reports it, or None where it cannot be asked."""
    prctl = _prctl()
    state = prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) if prctl is not None else -1
    return None if state < 0 else state


def thp_disabled() -> bool | None:
    """Whether transparent huge pages are off for this whole process, or None where that
    cannot be asked (not Linux, or a kernel without the switch)."""
    state = _thp_state()
    return None if state is None else bool(state)


def _set_thp_state(state: int) -> int | None:
    """Set the process's switch (0: huge pages allowed, 1: off, 1 | `_EXCEPT_ADVISED`).
    Returns the previous state, or None, changing nothing, where it cannot be set."""
    before = _thp_state()
    if before is None or _prctl()(_PR_SET_THP_DISABLE, state & 1, state & _EXCEPT_ADVISED,
                                  0, 0) != 0:
        return None
    return before


PageState = tuple[bool | None, int | None]  # numpy's advice, the process's THP switch


def set_huge_pages(on: bool) -> PageState | None:
    """Huge pages on or off for the memory this process touches from now on, and for the
    processes it starts: numpy's advice, and Linux's transparent huge pages for the whole
    process (Arrow's mimalloc pool advises them too). Returns the previous state (None in a
    part not switched), or None where nothing was switched.

    A `HUGE_PAGES_VAR` in the environment (the user's choice, or `worker_env`'s) leaves
    numpy's advice to it, and the process's switch too unless it says the same: "0" with
    `on` false turns huge pages off for the whole process as well."""
    var = os.environ.get(HUGE_PAGES_VAR)
    if var is None:
        switch = _numpy_switch()
        state = (bool(switch(on)) if switch is not None else None), _set_thp_state(int(not on))
    else:
        state = None, (_set_thp_state(1) if var == "0" and not on else None)
    return None if state == (None, None) else state


@contextmanager
def huge_pages(on: bool) -> Iterator[None]:
    """Huge pages on or off in this process for the block (`set_huge_pages`), then as they
    were: a build leaves the process that called it as it found it. Processes started in the
    block (an embedded Ray, a Spark JVM and their workers) keep the block's setting."""
    before = set_huge_pages(on)
    try:
        yield
    finally:
        if before is not None:
            advice, thp = before
            if advice is not None:
                _numpy_switch()(advice)
            if thp is not None:
                _set_thp_state(thp)


_previous_pool = None  # Arrow's pool before keep_freed_memory, while the setting is on


def keep_freed_memory() -> bool:
    """Switch Arrow to jemalloc, with a `DECAY_MS` decay unless the process started with a
    jemalloc decay of its own (`worker_env`, or the user's), which stays (a second call while
    on does nothing); the pool before hands back what it holds freed first. Returns False,
    changing nothing, where pyarrow was built without jemalloc."""
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
    # what the pool before holds freed would sit idle beside jemalloc's pages until the
    # encode ends: the local engine's driver has just read every shard for the fit sample
    # (in task threads), and a 1.5M-item build (3 x 256, 23 shards) reached 819-868 MiB in
    # its first shards, its peak, against 572-687 with this memory handed back first (its
    # peak then fell later: 804-849 MiB in its later encode shards or its SID -> items
    # lookup, 794-878 with a drift pass beside a parent version; 636-647 and 714 since: see
    # the module's note on arenas)
    pa.default_memory_pool().release_unused()
    _previous_pool = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    return True


def release_freed_memory() -> None:
    """Undo `keep_freed_memory` once the shards are done (the local engine encodes in the
    driver, whose reduce then runs on the default pool again): Arrow's pool back, and
    jemalloc's decay 0 for arenas created later. The pages the encode's arenas keep are not
    handed back: neither this nor the jemalloc pool's `release_unused` lowered the resident
    memory of a probe (see the module's note on arenas)."""
    global _previous_pool
    import pyarrow as pa

    if _previous_pool is None:
        return
    pa.set_memory_pool(_previous_pool)
    _previous_pool = None
    pa.jemalloc_set_decay_ms(0)
