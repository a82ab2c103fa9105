"""encode.reuse_memory: the encode workers' Arrow pool (semid_dist.memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from semid_dist.memory import (
    KEEP_PAGES_CONF,
    MALLOC_CONF_VAR,
    keep_freed_memory,
    release_freed_memory,
    worker_env,
)

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


def test_worker_env_only_under_reuse_memory_and_never_over_the_users(monkeypatch):
    monkeypatch.delenv(MALLOC_CONF_VAR, raising=False)
    assert worker_env(True) == {MALLOC_CONF_VAR: KEEP_PAGES_CONF}
    assert worker_env(False) == {}
    monkeypatch.setenv(MALLOC_CONF_VAR, "narenas:2")
    assert worker_env(True) == {}


# In a fresh interpreter: allocate and touch a 64 MiB buffer in the encode pool, free it, do
# it again, and count the page faults of the second round (0 where the pages were kept).
_REUSE_PROBE = """
import resource, numpy as np, pyarrow as pa
from semid_dist.memory import keep_freed_memory
assert keep_freed_memory()
def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = pa.allocate_buffer(64 * 2**20)
    np.frombuffer(buf, dtype=np.uint8)[::4096] = 1
    del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
touch()
print(max(touch() for _ in range(3)))
"""


def test_worker_started_with_worker_env_reuses_the_pages_it_freed():
    env = {**os.environ, **worker_env(True)}
    out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert int(out.stdout) < 64 * 2**20 // 4096 // 10, out.stdout  # < 10% of the pages


def test_embedded_ray_workers_start_with_worker_env(tmp_path):
    """The engine's own Ray hands the setting to its worker processes."""
    pytest.importorskip("ray")
    probe = f"""
import os, ray
from semid_dist.config import parse_config
from semid_dist.engines.ray_data import ray_init
cfg = parse_config({{"input": {{"path": "{tmp_path}"}}, "output": {{"root": "{tmp_path}"}},
                    "ray": {{"num_cpus": 1, "object_store_memory_mb": 128}}}})
assert ray_init(cfg)
print(os.environ.get("{MALLOC_CONF_VAR}"))  # the driver's own environment is left as it was
print(ray.get(ray.remote(lambda: os.environ.get("{MALLOC_CONF_VAR}")).remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != MALLOC_CONF_VAR}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["None", KEEP_PAGES_CONF], out.stderr[-2000:]


def test_spark_workers_of_a_started_session_get_worker_env(tmp_path):
    """A Spark session the engine starts hands the setting to its Python workers."""
    pytest.importorskip("pyspark")
    probe = f"""
import os, pyarrow as pa
from semid_dist.config import parse_config
from semid_dist.engines.spark import spark_session
cfg = parse_config({{"input": {{"path": "{tmp_path}"}}, "output": {{"root": "{tmp_path}"}},
                    "spark": {{"master": "local[1]", "driver_memory": "512m"}}}})
spark, started = spark_session(cfg)
assert started
def env(batches):
    for b in batches:
        yield pa.RecordBatch.from_pydict({{"v": [str(os.environ.get("{MALLOC_CONF_VAR}"))]}})
print(os.environ.get("{MALLOC_CONF_VAR}"))
print(spark.range(1).mapInArrow(env, "v string").collect()[0].v)
spark.stop()
"""
    env = {k: v for k, v in os.environ.items() if k != MALLOC_CONF_VAR}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-2:] == ["None", KEEP_PAGES_CONF], out.stderr[-2000:]
