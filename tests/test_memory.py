"""encode.reuse_memory and encode.huge_pages: the encode workers' Arrow pool and numpy's
huge-page advice (semid_dist.memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from semid_dist.memory import (
    HUGE_PAGES_VAR,
    KEEP_PAGES_CONF,
    MALLOC_CONF_VAR,
    _numpy_switch,
    huge_pages,
    keep_freed_memory,
    release_freed_memory,
    set_huge_pages,
    worker_env,
)

try:
    pa.jemalloc_memory_pool()
    _JEMALLOC = True
except NotImplementedError:
    _JEMALLOC = False
needs_jemalloc = pytest.mark.skipif(not _JEMALLOC, reason="pyarrow is built without "
                                    "jemalloc: encode.reuse_memory changes nothing")


@needs_jemalloc
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


def test_worker_env_follows_the_settings_and_never_overrides_the_users(monkeypatch):
    monkeypatch.delenv(MALLOC_CONF_VAR, raising=False)
    monkeypatch.delenv(HUGE_PAGES_VAR, raising=False)
    assert worker_env(True, False) == {MALLOC_CONF_VAR: KEEP_PAGES_CONF, HUGE_PAGES_VAR: "0"}
    assert worker_env(False, False) == {HUGE_PAGES_VAR: "0"}
    assert worker_env(True, True) == {MALLOC_CONF_VAR: KEEP_PAGES_CONF}
    assert worker_env(False, True) == {}
    monkeypatch.setenv(MALLOC_CONF_VAR, "narenas:2")
    monkeypatch.setenv(HUGE_PAGES_VAR, "1")
    assert worker_env(True, False) == {}


def _advice() -> bool:
    """numpy's huge-page advice in this process, read without changing it."""
    switch = _numpy_switch()
    before = switch(False)
    switch(before)
    return bool(before)


def test_huge_pages_switches_the_advice_for_the_block_and_restores_it(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_VAR, raising=False)
    first = _advice()
    for on in (False, True):
        with huge_pages(on):
            assert _advice() is on
        assert _advice() is first
    # a variable in the environment is the user's (or the engine's) choice: left alone
    monkeypatch.setenv(HUGE_PAGES_VAR, "1")
    assert set_huge_pages(not first) is None
    with huge_pages(not first):
        assert _advice() is first
    assert _advice() is first


# In a fresh interpreter: the huge pages behind a new, touched 64 MiB numpy array.
_HUGE_PROBE = """
import sys, numpy as np
from semid_dist.memory import set_huge_pages
def huge_kib():
    text = open("/proc/self/smaps_rollup").read()
    return int(text.split("AnonHugePages:")[1].split()[0])
set_huge_pages(sys.argv[1] == "on")
before = huge_kib()
a = np.ones(8 * 2**20)
print(huge_kib() - before)
"""


def _thp_on_advice() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_on_advice(), reason="the kernel gives huge pages on advice only "
                    "where transparent_hugepage/enabled is [madvise]")
def test_numpy_arrays_get_no_huge_pages_with_the_advice_off():
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_VAR}
    huge = {}
    for on in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _HUGE_PROBE, on], env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        huge[on] = int(out.stdout)
    if huge["on"] == 0:
        pytest.skip("the kernel found no free huge page for the advised array")
    assert huge["off"] == 0, huge  # KiB


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


@needs_jemalloc
def test_worker_started_with_worker_env_reuses_the_pages_it_freed():
    env = {**os.environ, **worker_env(True, True)}
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
names = ("{MALLOC_CONF_VAR}", "{HUGE_PAGES_VAR}")
print([os.environ.get(n) for n in names])  # the driver's own environment is left as it was
print(ray.get(ray.remote(lambda: [os.environ.get(n) for n in names]).remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in (MALLOC_CONF_VAR, HUGE_PAGES_VAR)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-2:] == [
        "[None, None]", f"['{KEEP_PAGES_CONF}', '0']"], out.stderr[-2000:]


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
names = ("{MALLOC_CONF_VAR}", "{HUGE_PAGES_VAR}")
def env(batches):
    for b in batches:
        yield pa.RecordBatch.from_pydict({{"v": [str([os.environ.get(n) for n in names])]}})
print([os.environ.get(n) for n in names])
print(spark.range(1).mapInArrow(env, "v string").collect()[0].v)
spark.stop()
"""
    env = {k: v for k, v in os.environ.items() if k not in (MALLOC_CONF_VAR, HUGE_PAGES_VAR)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-2:] == [
        "[None, None]", f"['{KEEP_PAGES_CONF}', '0']"], out.stderr[-2000:]
