"""Engine tests on one embedded local Ray (session fixture): Ray Data encode and Ray Train fit."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from semid_dist.engines.ray_data import _one_stage, task_shards
from semid_dist.engines.ray_train import fit_on_ray_train
from semid_dist.errors import ConfigError, InputError
from semid_dist.io.catalog import Piece, Shard
from semid_dist.io.store import TableStore
from semid_dist.pipeline import build
from semid_dist.quantize.acrq import fit_acrq, split_sample
from semid_dist.quantize.residual import init_subset
from tests.conftest import (
    REPO,
    capacity_ranges_on_engines,
    cli_build,
    clustered,
    corrupt_embedding_pages,
    incremental_on_engines,
    named_error,
    ray_session_dir,
    small_config,
    write_catalog,
)

pytestmark = pytest.mark.engine


def quiet(msg: str) -> None:
    pass


def without_ray_address() -> dict[str, str]:
    """This process's environment without RAY_ADDRESS: a `semid` child starts its own Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_ray_address_with_no_cluster_fails_naming_the_fix(tmp_path):
    """`ray.address=auto` where no Ray cluster runs, a host:port where nothing listens, and
    RAY_ADDRESS set with no ray.address: one line naming the address and the ways out,
    status 2, nothing written. A process of its own, whose Ray looks for a running cluster
    in an empty temporary folder (not the one this session's Ray may have used)."""
    # (no public API says whether `auto` would find a cluster: Ray's own lookup does)
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # what `auto` falls back to: any Ray running on this machine
        pytest.skip("a Ray cluster runs on this machine: ray.address=auto would join it")
    env = without_ray_address()
    env["RAY_TMPDIR"] = str(tmp_path / "ray")
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog, clustered(50, 8, seed=0))
    out = tmp_path / "out"
    paths = (f"input.path={catalog}", f"output.root={out}")
    demo = REPO / "conf" / "demo.yaml"
    last = named_error(cli_build(demo, "ray.address=auto", *paths, env=env, timeout=120))
    assert last.startswith("semid build: error: ray.address=auto: could not connect to a Ray "
                           "cluster from this machine (")
    assert "`ray start --head`" in last and "leave ray.address (and RAY_ADDRESS) unset" in last
    assert not out.exists()
    # Ray's record of a cluster that has stopped since: the address and the record named
    record = tmp_path / "ray" / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text("127.0.0.1:1")
    last = named_error(cli_build(demo, "ray.address=auto", *paths, env=env, timeout=120))
    assert re.match(r"semid build: error: ray\.address=auto: could not connect to a Ray "
                    r"cluster from this machine \(\S+:1, which "  # (Ray names this machine)
                    rf"{re.escape(str(record))} records as the cluster last started here: ",
                    last), last
    record.unlink()
    assert not out.exists()
    # a host:port where nothing listens: said at once (Ray itself retries it for minutes)
    last = named_error(cli_build(demo, "ray.address=127.0.0.1:1", *paths, env=env, timeout=120))
    assert last.startswith(
        "semid build: error: ray.address=127.0.0.1:1: could not connect to a Ray cluster from "
        "this machine (")
    assert not out.exists()
    # RAY_ADDRESS without ray.address: Ray would join that address, not start a Ray here
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    assert named_error(cli_build(demo, *paths, env=env, timeout=120)) == (
        "semid build: error: RAY_ADDRESS=127.0.0.1:1 is set (as for a `ray job submit` job) "
        "but ray.address is not: set ray.address=auto to run on that cluster, or unset "
        "RAY_ADDRESS to run on an embedded local Ray")
    assert not out.exists()


def test_a_failed_start_takes_back_the_auth_mode_the_engine_set(tmp_path):
    """The engine sets RAY_AUTH_MODE=disabled for its embedded Ray (and copies a head's of
    this machine for an attach), taken back as it stops; a Ray that did not start (too
    large an object store) took it back too, not leaving it to the process's next Ray. A
    process of its own: this one's Ray may run."""
    code = (
        "import os\n"
        "from semid_dist.config import BuildConfig, InputConfig, OutputConfig, RayConfig\n"
        "from semid_dist.engines.ray_session import ray_init\n"
        "from semid_dist.errors import ConfigError\n"
        "cfg = BuildConfig(InputConfig('c.parquet'), OutputConfig('out'),\n"
        "                  ray=RayConfig(num_cpus=1, object_store_memory_mb=10**7))\n"
        "try:\n"
        "    ray_init(cfg)\n"
        "except ConfigError as exc:\n"
        "    print('refused:', str(exc)[:60].strip())\n"
        "print('mode:', os.environ.get('RAY_AUTH_MODE'))\n")
    env = {k: v for k, v in without_ray_address().items() if k != "RAY_AUTH_MODE"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == [
        "refused: ray.num_cpus / ray.object_store_memory_mb: Ray cannot start",
        "mode: None"], run.stdout


def test_a_ray_client_address_without_ray_client_is_refused_by_the_dry_run_too(tmp_path):
    """`ray.address=ray://...` needs ray[client], which this project does not install: the
    dry run passed and the build stopped on Ray's line; both now give the named error,
    nothing written."""
    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("Ray Client's package (grpcio) is installed here")
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog, clustered(50, 8, seed=0))
    out = tmp_path / "out"
    over = (f"input.path={catalog}", f"output.root={out}", "ray.address=ray://127.0.0.1:1")
    want = ("error: ray.address=ray://127.0.0.1:1 is a Ray Client address, and Ray Client "
            "needs the package ray[client] (grpcio), which is not installed here: ")
    demo = REPO / "conf" / "demo.yaml"
    for extra in (("--dry-run",), ()):
        run = cli_build(demo, *extra, *over, env=without_ray_address(), timeout=120)
        assert run.returncode == 2 and named_error(run).startswith(f"semid build: {want}"), (
            run.stderr[-2000:])
    assert not out.exists()


def test_a_failed_attach_is_said_in_one_line_and_a_refused_token_names_the_auth_mode(
        monkeypatch):
    """Ray's reasons for a failed connection (as `ray.init` gives them: a ConnectionError
    whose text holds a Python traceback) in one line; a cluster that refused this driver's
    authentication (`ray start` enables token authentication; the engine set
    RAY_AUTH_MODE=disabled for an attach too) names the setting, not `ray start --head`."""
    from semid_dist.engines.ray_session import _connect_error

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    stack = ("Failed to connect to GCS. Last connection error: Traceback (most recent call "
             "last):\n  File \"node.py\", line 996, in _init_gcs_client\n    x()\n")
    refused = ConnectionError(stack + "ray.exceptions.AuthenticationError: Authentication "
                              "error: InvalidAuthToken\n")
    assert _connect_error("auto", refused) == (
        "ray.address=auto: the Ray cluster refused this driver's authentication "
        "(RAY_AUTH_MODE=disabled; a cluster `ray start` started asks for the token it wrote to "
        "~/.ray/auth_token); run with RAY_AUTH_MODE unset or token and the cluster's token "
        "(RAY_AUTH_TOKEN or ~/.ray/auth_token), or start the cluster with "
        "RAY_AUTH_MODE=disabled")
    monkeypatch.delenv("RAY_AUTH_MODE")  # (unset: Ray found no token to use)
    assert "(RAY_AUTH_MODE=unset; " in _connect_error("auto", refused)
    assert "; give this driver the cluster's token (RAY_AUTH_TOKEN, or the file " in (
        _connect_error("auto", refused))
    # a host:port: Ray sends no token there unless told (a cluster on another machine)
    assert "; set RAY_AUTH_MODE=token and give this driver the cluster's token " in (
        _connect_error("10.0.0.1:6379", refused))
    timed_out = ConnectionError(stack + "TimeoutError: deadline exceeded\n")
    line = _connect_error("10.0.0.1:6379", timed_out)
    assert line.startswith("ray.address=10.0.0.1:6379: could not connect to a Ray cluster "
                           "from this machine (Failed to connect to GCS. Last connection "
                           "error: TimeoutError: deadline exceeded); start one")
    assert "\n" not in line and "Traceback" not in line


def _one_row_each(batch: dict[str, np.ndarray]):
    """A map task that yields one row per input row, as the encode tasks yield shard results."""
    for x in batch["x"]:
        yield {"x": [int(x)]}


def test_encode_stage_sends_each_result_as_a_block_of_its_own(ray_session):
    """`_one_stage` makes each row a task yields a block of its own (so the driver gets each
    shard's result as the shard finishes, not when its task ends), on that dataset only:
    Ray Data's own default, checked alongside, gathers a task's rows into one block."""
    import ray.data

    default = ray.data.DataContext.get_current().target_max_block_size

    def stage(one_stage: bool):
        ds = ray.data.from_items([{"x": i} for i in range(6)], override_num_blocks=6)
        ds = ds.map_batches(_one_row_each, batch_size=3, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=2), num_cpus=1)
        return (_one_stage(ds, 2) if one_stage else ds).materialize()

    ours, plain = stage(True), stage(False)
    assert ours.num_blocks() == 6 and plain.num_blocks() == 2
    assert sorted(r["x"] for r in ours.iter_rows()) == list(range(6))
    assert ray.data.DataContext.get_current().target_max_block_size == default


def test_task_shards_round_robin_on_one_node_consecutive_on_a_cluster():
    """One node: a task per slot, shards dealt round-robin (results come about in shard
    order); a cluster: tasks of up to 4 consecutive shards, at least 2 tasks per slot. Each
    shard in exactly one task either way."""
    shards = [Shard(i, (Piece("part.parquet", (i,), 100 * i, 100),)) for i in range(23)]
    one = task_shards(shards, 2, one_node=True)
    assert [[s.index for s in g] for g in one] == [list(range(0, 23, 2)), list(range(1, 23, 2))]
    many = task_shards(shards, 2, one_node=False)
    assert [len(g) for g in many] == [4, 4, 4, 4, 4, 3]
    assert [s.index for g in many for s in g] == list(range(23))
    assert [len(g) for g in task_shards(shards, 8, one_node=False)] == [1] * 23
    assert task_shards(shards[:3], 8, one_node=True) == [[s] for s in shards[:3]]
    assert [len(g) for g in task_shards(shards, 4, one_node=True)] == [6, 6, 6, 5]


@pytest.mark.parametrize("group_rows", [500, 100])
def test_ray_data_encode_identical_to_local(ray_session, small_catalog, tmp_path, group_rows):
    """Same input, same codebooks: the Ray Data engine writes exactly the local engine's table
    and metrics, its duplicate check and collision suffixes run by Ray tasks. With 100-row
    shards each of the encode tasks runs its share of them one after the other, and the
    shards' head / tail statistics (popularity column) come back per shard; there the
    catalog is 60 files of 40 rows, so each shard holds two files (30 shards)."""
    _, x = small_catalog
    # continuous popularity at 100 rows: the head threshold takes Ray passes deeper
    pop = np.random.default_rng(2).lognormal(0, 2, len(x)) if group_rows == 100 else None
    catalog = write_catalog(tmp_path / "catalog", x, row_group_rows=group_rows,
                            files={500: 2, 100: 60}[group_rows], popularity=pop)
    over = {"encode__shard_rows": group_rows}
    if group_rows == 100:
        over["input__popularity_column"] = "popularity"
    root = str(tmp_path / "out")
    fitted = build(small_config(catalog, root, **over), log=quiet)
    local = build(small_config(catalog, root, encode__from_version=fitted.version_id, **over),
                  log=quiet)
    # driver.gather_rows 700: Ray tasks check the ids in hash buckets and rank the colliding
    # items in key ranges (through staging)
    logs: list[str] = []
    ray = build(small_config(catalog, root, engine="ray", driver__gather_rows=700,
                             encode__from_version=fitted.version_id, **over), log=logs.append)
    assert any("colliding items in" in m and "key ranges" in m for m in logs)
    assert any("ids for duplicates in" in m and "hash buckets" in m for m in logs)
    if pop is not None:
        assert any("more pass(es) over the popularity column" in m and "took 0" not in m
                   for m in logs)
    store = TableStore(root, "sids")
    a = store.read_data(local.version_id).sort_by("item_id")
    b = store.read_data(ray.version_id).sort_by("item_id")
    assert a.num_rows == 2400 and a.equals(b)
    ma = {k: v for k, v in local.metrics.items() if k not in ("timings", "fit")}
    mb = {k: v for k, v in ray.metrics.items() if k not in ("timings", "fit")}
    assert json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)
    assert store.manifest(ray.version_id)["engine"] == "ray"
    # one data part per shard: 2 files of 1,200 rows in row groups of 500; 60 of 40 rows
    assert len(store.part_paths(ray.version_id)) == {500: 6, 100: 30}[group_rows]


def test_ray_capacity_bound_in_prefix_ranges_identical_to_local(ray_session, small_catalog,
                                                              tmp_path):
    """collisions.max_per_sid past driver.gather_rows: Ray tasks move the overflow of the
    over-full SIDs in prefix ranges through staging, and each shard reads its own moves:
    the same table and metrics as the local engine's."""
    (a, b), (local, ray), _ = capacity_ranges_on_engines(small_catalog[0], str(tmp_path),
                                                          "ray")
    assert a.equals(b)
    ma, mb = ({k: v for k, v in r.metrics.items() if k not in ("timings", "fit")}
              for r in (local, ray))
    assert json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)


def test_ray_incremental_version_identical_to_local(ray_session, incremental_catalogs,
                                                    tmp_path):
    """An incremental version on Ray Data: the same carried, rewritten and new parts, SIDs,
    suffixes and metrics as on the local engine."""
    store, parent, results = incremental_on_engines(incremental_catalogs,
                                                    str(tmp_path / "out"), "ray")
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in results)
    assert a.num_rows == 2700 and a.equals(b)
    ma, mb = ({k: v for k, v in r.metrics.items() if k not in ("timings", "fit")}
              for r in results)
    assert json.dumps(ma, sort_keys=True) == json.dumps(mb, sort_keys=True)
    refs = [{e.get("version") for e in store.manifest(r.version_id)["files"]} for r in results]
    assert parent.version_id in refs[0] and refs[0] == {parent.version_id, None} == refs[1]


def test_a_named_error_in_a_ray_task_is_itself_on_one_line(ray_session, small_catalog,
                                                         tmp_path):
    """A catalog file whose embedding pages fail their checksum, met by a Ray task (the fit
    sample's read) and by a Ray Data encode task (a build encoding with a version's
    codebooks: no sample read): the build raises the task's InputError itself, its one line
    (not Ray's wrapper, whose message was the task's traceback and Ray Data's retry note),
    and commits nothing."""
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    good = build(small_config(catalog, root), log=quiet)
    bad = write_catalog(tmp_path / "bad", x[:600], files=1)
    corrupt_embedding_pages(tmp_path / "bad" / "part-001.parquet", x[600:900])
    for over in ({}, {"encode__from_version": good.version_id}):
        with pytest.raises(InputError) as err:
            build(small_config(bad, root, engine="ray", **over), log=quiet)
        assert type(err.value) is InputError and "\n" not in str(err.value), over
        assert re.fullmatch(r"catalog file '.*part-001\.parquet': cannot read row groups "
                            r"\[0\] \(.*checksum.*\); repair or remove the file "
                            r"\(raised in a Ray task\)", str(err.value)), str(err.value)
    assert TableStore(root, "sids").versions() == [good.version_id]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_gpu_settings_on_a_ray_without_gpus_are_a_clear_error(ray_session, small_catalog,
                                                             tmp_path):
    """Not a job waiting forever for a GPU: the engine stops before any work, Ray stays up."""
    root = str(tmp_path / "out")
    for over, named in (({"encode__use_gpu": True}, "encode.use_gpu=true"),
                        ({"fit__use_gpu": True, "encode__use_gpu": True},
                         "fit.use_gpu=true and encode.use_gpu=true")):
        with pytest.raises(ConfigError, match=f"{named} but the Ray cluster has no GPU"):
            build(small_config(small_catalog[0], root, engine="ray", **over), log=quiet)
    assert TableStore(root, "sids").latest() is None and ray_session.is_initialized()


_DECLARED_GPU_PROBE = """
import ray, sys
from semid_dist.config import parse_config
from semid_dist.engines import make_engine
from semid_dist.errors import SemidError
from semid_dist.pipeline import build
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,  # (one declared)
         object_store_memory=128 * 2**20)
catalog, root = sys.argv[1:]
def config(**sections):
    return parse_config({"engine": "ray", "input": {"path": catalog}, "output": {"root": root},
                         "quantizer": {"layers": [8, 4], "niter": 2},
                         "fit": {"sample_size": 600, "cpus_per_worker": 0.5}, **sections})
for workers in (2, 1):
    try:
        with make_engine(config(fit={"use_gpu": True, "num_workers": workers,
                                     "cpus_per_worker": 0.5}), log=print):
            print("started")
    except SemidError as exc:
        print(f"error: {exc}")
for stage in ({"encode": {"use_gpu": True, "shard_rows": 300}},
              {"fit": {"use_gpu": True, "num_workers": 1, "cpus_per_worker": 0.5}}):
    try:
        build(config(**stage), log=lambda msg: None)
    except SemidError as exc:
        print(f"error: {exc}")
ray.shutdown()
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")
def test_gpu_settings_a_ray_of_one_declared_gpu_cannot_run_are_clear_errors(tmp_path):
    """A Ray that lists one GPU (declared; this machine has none). fit.use_gpu takes a GPU a
    Ray Train worker, all at once: two workers waited forever (the check asked for one GPU);
    one line naming fit.num_workers. An encode task, or a fit, given the GPU on a node whose
    torch sees none: one line naming the setting and the torch build (torch's own assertion,
    "Torch not compiled with CUDA enabled", at the first tensor moved; the fit's workers
    failed in Ray Train's set-up, retried)."""
    catalog = write_catalog(tmp_path / "cat", clustered(600, 8, seed=3))
    run = subprocess.run([sys.executable, "-c", _DECLARED_GPU_PROBE, catalog,
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-4:-2] == [
        "error: fit.use_gpu=true with fit.num_workers=2 takes 2 GPUs at once but the Ray "
        "cluster has 1; set fit.num_workers=1 or fewer", "started"], run.stdout
    for line, stage in zip(lines[-2:], ("encode", "fit")):
        assert re.fullmatch(rf"error: {stage}.use_gpu=true but torch \S+ \((a CPU build|CUDA "
                            rf".*)\) sees no CUDA device on this worker's node; install a CUDA "
                            rf"build of torch on every node that runs the {stage}, or set "
                            rf"{stage}.use_gpu=false \(raised in a Ray task\)", line), line


def test_warm_up_runs_once_per_driver_and_frees_its_cpus(ray_session, tmp_path):
    """The engine's warm-up (Ray Data's helpers, encode modules imported in the workers) runs
    once per driver in the background, finishes, and hands every CPU back."""
    import ray

    from semid_dist.engines.ray_data import RayEngine, warm_up

    engine = RayEngine(small_config(str(tmp_path), str(tmp_path), engine="ray"), log=quiet)
    engine.warm_up()
    first = engine._warm
    assert first is not None and warm_up(2) is first
    first.join(timeout=120)
    assert not first.is_alive()
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)
    engine.close()
    assert ray.is_initialized()  # the session fixture's Ray is left alone


def test_train_one_vs_two_workers(ray_session, tmp_path):
    x = clustered(3000, 10, seed=11)
    seeds = init_subset(x, 32, seed=0)
    results = {}
    for workers in (1, 2):
        cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__layers=[32, 16],
                           fit__num_workers=workers, fit__cpus_per_worker=0.5)
        results[workers] = fit_on_ray_train(x, seeds, cfg, quiet,
                                            f"file://{tmp_path}/staging-{workers}")
    (one, _), (two, s2) = results[1], results[2]
    for a, b in zip(one, two):  # exact sums (kmeans' fixed point): the same to the last bit
        assert np.array_equal(a, b)
    assert [s["n"] for s in s2] == [3000, 3000]  # all-reduced counts cover the whole sample


def test_ray_build_end_to_end(ray_session, small_catalog, tmp_path):
    catalog, x = small_catalog
    root = str(tmp_path / "out")
    res = build(small_config(catalog, root, engine="ray"), log=quiet)
    store = TableStore(root, "sids")
    assert store.latest() == res.version_id
    assert res.manifest["rows"] == {"input": len(x), "encoded": len(x), "rejected": 0}
    local = build(small_config(catalog, root), log=quiet)
    # a 2-worker fit and encode tasks vs the local engine's 1-process fit: the same table
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in (res, local))
    assert a.equals(b) and a.num_rows == len(x)
    # the fit sample drawn by item id in every shard's task (fit.sample_by: id)
    by_id = [build(small_config(catalog, root, engine=engine, fit__sample_by="id"),
                   log=quiet) for engine in ("ray", "local")]  # (2 Ray Train workers)
    a, b = (store.read_data(r.version_id).sort_by("item_id") for r in by_id)
    assert a.equals(b) and a.num_rows == len(x)


def test_train_worker_failure_resumes_from_last_layer_checkpoint(ray_session, tmp_path,
                                                                  monkeypatch):
    """A Train worker killed (SIGKILL) after fitting layer 1, before its checkpoint: the
    worker group restarts from layer 0's checkpoint, refits layers 1-2, and the codebooks
    equal an uninterrupted fit."""
    x = clustered(2000, 8, seed=12)
    seeds = init_subset(x, 16, seed=0)
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__layers=[16, 8, 8],
                       fit__num_workers=2, fit__cpus_per_worker=0.5, fit__max_failures=2)
    clean, _ = fit_on_ray_train(x, seeds, cfg, quiet, f"file://{tmp_path}/clean")
    marker = tmp_path / "worker-died"
    monkeypatch.setenv("SEMID_FAULT", "train_worker")
    monkeypatch.setenv("SEMID_FAULT_MARKER", str(marker))
    lines: list[str] = []
    resumed, stats = fit_on_ray_train(x, seeds, cfg, lines.append,
                                      f"file://{tmp_path}/resumed")
    assert marker.exists()  # a worker really died
    # each layer's line relayed once (the restored layer 0's is not said again)
    assert [m.split(":")[1] for m in lines if m.startswith("fit: layer")] == [
        " layer 0", " layer 1", " layer 2"], lines
    assert len(resumed) == len(clean)
    for a, b in zip(clean, resumed):
        assert np.array_equal(a, b)
    assert [s["layer"] for s in stats] == [0, 1, 2]
    assert stats[0].get("from_checkpoint") and not stats[1].get("from_checkpoint")


def test_acrq_on_ray_train_matches_local_and_resumes(ray_session, tmp_path, monkeypatch):
    """ACRQ on 2 Ray Train workers: the codebooks of the local fit bit for bit, anchors
    frozen; a worker killed mid-fit resumes from the last of the 2L step checkpoints and
    ends with exactly the uninterrupted codebooks."""
    x = clustered(2400, 8, seed=13)
    head = np.random.default_rng(1).random(len(x)) < 0.5
    layers, anchors = [16, 8, 8], [4, 6, 6]
    cfg = small_config("unused", str(tmp_path), engine="ray", quantizer__method="acrq",
                       quantizer__layers=layers, quantizer__anchor_layers=anchors,
                       input__popularity_column="popularity", fit__num_workers=2,
                       fit__cpus_per_worker=0.5, fit__max_failures=2)
    split = split_sample(x, head, layers, anchors, seed=cfg.seed)
    local, _ = fit_acrq(x, head, layers, anchors, split, niter=cfg.quantizer.niter,
                        seed=cfg.seed)
    seeds = init_subset(x, 16, seed=0)
    clean, stats = fit_on_ray_train(x, seeds, cfg, quiet, f"file://{tmp_path}/clean", acrq=split)
    assert len(clean) == len(local) == len(layers)
    for a, b in zip(local, clean):
        assert np.array_equal(a, b)
    assert [s["anchors"] for s in stats] == anchors
    marker = tmp_path / "worker-died"
    monkeypatch.setenv("SEMID_FAULT", "train_worker")
    monkeypatch.setenv("SEMID_FAULT_MARKER", str(marker))
    resumed, _ = fit_on_ray_train(x, seeds, cfg, quiet, f"file://{tmp_path}/resumed",
                                  acrq=split)
    assert marker.exists()
    assert len(resumed) == len(clean)
    for a, b in zip(clean, resumed):
        assert np.array_equal(a, b)


_TRAIN_ACTORS_PROBE = """
import numpy as np, os, ray, sys
from semid_dist.config import parse_config
from semid_dist.engines import make_engine
root = sys.argv[1]
cfg = parse_config({"engine": "ray", "input": {"path": root}, "output": {"root": root},
                    "quantizer": {"layers": [4, 4], "niter": 2},
                    "fit": {"num_workers": 1, "cpus_per_worker": 1},
                    "ray": {"num_cpus": 2, "object_store_memory_mb": 128}})
x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
with make_engine(cfg, log=lambda msg: None) as engine:
    engine.fit(x, x, cfg, lambda msg: None, root + "/staging")
    print(sorted({a["ActorClassName"] for a in ray._private.state.actors().values()}))
print(os.environ.get("RAY_AUTH_MODE"))  # (after the engine's Ray stopped)
"""


@pytest.mark.parametrize("user_value", [None, "1"])
def test_embedded_ray_fit_starts_no_preemption_watcher(tmp_path, user_value):
    """On the engine's own Ray (one node: this machine) Ray Train starts no preemption
    watcher, whose start-up competed with the first layer for the CPUs; a user who sets
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER keeps their choice. The RAY_AUTH_MODE the embedded
    Ray set is taken back as it stops (a later attach in the process was refused by a
    token cluster); one the user set stays."""
    if user_value == "1" and importlib.util.find_spec(
            "ray.train.v2._internal.callbacks.preemption_callback") is None:
        pytest.skip("this Ray's Train has no preemption watcher")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_AUTH_MODE")}
    if user_value is not None:
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = user_value
        env["RAY_AUTH_MODE"] = "disabled"
    out = subprocess.run([sys.executable, "-c", _TRAIN_ACTORS_PROBE, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    actors, auth = out.stdout.strip().splitlines()[-2:]
    assert "TrainController" in actors, out.stderr[-2000:]  # the fit ran on Ray Train
    assert ("PreemptionWatcher" in actors) == (user_value == "1"), actors
    assert auth == ("None" if user_value is None else "disabled")


def test_ray_settings_it_cannot_start_or_fit_with_are_one_line_errors(tmp_path):
    """An object store larger than the machine, an address Ray cannot use as written (an
    HTTP one here; a Ray Client one: `test_a_ray_client_address_without_ray_client_...`),
    and a fit taking more CPUs than this machine's Ray has (Ray Train waited for them
    forever, and Ctrl-C hung in its abort): one line each naming the keys, status 2, nothing
    written."""
    catalog = tmp_path / "catalog.parquet"
    write_catalog(catalog, clustered(200, 8, seed=0))
    out = tmp_path / "out"
    env = without_ray_address()
    paths = (f"input.path={catalog}", f"output.root={out}", "quantizer.layers=[8,4]",
             "fit.sample_size=200", "ray.num_cpus=2")
    demo = REPO / "conf" / "demo.yaml"
    last = named_error(cli_build(demo, *paths, "ray.object_store_memory_mb=10000000", env=env,
                                 timeout=120))
    assert last.startswith("semid build: error: ray.num_cpus / ray.object_store_memory_mb: Ray "
                           "cannot start here with 2 CPUs and ray.object_store_memory_mb="
                           "10000000 (") and last.endswith("; lower them")
    assert named_error(cli_build(demo, *paths, "ray.address=http://127.0.0.1:8265", env=env,
                                 timeout=120)) == (
        f"semid build: error: {demo} with override ray.address=http://127.0.0.1:8265: "
        "ray.address: 'http://127.0.0.1:8265' is an HTTP address (the Ray dashboard's, which "
        "`ray job submit --address` takes): give the cluster's own address as `ray start "
        "--head` prints it (HOST:6379), or auto inside a job submitted to it")
    session = ray_session_dir()  # the fit's CPUs are checked before Ray starts, dry or not
    for dry in ([], ["--dry-run"]):
        last = named_error(cli_build(demo, *paths, "fit.num_workers=8", *dry, env=env,
                                     timeout=180))
        assert last == ("semid build: error: fit.num_workers=8 x fit.cpus_per_worker=0.5 take "
                        "4 CPUs but the Ray cluster has 2: Ray Train would wait for them "
                        "forever; lower fit.num_workers or fit.cpus_per_worker, or raise "
                        "ray.num_cpus")
    assert ray_session_dir() == session and not out.exists()


def test_a_ray_build_prints_its_own_progress_not_ray_internals(small_catalog, tmp_path):
    """A CLI build on Ray with a rejected row: no Ray Data progress report (a dozen lines
    every few seconds per dataset), no Ray Train line per worker report, no warning a second
    of the fit from Ray Train's placement-group cleaner (the State API it asks is the
    dashboard's, which the embedded Ray runs without), no Arrow conversion warning for the
    shard results of shards with rejects; the rejects and the data equal the local
    engine's."""
    catalog = tmp_path / "cat"
    x = clustered(1200, 8, seed=3)
    x[7] = np.nan
    write_catalog(catalog, x, files=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "engine": "ray", "seed": 1, "input": {"path": str(catalog)},
        "output": {"root": str(tmp_path / "out"), "table": "sids"},
        "quantizer": {"layers": [8, 4], "niter": 4}, "fit": {"sample_size": 600},
        "encode": {"shard_rows": 300}, "ray": {"num_cpus": 2}}))
    env = without_ray_address()
    run = cli_build(cfg, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in ("logging_progress", "Running Dataset", "Reporting training result",
                  "ArrowConversionError", "Started training worker group",
                  "Failed to query Ray Train Controller actor state"):  # (the State API's)
        assert noise not in run.stderr, noise
    assert "encode: 4/4 shards" in run.stderr
    # the fit's layers, relayed from Ray Train's first worker, then its end
    fit = [line.split("] ", 1)[1] for line in run.stderr.splitlines() if "] fit: " in line]
    assert [m.split(":")[1] for m in fit[1:]] == [" layer 0", " layer 1", " done on Ray Train,"
                                                  " 2 layers"], fit
    store = TableStore(str(tmp_path / "out"), "sids")
    assert cli_build(cfg, "engine=local", "encode.from_version=latest").returncode == 0
    ray_version, local_version = store.versions()
    for kind in ("data", "rejects"):
        a, b = (store.read_data(v, kind) for v in (ray_version, local_version))
        assert a.num_rows == (1199 if kind == "data" else 1)
        assert a.sort_by("item_id").equals(b.sort_by("item_id")), kind



_ANOTHER_RAY = """
import sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False,
         object_store_memory=80 * 2**20, configure_logging=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test lets go
"""


def test_a_ray_build_beside_another_ray_asks_its_own(small_catalog, tmp_path):
    """Another Ray on the machine (a second build, a notebook's): Ray Train's placement-group
    cleaner, asking Ray's State API without an address, found two and died with a
    ConnectionError traceback on the build's console (or asked the other one, where `ray
    start` had recorded it); each worker of the embedded Ray now names its own, and the
    build's console holds its own lines only."""
    other = subprocess.Popen([sys.executable, "-c", _ANOTHER_RAY], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=without_ray_address())
    try:
        other_address = other.stdout.readline().strip()
        assert other_address, "the other Ray did not start"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({
            "engine": "ray", "seed": 1, "input": {"path": small_catalog[0]},
            "output": {"root": str(tmp_path / "out"), "table": "sids"},
            "quantizer": {"layers": [8, 4], "niter": 4}, "fit": {"sample_size": 600},
            "ray": {"num_cpus": 2}}))
        run = cli_build(cfg, env=without_ray_address())
    finally:
        other.communicate(input="", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in ("Traceback", "Exception in thread", "Found multiple active Ray instances",
                  other_address):
        assert noise not in run.stderr, (noise, run.stderr[-3000:])


def test_an_error_of_processes_ray_lost_is_one_line_saying_what_to_do(ray_session, capsys):
    """A build whose Ray lost the processes it ran on (its cluster stopped during the fit: a
    ~60-line traceback ending in Ray's ActorUnavailableError) ends in one line quoting Ray's
    first line, saying nothing was committed and that the same command goes on: here Ray's
    own error of an actor whose worker process was killed, raised from inside the command as
    the fit's would be."""
    from semid_dist.cli import _run

    @ray_session.remote(num_cpus=0)
    class Worker:
        def pid(self) -> int:
            return os.getpid()

    worker = Worker.remote()
    os.kill(ray_session.get(worker.pid.remote()), 9)

    def command() -> int:
        try:
            ray_session.get(worker.pid.remote(), timeout=60)
        except Exception as exc:
            raise RuntimeError("the fit failed") from exc
        return 0

    assert _run("semid build", command, exiting=False, committed=lambda: None) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(r"semid build: error: Ray lost processes the build ran on \((ActorDied|"
                        r"ActorUnavailable)Error: .+\): the cluster or one of its nodes stopped, "
                        r"or a worker process died; .* run the same command \(it goes on from "
                        r"the shards this run finished\); nothing was committed\n", err), err
    with pytest.raises(ZeroDivisionError):  # an error no line names keeps its traceback
        _run("semid build", lambda: 1 // 0, exiting=False)
    # no lost process: an actor whose constructor raised (its traceback names the cause),
    # and a task's CUDA out-of-memory (Ray's wrapper subclasses torch's OutOfMemoryError)
    import torch
    from ray.exceptions import RayTaskError

    from semid_dist.cli import _ray_lost_line

    @ray_session.remote(num_cpus=0)
    class Broken:
        def __init__(self) -> None:
            raise ValueError("encode.use_gpu=true but torch sees no CUDA device")

        def pid(self) -> int:
            return os.getpid()

    with pytest.raises(Exception) as died:
        ray_session.get(Broken.remote().pid.remote(), timeout=60)
    assert type(died.value).__name__ == "ActorDiedError" and (
        _ray_lost_line(died.value, None) is None)
    try:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.OutOfMemoryError as oom:
        wrapped = RayTaskError("encode", "torch.OutOfMemoryError", oom).as_instanceof_cause()
    assert isinstance(wrapped, torch.OutOfMemoryError) and _ray_lost_line(wrapped, None) is None


def test_auto_with_several_rays_on_the_machine_and_none_recorded_is_refused(tmp_path):
    """`ray.address=auto` where several Rays run (two other processes' embedded ones here)
    and no `ray start` recorded one in Ray's temporary folder: Ray joined any one of them
    (one build ran on another process's Ray, without a word); a config error naming them,
    in the dry run and the build, nothing written."""
    others = [subprocess.Popen([sys.executable, "-c", _ANOTHER_RAY], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=without_ray_address())
              for _ in range(2)]
    try:
        addresses = [other.stdout.readline().strip() for other in others]
        assert all(addresses), "the other Rays did not start"
        catalog = tmp_path / "catalog.parquet"
        write_catalog(catalog, clustered(50, 8, seed=0))
        out = tmp_path / "out"
        env = without_ray_address()
        env["RAY_TMPDIR"] = str(tmp_path / "ray")  # (no cluster recorded there)
        for extra in (("--dry-run",), ()):
            run = cli_build(REPO / "conf" / "demo.yaml", *extra, f"input.path={catalog}",
                            f"output.root={out}", "ray.address=auto", env=env, timeout=120)
            last = named_error(run)
            assert run.returncode == 2 and last.startswith("semid build: error: ray.address=auto: "
                                                           ), run.stderr[-2000:]
            assert "Ray instances run on this machine" in last and all(
                a in last for a in addresses), last
            assert last.endswith("set ray.address to the cluster's host:port (the address "
                                 "`ray start` printed)"), last
        assert not out.exists()
    finally:
        for other in others:
            other.communicate(input="", timeout=120)


def _ray_start(env: dict[str, str], port: int) -> None:
    """`ray start --head` of a cluster of 2 CPUs at `port`, with `env` (its HOME and
    RAY_TMPDIR: its token and its record of the cluster)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    run = subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2",
                          "--object-store-memory=100000000", "--include-dashboard=false"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def _kill_cluster(folder: str) -> None:
    """Kill every process whose command line or environment names `folder` (the cluster's
    session folder is below it, and its workers, named `ray::...`, inherit its RAY_TMPDIR):
    never `ray stop`, which stops every Ray of the machine."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if any(folder.encode() in Path(f"/proc/{pid}/{part}").read_bytes()
                   for part in ("cmdline", "environ")) and int(pid) != os.getpid():
                os.kill(int(pid), 9)


@pytest.mark.parametrize("token_at", ["after_start", "before_start"])
def test_an_attach_to_a_cluster_of_this_machine_takes_its_authentication(tmp_path, token_at):
    """A token written after a cluster started without one (any bare `ray.init()` writes
    ~/.ray/auth_token): Ray enabled tokens for `auto`, the cluster could not call this driver
    back, and the fit hung ~60 s and failed with a traceback. A cluster started with a
    token, given as the host:port `ray start` printed: Ray sends no token to an address
    given, and the cluster refused it. With RAY_AUTH_MODE unset, the driver now takes the
    mode of the head's process on this machine, and both builds commit."""
    folder = tempfile.mkdtemp(prefix="/tmp/semid-rt-")  # (short: Ray's socket paths)
    home = Path(folder, "home")
    (home / ".ray").mkdir(parents=True)
    env = {k: v for k, v in without_ray_address().items() if k != "RAY_AUTH_MODE"}
    env.update(HOME=str(home), RAY_TMPDIR=f"{folder}/t")
    token = home / ".ray" / "auth_token"
    from semid_dist.bench.moto import free_port

    port = free_port()
    try:
        if token_at == "before_start":
            token.write_text("b7" * 32)
        _ray_start(env, port)
        if token_at == "after_start":
            token.write_text("c3" * 32)
        catalog = tmp_path / "catalog.parquet"
        write_catalog(catalog, clustered(600, 8, seed=0))
        address = "auto" if token_at == "after_start" else f"127.0.0.1:{port}"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({
            "engine": "ray", "seed": 1, "input": {"path": str(catalog)},
            "output": {"root": str(tmp_path / "out"), "table": "sids"},
            "quantizer": {"layers": [8, 4], "niter": 4}, "fit": {"sample_size": 600},
            "ray": {"address": address}}))
        if token_at == "before_start":  # a driver without the token: refused in one line
            empty = Path(folder, "empty-home")
            empty.mkdir()
            last = named_error(cli_build(cfg, env={**env, "HOME": str(empty)}, timeout=300))
            assert last.startswith(f"semid build: error: ray.address={address}: the Ray "
                                   "cluster refused this driver's authentication "), last
            assert "set RAY_AUTH_MODE=token and give this driver the cluster's token" in last
        run = cli_build(cfg, env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert TableStore(str(tmp_path / "out"), "sids").latest() is not None
    finally:
        _kill_cluster(folder)
        shutil.rmtree(folder, ignore_errors=True)
