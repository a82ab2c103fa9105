"""Killed builds (SIGKILL via the SEMID_FAULT switch, in a real `semid build` subprocess):
the previous version stays latest and readable, and re-running resumes to the same table."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from semid_dist import resume
from semid_dist.config import load_config
from semid_dist.io.retention import version_time
from semid_dist.io.store import TableStore, new_version_id
from semid_dist.pipeline import build
from semid_dist.shard_results import load_shard_results
from tests.conftest import REPO, cli_build

# the encode workers' steps, as metrics.json timings name them (README, Metrics)
STEPS = ("read", "validate", "quantize", "write", "statistics", "result")


def write_config(path: Path, catalog: str, root: Path, **sections) -> Path:
    """The crash tests' build config (seed 5, layers 16 x 8 x 8, 5 iterations, a sample of
    1,500, shards of 500 rows), as JSON at `path`; `sections` replace its top-level ones."""
    path.write_text(json.dumps({
        "engine": "local", "seed": 5, "input": {"path": catalog},
        "output": {"root": str(root), "table": "sids"},
        "quantizer": {"layers": [16, 8, 8], "niter": 5}, "fit": {"sample_size": 1500},
        "encode": {"shard_rows": 500}, **sections}))
    return path


def run_build(cfg_path: Path, *overrides: str, fault: str | None = None,
              marker: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SEMID_FAULT", None)
    if fault:
        env["SEMID_FAULT"] = fault
    if marker:
        env["SEMID_FAULT_MARKER"] = str(marker)
    return cli_build(cfg_path, *overrides, env=env)


@pytest.fixture()
def setup(small_catalog, tmp_path):
    catalog, _ = small_catalog
    cfg = write_config(tmp_path / "build.yaml", catalog, tmp_path / "out")
    first = run_build(cfg, "seed=4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "new version" in first.stderr and "resuming version" not in first.stderr
    store = TableStore(str(tmp_path / "out"), "sids")
    return cfg, store, store.latest(), store.read_data().sort_by("item_id")


@pytest.fixture(scope="module")
def reference(small_catalog, tmp_path_factory):
    """The uninterrupted build every resumed run must reproduce."""
    catalog, _ = small_catalog
    root = tmp_path_factory.mktemp("ref")
    cfg = write_config(root / "build.yaml", catalog, root / "out")
    assert run_build(cfg).returncode == 0
    return TableStore(str(root / "out"), "sids").read_data().sort_by("item_id")


@pytest.mark.parametrize("point", ["fit", "encode", "reduce", "commit"])
def test_killed_build_keeps_previous_version_and_resumes(setup, reference, point):
    cfg, store, previous, before = setup
    killed = run_build(cfg, fault=point)
    assert killed.returncode == -signal.SIGKILL
    assert store.latest() == previous and store.versions() == [previous]
    assert store.read_data(previous).sort_by("item_id").equals(before)
    assert len(store.uncommitted()) == 1
    staged = load_shard_results(store, store.uncommitted()[0])
    assert len(staged) == {"fit": 0, "encode": 2}.get(point, 6)
    # a finished shard's staged result holds its counts, not its step times: a resumed run
    # counts only the time of the shards it encodes itself
    assert all("seconds" not in r and r["encoded"] + r["rejected"] == r["rows"] > 0
               for r in staged.values()), staged
    resumed = run_build(cfg)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming version" in resumed.stderr
    if point != "fit":
        assert "reusing the fit of the unfinished run" in resumed.stderr
    timings = store.read_json(store.latest(), "metrics.json")["timings"]
    steps = [k for k in timings if k.startswith("encode_worker_")]
    if point in ("reduce", "commit"):
        assert "6 shards done by the unfinished run, 0 to go" in resumed.stderr
        assert "encode: 6/6 shards" in resumed.stderr and "encode: 5/6" not in resumed.stderr
        # no shard was encoded by this run: no worker time is counted for the others
        assert steps == [] and "worker time per shard" not in resumed.stderr
    if point == "encode":
        assert "2 shards done by the unfinished run, 4 to go" in resumed.stderr
        # progress lines for the shards this run encodes, not the interrupted run's
        assert "encode: 2/6 shards" not in resumed.stderr
        assert "encode: 3/6 shards" in resumed.stderr
        assert "encode: worker time per shard (4 shards): read " in resumed.stderr
    if point in ("fit", "encode"):
        assert steps == [f"encode_worker_{s}_s" for s in STEPS]
    assert store.latest() != previous and store.uncommitted() == []
    assert store.read_data().sort_by("item_id").equals(reference)


@pytest.mark.parametrize("case", ["meanwhile", "gc", "warm_start"])
def test_a_resumed_version_keeps_the_parent_its_first_run_started_from(setup, monkeypatch,
                                                                        case):
    """A build of another config that started before the killed one and committed after it
    died is not the resumed version's parent: the re-run keeps the parent its first run
    started from (lineage, drift, the warm start's checks: `warm_start`, where the other
    build's layers differ), unless gc removed that version meanwhile (`gc`)."""
    cfg, store, previous, _ = setup
    warm = ("fit.warm_start=parent",) if case == "warm_start" else ()
    killed = run_build(cfg, *warm, fault="encode")
    assert killed.returncode == -signal.SIGKILL
    [vid] = store.uncommitted()
    started = version_time(vid)
    assert started is not None
    # the other build's version id sorts before the killed one's, as its earlier start does
    earlier = new_version_id(started - dt.timedelta(seconds=1))
    monkeypatch.setattr(resume, "new_version_id", lambda: earlier)
    other = ["seed=6", *(["quantizer.layers=[8,8]"] if warm else [])]
    assert build(load_config(cfg, other), log=lambda line: None).version_id == earlier
    monkeypatch.undo()
    assert store.latest() == earlier and store.manifest(earlier)["parent"] == previous
    if case == "gc":  # the killed run's first parent goes; the killed version, young, stays
        report = store.gc(1)
        assert report["deleted"] == [previous] and report["kept_uncommitted"] == [vid]
    resumed = run_build(cfg, *warm)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming version {vid}" in resumed.stderr
    parent = earlier if case == "gc" else previous
    assert f"(parent {parent}); engine local" in resumed.stderr
    if case == "gc":
        assert (f"the parent version {vid} started from, {previous}, is no longer committed"
                in resumed.stderr)
    else:
        assert (f"version {vid} keeps the parent its first run started from, {previous} "
                f"(committed since: {earlier})" in resumed.stderr)
    assert store.latest() == vid and store.manifest(vid)["parent"] == parent
    assert store.read_json(vid, "drift.json")["from_version"] == parent


def test_bucketed_steps_remove_their_scratch_before_the_commit(setup, reference):
    """driver.gather_rows 300: the duplicate check and the collision suffixes run as tasks
    through the version's staging. Killed just before the manifest, the version's staging
    (kept for the resume) holds neither step's scratch files; the resumed run commits the
    table the driver-side steps give."""
    cfg, store, previous, _ = setup
    killed = run_build(cfg, "driver.gather_rows=300", fault="commit")
    assert killed.returncode == -signal.SIGKILL
    assert "hash buckets" in killed.stderr and "key ranges" in killed.stderr
    (vid,) = store.uncommitted()
    staging = Path(store.version_dir(vid)) / "_staging"
    assert staging.is_dir() and (staging / "run.json").exists()
    assert not [p for p in ("scan", "suffixes", "sid_items") if (staging / p).exists()]
    resumed = run_build(cfg, "driver.gather_rows=300")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming version" in resumed.stderr and store.latest() != previous
    assert store.read_data().sort_by("item_id").equals(reference)


def test_killed_between_manifest_and_latest(setup):
    cfg, store, previous, before = setup
    killed = run_build(cfg, fault="latest")
    assert killed.returncode == -signal.SIGKILL
    assert store.latest() == previous  # _latest never moved
    assert store.read_data(previous).sort_by("item_id").equals(before)
    assert len(store.versions()) == 2  # the new version is complete and listed, not latest
    killed_vid = store.versions()[-1]
    assert store.fs.exists(f"{store.version_dir(killed_vid)}/_staging")  # its work files
    report = store.gc(5)  # go with gc: the build that wrote them is gone
    assert report["staging_removed"] == [killed_vid] and report["deleted"] == []
    assert store.version_dirs() == sorted([previous, killed_vid])
    store.check_files(killed_vid)
    again = run_build(cfg)
    assert again.returncode == 0 and store.latest() == store.versions()[-1]


@pytest.mark.engine
@pytest.mark.parametrize("fault", ["encode_worker", "encode_worker_second"])
def test_ray_encode_worker_killed_is_retried(small_catalog, tmp_path, fault):
    """An encode worker dies (SIGKILL) on its first shard, or on its second, a second after
    its task sent the first shard's result (6 shards, a task per slot: 3 each); Ray re-runs
    the task, and the table equals the local engine's (no shard lost or counted twice)."""
    catalog, _ = small_catalog
    cfg = write_config(tmp_path / "ray.yaml", catalog, tmp_path / "out", ray={"num_cpus": 2})
    assert run_build(cfg).returncode == 0
    store = TableStore(str(tmp_path / "out"), "sids")
    local = store.read_data().sort_by("item_id")
    marker = tmp_path / "died"
    res = run_build(cfg, "engine=ray", "encode.from_version=latest", "--json", fault=fault,
                    marker=marker)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists()  # a worker really died
    # stdout holds the JSON alone (Ray's line of the dead worker went there, before it)
    assert json.loads(res.stdout)["version_id"] == store.latest(), res.stdout[:2000]
    rows = store.manifest(store.latest())["rows"]
    assert rows["input"] == rows["encoded"] == 2400 and rows["rejected"] == 0
    assert store.read_data().sort_by("item_id").equals(local)


def test_killed_incremental_encode_resumes_to_the_same_table(setup, incremental_catalogs):
    """An incremental encode killed after it rewrote the parent's parts it carries (the
    `reduce` point): the parent stays latest, and the re-run resumes to exactly the table of
    an uninterrupted incremental run."""
    cfg, store, previous, before = setup
    inc = ("encode.incremental=true", f"encode.from_version={previous}",
           f"input.path={incremental_catalogs['delta']}")
    killed = run_build(cfg, *inc, fault="reduce")
    assert killed.returncode == -signal.SIGKILL
    assert store.latest() == previous and store.versions() == [previous]
    assert store.read_data(previous).sort_by("item_id").equals(before)
    resumed = run_build(cfg, *inc)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming version" in resumed.stderr
    again = run_build(cfg, *inc)
    assert again.returncode == 0, again.stderr[-2000:]
    _, first, second = store.versions()
    rows = store.manifest(first)["rows"]
    assert rows["carried"] == 2400 - 150 and rows == store.manifest(second)["rows"]
    assert store.read_data(first).sort_by("item_id").equals(
        store.read_data(second).sort_by("item_id"))


def _ray_train_workers(driver: int) -> bool:
    """Whether a Ray Train worker process (Ray titles it) of the Ray that process `driver`
    started runs: one of its descendants."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                continue
            pid = int(proc.name)
            while pid > 1:  # up its parents (`stat`'s 4th field, after the command's `)`)
                pid = int((Path("/proc") / str(pid) / "stat").read_text()
                          .rsplit(")", 1)[1].split()[1])
                if pid == driver:
                    return True
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass
    return False


def _wait_for_no_other_ray(timeout: float = 180) -> None:
    """Wait while a Ray of an earlier test runs on this machine (one whose driver was
    killed outlives it by up to ~2 min): with two, Ray Train's placement-group cleaner, which
    asks Ray's State API for the default address, finds both and dies with a traceback on
    the console of a build stopped during its fit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(b"gcs_server" in c for c in _cmdlines()):
        time.sleep(1)


def _cmdlines():
    """Each running process's command line (bytes)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            yield (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue


@pytest.mark.engine
@pytest.mark.parametrize("train", ["1", "0"], ids=["train_v2", "train_v1"])
@pytest.mark.parametrize("when", ["during", "after"])
def test_ctrl_c_during_or_after_a_ray_train_fit_stops_the_build(small_catalog, tmp_path, when,
                                                                train):
    """A Ctrl-C while Ray Train fits, or three once it has fitted (Ray Train took over the
    SIGINT handler: the first ended the build with status 1 and no message, the second was
    ignored and the build committed; then the later Ctrl-Cs broke Ray's shutdown): status
    130, the one line and no traceback, nothing committed. Ray Train V1 too (its Ray Tune
    handler stopped the fit, whose codebooks were then missing: a traceback)."""
    catalog, _ = small_catalog
    root = tmp_path / "out"
    cfg = write_config(tmp_path / "ray.yaml", catalog, root, engine="ray", ray={"num_cpus": 2})
    env = {k: v for k, v in os.environ.items() if k != "SEMID_FAULT"}
    env["RAY_TRAIN_V2_ENABLED"] = train
    _wait_for_no_other_ray()
    proc = subprocess.Popen([sys.executable, "-m", "semid_dist.cli", "build", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=env)
    watchdog = threading.Timer(300, proc.kill)  # a hang fails the test, not the suite
    watchdog.start()
    try:
        err = ""
        mark = "fit: Ray Train" if when == "during" else "fit: done"  # (as the fit ends)
        for line in proc.stderr:
            err += line
            if line.startswith("[semid") and mark in line:
                break
        while when == "during" and not _ray_train_workers(proc.pid):  # they fit by now
            assert proc.poll() is None, err
            time.sleep(0.05)
        for _ in range(1 if when == "during" else 3):  # an impatient user's three Ctrl-Cs
            proc.send_signal(signal.SIGINT)  # (the later ones broke Ray's shutdown)
            time.sleep(0.3)
        err += proc.stderr.read()
        assert proc.wait() == 130, err[-3000:]
    finally:
        watchdog.cancel()
    store = TableStore(str(root), "sids")
    assert store.versions() == [] and len(store.uncommitted()) == 1
    assert err.strip().endswith("semid build: interrupted; nothing was committed (the same "
                                f"command resumes version {store.uncommitted()[0]})"), err[-2000:]
    assert "Traceback" not in err, err[-3000:]


_CALLERS_RAY = """
import json, os, signal, sys, threading, time
import ray
from semid_dist.config import load_config
from semid_dist.pipeline import build
from tests.test_crash import _ray_train_workers

ray.init(address="local", num_cpus=2, include_dashboard=False,
         object_store_memory=128 * 2**20, configure_logging=False, log_to_driver=False)

def interrupt():  # a Ctrl-C once the fit's workers run
    while not _ray_train_workers(os.getpid()):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)

def log(line):
    if "fit: Ray Train" in line:
        threading.Thread(target=interrupt, daemon=True).start()

import semid_dist.engines.ray_train as ray_train
abort, aborted = ray_train._abort, {}

def watched_abort(controller):  # the real abort; then: does a worker of the fit run on?
    abort(controller)
    start = time.monotonic()
    while _ray_train_workers(os.getpid()) and time.monotonic() - start < 3.5:
        time.sleep(0.02)
    aborted.update(controller=controller is not None, workers=_ray_train_workers(os.getpid()))

ray_train._abort = watched_abort
kept = None
try:
    build(load_config(sys.argv[1]), log=log)
    outcome = "committed"
except KeyboardInterrupt as exc:  # kept: its frames hold the fit's controller handle (the
    outcome, kept = "interrupted", exc  # controller ends once it is collected)
start = time.monotonic()
while _ray_train_workers(os.getpid()) and time.monotonic() - start < 30:
    time.sleep(0.1)
print(json.dumps({"outcome": outcome, "aborted": aborted,
                  "workers": _ray_train_workers(os.getpid()),
                  "after_s": time.monotonic() - start,
                  "ray": ray.get(ray.put(7)) if ray.is_initialized() else None}))
"""


@pytest.mark.engine
def test_ctrl_c_in_a_fit_on_the_callers_ray_stops_the_fit(small_catalog, tmp_path):
    """The build as a library call on a Ray its caller started (which outlives the build):
    a Ctrl-C during the Ray Train fit stops the build (KeyboardInterrupt), the fit (of
    minutes: 10,000 iterations a layer) ends with its workers while the caller still holds
    the interrupt (whose frames hold the fit's controller handle), and the caller's Ray goes
    on serving it. The fit is aborted through its controller: no worker of it runs 3.5 s
    after the abort returns (at once, measured; not aborted, they ran 4-5 s more, a fit of
    minutes ending only as its checkpoint folder went)."""
    catalog, _ = small_catalog
    cfg = write_config(tmp_path / "ray.yaml", catalog, tmp_path / "out", engine="ray",
                       quantizer={"layers": [64, 64, 64], "niter": 10_000},
                       fit={"sample_size": 2000})
    env = {k: v for k, v in os.environ.items() if k != "SEMID_FAULT"}
    done = subprocess.run([sys.executable, "-c", _CALLERS_RAY, str(cfg)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "interrupted", result
    assert result["aborted"] == {"controller": True, "workers": False}, result
    assert not result["workers"], result  # ended within 30 s of the build's return
    assert result["ray"] == 7  # the caller's Ray still serves it
