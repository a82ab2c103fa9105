"""The lines a Spark build logs about its executors: while a job waits for them
(`spark_watch.notice`), and the session's start line's parallelism (`spark.slots_text`); the
watch itself runs against a real standalone master in tests/test_spark_cluster.py."""

from __future__ import annotations

from semid_dist.engines.spark_watch import notice


def test_the_wait_notice_says_whether_the_build_lost_its_executors():
    """A worker lost mid-build (its executors with it) is not "none has registered": the
    line says the last one was lost; off standalone clusters the fix is the manager's."""
    lost = notice("spark://10.0.0.5:7077", 15, lost=True)
    assert lost.startswith("spark: the build's last executor was lost and none has registered "
                           "with master spark://10.0.0.5:7077 since, for 15 s; the build waits "
                           "for one (Spark's own wait): start a worker")
    assert notice("yarn", 60, lost=True).startswith(
        "spark: the build's last executor was lost or released and none")  # (dynamic allocation)
    never = notice("yarn", 60, lost=False)
    assert never.startswith("spark: no executor has registered with master yarn for 60 s; the "
                            "build waits for one (Spark's own wait): the cluster manager has "
                            "granted none yet")
    assert all(line.endswith("Ctrl-C stops the build") for line in (lost, never))


def test_the_start_line_says_task_slots_for_local_masters_only():
    """A local master's default parallelism is its task slots; a cluster's (local-cluster
    included) is Spark's figure of the cores registered so far, 2 at least."""
    from semid_dist.engines.spark import slots_text

    assert slots_text("local[2]", 2) == "2 task slots"
    assert slots_text("local", 1) == "1 task slot"
    assert slots_text("local[4, 3]", 4) == "4 task slots"
    for master in ("spark://10.0.0.5:7077", "yarn", "local-cluster[2, 1, 1024]"):
        assert slots_text(master, 2) == "default parallelism 2"
