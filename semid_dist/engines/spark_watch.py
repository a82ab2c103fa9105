"""Says when a Spark job of the build waits for executors: a cluster with no worker (none
started, or the only one gone mid-build), or with none that has the cores and memory the job
asks for. Spark's own warning ("Initial job has not accepted any resources") repeats only
until the application's first task has run: a worker lost later, it waits without a word,
and the build looked hung. Local masters run their tasks in the driver: nothing to watch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark import SparkContext

NOTICE_S = 15.0  # a standalone master: as Spark's own starvation warning
MANAGER_NOTICE_S = 60.0  # YARN, Kubernetes: granting executors takes longer as a rule
POLL_S = 1.0


class ExecutorWatch:
    """A background thread that asks Spark's status tracker, every `POLL_S` seconds, for the
    active stages and the registered executors: a stage active while no executor is there
    for the notice time is one line, and the executors' return another."""

    def __init__(self, sc: SparkContext, log: Callable[[str], None]) -> None:
        self.sc, self.log = sc, log
        self.standalone = sc.master.startswith("spark://")
        self.notice_s = NOTICE_S if self.standalone else MANAGER_NOTICE_S
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
        since, said = None, False  # since when a stage waits with no executor
        had = False  # an executor was registered before (the wait is then for a lost one's)
        while not self._stop.wait(POLL_S):
            try:
                count, active = self._poll()
            except Exception:  # noqa: BLE001 (a Py4J call broken by a Ctrl-C): asked again
                if self.sc._jsc is None:  # noqa: SLF001 (the session has stopped)
                    return
                continue
            if count > 0 and said:
                self.log(f"spark: {count} executor{'s' * (count > 1)} registered; the build "
                         "goes on")
            had = had or count > 0
            if count > 0 or not active:
                since, said = None, False
                continue
            since = time.monotonic() if since is None else since
            if not said and time.monotonic() - since >= self.notice_s:
                said = True
                self.log(notice(self.sc.master, self.notice_s, lost=had))

    def _poll(self) -> tuple[int, bool]:
        """(registered executors, whether a stage is active)."""
        jvm_tracker = self.sc._jsc.sc().statusTracker()  # noqa: SLF001 (executors: the JVM's)
        # the driver is one of the executor infos Spark lists
        return (len(jvm_tracker.getExecutorInfos()) - 1,
                bool(self.sc.statusTracker().getActiveStageIds()))


def notice(master: str, wait_s: float, *, lost: bool) -> str:
    """The line for a job of the build that has waited `wait_s` seconds with no executor;
    `lost`: the build had executors, and lost the last (its worker gone; or, off standalone
    clusters, dynamic allocation released it)."""
    standalone = master.startswith("spark://")
    fix = ("start a worker, or check that the cluster's workers have the cores and memory "
           if standalone else
           "the cluster manager has granted none yet: check its queue and capacity, and "
           "that it can grant the cores and memory ")
    gone = "lost" if standalone else "lost or released"  # (dynamic allocation releases)
    what = (f"the build's last executor was {gone} and none has registered with master "
            f"{master} since, for {wait_s:.0f} s" if lost else
            f"no executor has registered with master {master} for {wait_s:.0f} s")
    return (f"spark: {what}; the build waits for one (Spark's own wait): {fix}this job asks "
            "for (spark.executor.cores, spark.executor.memory); Ctrl-C stops the build")


def watch_executors(sc: SparkContext, log: Callable[[str], None]) -> ExecutorWatch | None:
    """An `ExecutorWatch` started on `sc`; None on a local master (no executors to wait for)."""
    if sc.master.startswith("local"):
        return None
    return ExecutorWatch(sc, log).start()
