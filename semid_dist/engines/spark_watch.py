"""Says when a Spark job of the build waits for executors: a cluster with no worker (none
started, or the only one gone mid-build), or with none that has the cores and memory the job
asks for. Spark waits for one without a line (its "Initial job has not accepted any
resources" warning comes at most once per application, and not at all once a task ran), so
the build looked hung. Local masters run their tasks in the driver: nothing to watch there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark import SparkContext

NOTICE_S = 15.0  # as Spark's own starvation warning (spark.starvation.timeout)
POLL_S = 1.0


class ExecutorWatch:
    """A background thread that asks Spark's status tracker, every `POLL_S` seconds, for the
    active stages and the registered executors: a stage active while no executor is there
    for `NOTICE_S` seconds is one line, and the executors' return another."""

    def __init__(self, sc: SparkContext, log: Callable[[str], None]) -> None:
        self.sc, self.log = sc, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="semid-spark-executors",
                                        daemon=True)

    def start(self) -> ExecutorWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            tracker = self.sc.statusTracker()
            executors = self.sc._jsc.sc().statusTracker()  # noqa: SLF001 (the JVM's: executors)
            since, said = None, False  # since when a stage waits with no executor
            while not self._stop.wait(POLL_S):
                # the driver is one of the executor infos Spark lists
                count = len(executors.getExecutorInfos()) - 1
                if count > 0 or not tracker.getActiveStageIds():
                    if said and count > 0:
                        self.log(f"spark: {count} executor{'s' * (count > 1)} registered; "
                                 "the build goes on")
                        said = False
                    since = None
                    continue
                since = time.monotonic() if since is None else since
                if not said and time.monotonic() - since >= NOTICE_S:
                    said = True
                    self.log(self._notice())
        except Exception:  # noqa: BLE001 (a session stopping, a Ctrl-C breaking Py4J)
            return

    def _notice(self) -> str:
        return (f"spark: no executor has registered with master {self.sc.master} for "
                f"{NOTICE_S:.0f} s; the build waits for one (Spark's own wait): start a "
                "worker, or check that the cluster's workers have the cores and memory this "
                "job asks for (spark.executor.cores, spark.executor.memory); Ctrl-C stops "
                "the build")


def watch_executors(sc: SparkContext, log: Callable[[str], None]) -> ExecutorWatch | None:
    """An `ExecutorWatch` started on `sc`; None on a local master (no executors to wait for)."""
    if sc.master.startswith("local"):
        return None
    return ExecutorWatch(sc, log).start()
