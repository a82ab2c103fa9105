"""Spark engine: shard tasks on RDD partitions, encode with `mapInArrow`, fit on the driver.

Submit with `spark-submit --master local[2] --driver-java-options -XX:TieredStopAtLevel=1
jobs/spark_build.py --config conf/spark.yaml` (spark-submit's session and settings are used;
see `spark.java_options`), or run `semid build ... engine=spark` alone: the
engine then starts a session from the `spark:` settings (`local[*]` unless `spark.master` is
set) and stops it when done; an already active session is used and left running.

Nothing numeric lives here. Every task runs a stage function of `semid_dist.stages` on one
shard; encode gives each shard its own partition and calls the `EncodeWorker` that the local
and Ray engines call, so every engine writes identical codes, tables and partial statistics.
The sample is drawn with `map` and the codebooks are fitted on the driver with the local
engine's code. pyspark is imported inside the functions only.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import pickle
import re
import signal
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from semid_dist import errors
from semid_dist.config import BuildConfig
from semid_dist.engines import spark_interrupts as interrupts
from semid_dist.engines import spark_session as session
from semid_dist.engines.local import LocalEngine
from semid_dist.engines.shared import resolve, split_shared
from semid_dist.engines.spark_watch import watch_executors
from semid_dist.errors import ConfigError, InputError, SemidError
from semid_dist.io.catalog import Shard, shard_from_dict, shard_to_dict
from semid_dist.runtime import TABLE_PREFIX
from semid_dist.stages import JobContext, has_job_worker, job_worker

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.sql import SparkSession

_RESULT_SCHEMA = "index long, result binary"
_ARROW_SCHEMA = pa.schema([("index", pa.int64()), ("result", pa.binary())])
WARM_UP_GROUP = "semid-warm-up"
_TASK_ERROR = re.compile(r"semid_dist\.errors\.(\w+): (.+)")
_NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}")


@contextmanager
def task_errors() -> Iterator[None]:
    """Re-raise a named semid error from a Spark task as itself, so the CLI prints its
    one-line reason, a task's missing module (executors running a Python without the
    project) as a ConfigError, and a job's failure after a Ctrl-C as the KeyboardInterrupt;
    any other task failure propagates unchanged."""
    try:
        yield
    except SemidError:
        raise
    except Exception as exc:
        # the job failed as the Ctrl-C cancelled it, or the Py4J connection as a Ctrl-C
        # stopped the driver inside a call (the guard's escalation: the next call fails)
        if interrupts.claim_interrupt() or _after_interrupt(exc):
            raise KeyboardInterrupt from None
        match = _TASK_ERROR.search(str(exc))
        cls = getattr(errors, match.group(1), None) if match else None
        if isinstance(cls, type) and issubclass(cls, SemidError):
            raise cls(f"{match.group(2)} (raised in a Spark task)") from exc
        missing = _NO_MODULE.search(str(exc))
        if missing is None or importlib.util.find_spec(missing.group(1).split(".")[0]) is None:
            raise  # (a module this driver lacks too: not the executors' environment)
        raise ConfigError(
            f"the Spark executors' Python has no module {missing.group(1)!r} (a task failed "
            "on its import): point spark.pyspark.python (or PYSPARK_PYTHON where they run) at "
            "a Python with semid_dist installed, such as this driver's "
            f"{sys.executable}, or ship one (jobs/spark_build.py)") from None


def _after_interrupt(exc: BaseException) -> bool:
    """Whether `exc` was raised while a KeyboardInterrupt was being handled."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


RECLAIM_EVERY = 256  # a worker's tasks between two full collections of its whole heap
_tasks_settled = 0  # tasks of this Python worker so far (`settle_worker`)


def settle_worker(*, new_job: bool = False) -> None:
    """Keep what this Python worker holds out of the garbage collector's full passes
    (`gc.freeze`), as a task starts. PySpark's daemon runs a full `gc.collect()` in a reused
    worker after each of its tasks; once the encode modules are imported (torch, numpy,
    pyarrow) that walks ~200,000 objects (203,613 in a process that imported them and
    validated a batch, `stages.warm_worker`): 95-97 ms a collection on the 2-core benchmark
    VM, about half a 65,536-row shard's quantize step at 3 x 256. Called as a task starts,
    after the previous task's collection: the imports and the worker's cached state are
    frozen, each task's own garbage is still collected. A frozen object is still freed when
    its last reference goes, but a reference cycle holding one is kept while it stays
    frozen; so the first task of a new encode job in the worker (`new_job`: the last job's
    encode worker is dropped) and every `RECLAIM_EVERY`-th task unfreeze instead, and the
    collection after that task walks the whole heap once and reclaims such cycles."""
    global _tasks_settled
    _tasks_settled += 1
    if new_job or _tasks_settled % RECLAIM_EVERY == 0:
        gc.unfreeze()
    else:
        gc.freeze()


def _encode_partition(job: str, ctx_bc: Broadcast[JobContext], shards: list[str],
                      batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow body over `spark.range` rows: row i encodes shards[i] (a shard's JSON),
    one result row per shard. The `EncodeWorker` (codebooks) is built once per Python worker
    process and encode job."""
    from pyspark import TaskContext

    from semid_dist.quantize.cpu_blas import set_cpu_threads

    settle_worker(new_job=not has_job_worker(job))
    set_cpu_threads(TaskContext.get().cpus())
    worker = job_worker(job, ctx_bc.value)
    for batch in batches:
        for i in batch.column(0).to_pylist():
            res = worker(shard_from_dict(json.loads(shards[i])))
            # the result dict travels as Spark's own Python results do (pickled), so it
            # reaches the driver exactly as `EncodeWorker` returned it, whatever keys it has
            yield pa.RecordBatch.from_pydict(
                {"index": [res["index"]], "result": [pickle.dumps(res, protocol=5)]},
                schema=_ARROW_SCHEMA)


def _oldest_wave(running: deque[Future]) -> pa.Table:
    """The oldest wave's results once it is done (popped); raises as soon as any wave in
    flight fails, not only when its turn comes."""
    while True:
        for f in running:
            if f.done() and f.exception() is not None:
                f.result()
        if running[0].done():
            return running.popleft().result()
        wait([f for f in running if not f.done()], return_when=FIRST_COMPLETED)


MAP_TASKS_PER_SLOT = 2
MAP_ITEMS_PER_TASK = 4


def map_runs(items: int, slots: int) -> list[tuple[int, int]]:
    """The Spark tasks of `SparkEngine.map` over `items` items, as (start, stop) runs of
    consecutive items of near-equal length: an item a task up to `MAP_TASKS_PER_SLOT` tasks a
    slot, and past that fewer tasks, of at most `MAP_ITEMS_PER_TASK` items (a session whose
    executors are still being added, or were released, counts few slots: heavy items then
    keep most of their tasks). A PySpark task costs ~29 ms whatever it does (local[2] on 2
    cores, workers with the encode modules imported: 23 items of a function that returns at
    once took 0.66 s as 23 tasks and 0.19 s as 4; 1.24 s and 0.35 s before every task froze
    its worker's heap, `settle_worker`), about as much as a data part takes to write."""
    tasks = max(1, min(items, max(MAP_TASKS_PER_SLOT * max(1, slots),
                                  math.ceil(items / MAP_ITEMS_PER_TASK))))
    bounds = [items * i // tasks for i in range(tasks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def encode_waves(shards: list[Shard], slots: int) -> list[list[Shard]]:
    """The shards in waves of consecutive shards, one Spark job each: at least two tasks a
    slot per wave (a job's start is paid once per wave) and at most ~20 waves a stage (the
    driver gets results at least every ~5% of it)."""
    size = max(2 * slots, math.ceil(len(shards) / 20))
    return [shards[i:i + size] for i in range(0, len(shards), size)]


def _warm_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of the warm-up: pay what an encode task pays first (`warm_worker`)."""
    from semid_dist.stages import warm_worker

    settle_worker()
    warm_worker()
    yield from batches


def warm_up(spark: SparkSession) -> threading.Thread:
    """Run one small job in a background thread: a mapInArrow task per slot whose Python
    worker imports the encode modules. The encode stage's first mapInArrow job paid the
    first SQL job, a Python daemon's start (a trace showed one starting after the scan's RDD
    tasks) and each worker's imports: 7.5 s on 2 cores before the first encode task.
    Spark runs jobs first come, first served, so when a build fits codebooks the pipeline
    starts the warm-up as the driver starts fitting (`SparkEngine.warm_up_beside_fit`):
    started with the job, it ran between the scan's jobs and held them up for its length.
    With no fit it starts with the job (the scan waits for it instead of the encode). Spark
    reuses the warmed workers for the encode tasks. The job is planned in the calling
    thread (pyspark's pandas-3 notice is filtered there): the first mapInArrow a process
    plans imports pandas, 0.26 s on 2 cores, which the encode's first wave paid before.
    Best effort: an error here is the encode stage's to report."""
    sc = spark.sparkContext
    try:  # planned here, not in the thread: the warning filter is process-wide state
        slots = sc.defaultParallelism
        with session.no_pandas_warning():
            job = spark.range(slots, numPartitions=slots).mapInArrow(_warm_partition, "id long")
    except Exception:  # noqa: BLE001
        job = None

    def run() -> None:
        try:
            sc.setJobGroup(WARM_UP_GROUP, "semid: import the encode modules in the Python "
                           "workers")  # this thread's jobs only
            if job is not None:
                job.collect()
        except Exception:  # noqa: BLE001
            pass

    thread = threading.Thread(target=run, name="semid-spark-warm-up", daemon=True)
    thread.start()
    return thread


def slots_text(master: str, parallelism: int) -> str:
    """The session's start line's word on its parallelism: a local master's (local, local[N],
    local[N, F]) is its task slots; a cluster's default parallelism (local-cluster[...]
    included) is its executors' cores registered so far, but at least 2 (a 1-core worker
    reads "default parallelism 2")."""
    if master == "local" or master.startswith("local["):
        return f"{parallelism} task slot{'s' if parallelism != 1 else ''}"
    return f"default parallelism {parallelism}"


class SparkEngine(LocalEngine):
    """`map` runs one Spark task per item; `encode` one `mapInArrow` task per shard; `fit`
    is the local engine's (the sample is already on the driver)."""

    name = "spark"
    warm_up_beside_fit = True

    def __init__(self, cfg: BuildConfig, log: Callable[[str], None] = print) -> None:
        super().__init__(cfg, log)
        before = signal.getsignal(signal.SIGINT)
        with session.no_pandas_warning():
            self.spark, self._started = session.spark_session(cfg)
        sc = self.spark.sparkContext
        self._guard = interrupts.guard_interrupts(sc, before, self._started)
        self._warm: threading.Thread | None = None
        unused = cfg.spark.master not in (None, sc.master)  # spark-submit's, or a session's
        log(f"spark: master {sc.master}, {slots_text(sc.master, sc.defaultParallelism)}, "
            f"{'new' if self._started else 'existing'} session {sc.applicationId}"
            + (f" (not spark.master={cfg.spark.master}: "
               f"{'spark-submit' if session.spark_submitted() else 'the session'}'s wins)"
               if unused else ""))
        self._watch = watch_executors(sc, log)  # a line when a job waits for executors

    def close(self) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:  # a Ctrl-C now is raised once the session has stopped
            guard.hold()
        try:
            if self._watch is not None:
                self._watch.stop()
            if self._warm is not None:  # the session is not stopped under a running warm-up
                self._warm.join(timeout=60)
            if self._started:
                self._started = False
                if not session.stop_session(self.spark):
                    self.log("spark: the driver JVM was gone before the session stopped")
        except BaseException:
            if guard is not None:
                guard.release(raise_pending=False)
            raise
        if guard is not None:
            guard.release()

    def warm_up(self) -> None:
        """Start the session's Python workers with the encode modules imported, in the
        background (`warm_up`)."""
        if self._warm is None:
            self._warm = warm_up(self.spark)

    def resolve_input(self, path: str) -> str:
        """`table:<name>` -> the Parquet location of that table in the session catalog
        (a Parquet data source table, or a Hive table stored as Parquet)."""
        if not path.startswith(TABLE_PREFIX):
            return path
        name = path[len(TABLE_PREFIX):]
        if not _TABLE_NAME.fullmatch(name):
            raise ConfigError(f"input.path: {name!r} is not a table name (db.table)")
        from pyspark.errors import AnalysisException

        try:  # (asked first: a failed DESCRIBE is also logged by Spark, at ERROR)
            if not self.spark.catalog.tableExists(name):
                raise InputError(self._no_table(name))
            rows = self.spark.sql(f"DESCRIBE FORMATTED {name}").collect()
        except AnalysisException:
            raise InputError(self._no_table(name)) from None
        info = {r.col_name.strip(): (r.data_type or "").strip() for r in rows}
        provider = info.get("Provider", "").lower()
        serde = info.get("Serde Library", "").lower()
        if provider != "parquet" and "parquet" not in serde:
            raise InputError(f"input.path: table {name!r} is stored as "
                             f"{provider or serde or 'unknown'}, not Parquet; write it as "
                             "Parquet or point input.path at Parquet files")
        location = info.get("Location")
        if not location:
            raise InputError(f"input.path: table {name!r} has no storage location")
        self.log(f"input: table {name} -> {location}")
        return location

    def _no_table(self, name: str) -> str:
        """The error of a `table:` input the session catalog does not hold; a session started
        here keeps its catalog in memory (but where its settings say otherwise), which holds
        no table made elsewhere."""
        missing = f"input.path: table {name!r} is not in the Spark session catalog"
        implementation = self.spark.conf.get("spark.sql.catalogImplementation", "in-memory")
        if not (self._started and implementation == "in-memory"):
            return f"{missing}; check the name or use a Parquet path"
        where = ("give spark-submit the catalog that holds it" if session.spark_submitted()
                 else "run jobs/spark_build.py under spark-submit with the catalog that holds it")
        return (f"{missing}: the session this job started keeps its catalog in memory "
                "(spark.sql.catalogImplementation=in-memory), which holds no table made "
                f"elsewhere; {where} (e.g. --conf spark.sql.catalogImplementation=hive, with "
                "the metastore's settings), or point input.path at the table's Parquet files")

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        shared, items = split_shared(list(items))
        if not items:
            return []
        sc = self.spark.sparkContext
        shared_bc = sc.broadcast(shared)  # once, not pickled into every item
        runs = [items[a:b] for a, b in map_runs(len(items), sc.defaultParallelism)]
        rdd = sc.parallelize(runs, len(runs))  # a run a slice: PySpark batches one a slice

        def run_items(run: list[tuple]) -> list[Any]:
            settle_worker()
            return [fn(*resolve(item, shared_bc.value)) for item in run]

        with task_errors():
            results = rdd.flatMap(run_items).collect()
        session.unpersist(shared_bc)  # after a clean job only (see `session.unpersist`)
        return results

    def encode(self, ctx: JobContext, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        """One `mapInArrow` task per shard, in waves (`encode_waves`): a Spark job collects
        its results only when all its tasks are done, so one job for the whole stage would
        hand every result over at its end. Two waves are in flight at a time (Spark runs the
        second's tasks as the first's free their slots), and a wave's results are yielded as
        it ends: the driver merges statistics and logs progress during the stage. A failed
        wave, or a caller that stops, cancels the others' jobs (tagged per encode; they keep
        the caller's job group, scheduler pool and tags) and raises."""
        from pyspark.util import inheritable_thread_target

        if not shards:
            return
        if self._warm is not None:  # its workers serve the encode tasks; long done, as a rule
            self._warm.join(timeout=120)
        sc = self.spark.sparkContext
        ctx_bc, job = sc.broadcast(ctx), uuid.uuid4().hex
        tag, stopped = f"semid-encode-{job}", threading.Event()
        encode = partial(_encode_partition, job, ctx_bc)

        def frame(wave: list[Shard]):
            """The wave's job, planned here (not in a pool thread: the warning filter is
            process-wide state)."""
            shards_json = [json.dumps(shard_to_dict(s)) for s in wave]
            with session.no_pandas_warning():
                # rows 0..n-1, one a partition: each shard its own task, and no Python
                # worker feeding the rows (as a DataFrame of a Python RDD would need)
                return (self.spark.range(len(wave), numPartitions=len(wave))
                        .mapInArrow(partial(encode, shards_json), _RESULT_SCHEMA))

        @inheritable_thread_target(self.spark)
        def run(df) -> pa.Table | None:
            sc.addJobTag(tag)  # this thread's jobs only
            return None if stopped.is_set() else df.toArrow()

        waves = iter(encode_waves(shards, sc.defaultParallelism))
        with task_errors(), ThreadPoolExecutor(2, "semid-spark-encode") as pool:
            running = deque(pool.submit(run, frame(w)) for w in islice(waves, 2))
            try:
                while running:
                    table = _oldest_wave(running)
                    running.extend(pool.submit(run, frame(w)) for w in islice(waves, 1))
                    for blob in table.column("result").to_pylist():
                        yield pickle.loads(blob)
            except BaseException:  # a failed wave, or the caller stopped
                stopped.set()
                while not all(f.done() for f in running):  # a job may start after a cancel
                    with suppress(Exception):  # keep the first error
                        sc.cancelJobsWithTag(tag)
                    wait(running, timeout=1.0)
                raise
        session.unpersist(ctx_bc)  # after a clean stage only (see `session.unpersist`)
