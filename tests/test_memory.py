"""encode.reuse_memory: the encode workers' Arrow pool (semid_dist.memory)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from semid_dist.memory import keep_freed_memory, release_freed_memory

try:
    pa.jemalloc_memory_pool()
except NotImplementedError:
    pytest.skip("pyarrow is built without jemalloc: the setting changes nothing",
                allow_module_level=True)


def test_encode_pool_is_switched_once_and_restored():
    first = pa.default_memory_pool().backend_name
    try:
        assert keep_freed_memory() and keep_freed_memory()
        assert pa.default_memory_pool().backend_name == "jemalloc"
        table = pa.table({"x": pa.array(range(100_000))})  # new buffers come from jemalloc
        assert pa.jemalloc_memory_pool().bytes_allocated() >= table.nbytes
    finally:
        release_freed_memory()
    assert pa.default_memory_pool().backend_name == first
    release_freed_memory()  # a second release does nothing
    assert pa.default_memory_pool().backend_name == first
