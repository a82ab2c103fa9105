"""The Spark session the engine works in: the active one (spark-submit's, or a caller's),
or one started from the `spark:` settings, with the JVMs' options and the Python workers'
environment (memory settings, `ONE_DAEMON_VAR`). pyspark is imported inside the functions
only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semid_dist.config import BuildConfig
from semid_dist.engines.spark_interrupts import SignalsHeld
from semid_dist.errors import ConfigError, one_line
from semid_dist.io.fs import tcp_refusal
from semid_dist.memory import huge_pages, worker_env

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

# Spark starts the Python workers of SQL tasks (mapInArrow: encode, warm-up) with this
# variable set, and those of RDD tasks (`map`) without it; a Python worker daemon serves one
# environment, so an executor ran two daemons, and each of their workers imported torch and
# the encode modules: the warm-up warmed the encode's workers only. Set for every task
# (Python tracebacks of the RDD tasks then leave PySpark's own frames out, as SQL tasks'
# do), one daemon serves both: a Spark `semid encode` of 1.5M x 128 items (3 x 256) took
# 20.8-23.6 s instead of 26.3-27.4 s on 2 cores (its scan 3.6 s instead of 6.0).
ONE_DAEMON_VAR = "SPARK_SIMPLIFIED_TRACEBACK"


def spark_submitted() -> bool:
    """Whether spark-submit launched this driver (it passes its gateway to pyspark)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def session_master(cfg: BuildConfig) -> str | None:
    """The master a session the engine starts gets: spark.master, else local[*]; None under
    spark-submit, whose master wins (its --master, local[*] by default)."""
    return None if spark_submitted() else cfg.spark.master or "local[*]"


def check_startable(cfg: BuildConfig) -> None:
    """What `spark_session` checks before it starts a session, for a dry run (which starts
    none): a Java to launch the JVM with (but under spark-submit), and a standalone master
    that accepts connections."""
    if not spark_submitted():
        _check_java()
    master = session_master(cfg)
    if master is not None and master.startswith("spark://"):
        _check_master_reachable(master)


def spark_session(cfg: BuildConfig) -> tuple[SparkSession, bool]:
    """The active session, or a new one from `cfg.spark`. Returns (session, started here)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    submitted = spark_submitted()
    if not submitted and SparkContext._active_spark_context is None:  # a JVM to launch
        _check_java()
    settings, master = _session_settings(cfg, submitted), session_master(cfg)
    if submitted:  # its settings are the running JVM's: its gateway is opened first (a
        # SparkConf made before it holds nothing, and every value was replaced)
        SparkContext._ensure_initialized()
        given = SparkConf()
        master = given.get("spark.master", None)
        settings = {k: v for k, v in settings.items() if not given.contains(k)}
    if (master or "").startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder
    for name, value in settings.items():
        builder = builder.config(name, value)
    if master is not None and master.startswith("spark://"):
        _check_master_reachable(master)
    with huge_pages(cfg.encode.huge_pages), SignalsHeld() as signals:  # (huge pages:
        try:  # inherited by the JVM it starts and its workers)
            if not submitted and SparkContext._gateway is None:
                _launch_jvm(builder)
            spark = builder.getOrCreate()
        except Exception as exc:  # the JVM or the master refused this session's settings
            raise ConfigError(_start_error(cfg, master, exc)) from exc
        signals.keep_pysparks()
        if signals.held:  # a Ctrl-C or SIGTERM came as it started: stopped, then raised
            signals.stopping()
            stop_session(spark)
    _quiet_accumulator_server(spark.sparkContext)
    _quiet_local_task_failures(spark.sparkContext)
    return spark, True


def _session_settings(cfg: BuildConfig, submitted: bool) -> dict[str, str]:
    """The settings a session the engine starts gets: its master, name and SQL settings, the
    JVMs' options and the workers' memory settings (Spark starts its Python workers with
    spark.executorEnv.* in their environment), and `ONE_DAEMON_VAR`. Under spark-submit a
    value its settings give wins (its --master, --name, --conf, spark-defaults.conf: the
    config's local[2] ran a `--master yarn` job locally)."""
    settings = {"spark.app.name": cfg.spark.app_name, "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",  # the log reports progress
                "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.spark.arrow_batch_rows),
                "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
                **_java_options(cfg.spark.java_options, submitted)}
    if (master := session_master(cfg)) is not None:
        settings["spark.master"] = master
    if not submitted:  # under spark-submit the driver JVM already runs with its memory
        settings["spark.driver.memory"] = cfg.spark.driver_memory
        if (logging := _own_logging(cfg.spark.java_options)) is not None:
            given = settings.get("spark.driver.extraJavaOptions")
            settings["spark.driver.extraJavaOptions"] = f"{given} {logging}" if given else logging
    for name, value in worker_env(cfg.encode.reuse_memory, cfg.encode.huge_pages).items():
        settings[f"spark.executorEnv.{name}"] = value
    settings[f"spark.executorEnv.{ONE_DAEMON_VAR}"] = "1"
    return settings


LOG4J_FILE = Path(__file__).with_name("log4j2.properties")
# the files log4j 2 configures itself from (a `.template` beside them, as Spark ships, is not)
LOG4J_EXTENSIONS = (".properties", ".xml", ".yaml", ".yml", ".json", ".jsn")


def _own_logging(java_options: str | None) -> str | None:
    """The driver JVM option that gives a session this job starts its logging from
    `LOG4J_FILE` (warnings and errors; without Spark's four start-up lines of its default
    profile and Hadoop's native-library warning), or None where the user configures log4j:
    a log4j2 file in Spark's configuration folder (SPARK_CONF_DIR, else $SPARK_HOME/conf),
    or `log4j` named in spark.java_options; and where spark.java_options is null (the
    driver's JVM options are then `spark-defaults.conf`'s, which a value set here would
    replace). The file is given as a URI (`as_uri` escapes what Spark's splitting of the
    options would cut at: spaces, quotes)."""
    if java_options is None or "log4j" in java_options:
        return None
    conf_dir = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if os.environ.get("SPARK_HOME")
        else None)
    if conf_dir is not None and any((Path(conf_dir) / f"log4j2{ext}").is_file()
                                    for ext in LOG4J_EXTENSIONS):
        return None
    if not LOG4J_FILE.is_file():
        return None
    return f"-Dlog4j2.configurationFile={LOG4J_FILE.as_uri()}"


_ONE_JVM = re.compile(r"local(\[([0-9]+|\*)\])?")  # masters whose executor is the driver's JVM
# the loggers that print a failed task's error with its Python and Java stacks (the executor's
# `Exception in task`, the scheduler's `Lost task` and `aborting job`)
TASK_FAILURE_LOGGERS = ("org.apache.spark.executor.Executor",
                        "org.apache.spark.scheduler.TaskSetManager")


def _quiet_local_task_failures(sc: SparkContext) -> None:
    """In local mode the executor is this console's JVM: a task's failure (a corrupt catalog
    file) printed ~60 lines of Python and Java stacks before the build's one-line error,
    though the driver gets the same error (with the task's Python traceback) and the
    build names it. Those loggers are turned off there; a cluster's executors log to their
    own files, as before. Best effort: a JVM without log4j 2 keeps its logging."""
    if not _ONE_JVM.fullmatch(sc.master):  # (local-cluster's executors are JVMs of their own;
        return  # local[N,F] retries a failed task, and the retry may mend it)
    with suppress(Exception):
        log4j = sc._jvm.org.apache.logging.log4j
        for name in TASK_FAILURE_LOGGERS:
            log4j.core.config.Configurator.setLevel(name, log4j.Level.OFF)


def _launch_jvm(builder: Any) -> None:
    """Launch the driver JVM as pyspark would for this builder's session (the same settings
    on its command line), but in a session of its own: a Ctrl-C at the terminal (a SIGINT to
    the whole foreground process group) no longer reaches its Python workers, whose pyspark
    daemon puts Python's SIGINT handler back in each (the JVM itself ignores SIGINT): a
    worker interrupted in a task printed a `BrokenPipeError` traceback as the driver's cancel
    closed its connection (1 of 10 Ctrl-Cs of a local[2] build). The driver's handler stops
    the build and its session as before. The JVM still ends with this process (it exits when
    its standard input, a pipe from here, closes), and a SIGTERM to the process group, which
    no longer reaches it, stops the build as one to this process does."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    conf = SparkConf()
    for key, value in builder._options.items():  # as `getOrCreate` makes its SparkConf
        conf.set(key, value)
    SparkContext._ensure_initialized(
        gateway=launch_gateway(conf, popen_kwargs={"start_new_session": True}))


def _quiet_accumulator_server(sc: SparkContext) -> None:
    """pyspark's accumulator server prints a traceback of its own (`EOFError`) when the
    driver JVM it serves dies connected to it (crashed, or killed by hand); the
    build says what happened. Its other errors print as before."""
    server = getattr(sc, "_accumulatorServer", None)
    if server is None:
        return
    default = server.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (EOFError, ConnectionError)):
            default(request, client_address)

    server.handle_error = handle_error


def _start_error(cfg: BuildConfig, master: str | None, exc: BaseException) -> str:
    """One line for a Spark session that did not start, naming the settings it took (the
    JVM's own reason, where it gave one, is printed above it by the JVM)."""
    reason = one_line(exc)
    if len(reason) > 300:  # a Java stack trace rides in some of pyspark's errors
        reason = reason[:300] + " ..."
    options = cfg.spark.java_options
    settings = (f"spark.master={master}, spark.driver_memory={cfg.spark.driver_memory} and "
                f"spark.java_options={options}" if options else
                f"spark.master={master} and spark.driver_memory={cfg.spark.driver_memory}")
    return (f"engine: spark could not start a Spark session with {settings} "
            f"({type(exc).__name__}: {reason}); check those settings and the JVM's output above")


def _check_master_reachable(master: str) -> None:
    """A standalone master (`spark://host:port[,host:port]`) that accepts no TCP connection
    is a ConfigError at once: Spark retries it for a minute, then fails with a stack trace."""
    problems = []
    for address in master[len("spark://"):].split(","):
        refusal = tcp_refusal(address)
        if refusal is None:  # one master of a highly available set is enough (or a form
            return  # left to Spark)
        problems.append(f"{address}: {refusal}")
    raise ConfigError(f"spark.master={master}: no Spark master answers there "
                      f"({'; '.join(problems)}); start it, correct the address, or leave "
                      "spark.master unset to run on local[*]")


def _check_java() -> None:
    """A session started here launches a JVM, as Spark's launcher finds it: `$JAVA_HOME/bin/
    java`, else `java` on the PATH. Raises ConfigError when there is none (pyspark would
    fail with "Java gateway process exited before sending its port number"). A
    `spark-env.sh` in Spark's conf folder may set JAVA_HOME for the launcher alone: the
    launcher is then left to find it. Java's version is not checked (Spark 4 needs 17)."""
    import pyspark

    spark_home = os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__)
    conf = os.environ.get("SPARK_CONF_DIR") or os.path.join(spark_home, "conf")
    if os.path.exists(os.path.join(conf, "spark-env.sh")):
        return
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if java and os.access(java, os.X_OK):
        return
    where = f"JAVA_HOME={home} holds no bin/java" if home else "no `java` on the PATH"
    raise ConfigError(f"engine: spark starts a Spark session, which needs Java ({where}): "
                      "install Java (17 or later for Spark 4, e.g. apt-get install "
                      "openjdk-17-jre-headless) or set JAVA_HOME, or use engine: ray or local")


def _java_options(options: str | None, submitted: bool) -> dict[str, str]:
    """The Spark settings that give a new session's JVMs `spark.java_options`: the driver's
    unless spark-submit started it already (its --driver-java-options then), and the
    executors' (which are the driver itself in local mode)."""
    if options is None:
        return {}
    keys = ["spark.executor.extraJavaOptions"]
    if not submitted:
        keys.insert(0, "spark.driver.extraJavaOptions")
    return {key: options for key in keys}


@contextmanager
def no_pandas_warning() -> Iterator[None]:
    """pyspark warns about pandas 3 when it imports its pandas helpers; no pandas is used here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas",
                                FutureWarning)
        yield


def unpersist(broadcast: Any) -> None:
    """Drop a broadcast's copies on the executors; nothing where the driver JVM is gone
    already (`stop_session`: the build's own error or interrupt then goes on unhidden).

    Called once the jobs that read it have ended cleanly only. A failed or stopped job's
    cancelled tasks may still be running when the driver gets its error, and a task that
    ends after its broadcast was dropped has Spark log an ERROR with a stack trace ("Block
    broadcast_N does not exist", seen on a third of the Ctrl-Cs of a local[2] encode stage);
    such a broadcast is left to the session's stop where the build started the session, and
    otherwise to Spark's cleaner, which drops a broadcast once the driver JVM's garbage
    collector finds it unreferenced (every 30 minutes at least: spark.cleaner.periodicGC)."""
    from py4j.protocol import Py4JNetworkError

    with suppress(Py4JNetworkError, ConnectionError, EOFError):
        broadcast.unpersist()


def stop_session(spark: SparkSession) -> bool:
    """Stop a session this engine started; False where its driver JVM could not be reached
    (gone already: crashed or killed, or killed with the build's process group where it is
    in that group: spark-submit's), when there is nothing left to stop: a JVM still in its
    shutdown is waited for (killed past `JVM_EXIT_S`), pyspark's records of the session are cleared
    (a later session in this process starts a new JVM), and no error or pyspark warning is
    raised, which would hide the build's own (its interrupt: a traceback, status 1)."""
    from py4j.protocol import Py4JNetworkError
    from pyspark import SparkContext
    from pyspark.sql import SparkSession, SQLContext

    gateway = SparkContext._gateway
    proc = getattr(gateway, "proc", None)  # (a JVM this process launched; not spark-submit's)
    # one that exited is sent nothing: a command on its reset connection made py4j log the
    # error's traceback itself, at ERROR, where the reset came as it read the answer
    gone = proc is not None and proc.poll() is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not gone:
                _end_tasks(spark.sparkContext)
                spark.stop()
        except (Py4JNetworkError, ConnectionError, EOFError):
            gone = True
    for warning in caught:  # pyspark's own, where its stop of the context found the JVM gone
        if "Unable to cleanly shutdown Spark JVM" in str(warning.message):
            gone = True
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
    if not gone:
        return True
    _end_jvm(proc)
    with suppress(Exception):
        gateway.close()
    with SparkContext._lock:  # (pyspark's own stop clears these once the JVM has answered)
        SparkContext._active_spark_context = None
        SparkContext._gateway = SparkContext._jvm = None
    SparkSession._instantiatedSession = SparkSession._activeSession = None
    SQLContext._instantiatedContext = None
    return False


JVM_EXIT_S = 10.0  # a driver JVM's shutdown hooks after a SIGTERM take ~1 s
TASKS_END_S = 10.0  # cancelled encode tasks ended within ~2 s (Spark kills a Python worker
# 2 s after its task was cancelled: spark.python.task.killTimeout)


def _end_tasks(sc: SparkContext) -> None:
    """Cancel the session's jobs and wait (up to `TASKS_END_S`) until its executors run no
    task. A build stopped by an error or Ctrl-C gets the error while the cancelled tasks of
    the job it waited on still run; stopped under them, Spark drops the blocks they hold and
    each logs an ERROR with a stack trace as it ends ("Block broadcast_N does not exist"),
    seen on a third of the Ctrl-Cs of a local[2] encode stage. A build that ended cleanly has
    no task running: one call. A context Spark stopped already (a master that ended the
    application) has nothing to wait for; a JVM gone raises Py4JNetworkError (the caller's).

    The count is the task scheduler's (its running tasks, each until the executor reports it
    ended: after its completion listeners), not the status store's: the store writes an
    executor's count at most every 100 ms as tasks start, so tasks started just after its
    last one ended read 0 there for up to a heartbeat. Spark's status store stands in where
    a Spark version lacks the scheduler's count."""
    from py4j.protocol import Py4JError, Py4JJavaError, Py4JNetworkError

    jsc = sc._jsc.sc()
    try:
        if jsc.isStopped():
            return
        sc.cancelAllJobs()
    except Py4JNetworkError:
        raise
    except Py4JJavaError:  # stopped meanwhile
        return

    def running() -> int:
        try:
            counts = jsc.taskScheduler().runningTasksByExecutors().valuesIterator()
            total = 0
            while counts.hasNext():
                total += counts.next()
            return total
        except Py4JNetworkError:
            raise
        except Py4JError:  # (an internal of Spark's: the status store's count instead)
            return sum(e.numRunningTasks() for e in jsc.statusTracker().getExecutorInfos())

    deadline = time.monotonic() + TASKS_END_S
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)


def _end_jvm(proc: Any) -> None:
    """The driver JVM this process launched (pyspark's `gateway.proc`) exited: waited for
    while it runs its shutdown hooks, killed if it is still there past `JVM_EXIT_S`."""
    if proc is None:  # (a JVM this process did not launch: spark-submit's)
        return
    try:
        proc.wait(timeout=JVM_EXIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdin is not None:  # (the pipe pyspark keeps open to it)
        with suppress(OSError):
            proc.stdin.close()
