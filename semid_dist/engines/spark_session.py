"""The Spark session the engine works in: the active one (spark-submit's, or a caller's),
or one started from the `spark:` settings, with the JVMs' options and the Python workers'
environment (memory settings, `ONE_DAEMON_VAR`). pyspark is imported inside the functions
only.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from semid_dist.config import BuildConfig
from semid_dist.engines.shared import tcp_refusal
from semid_dist.errors import ConfigError, one_line
from semid_dist.memory import huge_pages, worker_env

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Spark starts the Python workers of SQL tasks (mapInArrow: encode, warm-up) with this
# variable set, and those of RDD tasks (`map`) without it; a Python worker daemon serves one
# environment, so an executor ran two daemons, and each of their workers imported torch and
# the encode modules: the warm-up warmed the encode's workers only. Set for every task
# (Python tracebacks of the RDD tasks then leave PySpark's own frames out, as SQL tasks'
# do), one daemon serves both: a Spark `semid encode` of 1.5M x 128 items (3 x 256) took
# 20.8-23.6 s instead of 26.3-27.4 s on 2 cores (its scan 3.6 s instead of 6.0).
ONE_DAEMON_VAR = "SPARK_SIMPLIFIED_TRACEBACK"


def spark_session(cfg: BuildConfig) -> tuple[SparkSession, bool]:
    """The active session, or a new one from `cfg.spark`. Returns (session, started here)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit launched this driver
    if not submitted and SparkContext._active_spark_context is None:  # a JVM to launch
        _check_java()
    master = cfg.spark.master or (None if submitted else "local[*]")
    builder = (SparkSession.builder.appName(cfg.spark.app_name)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")  # the log reports progress
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", cfg.spark.arrow_batch_rows)
               .config("spark.sql.shuffle.partitions", cfg.spark.shuffle_partitions))
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if not submitted:  # under spark-submit the driver JVM already runs with its memory
        builder = builder.config("spark.driver.memory", cfg.spark.driver_memory)
    # the JVMs' options and the workers' memory settings (Spark starts its Python workers
    # with spark.executorEnv.* in their environment), and `ONE_DAEMON_VAR`; a value
    # spark-submit's settings give wins
    defaults = SparkConf()
    settings = _java_options(cfg.spark.java_options, submitted)
    for name, value in worker_env(cfg.encode.reuse_memory, cfg.encode.huge_pages).items():
        settings[f"spark.executorEnv.{name}"] = value
    settings[f"spark.executorEnv.{ONE_DAEMON_VAR}"] = "1"
    for name, value in settings.items():
        if not defaults.contains(name):
            builder = builder.config(name, value)
    if master is not None and master.startswith("spark://"):
        _check_master_reachable(master)
    with huge_pages(cfg.encode.huge_pages):  # inherited by the JVM it starts and its workers
        try:
            return builder.getOrCreate(), True
        except Exception as exc:  # the JVM or the master refused this session's settings
            raise ConfigError(_start_error(cfg, master, exc)) from exc


def _start_error(cfg: BuildConfig, master: str | None, exc: BaseException) -> str:
    """One line for a Spark session that did not start, naming the settings it took (the
    JVM's own reason, where it gave one, is printed above it by the JVM)."""
    reason = one_line(exc)
    if len(reason) > 300:  # a Java stack trace rides in some of pyspark's errors
        reason = reason[:300] + " ..."
    return (f"engine: spark could not start a Spark session with spark.master={master} and "
            f"spark.driver_memory={cfg.spark.driver_memory} ({type(exc).__name__}: {reason}); "
            "check those settings and the JVM's output above")


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
