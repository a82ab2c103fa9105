"""`semid build --dry-run` / `semid encode --dry-run`: the checks a build makes before it
writes anything, what it would do (rows, dimension, codebooks, parent, a killed run it would
resume), and nothing written; a check that fails is the build's own error (status 2)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np

from semid_dist.io.store import TableStore
from tests.conftest import cli_build, clustered, ray_session_dir, semid_cli, write_catalog


def write_config(path: Path, catalog: str, root: Path) -> Path:
    path.write_text(json.dumps({
        "engine": "local", "seed": 5, "input": {"path": catalog},
        "output": {"root": str(root), "table": "sids"},
        "quantizer": {"layers": [16, 8, 8], "niter": 5}, "fit": {"sample_size": 1500},
        "encode": {"shard_rows": 500}}))
    return path


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def dry(*args: str) -> dict:
    run = semid_cli(*args, "--dry-run", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def test_a_dry_run_says_what_the_build_would_do_and_writes_nothing(small_catalog, tmp_path):
    catalog, x = small_catalog
    root = tmp_path / "out"
    cfg = write_config(tmp_path / "build.yaml", catalog, root)
    warm = semid_cli("build", "--config", str(cfg), "--dry-run", "fit.warm_start=parent")
    assert ("fit: fit.warm_start=parent but the table has no committed version yet; "
            "k-means++ init") in warm.stderr and "codebooks: fit new ones\n" in warm.stdout
    plan = dry("build", "--config", str(cfg))
    assert {k: plan[k] for k in ("rows", "files", "shards", "dim", "item_id_type", "latest",
                                 "codebooks", "incremental", "version", "parent", "engine")} == {
        "rows": len(x), "files": 2, "shards": 6, "dim": x.shape[1], "item_id_type": "int64",
        "latest": None, "codebooks": "fit", "incremental": False, "version": "new",
        "parent": None, "engine": "local"}
    assert not root.exists()  # not even the table's folder
    first = cli_build(cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    store = TableStore(str(root), "sids")
    vid = store.latest()
    before = files(root)
    text = semid_cli("encode", "--config", str(cfg), "--dry-run")
    assert text.returncode == 0, text.stderr[-2000:]
    assert f"codebooks: those of version {vid}" in text.stdout
    assert f"would:     commit a version with parent {vid}, on engine local" in text.stdout
    assert text.stdout.rstrip().endswith("nothing was written")
    delta = write_catalog(tmp_path / "delta", clustered(200, x.shape[1], seed=3),
                          ids=np.arange(50_000, 50_200))
    plan = dry("encode", "--config", str(cfg), "--incremental", f"input.path={delta}")
    assert (plan["rows"], plan["codebooks"], plan["parent"], plan["incremental"]) == (
        200, vid, vid, True)
    assert files(root) == before


def test_a_dry_run_fails_as_the_build_would_and_writes_nothing(small_catalog, tmp_path):
    catalog, x = small_catalog
    root = tmp_path / "out"
    cfg = write_config(tmp_path / "build.yaml", catalog, root)
    none_yet = semid_cli("encode", "--config", str(cfg), "--dry-run")
    assert none_yet.returncode == 2 and not root.exists(), none_yet.stderr
    last = none_yet.stderr.splitlines()[-1]
    assert last.startswith("semid encode: error: table ") and last.endswith(
        "has no committed version yet; run `semid build` first"), none_yet.stderr
    assert cli_build(cfg).returncode == 0
    before = files(root)
    wider = write_catalog(tmp_path / "wider", clustered(100, x.shape[1] + 4, seed=3),
                          ids=np.arange(50_000, 50_100))
    strings = write_catalog(tmp_path / "strings", clustered(100, x.shape[1], seed=3),
                            ids=np.array([f"sku-{i}" for i in range(100)]))
    for path, said in ((wider, f"embedding dim {x.shape[1] + 4} != codebook dim "
                               f"{x.shape[1]}"),
                       (strings, "the catalog's item ids are string but version")):
        run = semid_cli("encode", "--config", str(cfg), "--incremental", "--dry-run",
                        f"input.path={path}")
        assert run.returncode == 2 and said in run.stderr, run.stderr
    # a warm start from the parent is said; a table: input needs Spark, and Ray is not
    # started to say so; nor to find RAY_ADDRESS set without ray.address; a table under a
    # file cannot be written
    without_ray_address = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    text = semid_cli("build", "--config", str(cfg), "--dry-run", "fit.warm_start=parent")
    assert (f"codebooks: fit new ones, starting from version {store_latest(root)}'s "
            "(fit.warm_start)") in text.stdout, text.stderr
    assert f"fit: warm start from the codebooks of version {store_latest(root)}" in text.stderr
    for args, env, said in (
            (["engine=ray", "input.path=table:items"], None,
             "input.path='table:items' names a Spark catalog table; use engine: spark"),
            (["engine=ray"], {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"},
             "RAY_ADDRESS=127.0.0.1:9 is set (as for a `ray job submit` job) but ray.address "
             "is not"),
            ([f"output.root={cfg}/out"], None, f"output.root '{cfg}/out': cannot write the "
             "table 'sids' there ([Errno 20] Not a directory"),
            # auto where no cluster runs here: the build failed at once, the dry run passed
            *([(["engine=ray", "ray.address=auto"], without_ray_address,
                "ray.address=auto: could not connect to a Ray cluster from this machine "
                "(Could not find any running Ray instance")] if not _gcs_running() else [])):
        session = ray_session_dir()
        run = semid_cli("build", "--config", str(cfg), "--dry-run", *args, env=env)
        assert run.returncode == 2 and said in run.stderr.splitlines()[-1], run.stderr
        assert ray_session_dir() == session  # no Ray started
    assert files(root) == before



def _gcs_running() -> bool:
    """Whether a Ray cluster's GCS server runs on this machine (Ray's `auto` finds it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"gcs_server" in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def store_latest(root: Path) -> str:
    return TableStore(str(root), "sids").latest()


def test_a_dry_run_names_the_killed_run_the_build_would_resume(small_catalog, tmp_path):
    catalog, _ = small_catalog
    root = tmp_path / "out"
    cfg = write_config(tmp_path / "build.yaml", catalog, root)
    env = {**os.environ, "SEMID_FAULT": "reduce"}
    assert cli_build(cfg, env=env).returncode == -signal.SIGKILL
    store = TableStore(str(root), "sids")
    [killed] = store.uncommitted()
    before = files(root)
    plan = dry("build", "--config", str(cfg))
    assert plan["version"] == killed and plan["resuming"] and plan["latest"] is None
    text = semid_cli("build", "--config", str(cfg), "--dry-run")
    assert (f"resuming version {killed} (an unfinished run of this command: stopped or "
            "failed)") in text.stdout
    assert files(root) == before
    # another config is another run: a new version, and the dry run and the build say which
    # settings differ from the unfinished run's (a re-run with a lower encode.chunk_rows
    # after a kill for memory started afresh without a word)
    assert dry("build", "--config", str(cfg), "seed=6")["version"] == "new"
    other = semid_cli("build", "--config", str(cfg), "--dry-run", "seed=6",
                      "encode.chunk_rows=100")
    said = (f"plan: the unfinished run in version {killed} (stopped or failed) is not "
            "continued: its settings differ (encode.chunk_rows ")
    assert re.search(re.escape(said) + r"\d+ -> 100, seed \d+ -> 6\); a new version starts",
                     other.stderr), other.stderr
    built = cli_build(cfg, "seed=6")
    assert built.returncode == 0 and said[:-len("encode.chunk_rows ")] + "seed " in built.stderr
    # once a version is committed after the killed run started, it is not continued, and
    # the dry run says so as the build would
    run = semid_cli("build", "--config", str(cfg), "--dry-run", "--json")
    assert run.returncode == 0 and not json.loads(run.stdout)["resuming"]
    assert (f"plan: the unfinished run of this build in version {killed} is not continued"
            in run.stderr), run.stderr
