"""A build against a Spark standalone cluster on this machine (a master and a worker started
from pyspark's own `spark-class`), as a job is run against an existing Spark cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from semid_dist.io.store import TableStore
from tests.conftest import REPO, clustered, write_catalog

pytest.importorskip("pyspark")
pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_class(*args: str, log: Path) -> subprocess.Popen:
    """A Spark daemon (`org.apache.spark.deploy.*`) from pyspark's own launcher."""
    import pyspark

    launcher = Path(pyspark.__file__).parent / "bin" / "spark-class"
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(log.parent))
    with open(log, "w") as out:
        return subprocess.Popen([str(launcher), *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _wait_for_port(port: int, daemon: subprocess.Popen, timeout: float) -> bool:
    """Whether `daemon` listens on `port` within `timeout` seconds (False: it exited, or
    stays silent: stopped)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and daemon.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    _stop(daemon)
    return False


def _start_master(log: Path) -> tuple[subprocess.Popen, int]:
    """A standalone master on a free loopback port (tried again where another process took
    the port between its choice and the master's bind)."""
    for _ in range(3):
        port = _free_port()
        master = _spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                              "--port", str(port), "--webui-port", str(_free_port()), log=log)
        if _wait_for_port(port, master, timeout=90):
            return master, port
    pytest.fail(f"no Spark master started: {log.read_text()[-3000:]}")


def _stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        os.killpg(daemon.pid, 15)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, 9)
            daemon.wait()


def test_a_build_waiting_for_executors_says_so_and_goes_on_when_a_worker_joins(tmp_path):
    """Spark waits for executors without a line (no worker started, or the only one gone):
    the build says it waits, names the fix, and says when executors have registered; the
    table it then commits holds the local engine's SIDs."""
    master, port = _start_master(tmp_path / "master.log")
    worker = None
    try:
        catalog = write_catalog(tmp_path / "cat", clustered(3000, 8, seed=3))
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({
            "engine": "spark", "input": {"path": catalog},
            "spark": {"master": f"spark://127.0.0.1:{port}"},
            "output": {"root": str(tmp_path / "out"), "table": "sids"},
            "quantizer": {"layers": [16, 8], "niter": 4}, "fit": {"sample_size": 2000},
            "encode": {"shard_rows": 500}}))
        # the executors' Python workers run this environment's Python; the driver is
        # reached on loopback, as the daemons are
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1")
        proc = subprocess.Popen([sys.executable, "-m", "semid_dist.cli", "build", "--config",
                                 str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=env)
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        try:
            err = ""
            for line in proc.stderr:
                err += line
                if "no executor has registered" in line:
                    break
            assert (f"spark: no executor has registered with master spark://127.0.0.1:{port} "
                    "for 15 s; the build waits for one (Spark's own wait): start a worker"
                    in err), err[-3000:]
            worker = _spark_class("org.apache.spark.deploy.worker.Worker",
                                  f"spark://127.0.0.1:{port}", "--cores", "2", "--memory", "2g",
                                  "--webui-port", str(_free_port()),
                                  "--work-dir", str(tmp_path / "work"),
                                  log=tmp_path / "worker.log")
            err += proc.stderr.read()
            assert proc.wait() == 0, err[-3000:]
        finally:
            watchdog.cancel()
            proc.kill()
        assert "spark: 1 executor registered; the build goes on" in err, err[-3000:]
        # no executor yet when the session starts: a cluster's figure is not task slots
        assert (f"spark: master spark://127.0.0.1:{port}, default parallelism 2, new session "
                in err), err[:3000]
        assert err.count("no executor has registered") == 1
    finally:
        for daemon in (worker, master):
            if daemon is not None:
                _stop(daemon)
    local = subprocess.run([sys.executable, "-m", "semid_dist.cli", "build", "--config",
                            str(cfg), "engine=local", f"output.root={tmp_path / 'local'}"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    ours = TableStore(str(tmp_path / "out"), "sids").read_data().sort_by("item_id")
    reference = TableStore(str(tmp_path / "local"), "sids").read_data().sort_by("item_id")
    columns = ["item_id", "codes", "sid", "suffix"]
    assert ours.num_rows == 3000 and ours.select(columns).equals(reference.select(columns))
