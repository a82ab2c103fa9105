"""Remote storage for real: an S3-compatible server (moto) on loopback, reached through plain
`s3://bucket/...` URLs with the endpoint and fake credentials in the environment, as a job
would get them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).

The environment is set when this module is imported (collection time), before any test
starts Ray: locally started Ray workers inherit the driver's environment as it is when Ray
starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from semid_dist.bench.moto import free_port, start_moto  # noqa: E402
from semid_dist.cli import main  # noqa: E402
from semid_dist.errors import ConfigError, InputError, StoreError  # noqa: E402
from semid_dist.io.fs import redact, redact_url  # noqa: E402
from semid_dist.io.store import MANIFEST, STAGING, TableStore  # noqa: E402
from semid_dist.pipeline import build  # noqa: E402
from tests.conftest import REPO, clustered, small_config, write_catalog  # noqa: E402

PORT = free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
ACCESS_KEY = f"AKIASEMID{uuid.uuid4().hex[:11].upper()}"
SECRET_KEY = f"semid-secret-{uuid.uuid4().hex}"
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)
os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                  AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=ENDPOINT)

REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP')


def quiet(msg: str) -> None:
    pass


@dataclass
class Moto:
    fs: s3fs.S3FileSystem
    log_path: Path

    def requests(self, bucket: str) -> list[tuple[str, str]]:
        """(method, path) of every request the server answered for `bucket`, in order."""
        text = self.log_path.read_text(errors="replace")
        return [(m, p) for m, p in REQUEST.findall(text)
                if p == f"/{bucket}" or p.startswith((f"/{bucket}/", f"/{bucket}?"))]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server as a subprocess on 127.0.0.1:PORT, stopped at the end of the session;
    its request log is kept to check what went over the wire."""
    log_path = tmp_path_factory.mktemp("moto") / "requests.log"
    proc = start_moto(PORT, log_path)
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        yield Moto(s3fs.S3FileSystem(), log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture()
def bucket(s3) -> str:
    name = f"semid-{uuid.uuid4().hex[:12]}"
    s3.fs.mkdir(name)
    return name


def upload_catalog(s3: Moto, local_dir: str, bucket: str, prefix: str = "catalog") -> str:
    for f in sorted(Path(local_dir).glob("*.parquet")):
        s3.fs.pipe_file(f"{bucket}/{prefix}/{f.name}", f.read_bytes())
    return f"s3://{bucket}/{prefix}"


def by_id(store: TableStore, version: str):
    return store.read_data(version).sort_by("item_id")


def check_commit_order(s3: Moto, bucket: str, table_prefix: str, version: str) -> None:
    """On the wire: every object of the version was PUT before its manifest, `_latest` after
    it, and no temporary (`.tmp-`) object was ever written (object stores have no rename).
    (The work files, `_staging`, are not the version's: the build's heartbeat renews its run
    file there until the commit returns, every 10 s.)"""
    reqs = s3.requests(bucket)
    assert not [p for _, p in reqs if ".tmp-" in p]
    vdir = f"/{bucket}/{table_prefix}/versions/{version}/"
    puts = [p for m, p in reqs if m == "PUT" and p.startswith(vdir)
            and not p.startswith(vdir + STAGING + "/")]
    assert puts[-1] == vdir + MANIFEST and puts.count(vdir + MANIFEST) == 1
    assert len(puts) > 5  # codebooks, data, metrics, report ... then the manifest
    order = [p for m, p in reqs if m == "PUT"]
    latest = f"/{bucket}/{table_prefix}/_latest"
    assert latest in order[order.index(vdir + MANIFEST):]


# -- the local engine on S3 -----------------------------------------------------------------

def test_catalog_and_table_on_s3(s3, bucket, small_catalog, tmp_path, capsys):
    local_catalog, x = small_catalog
    catalog = upload_catalog(s3, local_catalog, bucket)
    root = f"s3://{bucket}/tables"
    first = build(small_config(catalog, root), log=quiet)
    store = TableStore(root, "sids")
    assert isinstance(store.fs, s3fs.S3FileSystem)
    assert store.latest() == first.version_id == store.versions()[-1]
    assert s3.fs.cat_file(f"{bucket}/tables/sids/_latest").decode() == first.version_id
    m = store.manifest()
    assert m["rows"] == {"input": len(x), "encoded": len(x), "rejected": 0}
    assert m["input"]["url"] == catalog and m["config"]["output"]["root"] == root
    for entry in m["files"]:  # every listed object exists with its size
        assert s3.fs.size(f"{bucket}/tables/sids/versions/{first.version_id}/{entry['path']}") \
            == entry["bytes"]
    assert not s3.fs.exists(f"{bucket}/tables/sids/versions/{first.version_id}/_staging")
    check_commit_order(s3, bucket, "tables/sids", first.version_id)
    # the same table as the same catalog on local disk
    local_root = str(tmp_path / "local")
    local = build(small_config(local_catalog, local_root), log=quiet)
    assert by_id(store, first.version_id).equals(
        by_id(TableStore(local_root, "sids"), local.version_id))
    # encode.from_version=latest on S3: reuses the codebooks, records the parent; the
    # duplicate check and collision suffixes in buckets of 700 rows, through staging on S3
    logs: list[str] = []
    before = len(s3.requests(bucket))
    second = build(small_config(catalog, root, encode__from_version="latest",
                                driver__gather_rows=700), log=logs.append)
    # the reused codebooks are read once: checked before the version starts, then copied
    books = f"/{bucket}/tables/sids/versions/{first.version_id}/codebooks/"
    gets = [p for m, p in s3.requests(bucket)[before:] if m == "GET" and p.startswith(books)]
    assert sorted(gets) == sorted({*gets}) and len(gets) == 2, gets
    assert any("colliding items in" in m and "key ranges" in m for m in logs)
    assert any("ids for duplicates in" in m and "hash buckets" in m for m in logs)
    assert not s3.fs.exists(f"{bucket}/tables/sids/versions/{second.version_id}/_staging")
    assert store.latest() == second.version_id
    assert store.manifest(second.version_id)["parent"] == first.version_id
    assert second.metrics["fit"]["codebooks_from"] == first.version_id
    assert by_id(store, second.version_id).equals(by_id(store, first.version_id))
    check_commit_order(s3, bucket, "tables/sids", second.version_id)
    # `semid versions list` on the S3 table
    capsys.readouterr()
    assert main(["versions", "list", "--root", root, "--table", "sids", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version_id"] for v in listed] == [first.version_id, second.version_id]
    assert [v["latest"] for v in listed] == [False, True]
    assert not [o for o in s3.fs.find(bucket) if ".tmp-" in o]


def test_failed_build_on_s3_writes_no_manifest(s3, bucket, tmp_path):
    good = upload_catalog(s3, write_catalog(tmp_path / "good", clustered(900, 8, seed=1)),
                          bucket, "good")
    x = clustered(900, 8, seed=2)
    x[::10, 0] = float("nan")  # 10% bad rows > max_reject_fraction 1%
    bad = upload_catalog(s3, write_catalog(tmp_path / "bad", x), bucket, "bad")
    root = f"s3://{bucket}/tables"
    over = {"quantizer__layers": [8, 4], "fit__sample_size": 900}
    first = build(small_config(good, root, **over), log=quiet)
    with pytest.raises(InputError, match="max_reject_fraction"):
        build(small_config(bad, root, **over), log=quiet)
    store = TableStore(root, "sids")
    assert store.versions() == [first.version_id] and store.latest() == first.version_id
    failed = [v for v in store.version_dirs() if v != first.version_id]
    assert len(failed) == 1
    objects = s3.fs.find(f"{bucket}/tables/sids/versions/{failed[0]}")
    assert any("/codebooks/" in o for o in objects) and any("/rejects/" in o for o in objects)
    assert not [o for o in objects if o.endswith(MANIFEST)]  # data without a manifest
    with pytest.raises(StoreError, match="is not committed"):
        store.resolve(failed[0])
    assert not [p for _, p in s3.requests(bucket) if ".tmp-" in p]


# -- credentials ------------------------------------------------------------------------------

def assert_clean(blobs: dict[str, bytes], markers: list[str]) -> None:
    for name, data in blobs.items():
        for marker in markers:
            assert marker.encode() not in data, f"{marker!r} found in {name}"


def table_objects(s3: Moto, prefix: str) -> dict[str, bytes]:
    objects = s3.fs.find(prefix)
    assert objects
    return {o: s3.fs.cat_file(o) for o in objects}


def test_credentials_never_reach_outputs_or_logs(s3, bucket, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    x = clustered(900, 8, seed=4)
    x[5, 0] = float("nan")  # one reject row: the rejects table names its source file
    catalog = upload_catalog(s3, write_catalog(tmp_path / "cat", x), bucket)
    root = f"s3://{bucket}/tables"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": catalog},
                               "output": {"root": root},
                               "quantizer": {"layers": [8, 4], "niter": 4},
                               "fit": {"sample_size": 900}}))
    assert main(["build", "--config", str(cfg)]) == 0
    assert main(["versions", "show", "--root", root, "--table", "sids", "--json"]) == 0
    out, err = capfd.readouterr()
    assert "version" in out and "[semid" in err
    markers = [SECRET_KEY, ACCESS_KEY]
    assert_clean({"stdout": out.encode(), "stderr": err.encode(),
                  "log records": caplog.text.encode()}, markers)
    blobs = table_objects(s3, f"{bucket}/tables")
    assert any(k.endswith(MANIFEST) for k in blobs) and any("/rejects/" in k for k in blobs)
    assert_clean(blobs, markers)


def test_credentials_inside_an_s3_url_are_refused_without_echoing_them(s3, bucket, tmp_path,
                                                                        capfd):
    catalog = upload_catalog(s3, write_catalog(tmp_path / "cat", clustered(300, 4)), bucket)
    leaky = catalog.replace("s3://", f"s3://{ACCESS_KEY}:{SECRET_KEY}@")
    with pytest.raises(ConfigError, match=r"s3://\*\*\*@semid-.*: s3:// URLs take no "
                                          r"credentials .*AWS_ACCESS_KEY_ID") as exc:
        build(small_config(leaky, f"s3://{bucket}/tables"), log=quiet)
    assert_clean({"error": str(exc.value).encode()}, [SECRET_KEY, ACCESS_KEY])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": catalog},
                               "output": {"root": f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket}/t"}}))
    assert main(["build", "--config", str(cfg)]) == 2
    out, err = capfd.readouterr()
    assert "s3:// URLs take no credentials" in err
    assert_clean({"stdout": out.encode(), "stderr": err.encode()}, [SECRET_KEY, ACCESS_KEY])
    assert not s3.fs.exists(f"{bucket}/t")


def test_a_user_alone_in_a_bucket_url_is_refused_and_masked(s3, bucket, tmp_path, capfd):
    """`s3://KEY@bucket/x` (an access key id without its secret): refused as credentials,
    the key id masked in the error and in `semid validate`'s, as `KEY:SECRET@` is (it was
    botocore's ParamValidationError traceback, and the config's log line showed the key);
    `semid validate` refuses both forms, as a build does (it said `ok`)."""
    for user in (ACCESS_KEY, f"{ACCESS_KEY}:{SECRET_KEY}"):
        for key in ("input", "output"):
            url = f"s3://{user}@{bucket}/{key}"
            cfg = tmp_path / f"{key}.yaml"
            cfg.write_text(json.dumps({"input": {"path": url if key == "input" else "/c"},
                                       "output": {"root": url if key == "output" else "/o"}}))
            for argv in (["build", "--config", str(cfg)], ["validate", str(cfg)]):
                assert main(argv) == 2, argv
                out, err = capfd.readouterr()
                name = "input.path" if key == "input" else "output.root"
                assert err.strip().splitlines()[-1].endswith(
                    f"{name}: s3://***@{bucket}/{key}: s3:// URLs take no credentials (they "
                    "would end up in logs and manifests); remove the user info ('KEY:SECRET@' "
                    "or 'KEY@') and give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a "
                    "profile (AWS_PROFILE) or the machine's role"), err
                assert_clean({"stdout": out.encode(), "stderr": err.encode()}, [ACCESS_KEY])
    assert not s3.fs.exists(f"{bucket}/output")
    # a chained URL's link (refused as credentials); a scheme in capitals (no file system
    # fsspec knows: the key is masked in that error too)
    for url in (f"simplecache::s3://{ACCESS_KEY}@{bucket}/c", f"S3://{ACCESS_KEY}@{bucket}/c"):
        with pytest.raises(ConfigError) as err:
            build(small_config(url, str(tmp_path / "o")), log=quiet)
        assert ACCESS_KEY not in str(err.value) and "***@" in str(err.value), str(err.value)


def test_a_bucket_that_is_not_there_is_not_created(s3, bucket, tmp_path):
    """output.root in a bucket that does not exist: the build's first write fails, naming
    output.root, and no bucket is made (s3fs' makedirs made one: a typo became a bucket)."""
    catalog = upload_catalog(s3, write_catalog(tmp_path / "cat", clustered(300, 4)), bucket)
    missing = f"semid-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreError, match=rf"^output\.root 's3://{missing}/t': cannot write the "
                                         r"table 'sids' there \(.*\); point output\.root at a "
                                         r"folder or bucket this job can write to$"):
        build(small_config(catalog, f"s3://{missing}/t", quantizer__layers=[8, 4]), log=quiet)
    s3.fs.invalidate_cache()
    assert missing not in [b.rstrip("/") for b in s3.fs.ls("")]


def test_a_bucket_name_s3_does_not_allow_is_one_line(s3, bucket, tmp_path, capfd):
    """`s3://Bad_Bucket!/t`: the client refuses the request before sending it; one line,
    status 2, nothing committed (botocore's ParamValidationError traceback, status 1)."""
    catalog = upload_catalog(s3, write_catalog(tmp_path / "cat", clustered(300, 4)), bucket)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": catalog},
                               "output": {"root": "s3://Bad_Bucket!/t"},
                               "quantizer": {"layers": [8, 4]}}))
    assert main(["build", "--config", str(cfg)]) == 2
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"semid build: error: the object store's client refuses the request "
                        r"\(ParamValidationError: .*Invalid bucket name.*\); check the URL "
                        r"\(S3 bucket names: lowercase letters, digits, '\.' and '-'\); "
                        r"nothing was committed", last), last


def test_an_object_store_that_does_not_answer_is_one_line(bucket, tmp_path):
    """An endpoint where nothing listens (the catalog's, then the table's): one line
    naming the client's error and what to check, status 2 (botocore's
    EndpointConnectionError traceback, status 1); on a command that commits nothing, no
    word of a commit."""
    held = socket.socket()  # bound, not listening: refused for the test's whole length
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    cfg = tmp_path / "c.yaml"
    for catalog, root in (("s3://b/cat", str(tmp_path / "out")),
                          (write_catalog(tmp_path / "cat", clustered(300, 4)), "s3://b/t")):
        cfg.write_text(json.dumps({"engine": "local", "input": {"path": catalog},
                                   "output": {"root": root}, "quantizer": {"layers": [8, 4]}}))
        run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "build", "--config",
                              str(cfg)], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        if catalog.startswith("s3://"):
            assert re.fullmatch(r"semid build: error: input\.path 's3://b/cat' cannot be "
                                r"reached \(EndpointConnectionError: .*\); check its host "
                                r"and port, the network and the credentials", last), last
        else:
            assert re.fullmatch(r"semid build: error: the storage does not answer "
                                r"\(EndpointConnectionError: .*\); check its address \(s3://: "
                                r"AWS_ENDPOINT_URL, or the bucket's region\) and the network, "
                                r"then run the command again; nothing was committed", last), last
    run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "versions", "list", "--root",
                          "s3://b/t", "--table", "sids"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        "semid versions list: error: the storage does not answer (EndpointConnectionError: ")
    assert "committed" not in run.stderr
    held.close()


def test_an_option_the_s3_client_does_not_take_is_one_line(s3, bucket, tmp_path):
    """FSSPEC_S3 (or FSSPEC_S3_<KEY>) giving s3fs an option it hands on to a session that
    refuses it: one line naming the option, where it comes from and where botocore's settings
    go, status 2, for a table's and a catalog's storage (a TypeError traceback before, raised
    by the client's first request)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": f"s3://{bucket}/cat"},
                               "output": {"root": str(tmp_path / "out")},
                               "quantizer": {"layers": [8, 4]}}))
    for env, command in (({"FSSPEC_S3": '{"retries": 1}'},
                          ["versions", "list", "--root", f"s3://{bucket}/t", "--table", "sids"]),
                         ({"FSSPEC_S3_RETRIES": "1"}, ["build", "--config", str(cfg)])):
        run = subprocess.run([sys.executable, "-m", "semid_dist.cli", *command],
                             env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        name = " ".join(command[:2] if command[0] == "versions" else command[:1])
        assert re.fullmatch(
            rf"semid {name}: error: the s3:// file system does not take the option "
            r"'retries' that fsspec's configuration gives it \(TypeError: .*'retries'\); remove "
            r"it from FSSPEC_S3 \(or FSSPEC_S3_RETRIES\), or the files in FSSPEC_CONFIG_DIR; "
            r"botocore's settings go under \"config_kwargs\", as in \{.*\}"
            + ("; nothing was committed" if command[0] == "build" else ""), last), last
    assert not (tmp_path / "out").exists()


def test_storage_gone_under_a_build_names_the_version_it_resumes(tmp_path):
    """The object store's client saying the server went away inside a started build: one
    line, nothing committed, what to check, and the version the same command resumes; a
    builtin ConnectionError (a Ray or Spark connection's) is not taken for the storage's."""
    from botocore.exceptions import EndpointConnectionError

    from semid_dist.plan import storage_failures

    store = TableStore("s3://b/t", "sids")
    with pytest.raises(ConnectionResetError, match="^the driver went away$"):
        with storage_failures(store, ["20261206T000000000000Z-abcdef"]):
            raise ConnectionResetError("the driver went away")
    with pytest.raises(StoreError) as err:
        with storage_failures(store, ["20261206T000000000000Z-abcdef"]):
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    assert str(err.value) == (
        'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:1/b" '
        "(reading the catalog or writing the table s3://b/t/sids?); nothing was committed (the "
        "table's versions are as they were): check the storage's address (AWS_ENDPOINT_URL, or "
        "the bucket's region) and the network, then run the same command again (it resumes "
        "version 20261206T000000000000Z-abcdef)")


@pytest.mark.engine
def test_storage_gone_during_a_ray_train_fit_is_one_line(tmp_path):
    """The object store gone while Ray Train fits (its workers write the fit's progress and
    output there): one line naming the client's error and the version the same command
    resumes, status 2. Ray Train hands the driver its workers' errors as text only: the
    build ended with Ray Train's traceback, status 1 (its progress thread on the driver
    also raised in its thread)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = start_moto(port, tmp_path / "moto.log")
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("gone")
        for f in sorted(Path(write_catalog(tmp_path / "cat", clustered(3000, 16, seed=9),
                                           files=2)).glob("*.parquet")):
            fs.pipe_file(f"gone/catalog/{f.name}", f.read_bytes())
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({
            "engine": "ray", "input": {"path": "s3://gone/catalog"},
            "output": {"root": "s3://gone/t"}, "ray": {"num_cpus": 2},
            "quantizer": {"layers": [64, 32, 32], "niter": 400},
            "fit": {"sample_size": 3000, "max_failures": 0}}))
        env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
        build_proc = subprocess.Popen([sys.executable, "-m", "semid_dist.cli", "build",
                                       "--config", str(cfg)], env=env, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO)
        err = ""
        for line in build_proc.stderr:  # the fit started: the storage goes
            err += line
            if "fit: Ray Train" in line:
                moto.kill()
                break
        err += build_proc.communicate(timeout=300)[1]
    finally:
        moto.kill()
        moto.wait()
    assert build_proc.returncode == 2 and "Traceback" not in err, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"semid build: error: EndpointConnectionError: Could not connect to the endpoint URL: "
        r'"http://127\.0\.0\.1:\d+/gone/t/sids/versions/\S+" \(raised in a Ray task\) '
        r"\(reading the catalog or writing the table s3://gone/t/sids\?\); nothing was "
        r"committed \(the table's versions are as they were\): check the storage's address "
        r".* \(as Ray's workers see it\), then run the same command again \(it "
        r"resumes version \S+\)", last), last


@pytest.mark.engine
def test_storage_failures_in_a_ray_task_are_the_tasks_own_error_in_one_line(ray_session):
    """A no-answer or no-credentials error raised in a Ray task reaches the driver inside
    Ray's wrapper, whose text is the task's whole traceback (ANSI colours, ~10 kB in a Ray
    Data stage): the line names the task's own error, that a Ray task raised it (on a
    cluster, in its nodes' environment), and the version the same command resumes."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from semid_dist.plan import storage_failures

    ray = ray_session

    @ray.remote(max_retries=0)
    def task(kind: str) -> None:
        if kind == "gone":
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
        raise NoCredentialsError()

    store, vid = TableStore("s3://b/t", "sids"), "20261206T000000000000Z-abcdef"
    for kind in ("gone", "credentials"):
        with pytest.raises(StoreError) as err:
            with storage_failures(store, [vid]):
                ray.get(task.remote(kind))
        said = str(err.value)
        assert "Traceback" not in said and "\x1b" not in said and len(said) < 700, said
        assert said.endswith(f", then run the same command again (it resumes version {vid})")
        if kind == "gone":
            assert said.startswith(
                'EndpointConnectionError: Could not connect to the endpoint URL: "http://'
                '127.0.0.1:1/b" (raised in a Ray task) (reading the catalog or writing the '
                "table s3://b/t/sids?); nothing was committed (the table's versions are as they "
                "were): check the storage's address (AWS_ENDPOINT_URL, or the bucket's region) "
                "and the network (as Ray's workers see it)"), said
        else:
            assert said.startswith(
                "no credentials for the object store (NoCredentialsError: Unable to locate "
                "credentials) (raised in a Ray task) (reading the catalog or writing the table "
                "s3://b/t/sids?); nothing was committed (the table's versions are as they "
                "were): give Ray's workers credentials for the object store: on a cluster, an "
                "instance role or the nodes' environment, or env_vars passed with the job (ray "
                "job submit --runtime-env-json '{\"env_vars\": {...}}'); an embedded Ray's "
                "workers read this environment as Ray starts: set them here (s3://: "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE), then run"), said


def test_a_fits_storage_failure_is_found_among_its_workers_errors_and_only_it():
    """Ray Train's error holds each failed worker's own error (`worker_failures`): the
    lowest rank's no-answer error is the fit's (the others' may be what its going broke);
    none where no worker's is one. The workers' log of a traceback is left out only where
    its error, on its last line, is a storage's no-answer; a named error is not taken for
    the storage's, even one raised from a client's error."""
    from botocore.exceptions import EndpointConnectionError
    from ray.train import WorkerGroupError

    from semid_dist.engines.ray_train import _no_storage_tracebacks, _storage_gone
    from semid_dist.errors import SemidError
    from semid_dist.plan import storage_failures

    gone = EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b")
    broken = RuntimeError("Connection closed by peer")  # (gloo's, on the other worker)
    assert _storage_gone(WorkerGroupError("...", {1: gone, 0: broken})) is gone
    assert _storage_gone(WorkerGroupError("...", {0: broken})) is None
    assert _storage_gone(RuntimeError("not Ray Train's")) is None

    def kept(text: str) -> bool:
        return _no_storage_tracebacks(logging.LogRecord("ray", logging.ERROR, "f", 1, text,
                                                        None, None))

    trace = "Error in training function:\nTraceback (most recent call last):\n  ...\n"
    assert not kept(trace + f"botocore.exceptions.EndpointConnectionError: {gone}\n")
    assert kept(trace + "ValueError: a bug\n")
    assert kept(f"EndpointConnectionError: {gone}\n\nDuring handling ...\nTypeError: a bug")
    store = TableStore("s3://b/t", "sids")
    with pytest.raises(SemidError, match="^the staged result of shard 3 cannot be read$"):
        with storage_failures(store, ["20261206T000000000000Z-abcdef"]):
            raise SemidError("the staged result of shard 3 cannot be read") from gone


def test_storage_gone_after_the_manifest_says_the_version_stands(s3, bucket, tmp_path,
                                                                 monkeypatch):
    """The server gone between the manifest and `_latest` (a fault injected in place of
    `advance_latest`): the version is committed, and the error says so, not that nothing
    was (what `plan.storage_failures` said of any such error)."""
    from botocore.exceptions import EndpointConnectionError

    catalog = upload_catalog(s3, write_catalog(tmp_path / "cat", clustered(300, 4)), bucket)
    root = f"s3://{bucket}/t"

    def gone(self, version_id, expect=None):
        raise EndpointConnectionError(endpoint_url=ENDPOINT)

    monkeypatch.setattr(TableStore, "advance_latest", gone)
    with pytest.raises(StoreError, match=r"^version (\S+) is committed, but _latest was not "
                                         r"moved \(EndpointConnectionError: ") as err:
        build(small_config(catalog, root, quantizer__layers=[8, 4]), log=quiet)
    vid = re.match(r"^version (\S+) ", str(err.value)).group(1)
    monkeypatch.undo()
    assert TableStore(root, "sids").versions() == [vid]


def test_an_object_store_catalogs_files_are_named_by_their_urls(s3, bucket, tmp_path):
    """The rejects' source_file and a catalog error name an s3:// file by its URL (they gave
    fsspec's path, `bucket/catalog/part-000.parquet`, which names no file)."""
    x = clustered(600, 8, seed=8)
    x[5, 2] = float("nan")
    url = upload_catalog(s3, write_catalog(tmp_path / "cat", x), bucket)
    root = f"s3://{bucket}/tables"
    cfg = small_config(url, root, quantizer__layers=[8, 4], fit__sample_size=500)
    res = build(cfg, log=quiet)
    rejects = TableStore(root, "sids").read_data(res.version_id, kind="rejects")
    assert rejects.column("source_file").to_pylist() == [f"{url}/part-000.parquet"]
    s3.fs.pipe_file(f"{bucket}/catalog/part-001.parquet", b"")
    with pytest.raises(InputError, match=re.escape(
            f"catalog file '{url}/part-001.parquet' is empty (0 bytes)")):
        build(cfg, log=quiet)


def test_an_object_stores_footers_are_read_at_once_in_the_files_order(s3, bucket, tmp_path):
    """On an object store the plan reads 16 footers at once, 64 ahead of itself: 150 small
    files plan in path order, each its own rows and row groups, as from a local copy; of two
    bad files the first in path order is named, though a thread reads the later first."""
    from semid_dist.io.catalog import plan_catalog

    local = tmp_path / "cat"
    local.mkdir()
    sizes = [1 + (i * 5) % 7 for i in range(150)]
    x = clustered(sum(sizes), 8, seed=3)
    ids = np.arange(sum(sizes), dtype=np.int64)
    start = 0
    for i, n in enumerate(sizes):
        pq.write_table(pa.table({"item_id": ids[start:start + n], "embedding":
                                 pa.FixedSizeListArray.from_arrays(
                                     pa.array(x[start:start + n].ravel()), 8)}),
                       local / f"part-{i:03d}.parquet", row_group_size=1 + i % 3)
        start += n
    url = upload_catalog(s3, str(local), bucket)
    plan, mine = plan_catalog(url, target_rows=20), plan_catalog(str(local), target_rows=20)
    facts = [[(p.path.rsplit("/", 1)[1], p.row_groups, p.num_rows) for p in s.pieces]
             for s in plan.shards]
    assert facts == [[(p.path.rsplit("/", 1)[1], p.row_groups, p.num_rows) for p in s.pieces]
                     for s in mine.shards]
    assert [f for s in facts for f, _, _ in s] == [f"part-{i:03d}.parquet" for i in range(150)]
    s3.fs.pipe_file(f"{bucket}/catalog/part-140.parquet", b"not parquet")
    s3.fs.pipe_file(f"{bucket}/catalog/part-100.parquet", b"PAR1" + b"x" * 200_000 + b"PAR1")
    with pytest.raises(InputError, match=re.escape(f"catalog file '{url}/part-100.parquet' is "
                                                   "not readable Parquet")):
        plan_catalog(url, target_rows=20)


def test_the_plan_benchmark_job_times_both_ways_on_one_catalog():
    """jobs/plan_bench.py starts its own moto server and proxy, plans the same catalog one
    footer at a time and 16 at once, and prints both times and their ratio."""
    run = subprocess.run([sys.executable, "jobs/plan_bench.py", "--files", "24",
                          "--latency-ms", "5"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    got = re.fullmatch(r"24 files \(1200 rows, 1 shard\(s\)\) on moto's S3 at 127\.0\.0\.1, "
                       r"5 ms a request: plan ([\d.]+) s reading one footer at a time, "
                       r"([\d.]+) s reading 16 at once \(([\d.]+)x; the best of two runs "
                       r"each\)", line)
    assert got, line
    one, many, ratio = map(float, got.groups())
    assert one > 0 and many > 0 and ratio == pytest.approx(one / many, rel=0.02)


def test_credentials_inside_an_http_catalog_url_are_redacted(s3, bucket, tmp_path, capfd):
    """fsspec's HTTP filesystem takes `user:password@` from the URL: the build works, and the
    manifest, every object, the rejects' source_file and the logs show `***` instead."""
    secret = f"url-secret-{uuid.uuid4().hex}"
    x = clustered(900, 8, seed=6)
    x[7, 1] = float("inf")
    upload_catalog(s3, write_catalog(tmp_path / "cat", x), bucket)
    url = f"http://reader:{secret}@127.0.0.1:{PORT}/{bucket}/catalog/part-000.parquet"
    root = f"s3://{bucket}/tables"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"engine": "local", "input": {"path": url},
                               "output": {"root": root},
                               "quantizer": {"layers": [8, 4], "niter": 4},
                               "fit": {"sample_size": 900}}))
    assert main(["build", "--config", str(cfg), "--json"]) == 0
    out, err = capfd.readouterr()
    store = TableStore(root, "sids")
    m = store.manifest()
    shown = f"http://***@127.0.0.1:{PORT}/{bucket}/catalog/part-000.parquet"
    assert m["input"]["url"] == shown and m["config"]["input"]["path"] == shown
    assert m["rows"] == {"input": 900, "encoded": 899, "rejected": 1}
    assert store.read_data(kind="rejects").column("source_file").to_pylist() == [shown]
    assert_clean({"stdout": out.encode(), "stderr": err.encode(),
                  **table_objects(s3, f"{bucket}/tables")}, [secret, SECRET_KEY, ACCESS_KEY])


@pytest.mark.parametrize("url, shown", [
    ("s3://AKIAX:wJal/K7+q@bucket/cat", "s3://***@bucket/cat"),
    ("ftp://user:pw@host:21/a/b.parquet", "ftp://***@host:21/a/b.parquet"),
    ("simplecache::s3://k:s@b/p", "simplecache::s3://***@b/p"),
    ("https://h/x?X-Amz-Credential=AKIA%2F1&versionId=3&X-Amz-Signature=ab",
     "https://h/x?X-Amz-Credential=***&versionId=3&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c/x?sv=2020&sig=zz",
     "https://acct.blob.core.windows.net/c/x?sv=2020&sig=***"),
    ("'https://h/x?X-Amz-Signature=ab' does not exist", "'https://h/x?X-Amz-Signature=***' "
     "does not exist"),  # a message quoting the URL keeps its closing quote
    ("abfs://container@account.dfs.core.windows.net/x", None),  # a container, no secret
    ("s3://bucket/images/a@2x/cat.parquet", None),
    ("s3://AKIAUSERONLY@bucket/x", "s3://***@bucket/x"),  # a bucket holds no '@': a user
    ("gs://user@bucket/x and s3a://k@b/y", "gs://***@bucket/x and s3a://***@b/y"),
    ("ftp://anonymous@host/x", None),
    ("/data/catalog", None),
])
def test_redact_url(url, shown):
    assert redact_url(url) == (shown or url)
    assert redact({"a": [url, {"b": (url,)}], "n": 3}) == {
        "a": [shown or url, {"b": (shown or url,)}], "n": 3}


def test_a_catalog_server_that_does_not_answer_is_a_named_error():
    """An FTP or HTTP catalog on a port where nothing listens: one line naming input.path
    without its password (a ConnectionRefusedError traceback; HTTP's said "does not
    exist")."""
    from semid_dist.io.catalog import plan_catalog

    with pytest.raises(InputError, match=r"input.path 'ftp://\*\*\*@127.0.0.1:1/cat' cannot be "
                                         r"reached \(ConnectionRefusedError: .*\); check its "
                                         r"host and port") as exc:
        plan_catalog("ftp://reader:pw-secret@127.0.0.1:1/cat")
    assert "pw-secret" not in str(exc.value)
    with pytest.raises(InputError, match=r"input.path 'http://\*\*\*@127.0.0.1:1/c.parquet' "
                                         r"cannot be reached \(ConnectionRefusedError"):
        plan_catalog("http://reader:pw-secret@127.0.0.1:1/c.parquet")  # ("does not exist")


@pytest.mark.parametrize("url, advice", [("gs://k:s@b/c", "GOOGLE_APPLICATION_CREDENTIALS"),
                                         ("s3://k:s@b/c", "AWS_ACCESS_KEY_ID"),
                                         ("file://u:p@/tmp/c", "give none: none are needed")])
def test_credentials_in_a_url_get_the_advice_of_its_file_system(url, advice):
    from semid_dist.io.fs import resolve

    protocol = url.split(":", 1)[0]
    with pytest.raises(ConfigError, match=rf"{protocol}:// URLs take no credentials .*{advice}"):
        resolve(url)


# -- the Ray engine on S3 ---------------------------------------------------------------------

@pytest.mark.engine
def test_ray_engine_reads_and_writes_s3(s3, ray_session, bucket, small_catalog):
    ray = ray_session

    @ray.remote
    def worker_env() -> tuple[str | None, str | None]:
        return os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID")

    # local Ray workers inherit the driver's environment (as it was when Ray started)
    assert ray.get(worker_env.remote()) == (ENDPOINT, ACCESS_KEY)
    local_catalog, x = small_catalog
    catalog = upload_catalog(s3, local_catalog, bucket)
    root = f"s3://{bucket}/tables"
    fitted = build(small_config(catalog, root, engine="ray"), log=quiet)  # Ray Train fit too
    store = TableStore(root, "sids")
    assert store.latest() == fitted.version_id
    assert fitted.manifest["rows"] == {"input": len(x), "encoded": len(x), "rejected": 0}
    assert fitted.manifest["engine"] == "ray"
    check_commit_order(s3, bucket, "tables/sids", fitted.version_id)
    # same codebooks: the Ray engine writes exactly the local engine's table
    local = build(small_config(catalog, root, encode__from_version=fitted.version_id),
                  log=quiet)
    on_ray = build(small_config(catalog, root, engine="ray",
                                encode__from_version=fitted.version_id), log=quiet)
    assert by_id(store, on_ray.version_id).equals(by_id(store, local.version_id))
    assert store.latest() == on_ray.version_id
    check_commit_order(s3, bucket, "tables/sids", on_ray.version_id)
    assert not [o for o in s3.fs.find(bucket) if ".tmp-" in o]
