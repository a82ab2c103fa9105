"""encode.reuse_memory and encode.huge_pages: the encode workers' Arrow pool, and huge pages
in the build's processes (semid_dist.memory)."""

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
    _set_thp_state,
    _thp_state,
    huge_pages,
    keep_freed_memory,
    release_freed_memory,
    set_huge_pages,
    thp_disabled,
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


def _thp_switchable() -> bool:
    """Whether this process may set Linux's huge-page switch (set to what it is)."""
    state = _thp_state()
    return state is not None and _set_thp_state(state) is not None


def test_huge_pages_switches_them_for_the_block_and_restores_them(monkeypatch):
    monkeypatch.delenv(HUGE_PAGES_VAR, raising=False)
    first, first_thp = _advice(), thp_disabled()
    for on in (False, True):
        with huge_pages(on):
            assert _advice() is on
            if _thp_switchable():  # Linux: the whole process's switch too
                assert thp_disabled() is (not on)
        assert (_advice(), thp_disabled()) == (first, first_thp)


def test_a_variable_in_the_environment_leaves_numpy_to_it(monkeypatch):
    first, first_thp = _advice(), thp_disabled()
    # the user's (or the engine's) choice of numpy's advice: left alone, and so are huge
    # pages unless it says the same as the setting
    for var, on in (("1", False), ("1", True), ("0", True)):
        monkeypatch.setenv(HUGE_PAGES_VAR, var)
        assert set_huge_pages(on) is None
        with huge_pages(on):
            assert (_advice(), thp_disabled()) == (first, first_thp)
    monkeypatch.setenv(HUGE_PAGES_VAR, "0")
    with huge_pages(False):
        assert _advice() is first
        if _thp_switchable():
            assert thp_disabled() is True
    assert (_advice(), thp_disabled()) == (first, first_thp)


# In a fresh interpreter: the huge pages behind a new, touched 64 MiB numpy array and a
# 64 MiB buffer of Arrow's mimalloc pool (which advises huge pages for its arenas).
_HUGE_PROBE = """
import sys, numpy as np, pyarrow as pa
from semid_dist.memory import set_huge_pages
def huge_kib():
    text = open("/proc/self/smaps_rollup").read()
    return int(text.split("AnonHugePages:")[1].split()[0])
set_huge_pages(sys.argv[1] == "on")
before = huge_kib()
a = np.ones(8 * 2**20)
after_numpy = huge_kib()
try:
    buf = pa.allocate_buffer(64 * 2**20, memory_pool=pa.mimalloc_memory_pool())
    np.frombuffer(buf, dtype=np.uint8)[::4096] = 1
except NotImplementedError:  # pyarrow built without mimalloc
    pass
print(after_numpy - before, huge_kib() - after_numpy)
"""


def _thp_available() -> bool:
    """Linux gives transparent huge pages on advice at least ([always] or [madvise])."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages here "
                    "(transparent_hugepage/enabled is [never], or not Linux)")
def test_no_huge_pages_with_the_setting_off():
    if not _thp_switchable():
        pytest.skip("this process may not set Linux's huge-page switch")
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_VAR}
    huge = {}
    for on in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", _HUGE_PROBE, on], env=env,
                             capture_output=True, text=True, timeout=120, check=True)
        huge[on] = [int(v) for v in out.stdout.split()]  # KiB: numpy's array, Arrow's buffer
    if huge["on"] == [0, 0]:
        pytest.skip("the kernel found no free huge page for the advised memory")
    assert huge["off"] == [0, 0], huge


# In a fresh interpreter: task threads read (allocate, touch, free) 16 x 32 MiB of Arrow
# buffers in the default pool, as the local engine's driver reads every shard for the fit
# sample; prints the MiB of RSS the pool then holds, and what is left after the switch
_HELD_PROBE = """
import os
from concurrent.futures import ThreadPoolExecutor
import numpy as np, pyarrow as pa
from semid_dist.memory import keep_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def read(_):
    bufs = [pa.allocate_buffer(8 * 2**20) for _ in range(4)]
    for b in bufs:
        np.frombuffer(b, dtype=np.uint8)[::4096] = 1
base = rss()
with ThreadPoolExecutor(2) as pool:
    list(pool.map(read, range(16)))
held = rss() - base
assert keep_freed_memory()
print(held, rss() - base)
"""


@needs_jemalloc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_switching_to_the_encode_pool_hands_back_what_the_pool_before_held():
    """The memory the default pool holds freed when the encode switches Arrow to jemalloc is
    handed back, not left idle beside the new pool's pages (a driver's fit-sample reads
    raised a local build's peak RSS by ~200 MiB at its first shards)."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", _HELD_PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    held, left = (float(v) for v in out.stdout.split())
    if held < 40:
        pytest.skip(f"the default pool kept {held:.0f} MiB of the freed reads: nothing to "
                    "hand back")
    assert left < held / 4, out.stdout


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


# What a process reports of its memory settings: the two variables, then whether
# transparent huge pages are off for it (None where that cannot be asked).
_SETTINGS = f"""
import os
from semid_dist.memory import thp_disabled
def settings():
    return [os.environ.get("{MALLOC_CONF_VAR}"), os.environ.get("{HUGE_PAGES_VAR}"),
            thp_disabled()]
print(settings())
"""


def _worker_settings(probe: str) -> None:
    """The settings of the probe's driver before and after it started an engine, and of one
    of the engine's workers (`worker_env`, and the huge-page switch the workers inherit)."""
    env = {k: v for k, v in os.environ.items() if k not in (MALLOC_CONF_VAR, HUGE_PAGES_VAR)}
    out = subprocess.run([sys.executable, "-c", _SETTINGS + probe], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    before = lines[0]
    assert before.startswith("[None, None, "), out.stdout  # the test's own environment
    thp = before[len("[None, None, "):-1]
    # the driver is left as it was; the workers have the variables and THP off
    assert lines[-2:] == [before, f"['{KEEP_PAGES_CONF}', '0', "
                          f"{'None' if thp == 'None' else 'True'}]"], out.stderr[-2000:]


@pytest.mark.engine
def test_embedded_ray_workers_start_with_worker_env(tmp_path):
    """The engine's own Ray hands the settings to its worker processes."""
    pytest.importorskip("ray")
    _worker_settings(f"""
import ray
from semid_dist.config import parse_config
from semid_dist.engines.ray_session import ray_init
cfg = parse_config({{"input": {{"path": "{tmp_path}"}}, "output": {{"root": "{tmp_path}"}},
                    "ray": {{"num_cpus": 1, "object_store_memory_mb": 128}}}})
assert ray_init(cfg)
print(settings())
print(ray.get(ray.remote(settings).remote()))
ray.shutdown()
""")


@pytest.mark.engine
def test_spark_workers_of_a_started_session_get_worker_env(tmp_path):
    """A Spark session the engine starts hands the settings to its Python workers."""
    pytest.importorskip("pyspark")
    _worker_settings(f"""
import pyarrow as pa
from semid_dist.config import parse_config
from semid_dist.engines.spark_session import spark_session
cfg = parse_config({{"input": {{"path": "{tmp_path}"}}, "output": {{"root": "{tmp_path}"}},
                    "spark": {{"master": "local[1]", "driver_memory": "512m"}}}})
spark, started = spark_session(cfg)
assert started
def env(batches):
    for b in batches:
        yield pa.RecordBatch.from_pydict({{"v": [str(settings())]}})
print(settings())
print(spark.range(1).mapInArrow(env, "v string").collect()[0].v)
spark.stop()
""")
