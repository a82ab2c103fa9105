"""Engine tests on one local[2] Spark session (session fixture): mapInArrow encode parity with
the local engine, a full Spark build, and a failing task that commits nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from semid_dist.errors import ConfigError, InputError, SemidError
from semid_dist.io.catalog import Piece, Shard, read_shard
from semid_dist.io.store import STAGING, TableStore
from semid_dist.pipeline import build
from tests.conftest import (
    REPO,
    capacity_ranges_on_engines,
    cli_build,
    clustered,
    corrupt_embedding_pages,
    incremental_on_engines,
    named_error,
    small_config,
    write_catalog,
)

pytestmark = pytest.mark.engine


def quiet(msg: str) -> None:
    pass


def comparable(metrics: dict) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k not in ("timings", "fit")},
                      sort_keys=True)


@pytest.fixture(scope="session")
def spark_session():
    """One local[2] Spark for every Spark test; a failing task fails the job at once."""
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (SparkSession.builder.master("local[2]").appName("semid-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.task.maxFailures", "1")
               .config("spark.driver.memory", "1g")
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1")  # as the engine
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="semid-wh-")))
    with warnings.catch_warnings():  # pyspark's own pandas-3 notice; no pandas is used
        warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas",
                                FutureWarning)
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()


def test_spark_incremental_version_identical_to_local(spark_session, incremental_catalogs,
                                                      tmp_path):
    """An incremental version on Spark: the same carried, rewritten and new parts, SIDs,
    suffixes and metrics as on the local engine."""
    store, _, results = incremental_on_engines(incremental_catalogs, str(tmp_path / "out"),
                                               "spark")
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in results)
    assert a.num_rows == 2700 and a.equals(b)
    assert comparable(results[0].metrics) == comparable(results[1].metrics)


def test_spark_encode_identical_to_local(spark_session, small_catalog, tmp_path):
    """Same input, same codebooks: Spark's mapInArrow writes exactly the local engine's table
    and metrics; Spark tasks check the ids for duplicates in hash buckets and rank the
    collision suffixes in key ranges, and make the head threshold's passes over a
    continuous popularity column (driver.gather_rows 700). The catalog's 16 files of 150
    rows are read three a shard (6 shards, the last of one file)."""
    _, x = small_catalog
    pop = np.random.default_rng(2).lognormal(0, 2, len(x))
    catalog = write_catalog(tmp_path / "catalog", x, files=16, popularity=pop)
    root = str(tmp_path / "out")
    over = {"input__popularity_column": "popularity"}
    fitted = build(small_config(catalog, root, **over), log=quiet)
    local = build(small_config(catalog, root, encode__from_version=fitted.version_id, **over),
                  log=quiet)
    logs: list[str] = []
    spark = build(small_config(catalog, root, engine="spark", driver__gather_rows=700,
                               encode__from_version=fitted.version_id, **over), log=logs.append)
    assert logs[0].startswith("spark: master local[2], 2 task slots, existing session ")
    assert any("colliding items in" in m and "key ranges" in m for m in logs)
    assert any("ids for duplicates in" in m and "hash buckets" in m for m in logs)
    assert any("more pass(es) over the popularity column" in m and "took 0" not in m
               for m in logs)
    store = TableStore(root, "sids")
    a = store.read_data(local.version_id).sort_by("item_id")
    b = store.read_data(spark.version_id).sort_by("item_id")
    assert a.num_rows == 2400 and a.equals(b)
    assert comparable(local.metrics) == comparable(spark.metrics)
    assert store.manifest(spark.version_id)["engine"] == "spark"
    assert len(store.part_paths(spark.version_id)) == 6
    assert spark_session.range(3).count() == 3  # the engine left the test's session running


def test_spark_capacity_bound_in_prefix_ranges_identical_to_local(spark_session,
                                                                small_catalog, tmp_path):
    """collisions.max_per_sid past driver.gather_rows: Spark tasks move the overflow in
    prefix ranges through staging: the same table and metrics as the local engine's."""
    (a, b), (local, spark), _ = capacity_ranges_on_engines(small_catalog[0], str(tmp_path),
                                                            "spark")
    assert a.equals(b)
    assert comparable(local.metrics) == comparable(spark.metrics)


def test_spark_build_end_to_end(spark_session, tmp_path):
    """A full engine=spark build (sample via Spark tasks, fit on the driver) with bad rows: a
    reconciled version whose fit and metrics equal the local engine's."""
    x = clustered(1800, 10, seed=5)
    x[[3, 700]] = np.nan
    catalog = write_catalog(tmp_path / "cat", x, files=2, row_group_rows=300)
    root = str(tmp_path / "out")
    res = build(small_config(catalog, root, engine="spark"), log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == res.version_id and store.versions() == [res.version_id]
    assert res.manifest["rows"] == {"input": 1800, "encoded": 1798, "rejected": 2}
    data = store.read_data(res.version_id)
    assert data.num_rows == 1798 and set(data.column("item_id").to_pylist()).isdisjoint({3, 700})
    local = build(small_config(catalog, root), log=quiet)
    assert comparable(local.metrics) == comparable(res.metrics)
    assert store.read_data(local.version_id).sort_by("item_id").equals(data.sort_by("item_id"))
    # the fit sample drawn by item id in every shard's task (fit.sample_by: id)
    by_id = [build(small_config(catalog, root, engine=engine, fit__sample_by="id"), log=quiet)
             for engine in ("spark", "local")]
    assert by_id[0].manifest["rows"] == res.manifest["rows"]
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in by_id)
    assert a.equals(b) and not a.column("codes").equals(data.sort_by("item_id")["codes"])


def test_spark_encode_hands_results_over_wave_by_wave(spark_session, small_catalog, tmp_path,
                                                     monkeypatch):
    """Spark hands a job's results over when all its tasks are done, so the engine encodes
    in waves of shards, two in flight: the driver has the first wave's results (and merges
    them, and logs progress) while later waves' shards are still to be encoded, and the
    table is the local engine's."""
    from semid_dist.engines.spark import SparkEngine, encode_waves

    _, x = small_catalog
    catalog = write_catalog(tmp_path / "catalog", x, row_group_rows=100)  # 24 shards
    root = str(tmp_path / "out")
    staged: list[int] = []  # shard results staged when the driver got each result

    class Watching(SparkEngine):
        def encode(self, ctx, shards):
            folder = Path(ctx.store().version_dir(ctx.version_id)) / STAGING
            for res in super().encode(ctx, shards):
                staged.append(len(list(folder.glob("result-*.bin"))))
                yield res

    fitted = build(small_config(catalog, root), log=quiet)
    local = build(small_config(catalog, root, encode__shard_rows=100,
                               encode__from_version=fitted.version_id), log=quiet)
    monkeypatch.setattr("semid_dist.pipeline.make_engine", Watching)
    spark = build(small_config(catalog, root, engine="spark", encode__shard_rows=100,
                               encode__from_version=fitted.version_id), log=quiet)
    slots = spark_session.sparkContext.defaultParallelism
    assert [len(w) for w in encode_waves(list(range(24)), slots)] == [4] * 6
    # the third wave starts when the first is done, the fourth when the driver has taken the
    # first's results
    assert len(staged) == 24 and staged[0] <= 12
    store = TableStore(root, "sids")
    assert store.read_data(local.version_id).sort_by("item_id").equals(
        store.read_data(spark.version_id).sort_by("item_id"))
    assert comparable(local.metrics) == comparable(spark.metrics)


def test_spark_encode_stopped_by_the_driver_cancels_its_waves(spark_session, small_catalog,
                                                             tmp_path, monkeypatch):
    """A build that stops while Spark encodes (here: the driver fails on the first result)
    stops the encode: no later wave starts, the waves in flight are cancelled or done, no job
    is left running, nothing is committed, and the session goes on working."""
    from semid_dist.engines.spark import SparkEngine

    _, x = small_catalog
    catalog = write_catalog(tmp_path / "catalog", x, row_group_rows=100)
    root = str(tmp_path / "out")
    fitted = build(small_config(catalog, root), log=quiet)

    class Stopping(SparkEngine):
        def encode(self, ctx, shards):
            for _ in super().encode(ctx, shards):
                raise SemidError("the driver stops")
            yield  # a generator, as the engines' encode

    cancelled: list[str] = []
    cancel = spark_session.sparkContext.cancelJobsWithTag
    monkeypatch.setattr(spark_session.sparkContext, "cancelJobsWithTag",
                        lambda tag: (cancelled.append(tag), cancel(tag)))
    monkeypatch.setattr("semid_dist.pipeline.make_engine", Stopping)
    with pytest.raises(SemidError, match="the driver stops"):
        build(small_config(catalog, root, engine="spark", encode__shard_rows=100,
                           encode__from_version=fitted.version_id), log=quiet)
    assert cancelled and all(t.startswith("semid-encode-") for t in cancelled)
    assert spark_session.sparkContext.statusTracker().getActiveJobsIds() == []
    store = TableStore(root, "sids")
    assert store.versions() == [fitted.version_id]
    started = [p for p in (Path(root) / "sids" / "versions").iterdir()
               if p.name != fitted.version_id]
    assert len(started) == 1  # at most the three waves of 4 shards started were encoded
    assert len(list((started[0] / STAGING).glob("result-*.bin"))) <= 12
    assert spark_session.range(3).count() == 3


def test_spark_encode_waves_cover_the_shards_in_order():
    from semid_dist.engines.spark import encode_waves

    for shards, slots, sizes in ((23, 2, [4] * 5 + [3]), (3, 2, [3]), (1000, 8, [50] * 20),
                                 (100, 64, [100])):
        waves = encode_waves(list(range(shards)), slots)
        assert [len(w) for w in waves] == sizes
        assert [s for w in waves for s in w] == list(range(shards))
    assert encode_waves([], 2) == []


def _partition_of(i: int) -> tuple[int, int]:
    from pyspark import TaskContext

    return i, TaskContext.get().partitionId()


def test_spark_map_runs_consecutive_items_a_task_in_order(spark_session, tmp_path):
    """`SparkEngine.map` of 23 items runs the runs of `map_runs` as its tasks (a PySpark
    task costs ~29 ms however little it does), in item order, and 2 items still 2 tasks."""
    from semid_dist.engines.spark import SparkEngine, map_runs

    slots = spark_session.sparkContext.defaultParallelism
    with SparkEngine(small_config(str(tmp_path), str(tmp_path), engine="spark"), log=quiet) as eng:
        got = eng.map(_partition_of, [(i,) for i in range(23)])
        assert [i for i, _ in got] == list(range(23))
        tasks = {}
        for i, part in got:
            tasks.setdefault(part, []).append(i)
        assert [(run[0], run[-1] + 1) for _, run in sorted(tasks.items())] == map_runs(23, slots)
        assert len({p for _, p in eng.map(_partition_of, [(0,), (1,)])}) == 2


def _heap_census(i: int) -> tuple[int, int, int]:
    import gc

    return os.getpid(), gc.get_freeze_count(), len(gc.get_objects())


def test_spark_tasks_start_with_their_workers_heap_out_of_the_collectors_way(spark_session,
                                                                            tmp_path):
    """PySpark's reused worker runs a full `gc.collect()` after each task (~0.1 s once torch
    is imported): a map task starts with what its worker holds frozen (`settle_worker`),
    the imports (torch, numpy, pyarrow) among it, so a collection walks the task's own
    objects only; and nothing piles up frozen over many tasks. A worker's every
    `RECLAIM_EVERY`-th task starts unfrozen instead (at most one of 120 tasks here)."""
    from semid_dist.engines.spark import SparkEngine

    with SparkEngine(small_config(str(tmp_path), str(tmp_path), engine="spark"), log=quiet) as eng:
        rounds = [eng.map(_heap_census, [(i,) for i in range(4)]) for _ in range(30)]
    frozen: dict[int, list[int]] = {}
    censuses = [census for run in rounds[1:] for census in run]
    for pid, held, loose in censuses:
        if held:
            assert held > 50_000 and loose < held / 1000, (held, loose)
            frozen.setdefault(pid, []).append(held)
    assert len(censuses) - sum(map(len, frozen.values())) <= len(frozen)
    assert all(max(f) - min(f) <= 50 for f in frozen.values()), frozen


def test_settle_worker_freezes_a_task_and_unfreezes_a_new_job_or_every_nth_task():
    """`settle_worker` in this process: a task starts with the heap frozen; the first task
    of a new encode job, and every `RECLAIM_EVERY`-th task, start with it unfrozen, so the
    collection after them reclaims cycles that held frozen objects."""
    import gc

    from semid_dist.engines import spark

    try:
        spark.settle_worker()
        assert gc.get_freeze_count() > 1000 and len(gc.get_objects()) < gc.get_freeze_count()
        spark.settle_worker(new_job=True)
        assert gc.get_freeze_count() == 0
        while (spark._tasks_settled + 1) % spark.RECLAIM_EVERY:
            spark.settle_worker()
            assert gc.get_freeze_count() > 1000
        spark.settle_worker()  # the RECLAIM_EVERY-th
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_spark_map_runs_are_consecutive_near_equal_and_few_a_slot():
    from semid_dist.engines.spark import map_runs

    for items, slots, tasks in ((23, 2, 6), (8, 2, 4), (2, 2, 2), (1, 2, 1), (100, 2, 25),
                                (23, 64, 23), (4578, 400, 1145), (9, 0, 3)):
        runs = map_runs(items, slots)
        assert len(runs) == tasks
        assert [a for a, _ in runs] == [0] + [b for _, b in runs[:-1]] and runs[-1][1] == items
        sizes = [b - a for a, b in runs]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4


def test_spark_failing_task_commits_nothing(spark_session, small_catalog, tmp_path):
    """A task that raises (a second catalog file with a valid footer whose embedding pages are
    corrupt: planning and the id scan pass, the encode task fails its page checksum) fails
    the build; `_latest` and the versions are untouched."""
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    good = build(small_config(catalog, root), log=quiet)
    bad = write_catalog(tmp_path / "bad", x[:600], files=1)
    corrupt_embedding_pages(tmp_path / "bad" / "part-001.parquet", x[600:900])

    with pytest.raises(InputError, match="part-001.parquet.*checksum.*in a Spark task"):
        build(small_config(bad, root, engine="spark", encode__from_version=good.version_id),
              log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == good.version_id and store.versions() == [good.version_id]
    started = [p for p in (tmp_path / "out" / "sids" / "versions").iterdir()
               if p.name != good.version_id]  # the failed build had begun writing its version
    assert started and not any((p / "_manifest.json").exists() for p in started)
    assert build(small_config(catalog, root, engine="spark",  # the session still works
                              encode__from_version="latest"), log=quiet).manifest["rows"][
        "encoded"] == 2400


def test_spark_task_error_keeps_its_name(spark_session, tmp_path):
    """A named semid error raised inside a Spark task reaches the driver as itself (the CLI
    prints its one-line reason), not as a Java stack trace."""
    from semid_dist.engines.spark import SparkEngine

    missing = Shard(0, (Piece(str(tmp_path / "gone.parquet"), (0,), 0, 10),))
    with SparkEngine(small_config(str(tmp_path), str(tmp_path), engine="spark"), log=quiet) as eng:
        assert eng.map(max, [(1, 2), (5, 3)]) == [2, 5]
        with pytest.raises(InputError, match="gone.parquet.*in a Spark task"):
            eng.map(read_shard, [(str(tmp_path), missing, ["item_id"])])


def test_spark_warm_up_runs_one_task_per_slot_in_the_background(spark_session, tmp_path):
    """The engine's warm-up is one small job in a background thread (a task per slot, whose
    Python worker imports the encode modules), planned without pyspark's pandas-3 notice; it
    succeeds, and closing the engine waits for it and leaves the session it did not start
    running."""
    from semid_dist.engines.spark import WARM_UP_GROUP, SparkEngine

    sc = spark_session.sparkContext
    before = set(sc.statusTracker().getJobIdsForGroup(WARM_UP_GROUP))
    eng = SparkEngine(small_config(str(tmp_path), str(tmp_path), engine="spark"), log=quiet)
    with warnings.catch_warnings(record=True) as caught:  # the thread's warnings too
        warnings.simplefilter("always")
        eng.warm_up()
        thread = eng._warm
        eng.warm_up()  # once per engine
        assert eng._warm is thread
        eng.close()
    assert not [w for w in caught if "pandas" in str(w.message)]
    assert not thread.is_alive()
    jobs = set(sc.statusTracker().getJobIdsForGroup(WARM_UP_GROUP)) - before
    assert len(jobs) == 1
    job = sc.statusTracker().getJobInfo(jobs.pop())
    assert job.status == "SUCCEEDED"
    stages = [sc.statusTracker().getStageInfo(i) for i in job.stageIds]
    assert sum(st.numCompletedTasks for st in stages) == sc.defaultParallelism
    assert sum(st.numFailedTasks for st in stages) == 0
    assert spark_session.range(3).count() == 3  # the session is left running


def test_spark_session_started_by_the_engine_runs_its_jvm_with_java_options(tmp_path):
    """A session the engine starts (a separate process: the tests' own session is active
    here) runs its driver JVM with `spark.java_options` (C1 only by default) and gives the
    executors the same; its RDD tasks (`map`) and SQL tasks (mapInArrow: encode, warm-up)
    run in the same Python worker (one slot: one worker of one daemon, `ONE_DAEMON_VAR`)."""
    script = f"""
import os
import pyarrow as pa
from semid_dist.config import parse_config
from semid_dist.engines.spark_session import spark_session
cfg = parse_config({{"input": {{"path": "{tmp_path}"}}, "output": {{"root": "{tmp_path}"}},
                    "spark": {{"master": "local[1]", "driver_memory": "512m"}}}})
spark, started = spark_session(cfg)
bean = spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
print(started, list(bean.getInputArguments()))
print(spark.sparkContext.getConf().get("spark.executor.extraJavaOptions"))
def pids(batches):
    for b in batches:
        yield pa.RecordBatch.from_pydict({{"pid": [os.getpid()] * b.num_rows}})
rdd = spark.sparkContext.parallelize(range(3), 3).map(lambda i: os.getpid()).collect()
sql = spark.range(3, numPartitions=3).mapInArrow(pids, "pid long").toArrow()
print(sorted(set(rdd)), sorted(set(sql.column(0).to_pylist())))
spark.stop()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip().splitlines()
    assert out[0].startswith("True [") and "'-XX:TieredStopAtLevel=1'" in out[0]
    assert "-XX:TieredStopAtLevel=1" in out[1].split()  # after Spark's own defaults
    rdd_pids, sql_pids = out[2].split("] [")
    assert rdd_pids + "]" == "[" + sql_pids, out[2]


def test_spark_executors_without_the_project_are_one_line(small_catalog, tmp_path):
    """Executors running a Python that lacks semid_dist (a cluster's workers started without
    the job's environment): one line naming the setting and this driver's Python, status 2
    (Spark's task failure: a Py4J traceback, status 1)."""
    pytest.importorskip("pyspark")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    other = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    probe = "import sys; print(sys.version_info[:2]); import semid_dist"
    found = other and subprocess.run([other, "-c", probe], env=env, cwd=tmp_path,
                                     capture_output=True, text=True)
    if not found or found.returncode == 0 or found.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("needs another Python of this one's version, without semid_dist")
    catalog, _ = small_catalog
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "spark", "input": {"path": catalog},
                               "output": {"root": str(tmp_path / "out"), "table": "sids"},
                               "quantizer": {"layers": [8, 8], "niter": 2},
                               "spark": {"master": "local[1]"}}))
    run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "build", "--config", str(cfg)],
                         env={**env, "PYSPARK_PYTHON": other}, cwd=tmp_path, timeout=300,
                         capture_output=True, text=True)  # (not the repository: no package)
    assert named_error(run) == (
        "semid build: error: the Spark executors' Python has no module 'semid_dist' (a task "
        "failed on its import): point spark.pyspark.python (or PYSPARK_PYTHON where they "
        f"run) at a Python with semid_dist installed, such as this driver's {sys.executable}, "
        "or ship one (jobs/spark_build.py)")
    assert not TableStore(str(tmp_path / "out"), "sids").versions()


def test_a_spark_call_that_fails_after_an_interrupt_is_the_interrupt():
    """A Ctrl-C escalated inside a Py4J call (the cancel slow on a loaded machine) broke the
    connection, and the next call's Py4JNetworkError ("Answer from Java side is empty")
    ended the build with a traceback, status 1, in 3 of 10 barrages under load."""
    pytest.importorskip("pyspark")
    from semid_dist.engines.spark import task_errors

    with pytest.raises(KeyboardInterrupt), task_errors():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Answer from Java side is empty") from None  # (context kept)
    with pytest.raises(RuntimeError), task_errors():
        raise RuntimeError("a task failed")  # no interrupt: as it is


def test_spark_build_without_java_fails_naming_the_fix(tmp_path):
    """A build whose engine would start a Spark session, on a machine whose launcher would
    find no JVM: one line naming Java and how to get it, status 2, nothing written. Run in
    a process of its own (the tests' session may be active here) with no `java` on its PATH
    and no Spark conf folder of the machine's."""
    pytest.importorskip("pyspark")
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAVA_HOME", "SPARK_HOME", "SPARK_CONF_DIR")}
    env["PATH"] = str(Path(sys.executable).parent)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog, clustered(50, 8, seed=0))
    out = tmp_path / "out"
    args = (REPO / "conf" / "demo.yaml", "engine=spark", f"input.path={catalog}",
            f"output.root={out}")
    for java_home, where in ((None, "no `java` on the PATH"),
                             (tmp_path, f"JAVA_HOME={tmp_path} holds no bin/java")):
        if java_home is not None:
            env["JAVA_HOME"] = str(java_home)
        last = named_error(cli_build(*args, env=env, timeout=120))
        assert last.startswith("semid build: error: engine: spark starts a Spark session, "
                               f"which needs Java ({where}): install Java (17 or later")
        assert not out.exists()
    # a spark-env.sh may give Spark's launcher a JAVA_HOME of its own: the check stands aside
    # (here the launcher then fails on its own: this PATH has neither bash nor a JVM)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-env.sh").write_text("# JAVA_HOME=... for the launcher\n")
    run = cli_build(*args, env={**env, "SPARK_CONF_DIR": str(conf)}, timeout=120)
    assert run.returncode != 0 and "needs Java" not in run.stderr


def test_spark_java_options_go_to_the_jvms_a_session_starts():
    from semid_dist.engines.spark_session import _java_options

    opts = "-XX:TieredStopAtLevel=1 -Dx=1"
    assert _java_options(opts, submitted=False) == {"spark.driver.extraJavaOptions": opts,
                                                    "spark.executor.extraJavaOptions": opts}
    # under spark-submit the driver JVM runs already (--driver-java-options)
    assert _java_options(opts, submitted=True) == {"spark.executor.extraJavaOptions": opts}
    assert _java_options(None, submitted=False) == {}


def test_a_session_the_engine_starts_logs_by_its_own_log4j_file_unless_log4j_is_configured(
        tmp_path, monkeypatch):
    """The driver JVM of a session the engine starts gets semid's log4j 2 file (Spark's
    default profile printed four lines as it started, and Hadoop a WARN: checked on a real
    JVM in test_cli_errors), where the user configures none: not with a log4j2 file in
    Spark's configuration folder, nor with log4j named in spark.java_options, nor under
    spark-submit (its JVM runs already)."""
    from semid_dist.config import parse_config
    from semid_dist.engines.spark_session import LOG4J_FILE, _session_settings

    def driver_options(java_options="-Xss4m", submitted=False):
        cfg = parse_config({"engine": "spark", "input": {"path": "x"}, "output": {"root": "y"},
                            "spark": {"java_options": java_options}})
        return _session_settings(cfg, submitted).get("spark.driver.extraJavaOptions")

    own = f"-Dlog4j2.configurationFile={LOG4J_FILE.as_uri()}"
    assert LOG4J_FILE.read_text().count("rootLogger.level = warn") == 1
    monkeypatch.delenv("SPARK_HOME", raising=False)
    monkeypatch.setenv("SPARK_CONF_DIR", str(tmp_path))
    (tmp_path / "log4j2.properties.template").write_text("rootLogger.level = info\n")
    assert driver_options() == f"-Xss4m {own}"
    # null: the driver's options are spark-defaults.conf's, which a value set would replace
    assert driver_options(None) is None
    assert driver_options("-Dlog4j2.configurationFile=file:/etc/mine.xml") == (
        "-Dlog4j2.configurationFile=file:/etc/mine.xml")
    assert driver_options(submitted=True) is None
    (tmp_path / "log4j2.xml").write_text("<Configuration/>")
    assert driver_options() == "-Xss4m"  # (the user's log4j file: Spark finds it)
    monkeypatch.delenv("SPARK_CONF_DIR")
    monkeypatch.setenv("SPARK_HOME", str(tmp_path))  # (no conf/ there)
    assert driver_options() == f"-Xss4m {own}"


SUBMITTED_SESSION = """
import json, sys
from semid_dist.config import parse_config
from semid_dist.engines import make_engine
cfg = parse_config({"engine": "spark", "input": {"path": "x"}, "output": {"root": "y"},
                    "spark": {"master": "local[2]", "shuffle_partitions": 5}})
lines = []
with make_engine(cfg, log=lines.append) as engine:
    conf = engine.spark.sparkContext.getConf()
    print(json.dumps({"log": lines, **{name: conf.get(name) for name in sys.argv[1:]}}))
"""


def test_spark_submit_settings_win_over_the_engines(tmp_path):
    """Under spark-submit the engine's settings give way to those `--conf` gives, as README
    says (they were read before the JVM's gateway was open: none, and every one replaced),
    and so does the config's spark.master to its --master, the application name to its
    --name (the config's master, name and SQL settings replaced them)."""
    pytest.importorskip("pyspark")
    script = tmp_path / "session.py"
    script.write_text(SUBMITTED_SESSION)
    names = ["spark.executorEnv.JE_ARROW_MALLOC_CONF", "spark.executor.extraJavaOptions",
             "spark.executorEnv.NUMPY_MADVISE_HUGEPAGE", "spark.master", "spark.app.name",
             "spark.sql.shuffle.partitions", "spark.sql.execution.arrow.maxRecordsPerBatch"]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    run = subprocess.run(
        [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]",
         "--name", "nightly-sids", "--conf", "spark.sql.shuffle.partitions=3",
         "--driver-java-options", "-XX:TieredStopAtLevel=1",
         "--conf", "spark.executorEnv.JE_ARROW_MALLOC_CONF=narenas:2",
         "--conf", "spark.executor.extraJavaOptions=-Xss4m", str(script), *names],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got[names[0]] == "narenas:2"  # (Spark puts its own JVM options before ours)
    assert got[names[1]].endswith(" -Xss4m") and "TieredStopAtLevel" not in got[names[1]]
    assert got[names[2]] is not None  # what spark-submit leaves unset, the engine sets
    assert [got[n] for n in names[3:]] == ["local[1]", "nightly-sids", "3", "10000"]
    assert got["log"][0].startswith("spark: master local[1], ") and got["log"][0].endswith(
        " (not spark.master=local[2]: spark-submit's wins)"), got["log"]


def test_spark_warm_up_starts_beside_the_fit_after_the_scan_and_the_sample(
        spark_session, small_catalog, tmp_path, monkeypatch):
    """Spark runs jobs first come, first served: when a build fits, the engine's warm-up job
    starts once the scan's and the sample's tasks are done (as the driver fits), so neither
    waits for it; with codebooks from another version it starts with the job."""
    from semid_dist.engines.spark import SparkEngine

    catalog, _ = small_catalog
    root = str(tmp_path / "out")
    calls: list[str] = []

    class Recording(SparkEngine):
        def map(self, fn, items):
            calls.append(fn.__name__)
            return super().map(fn, items)

        def warm_up(self):
            calls.append("warm_up")
            super().warm_up()

        def fit(self, *args, **kwargs):
            calls.append("fit")
            return super().fit(*args, **kwargs)

        def encode(self, ctx, shards):
            calls.append("encode")
            return super().encode(ctx, shards)

    monkeypatch.setattr("semid_dist.pipeline.make_engine", Recording)
    built = build(small_config(catalog, root, engine="spark",
                               input__popularity_column="popularity"), log=quiet)
    # (the second warm_up, before the encode, finds it started: once per engine)
    assert calls[:6] == ["scan_keys", "sample_rows", "warm_up", "fit", "warm_up", "encode"]
    calls.clear()
    build(small_config(catalog, root, engine="spark", encode__from_version=built.version_id),
          log=quiet)
    # nothing to fit: it starts with the job (the second call finds it started)
    assert calls[:4] == ["warm_up", "scan_keys", "warm_up", "encode"]


def test_spark_reads_a_catalog_table(spark_session, small_catalog, tmp_path):
    """input.path: table:<name> reads a Parquet table of the session catalog; same SIDs as
    the Parquet files behind it, read directly."""
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    df = spark_session.read.parquet(catalog).select("item_id", "embedding")
    df.write.format("parquet").option("path", str(tmp_path / "tbl")).saveAsTable("semid_items")
    try:
        fitted = build(small_config(catalog, root), log=quiet)
        by_table = build(small_config("table:semid_items", root, engine="spark",
                                      encode__from_version=fitted.version_id), log=quiet)
        by_path = build(small_config(str(tmp_path / "tbl"), root,
                                     encode__from_version=fitted.version_id), log=quiet)
        store = TableStore(root, "sids")
        a = store.read_data(by_table.version_id).sort_by("item_id")
        b = store.read_data(by_path.version_id).sort_by("item_id")
        assert a.num_rows == len(x) and a.equals(b)
        assert by_table.manifest["input"]["url"].endswith("tbl")
        with pytest.raises(InputError, match="not in the Spark session catalog"):
            build(small_config("table:no_such_table", root, engine="spark"), log=quiet)
        with pytest.raises(ConfigError, match="engine: spark"):
            build(small_config("table:semid_items", root), log=quiet)
    finally:
        spark_session.sql("DROP TABLE IF EXISTS semid_items")


def test_spark_settings_a_session_cannot_start_with_are_one_line_errors(tmp_path):
    """A master that is no Spark master URL (a config error: the JVM printed its stack trace
    first), a standalone master where nothing listens (Spark retried it for a minute, then
    failed with a stack trace), a driver memory Spark does not start on (refused before a
    JVM starts) and JVM options it does not start with: one line naming them, status 2,
    nothing written, no JVM left. A process of its own (the tests' session
    may be active here)."""
    pytest.importorskip("pyspark")
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog, clustered(50, 8, seed=0))
    out = tmp_path / "out"
    args = (REPO / "conf" / "demo.yaml", "engine=spark", f"input.path={catalog}",
            f"output.root={out}")
    assert named_error(cli_build(*args, "spark.master=bogus", timeout=120)) == (
        f"semid build: error: {args[0]} with override spark.master=bogus: spark.master: 'bogus' "
        "is not a Spark master URL: give local[*], local[N], spark://HOST:PORT, "
        "k8s://https://HOST:PORT or yarn, or leave it unset (spark-submit's master, else "
        "local[*])")
    assert named_error(cli_build(*args, "spark.master=spark://127.0.0.1:1", timeout=60)) == (
        "semid build: error: spark.master=spark://127.0.0.1:1: no Spark master answers there "
        "(127.0.0.1:1: [Errno 111] Connection refused); start it, correct the address, or "
        "leave spark.master unset to run on local[*]")
    assert named_error(cli_build(*args, "spark.driver_memory=1k", timeout=60)).endswith(
        "spark.driver_memory: 1k is less than 512m: Spark does not start a driver with less "
        "than 450 MiB of heap, and the JVM gives it less than its -Xmx; give 512m or more "
        "(default 2g)")  # (no JVM started)
    last = named_error(cli_build(*args, "spark.java_options=-Xss1k", timeout=120))
    assert last.startswith("semid build: error: engine: spark could not start a Spark session "
                           "with spark.master=local[*], spark.driver_memory=2g and "
                           "spark.java_options=-Xss1k (")
    assert last.endswith("check those settings and the JVM's output above")
    run = cli_build(REPO / "conf" / "demo.yaml", "engine=spark", "input.path=table:default.cat",
                    f"output.root={out}", timeout=120)
    assert named_error(run) == (  # (no failed DESCRIBE logged by Spark at ERROR above it)
        "semid build: error: input.path: table 'default.cat' is not in the Spark session "
        "catalog: the session this job started keeps its catalog in memory "
        "(spark.sql.catalogImplementation=in-memory), which holds no table made elsewhere; run "
        "jobs/spark_build.py under spark-submit with the catalog that holds it (e.g. --conf "
        "spark.sql.catalogImplementation=hive, with the metastore's settings), or point "
        "input.path at the table's Parquet files")
    assert "TABLE_OR_VIEW_NOT_FOUND" not in run.stderr, run.stderr[-3000:]
    assert not out.exists()


def test_ctrl_c_while_the_driver_waits_on_a_spark_job_cancels_it_cleanly(spark_session, caplog):
    """The engine's SIGINT handler over pyspark's: a Ctrl-C while the driver waits on a job
    (inside a Py4J call) cancels the job from a thread of its own, and the job's failure is
    the KeyboardInterrupt. pyspark's own handler cancelled it through the connection the
    driver waited on ("reentrant call": the job ran on), py4j logged two tracebacks, and
    its KeyboardInterrupt inside the call could break the connection. The session works on
    after it, and pyspark's handler is put back."""
    from semid_dist.engines.spark import task_errors
    from semid_dist.engines.spark_interrupts import guard_interrupts

    sc = spark_session.sparkContext
    pysparks = signal.getsignal(signal.SIGINT)
    guard = guard_interrupts(sc, signal.default_int_handler, started=False)
    ctrl_c = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt), task_errors():  # as the engine's jobs run
            sc.parallelize(range(2), 2).foreach(lambda i: time.sleep(60))
        waited = time.monotonic() - start
    finally:
        ctrl_c.cancel()
        guard.release()
    assert waited < 45, waited  # cancelled, not waited out (60 s)
    assert not [r for r in caplog.records if "py4j" in r.pathname], caplog.text
    assert signal.getsignal(signal.SIGINT) is pysparks
    assert sc.parallelize(range(10), 2).sum() == 45


class _CtrlCAsCollected:
    def __del__(self) -> None:  # a Ctrl-C that comes as an object is collected
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # (the guard runs here, inside the finaliser)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (dropped)
def test_a_spark_job_that_fails_after_a_dropped_interrupt_is_the_interrupt(spark_session):
    """A Ctrl-C (or SIGTERM) that comes while the driver's main thread runs a finaliser: the
    guard cancels the jobs and raises its KeyboardInterrupt there, which Python drops; the
    encode's wave, cancelled in its pool thread, then failed with the job's Py4JJavaError,
    printed as a traceback (status 1) where the build should stop as interrupted: a job's
    failure after a Ctrl-C is the interrupt, raised or not."""
    from concurrent.futures import ThreadPoolExecutor

    from semid_dist.engines.spark import task_errors
    from semid_dist.engines.spark_interrupts import guard_interrupts

    sc = spark_session.sparkContext
    guard = guard_interrupts(sc, signal.default_int_handler, started=False)
    group = "semid-dropped-interrupt"

    def wave() -> None:  # as an encode wave runs: a job waited on in a pool thread
        sc.setJobGroup(group, "a wave")
        sc.parallelize(range(2), 2).foreach(lambda i: time.sleep(60))

    start = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(wave)
            while not sc.statusTracker().getJobIdsForGroup(group):  # the job runs
                assert not job.done() and time.monotonic() - start < 30, job
                time.sleep(0.05)
            _CtrlCAsCollected()  # collected at once: the guard's KeyboardInterrupt dropped
            assert guard.raised  # (the guard ran, and raised)
            with pytest.raises(KeyboardInterrupt), task_errors():
                job.result()  # the cancelled job's failure
        waited = time.monotonic() - start
    finally:
        guard.release(raise_pending=False)
    assert waited < 45, waited  # cancelled, not waited out (60 s)
    assert sc.parallelize(range(10), 2).sum() == 45


def _in_py4j(statement: str, **names) -> None:
    """Run `statement` as if inside a Py4J call (a frame of a py4j module's file)."""
    exec(compile(statement, "/site-packages/py4j/call.py", "exec"),
         {"signal": signal, "sys": sys, "time": time, **names})


def test_a_job_started_after_the_interrupts_cancel_is_cancelled_too(spark_session):
    """A Ctrl-C while the driver is in a Py4J call that had not started its job yet: the
    guard's cancel came before the job, so it ran on to its end (60 s here; a later
    Ctrl-C escalated inside the call, which could break the connection); the guard cancels
    again while the driver stays in the call, and the job's failure is the interrupt."""
    from semid_dist.engines.spark import task_errors
    from semid_dist.engines.spark_interrupts import guard_interrupts

    sc = spark_session.sparkContext
    guard = guard_interrupts(sc, signal.default_int_handler, started=False)

    def job() -> None:
        sc.parallelize(range(2), 2).foreach(lambda i: time.sleep(60))

    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), task_errors():
            # one call: the Ctrl-C, its first cancel done (nothing ran), then the job
            _in_py4j("guard(signal.SIGINT, sys._getframe()); time.sleep(0.5); job()",
                     guard=guard, job=job)
        waited = time.monotonic() - start
    finally:
        guard.release(raise_pending=False)
    assert waited < 45, waited  # cancelled, not waited out
    assert sc.parallelize(range(10), 2).sum() == 45


def test_the_spark_interrupt_guard_raises_out_of_py4j_and_after_the_session_stops(
        spark_session):
    """A Ctrl-C inside a Py4J call is raised once the driver is out of it (the cancel
    thread interrupts it again), and a later one stops a call no cancel ends (a Ctrl-C soon
    after the first is ignored); one while the engine closes, after the session has
    stopped; a SIGINT ignored before a session the engine started stays ignored, and
    semid's once-only handler is not put back after a Ctrl-C (the next would have raised
    again in the command's clean-up)."""
    from semid_dist.engines.spark_interrupts import guard_interrupts

    sc = spark_session.sparkContext
    pysparks = signal.getsignal(signal.SIGINT)
    try:
        guard = guard_interrupts(sc, signal.default_int_handler, started=False)
        returned = False
        with pytest.raises(KeyboardInterrupt):
            _in_py4j("guard(signal.SIGINT, sys._getframe())", guard=guard)  # deferred
            returned = True
            time.sleep(10)  # out of the call: the cancel thread's interrupt raises here
        assert returned
        guard.release()
        assert signal.getsignal(signal.SIGINT) is pysparks

        guard = guard_interrupts(sc, signal.default_int_handler, started=False)
        me, sent = os.getpid(), []

        def ctrl_c() -> None:
            sent.append(time.monotonic())
            os.kill(me, signal.SIGINT)

        kills = [threading.Timer(t, ctrl_c) for t in (0.05, 1.0, 6.0)]  # (ESCALATE_S: 3 s)
        for kill in kills:
            kill.start()
        with pytest.raises(KeyboardInterrupt):
            _in_py4j("time.sleep(12)")  # a call no cancel ends
        stopped_by = len(sent)
        for kill in kills:
            kill.cancel()
        guard.release()
        assert stopped_by == 3, sent  # by the third Ctrl-C, not the second

        guard = guard_interrupts(sc, signal.default_int_handler, started=True)
        guard.hold()
        guard(signal.SIGINT, None)  # the engine closes: noted only
        with pytest.raises(KeyboardInterrupt):
            guard.release()  # raised once the session stopped
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        guard = guard_interrupts(sc, signal.default_int_handler, started=True)
        guard.hold()
        guard(signal.SIGINT, None)
        guard.release(raise_pending=False)  # the engine closes on another error: that one
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        def once(signum, frame):
            raise KeyboardInterrupt
        once.ignores_later_interrupts = True
        guard = guard_interrupts(sc, once, started=True)
        guard.hold()
        guard(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            guard.release()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

        signal.signal(signal.SIGINT, pysparks)
        guard = guard_interrupts(sc, signal.SIG_IGN, started=True)  # (`nohup ... &`)
        guard(signal.SIGINT, None)  # a SIGINT stays ignored: nothing cancelled or raised
        assert not guard.pending
        guard.release()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, pysparks)
        sc.setLogLevel("ERROR")


def test_a_signal_while_a_session_starts_is_held_and_a_second_is_not(tmp_path):
    """`SignalsHeld` around a session's start: a Ctrl-C is held and raised as the block
    ends; a second one is raised where it comes (a start that blocks is not waited for),
    but while the session stops; a handler installed in the block (pyspark's, as its
    context starts) stays once the block ends with nothing held."""
    from semid_dist.engines.spark_interrupts import SignalsHeld

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with SignalsHeld() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # (Python runs the handler between two instructions)
            reached.append("held")
            signals.stopping()  # (the session stops: one more waits too)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached.append("stopped")
    assert reached == ["held", "stopped"] and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with SignalsHeld():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            reached.append("second held")
    assert "second held" not in reached and signal.getsignal(signal.SIGINT) is before

    def pysparks(signum, frame):
        raise KeyboardInterrupt

    try:
        with SignalsHeld() as signals:
            signal.signal(signal.SIGINT, pysparks)
            signals.keep_pysparks()
            assert signal.getsignal(signal.SIGINT) is not pysparks  # held over it
        assert signal.getsignal(signal.SIGINT) is pysparks
    finally:
        signal.signal(signal.SIGINT, before)


SIGNALS_IN_A_COMMAND = """
import os, signal, sys, time
from semid_dist.engines.spark_interrupts import SignalsHeld
from semid_dist.signals import one_interrupt, terminated
one_interrupt()  # (a command's handlers)
first, second = (getattr(signal, name) for name in sys.argv[1:])
try:
    with SignalsHeld():
        os.kill(os.getpid(), first)
        time.sleep(0.1)
        print("held", flush=True)
        os.kill(os.getpid(), second)
        time.sleep(5)
        print("slept", flush=True)
except KeyboardInterrupt:
    print("terminated" if terminated() else "interrupted")
"""


@pytest.mark.parametrize("first, second, said", [
    ("SIGTERM", "SIGINT", "held\nterminated\n"),  # (a Ctrl-C after: the SIGTERM's line)
    ("SIGINT", "SIGTERM", "held\n"), ("SIGTERM", "SIGTERM", "held\n")])  # (the process ends)
def test_a_second_signal_as_a_session_starts_is_a_commands_second(first, second, said):
    """Under a command's handlers (`signals.one_interrupt`): a Ctrl-C after a held SIGTERM
    stops it as the SIGTERM does (it said "interrupted"); a SIGTERM after either ends the
    process at once, as a second SIGTERM does."""
    run = subprocess.run([sys.executable, "-c", SIGNALS_IN_A_COMMAND, first, second],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    code = 0 if said.endswith("terminated\n") else -signal.SIGTERM
    assert (run.returncode, run.stdout) == (code, said), run.stderr


def test_a_session_whose_driver_jvm_is_gone_stops_and_a_new_one_starts():
    """The driver JVM killed under a session (the build's process group killed by `timeout`):
    stopping it raises nothing and no pyspark warning, and a later session in the same
    Python starts a new JVM and runs; a live session stops as before."""
    pytest.importorskip("pyspark")
    script = """
import gc, json, time, warnings
warnings.simplefilter("error")
from pyspark import SparkContext
from pyspark.sql import SparkSession
from semid_dist.engines.spark_session import stop_session

def start():
    return (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
            .getOrCreate())

spark = start()
# py4j's finalizer thread deletes the JVM's objects that Python dropped; a delete in flight
# as the JVM is killed makes py4j log the reset itself: none queued or freed from the kill
gc.collect()
gc.disable()
while SparkContext._gateway._gateway_client.finalizer_deque:
    time.sleep(0.05)
time.sleep(0.5)
jvm = SparkContext._gateway.proc
jvm.kill()
jvm.wait()
gone = stop_session(spark)
gc.enable()
again = start()
print(json.dumps({"gone_stopped": gone, "count": again.range(3).count(),
                  "new_jvm": SparkContext._gateway.proc.pid != jvm.pid,
                  "live_stopped": stop_session(again)}))
"""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        "gone_stopped": False, "count": 3, "new_jvm": True, "live_stopped": True}
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr[-3000:]


def test_a_session_stopped_under_running_tasks_lets_them_end_first():
    """A build stopped by an error or Ctrl-C stops its session while the cancelled tasks of
    the job it waited on may still run: stopped under them, Spark logged an ERROR with a
    stack trace as each ended (a dropped broadcast block, or no SparkEnv left). The stop
    cancels the jobs and waits for the tasks to end first, then stops: no ERROR. A context
    Spark stopped already stops without an error."""
    pytest.importorskip("pyspark")
    script = """
import json, threading, time
from pyspark.sql import SparkSession
from semid_dist.engines.spark_session import stop_session

spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false").getOrCreate())
sc = spark.sparkContext
shared = sc.broadcast(list(range(1000)))

def slow(rows):
    import time
    size = len(shared.value)  # the task holds the broadcast's block until it ends
    time.sleep(3)
    yield size

def job():
    try:
        sc.parallelize(range(2), 2).mapPartitions(slow).collect()
    except Exception:
        pass

threading.Thread(target=job, daemon=True).start()
while not sc.statusTracker().getActiveStageIds():
    time.sleep(0.05)
time.sleep(1.0)  # both tasks in their Python workers
stopped = stop_session(spark)
# a context Spark stopped itself (a master that ended the application): nothing to wait for
again = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .getOrCreate())
again.sparkContext._jsc.sc().stop()
print(json.dumps({"stopped": stopped, "stopped_in_the_jvm": stop_session(again)}))
"""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"stopped": True,
                                                               "stopped_in_the_jvm": True}
    assert " ERROR " not in run.stderr and "Exception" not in run.stderr, run.stderr[-3000:]


def test_the_driver_jvm_runs_in_a_session_of_its_own_with_the_builds_settings():
    """A Ctrl-C at the terminal reaches the whole foreground process group: the engine's
    driver JVM, and the Python workers it starts, run in a session of their own (a worker
    interrupted in a task printed a BrokenPipeError traceback), launched with the session's
    settings on their command line as pyspark would (the driver memory: the JVM's heap)."""
    pytest.importorskip("pyspark")
    script = """
import json, os
from pyspark import SparkContext
from semid_dist.config import parse_config
from semid_dist.engines.spark_session import spark_session, stop_session

cfg = parse_config({"engine": "spark", "input": {"path": "/unused"},
                    "output": {"root": "/unused"},
                    "spark": {"master": "local[1]", "driver_memory": "700m"}})
spark, started = spark_session(cfg)
jvm = SparkContext._gateway.proc
heap = spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory()
print(json.dumps({"started": started, "own_session": os.getsid(jvm.pid) == jvm.pid,
                  "driver_session": os.getsid(0) != os.getsid(jvm.pid),
                  "memory": spark.conf.get("spark.driver.memory"),
                  "heap_mib": heap // 2**20, "count": spark.range(3).count(),
                  "stopped": stop_session(spark)}))
"""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert 500 < out.pop("heap_mib") <= 700, out  # -Xmx700m (the JVM reports a little less)
    assert out == {"started": True, "own_session": True, "driver_session": True,
                   "memory": "700m", "count": 3, "stopped": True}


def _running(pid: int) -> bool:
    """Whether process `pid` runs (an exited one not yet reaped by whoever adopted it does
    not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_driver_jvm_ends_with_the_build_killed_out_of_its_reach():
    """The driver JVM is out of the build's process group (its own session), so `kill -9` of
    the build's group no longer takes it: it ends as its standard input, a pipe from the
    build's process, closes."""
    pytest.importorskip("pyspark")
    script = """
import sys, time
from pyspark import SparkContext
from semid_dist.config import parse_config
from semid_dist.engines.spark_session import spark_session

cfg = parse_config({"engine": "spark", "input": {"path": "/unused"},
                    "output": {"root": "/unused"}, "spark": {"master": "local[1]"}})
spark, _ = spark_session(cfg)
print(SparkContext._gateway.proc.pid, flush=True)
time.sleep(300)
"""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        jvm = int(proc.stdout.readline())
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(jvm):
            if time.monotonic() > deadline:
                os.kill(jvm, signal.SIGKILL)
                pytest.fail(f"the driver JVM {jvm} outlived its build by 30 s")
            time.sleep(0.2)
    finally:
        proc.kill()
