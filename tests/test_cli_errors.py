"""The `semid` command line on bad config files, bad options, a closed stdout and Ctrl-C: each
ends in one named line on stderr (status 2), never a traceback. Every test runs the real CLI
in a process of its own."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from semid_dist.cli import command_names
from semid_dist.io.store import TableStore
from tests.conftest import (
    REPO,
    clustered,
    corrupt_embedding_pages,
    named_error,
    write_catalog,
)
from tests.conftest import semid_cli as semid

GOOD = "input: {path: x}\noutput: {root: y}\n"
ENGINE = pytest.mark.engine  # (a test case that starts Ray or Spark)


def write(path: Path, body: str | bytes) -> str:
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return str(path)


def test_a_config_that_is_not_utf8_is_a_named_error(tmp_path):
    cfg = write(tmp_path / "c.yaml", b"\xff\xfe garbage")
    for run in (semid("validate", cfg), semid("build", "--config", cfg)):
        line = named_error(run)
        assert cfg in line and "UTF-8" in line and "0xff" in line, line
        assert "Traceback" not in run.stderr


def test_a_self_referencing_alias_is_a_named_error(tmp_path):
    cfg = write(tmp_path / "r.yaml", "a: &a [*a]\n")
    line = named_error(semid("validate", cfg))
    assert line.startswith(f"semid validate: error: {cfg}:1:") and "*a" in line, line
    assert "self-referencing" in line


def test_a_config_directory_is_named_as_a_directory(tmp_path):
    (tmp_path / "cfg").mkdir()
    write(tmp_path / "cfg" / "demo.yaml", GOOD)
    line = named_error(semid("build", "--config", str(tmp_path / "cfg")))
    assert "is a directory" in line and "does not exist" not in line, line
    assert "demo.yaml" in line  # the fix: name the file in it


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    cfg = write(tmp_path / "b.yaml", "input: [unclosed\n")
    run = semid("validate", cfg)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"semid validate: error: {cfg}:2:1: not valid YAML: expected")
    bad_value = semid("validate", write(tmp_path / "ok.yaml", GOOD))  # overrides: validate has
    assert bad_value.returncode == 0  # none, so check them through build
    run = semid("build", "--config", str(tmp_path / "ok.yaml"), "quantizer.layers=[1,")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "override quantizer.layers: cannot parse value" in run.stderr


def test_duplicate_keys_name_the_key_and_the_file(tmp_path):
    cfg = write(tmp_path / "d.yaml", "engine: local\n" + GOOD + "engine: ray\n")
    line = named_error(semid("validate", cfg))
    assert f"{cfg}:4:1:" in line and "duplicate key 'engine'" in line and "line 1" in line
    nested = write(tmp_path / "n.yaml", GOOD + "fit:\n  num_workers: 1\n  num_workers: 2\n")
    assert "duplicate key 'fit.num_workers'" in named_error(semid("build", "--config", nested))


def test_validate_checks_every_file_and_names_each_bad_one(tmp_path):
    good = write(tmp_path / "a.yaml", GOOD)
    bad = write(tmp_path / "bad.yaml", GOOD + "sed: 1\n")
    empty = write(tmp_path / "empty.yaml", "")
    a_list = write(tmp_path / "list.yaml", "- a\n- b\n")
    good2 = write(tmp_path / "c.yaml", GOOD)
    run = semid("validate", good, bad, empty, a_list, good2)
    assert run.returncode == 2
    assert run.stdout.splitlines() == [f"ok  {good}", f"ok  {good2}"]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 3 and all(x.startswith("semid validate: error: ") for x in lines)
    assert bad in lines[0] and "'sed'" in lines[0]
    assert empty in lines[1] and "missing required config key 'input'" in lines[1]
    assert a_list in lines[2] and "expected a mapping, got list" in lines[2]
    assert semid("validate", good, good2).returncode == 0
    # as `semid build` takes a config (it was a usage error), and with none a named one
    run = semid("validate", "--config", good, "--config", bad)
    assert run.returncode == 2 and run.stdout.splitlines() == [f"ok  {good}"]
    assert bad in run.stderr and "'sed'" in run.stderr
    assert named_error(semid("validate")) == (
        "semid validate: error: semid validate needs config files: semid validate FILE... (or "
        "--config FILE, as semid build takes it)")


def test_validate_refuses_a_fit_larger_than_the_embedded_ray_it_names(tmp_path):
    """A fit of more CPUs than the `ray.num_cpus` an embedded Ray is given: the dry run and
    the build refused it, validate said ok; a cluster's (`ray.address`) may grow: ok."""
    ray = "engine: ray\nray: {num_cpus: 1}\nfit: {num_workers: 4, cpus_per_worker: 1}\n"
    small = write(tmp_path / "small.yaml", GOOD + ray)
    line = named_error(semid("validate", small))
    assert line == (f"semid validate: error: {small}: fit.num_workers=4 x fit.cpus_per_worker=1 "
                    "take 4 CPUs but the Ray cluster has 1: Ray Train would wait for them "
                    "forever; lower fit.num_workers or fit.cpus_per_worker, or raise "
                    "ray.num_cpus"), line
    dry = named_error(semid("build", "--config", small, "--dry-run"))
    assert dry.endswith(line.split(f"{small}: ")[1]), dry
    cluster = write(tmp_path / "cluster.yaml", GOOD + ray.replace("num_cpus: 1",
                                                                  "num_cpus: 1, address: auto"))
    assert semid("validate", cluster).returncode == 0


@pytest.mark.parametrize("engine", ["spark", "ray"])
def test_a_missing_input_is_said_before_an_engine_starts(tmp_path, engine):
    """A mistyped input.path on Spark or Ray: its one line before the engine starts (on
    Spark it came after the JVM's start: ~5 s and its five lines)."""
    missing = tmp_path / "nope"
    cfg = write(tmp_path / "c.yaml", f"engine: {engine}\ninput: {{path: {missing}}}\n"
                                     f"output: {{root: {tmp_path / 'out'}}}\n")
    run = semid("build", "--config", cfg)
    lines = run.stderr.strip().splitlines()
    assert (run.returncode, lines[-1]) == (2, (
        f"semid build: error: input.path '{missing}' does not exist; point it at a Parquet "
        "file or a directory of Parquet files")), run.stderr
    assert all(line.startswith("[semid") for line in lines[:-1]), run.stderr  # none started


def test_the_spark_job_names_the_commands_it_runs():
    """`jobs/spark_build.py versions list ...`: the job runs build or encode; it said
    `semid build: error: ... required: --config`."""
    run = subprocess.run([sys.executable, "jobs/spark_build.py", "versions", "list", "--root",
                          "r", "--table", "t"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert (run.returncode, run.stderr) == (2, "spark_build.py: error: runs build or encode, "
                                               "not versions; run `semid versions ...` for "
                                               "that\n")
    spec = importlib.util.spec_from_file_location("spark_build", REPO / "jobs/spark_build.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    others = [c for c in command_names() if c not in ("build", "encode")]
    assert {"versions", "report", "validate", "bench"} <= set(others)
    for command in others:  # every other command of semid's parser, a new one too
        with pytest.raises(ValueError, match=f"runs build or encode, not {command}; "):
            job.spark_argv([command, "--help"])
    assert job.spark_argv(["encode", "--config", "c.yaml", "x=1"]) == [
        "encode", "--config", "c.yaml", "engine=spark", "x=1"]


def test_an_empty_path_option_is_refused():
    """`--root ''` read as the file system's root (`versions`) or the working directory
    (`report`), and `report --out ''` wrote into the working directory."""
    for command, flag in ((["versions", "list", "--root", "", "--table", "t"], "--root"),
                          (["report", "--root", "r", "--table", "t", "--out", ""], "--out"),
                          (["build", "--config", ""], "--config")):
        run = semid(*command)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines()[-1].endswith(
            f"error: argument {flag}: must not be empty"), run.stderr


def test_an_empty_version_is_refused_not_read_as_latest(tmp_path):
    """`encode.from_version=$VID` with VID unset encoded with latest's codebooks, and
    `versions show --version ''` showed latest, silently: an unset shell variable is not a
    version."""
    (tmp_path / "sids").mkdir()  # an empty table
    line = named_error(semid("versions", "show", "--root", str(tmp_path), "--table", "sids",
                             "--version", ""))
    assert "version '' is not a version id" in line, line
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{path: {tmp_path}/cat}}\noutput: {{root: {tmp_path}}}\n")
    for empty in ("encode.from_version=", "encode.from_version=''"):
        line = named_error(semid("encode", "--config", str(config), empty, "--dry-run"))
        assert "encode.from_version: expected a non-empty string, got ''" in line, line


def test_a_second_config_file_is_refused():
    """`semid build --config a.yaml --config b.yaml` ran on b.yaml alone, silently."""
    for command in ("build", "encode"):
        run = semid(command, "--config", "a.yaml", "--config", "b.yaml")
        assert run.returncode == 2 and run.stderr.splitlines()[-1] == (
            f"semid {command}: error: argument --config: given twice: a build reads one "
            "config file (give other settings as key=value overrides)"), run.stderr


def test_option_prefixes_are_refused_and_the_version_is_printed(tmp_path):
    """`semid build --dry` ran a whole build as `--dry-run`'s prefix would not: argparse
    took it for the option; now every command and job spells its options out."""
    from semid_dist import __version__

    run = semid("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"semid {__version__}", run
    for command in (["build", "--config", "c.yaml", "--dry"],
                    ["versions", "list", "--root", str(tmp_path), "--table", "t", "--js"],
                    ["bench", "--qu"]):
        run = semid(*command)
        assert run.returncode == 2 and "unrecognized arguments: --" in run.stderr, run.stderr
    job = subprocess.run([sys.executable, "jobs/merge_bench.py", "--shard", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert job.returncode == 2 and "unrecognized arguments: --shard" in job.stderr, job.stderr


def test_gc_min_age_hours_must_not_be_negative(tmp_path):
    (tmp_path / "sids").mkdir()  # an empty table
    for hours in ("-5", "nan"):
        line = named_error(semid("versions", "gc", "--root", str(tmp_path), "--table", "sids",
                                 "--keep", "1", "--min-age-hours", hours))
        assert "--min-age-hours" in line and ">= 0" in line, line


@pytest.mark.parametrize("action, options, named", [
    ("diff", ["--version", "latest"], "diff takes --from, --to, not --version"),
    ("show", ["--from", "latest"], "show takes --version, not --from"),
    ("list", ["--dry-run", "--keep", "0"], "list takes no option but --json, not --keep, "
                                           "--dry-run"),
    ("gc", ["--keep", "1", "--to", "latest"], "gc takes --keep, --min-age-hours, --dry-run, "
                                              "not --to")])
def test_an_option_of_another_versions_action_is_a_named_error(tmp_path, action, options,
                                                                named):
    """`semid versions diff --version V` compared latest with its parent, status 0: an
    option of another action was ignored."""
    (tmp_path / "sids").mkdir()  # an empty table
    line = named_error(semid("versions", action, "--root", str(tmp_path), "--table", "sids",
                             *options))
    assert named in line, line


def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status(tmp_path):
    (tmp_path / "sids").mkdir()  # an empty table: "(no committed versions)"
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` having exited
    try:
        run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "versions", "list",
                              "--root", str(tmp_path), "--table", "sids"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert run.returncode == 141 and run.stderr == "", run.stderr


def _blocked_writing_a_pipe(pid: int, timeout: float) -> bool:
    """Whether process `pid` comes to wait in a pipe write within `timeout` s (Linux's
    /proc/PID/wchan); the test is skipped where the system does not report it."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        try:
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            pytest.skip("/proc/PID/wchan cannot be read here")
        if "pipe_write" in wchan:  # anon_pipe_write too
            return True
        seen.add(wchan)
        time.sleep(0.05)
    if seen <= {"0", ""}:
        pytest.skip("/proc/PID/wchan reports no wait channel here")
    return False


def test_ctrl_c_after_the_commit_says_the_version_was_committed(tmp_path):
    """The summary's write blocks on a full stdout pipe, after `build` committed and
    returned; Ctrl-C then must not say that nothing was committed."""
    catalog = write_catalog(tmp_path / "cat", clustered(600, 8, seed=1))
    cfg = write(tmp_path / "c.yaml", yaml.safe_dump({
        "engine": "local", "input": {"path": catalog},
        "output": {"root": str(tmp_path / "out"), "table": "sids"},
        "quantizer": {"layers": [8, 4], "niter": 4}, "fit": {"sample_size": 300}}))
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:  # fill the pipe: the build's first write to stdout blocks
        while True:
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    proc = subprocess.Popen([sys.executable, "-m", "semid_dist.cli", "build", "--config", cfg],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO)
    os.close(write_end)
    watchdog = threading.Timer(180, proc.kill)  # a hang fails the test, not the suite
    watchdog.start()
    try:
        err = ""
        for line in proc.stderr:  # the pipeline's log, up to its commit line
            err += line
            if " committed in " in line:
                break
        assert " committed in " in err, err
        assert _blocked_writing_a_pipe(proc.pid, 60), "the summary's write did not block"
        proc.send_signal(signal.SIGINT)
        with os.fdopen(read_end, "rb") as out:  # drained: the process can flush and exit
            out.read()
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    versions = TableStore(str(tmp_path / "out"), "sids").versions()
    assert len(versions) == 1
    assert proc.returncode == 130, rest
    lines = rest.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"semid build: interrupted after version {versions[0]} was committed"), rest


def _small_build(tmp_path: Path, engine: str, rows: int) -> list[str]:
    """A small build's `semid build` command line, its catalog of `rows` items written (to
    `tmp_path`/out, table sids; Spark on local[1], 500-row shards)."""
    catalog = write_catalog(tmp_path / "cat", clustered(rows, 8, seed=2))
    cfg = write(tmp_path / "c.yaml", yaml.safe_dump({
        "engine": engine, "input": {"path": catalog}, "spark": {"master": "local[1]"},
        "output": {"root": str(tmp_path / "out"), "table": "sids"},
        "quantizer": {"layers": [16, 8], "niter": 4}, "fit": {"sample_size": 2000},
        "encode": {"shard_rows": 500}}))
    return [sys.executable, "-m", "semid_dist.cli", "build", "--config", cfg]


@pytest.mark.engine
def test_a_corrupt_file_on_local_spark_is_one_line(tmp_path):
    """A catalog file whose embedding pages are corrupt, on a Spark session the command starts
    in local mode: its one-line error, status 2 (the executor's `Exception in task` and the
    scheduler's `Lost task` printed ~60 lines of Python and Java stacks above it)."""
    pytest.importorskip("pyspark")
    command = _small_build(tmp_path, "spark", 600)
    corrupt_embedding_pages(tmp_path / "cat" / "part-001.parquet", clustered(300, 8, seed=3))
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"semid build: error: catalog file '.*part-001\.parquet': .*checksum.*"
                        r" \(raised in a Spark task\)", last), last
    for noise in ("Exception in task", "Lost task", "Traceback", "at org.apache",
                  # the JVM's start-up lines of Spark's default logging, and Hadoop's WARN:
                  # the session's logging is semid's own (engines/log4j2.properties)
                  "default log4j profile", "Setting default log level", "setLogLevel",
                  "NativeCodeLoader"):
        assert noise not in run.stderr, run.stderr[-3000:]


def _log_until(proc: subprocess.Popen, step: str) -> str:
    """The build's log read up to its first progress line of `step` (e.g. "encode:")."""
    err = ""
    for line in proc.stderr:
        err += line
        if line.startswith("[semid") and step in line:
            break
    return err


@pytest.mark.parametrize("engine, background, group", [
    ("local", False, False), pytest.param("spark", False, False, marks=ENGINE),
    pytest.param("spark", True, False, marks=ENGINE),
    pytest.param("spark", False, True, marks=ENGINE), pytest.param("ray", True, False,
                                                                   marks=ENGINE)])
def test_sigterm_stops_a_build_as_ctrl_c_does_and_the_rerun_resumes(tmp_path, engine,
                                                                    background, group):
    """`ray job stop`, `timeout` and schedulers cancel with SIGTERM: the build stops as on
    Ctrl-C, says so in one line, status 143, and gives its version up (it was the default
    death: no line; on Ray, `ray.init`'s own handler: `sys.exit(15)` and a C++ stack dump).
    `background`: started as a shell's background job is, SIGINT ignored (on Spark the
    engine's guard then stands for the SIGTERM alone: no Py4J traceback). `group`: the
    SIGTERM goes to the whole process group, as `timeout` sends it (it killed Spark's driver
    JVM with the build, and the session's stop failed on the gone JVM: a traceback, status 1;
    the JVM now runs in a session of its own, out of the signal's reach)."""
    pytest.importorskip({"spark": "pyspark", "ray": "ray"}.get(engine, "semid_dist"))
    command = _small_build(tmp_path, engine, 6000)
    background = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, preexec_fn=background, start_new_session=group)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        err = _log_until(proc, "encode:")
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        if group:  # (whatever a timed-out run left in the group goes too)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 143, (err, rest)
    version = re.search(r"new version (\S+) of", err).group(1)
    assert rest.strip().splitlines()[-1] == (
        "semid build: terminated (SIGTERM); nothing was committed (the same command resumes "
        f"version {version})"), rest[-4000:]
    assert "Traceback" not in rest and "Warning" not in rest, rest
    assert TableStore(str(tmp_path / "out"), "sids").versions() == []
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and f"resuming version {version}" in again.stderr, (
        again.stderr[-2000:])


def _jvms_named(app: str) -> list[int]:
    """The PIDs of this machine's Spark driver JVMs whose command line holds `app` (the
    build's own process names it too, in its arguments)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            line = Path(f"/proc/{pid}/cmdline").read_bytes()
            if app.encode() in line and b"SparkSubmit" in line:
                found.append(int(pid))
    return found


@pytest.mark.engine
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_as_the_spark_session_starts_stops_the_build_and_its_jvm(tmp_path, signum):
    """A Ctrl-C or SIGTERM while the driver JVM launches (its first line printed, the
    session not up): the build's one line, status 130 / 143, and no JVM left behind (one
    raised in pyspark's launch left the JVM it started running for good, out of the build's
    process session, waiting for a connection; one inside the context's start printed Py4J's
    traceback)."""
    pytest.importorskip("pyspark")
    name = f"semid-held-{os.getpid()}-{signum}"
    proc = subprocess.Popen([*_small_build(tmp_path, "spark", 600), f"spark.app_name={name}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        err = _log_until(proc, "config:")
        for line in proc.stderr:  # the JVM's first line: its launch under way
            err += line
            if not line.startswith("[semid"):
                break
        assert _jvms_named(name), err
        proc.send_signal(signum)
        lines: list[str] = []  # (read aside: a JVM left behind holds the pipe open)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        proc.wait(timeout=120)
        reader.join(10)
    finally:
        watchdog.cancel()
        proc.kill()
    for _ in range(100):  # (the JVM exits as its standard input closes: within seconds)
        if not _jvms_named(name):
            break
        time.sleep(0.1)
    left = _jvms_named(name)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    rest = "".join(lines)
    assert not left, f"the driver JVM outlived the build: {rest}"
    stop = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    assert (proc.returncode, rest.strip().splitlines()[-1:]) == (
        128 + signum, [f"semid build: {stop}; nothing was committed"]), err + rest
    assert "Traceback" not in rest, rest


@pytest.mark.parametrize("engine, start", [("local", "plan:"), pytest.param(
    "spark", "plan:", marks=ENGINE), ("local", "commit:")])
def test_ctrl_cs_until_the_command_exits_end_it_with_status_130(tmp_path, engine, start):
    """An impatient user's Ctrl-Cs, every 20 ms from the plan (or the commit) until the
    process is gone: the first stops the build, the others are ignored to the end (one
    after the command put Python's handler back killed the process by SIGINT, not status
    130; on Spark, after the engine put semid's handler back; after the commit, as the
    process exited: its work done, status 0 or 130)."""
    if engine == "spark":
        pytest.importorskip("pyspark")
    proc = subprocess.Popen(_small_build(tmp_path, engine, 3000), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        err = _log_until(proc, start)
        rest: list[str] = []
        stderr = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)
        stderr.start()  # (a full pipe would hold the process up)
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        stderr.join(10)
    finally:
        watchdog.cancel()
        proc.kill()
    versions = TableStore(str(tmp_path / "out"), "sids").versions()
    said = (proc.returncode, err[-500:], "".join(rest)[-3000:])
    if start == "commit:":
        assert proc.returncode in (0, 130) and len(versions) == 1, said
    else:
        assert proc.returncode == 130 and versions == [], said


def test_a_command_that_commits_nothing_says_no_word_of_a_commit_when_stopped(
        tmp_path, monkeypatch, capsys):
    """Ctrl-C in `semid versions list` (a Ctrl-C in place of its listing): `interrupted`,
    status 130; it said `interrupted; nothing was committed`, as a build does."""
    from semid_dist import cli

    def stopped(args, store):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_versions_list", stopped)
    (tmp_path / "sids").mkdir()
    assert cli.main(["versions", "list", "--root", str(tmp_path), "--table", "sids"]) == 130
    assert capsys.readouterr().err.strip() == "semid versions list: interrupted"


def test_an_object_store_without_credentials_is_one_line(tmp_path):
    """s3:// with no credentials anywhere: botocore's NoCredentialsError traceback before."""
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    cfg = write(tmp_path / "c.yaml", "input: {path: 's3://semid-no-such-bucket/cat'}\n"
                                     f"output: {{root: {tmp_path / 'out'}}}\nengine: local\n")
    run = subprocess.run([sys.executable, "-m", "semid_dist.cli", "build", "--config", cfg],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        "semid build: error: no credentials for the object store (NoCredentialsError: "), run.stderr
    assert "Traceback" not in run.stderr


def test_job_scripts_name_a_bad_config_in_one_line(tmp_path):
    """jobs/prune_sweep.py and jobs/compare_quantizers.py, as `semid` (tracebacks)."""
    cfg = write(tmp_path / "c.yaml", GOOD)
    for job, args, message in (
            ("prune_sweep.py", ["--config", str(tmp_path / "nope.yaml")],
             f"config file '{tmp_path / 'nope.yaml'}' does not exist"),
            ("compare_quantizers.py", ["--config", cfg, "fit.smaple=3"],
             f"{cfg} with override fit.smaple=3: unknown config key 'fit.smaple'"),
            # (its builds went to a temporary folder, removed: the override was lost)
            ("compare_quantizers.py", ["--config", cfg, f"output.root={tmp_path / 'o'}"],
             "output.root: output.root is set by the comparison itself: give its output root "
             "as --root DIR"),
            ("compare_quantizers.py", ["--config", cfg, "output.table=t"],
             "output.table: output.table is set by the comparison itself: drop the override "
             "(each row sets it)"),
            ("compare_quantizers.py", ["--config", cfg, "quantizer.acrq_base=rq_vae"],
             "quantizer.acrq_base: quantizer.acrq_base is set by the comparison itself"),
            ("prune_sweep.py", ["--config", cfg, "prune={strategy: top_k, k: 4}"],
             "prune: prune.strategy is set by the sweep itself: drop the override"),
            # a setting one method refuses: before the first build (after the others before)
            ("compare_quantizers.py", ["--config", cfg, "collisions.max_per_sid=10"],
             f"{cfg} with overrides collisions.max_per_sid=10, quantizer.method=rq_vae: "
             "collisions.max_per_sid is supported by residual k-means quantizers only"),
            ("prune_sweep.py", ["--config", cfg, "quantizer.layers=[16]"],
             f"{cfg} with overrides quantizer.layers=[16], prune.strategy=drop_layer: "
             "prune.strategy=drop_layer needs at least 2 layers")):
        run = subprocess.run([sys.executable, f"jobs/{job}", *args, "--root",
                              str(tmp_path / "root")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith(f"{job}: error: {message}"), (
            run.returncode, run.stderr[-2000:])
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert run.stdout == "" and not (tmp_path / "root").exists()


def test_job_scripts_check_their_root_before_the_first_build(tmp_path):
    """A --root the builds cannot write is said at once, naming --root (the first build
    found it, after its plan, and named output.root, a key the job refuses)."""
    cfg = write(tmp_path / "c.yaml", GOOD)
    (tmp_path / "afile").write_text("x")
    root = tmp_path / "afile" / "sub"
    for job in ("prune_sweep.py", "compare_quantizers.py"):
        run = subprocess.run([sys.executable, f"jobs/{job}", "--config", cfg, "--root",
                              str(root)], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
        table = "sids" if job == "prune_sweep.py" else "rq_kmeans"  # (its first row's)
        assert run.stderr == (f"{job}: error: --root '{root}': cannot write the table "
                              f"'{table}' there ([Errno 20] Not a directory: "
                              f"'{tmp_path / 'afile'}'); point --root at a folder or bucket "
                              "this job can write to\n"), run.stderr
        assert run.stdout == ""


def test_the_gpu_check_on_a_machine_without_a_gpu_says_so_in_one_line(tmp_path):
    """jobs/gpu_check.sh stops at once where torch sees no CUDA GPU (none here, or a CPU build
    of torch), with one line naming why (it ended in `nvidia-smi: command not found` and
    torch's AssertionError traceback)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script runs the GPU checks")
    run = subprocess.run(["bash", "jobs/gpu_check.sh", str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})
    why = "it is a CPU build" if torch.version.cuda is None else "it finds no CUDA device"
    assert run.returncode == 1 and run.stdout == "", (run.stdout, run.stderr)
    assert run.stderr.startswith(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (")
    assert why in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_versions_of_a_table_that_is_not_there_is_a_named_error(tmp_path):
    """A mistyped --root or --table: an error, not an empty list (or an empty gc), nor (for
    `semid report`) advice to build a first version."""
    for command in (["versions", "list"], ["versions", "gc", "--keep", "1"], ["report"]):
        name = " ".join(command[:2] if command[0] == "versions" else command[:1])
        line = named_error(semid(*command, "--root", str(tmp_path), "--table", "sids"))
        assert line == (f"semid {name}: error: no table at {tmp_path}/sids: "
                        "check --root and --table"), line
        # a root that is not there either (a bucket that does not exist: said as such)
        line = named_error(semid(*command, "--root", str(tmp_path / "nope"), "--table", "sids"))
        assert line == (f"semid {name}: error: no table at {tmp_path / 'nope'}/sids "
                        f"(nothing is found at --root {tmp_path / 'nope'} either: a bucket or "
                        "folder that does not exist, or one this user may not list): check "
                        "--root and --table"), line


def test_a_command_keeps_the_callers_sigint_handler(tmp_path):
    """A command run in-process puts Python's own SIGINT handler back when it returns, and
    leaves a SIGINT the caller ignores ignored (a job started in the background by a
    script): its once-only Ctrl-C handler stands only while it runs, over Python's own."""
    from semid_dist.cli import main

    cfg = write(tmp_path / "ok.yaml", GOOD)
    # Python's own handler to start from: a Spark session started earlier in this test
    # process (tests/test_spark.py's) leaves pyspark's in place
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["validate", cfg]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert main(["validate", cfg]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class _RaisesOnCollection:
    def __del__(self) -> None:  # a Ctrl-C that comes as an object is collected
        signal.raise_signal(signal.SIGINT)
        sum(range(1000))  # (the handler runs here, inside the finaliser)


def test_a_ctrl_c_a_finaliser_drops_is_raised_again_by_the_next_check(capfd):
    """Python drops an exception raised inside `__del__` (a Ray actor handle collected as
    a Ctrl-C came, just after a Ray Train fit: the build went on and committed, the Ctrl-Cs
    after it ignored): the command's interrupt is not printed ("Exception ignored ...
    KeyboardInterrupt") and `check_interrupted` raises it again; a command that was not
    interrupted passes the check, and no check raises once the command is over (the
    interrupt stopped the next library build in the process)."""
    from semid_dist import signals

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a `semid` process starts
    restore = signals.one_interrupt()
    try:
        signals.check_interrupted()  # nothing came
        _RaisesOnCollection()  # collected at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the handler ran
        with pytest.raises(KeyboardInterrupt):
            signals.check_interrupted()
    finally:
        restore()
        signal.signal(signal.SIGINT, previous)
    assert "KeyboardInterrupt" not in capfd.readouterr().err
    signals.check_interrupted()  # the command is over: a later library build is not stopped
    with pytest.raises(KeyboardInterrupt):
        signals.raise_interrupt()  # (the Spark engine's guard, under a library build)
    signals.check_interrupted()  # that interrupt is the library caller's


@pytest.mark.parametrize("broken", [RuntimeError("An error occurred while calling o91.getResult"),
                                    ConnectionResetError(104, "Connection reset by peer")])
def test_an_error_after_a_dropped_ctrl_c_ends_the_command_as_the_ctrl_c(capfd, broken):
    """A Ctrl-C whose KeyboardInterrupt a finaliser dropped, and then an error of what the
    stopping broke (a cancelled Spark job's Py4J error, a closed socket): the command's
    interrupted line and status 130 (it was that error's traceback, status 1); with no
    Ctrl-C the same error goes on as it is."""
    from semid_dist.cli import _run

    def run() -> int:
        _RaisesOnCollection()  # the Ctrl-C, dropped
        raise broken

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a `semid` process starts
    try:
        status = _run("semid build", run, exiting=False, committed=lambda: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert capfd.readouterr().err.strip().splitlines() == [
        "semid build: interrupted; nothing was committed"]

    def fails() -> int:
        raise broken

    with pytest.raises(type(broken)):
        _run("semid build", fails, exiting=False, committed=lambda: None)


def test_a_ctrl_c_under_a_started_version_names_it_or_its_commit(tmp_path, capfd):
    """A Ctrl-C under a build once its version was started: the line names the version the
    same command resumes, also where the Ctrl-C was dropped and what the stopping broke came
    instead; once its commit returned (a Ctrl-C after it, still inside the build: the
    heartbeat's stop) it says the version was committed (it said "nothing was committed"),
    known without asking the storage."""
    from semid_dist.cli import _run
    from semid_dist.plan import storage_failures

    store = TableStore(str(tmp_path / "out"), "sids")
    started, committed = [f"20261206T000000000000Z-{'a' * 6}"], []

    def stopped(drop: bool) -> int:
        with storage_failures(store, started, committed):
            if not drop:
                raise KeyboardInterrupt
            _RaisesOnCollection()  # the Ctrl-C, dropped
            raise ConnectionResetError(104, "Connection reset by peer")

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a `semid` process starts
    try:
        for drop in (False, True):
            assert _run("semid build", lambda drop=drop: stopped(drop), exiting=False,
                        committed=lambda: None) == 130
            assert capfd.readouterr().err.strip().splitlines() == [
                "semid build: interrupted; nothing was committed (the same command resumes "
                f"version {started[0]})"]
        committed.append(started[0])  # as the build notes its commit's return
        assert _run("semid build", lambda: stopped(False), exiting=False,
                    committed=lambda: None) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capfd.readouterr().err.strip().splitlines() == [
        f"semid build: interrupted after version {started[0]} was committed"]


def test_a_fits_handlers_are_undone_but_a_fired_ctrl_c_stays_fired():
    """After a Ray Train fit, the handlers it set are undone (Tune's SIGUSR1 here), but the
    SIG_IGN that semid's Ctrl-C handler set as it fired during the fit stays: it put semid's
    handler back, and a second Ctrl-C raised again in the engine's clean-up (Ray's
    shutdown), which `signals.one_interrupt` exists to prevent."""
    from semid_dist import signals
    from semid_dist.engines.ray_train import handlers_back

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a `semid` process starts
    restore = signals.one_interrupt()
    try:
        saved = {sig: signal.getsignal(sig) for sig in sigs}  # as the fit starts
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the fit's own
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the Ctrl-C during the fit
        handlers_back(saved)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # later ones ignored
        assert signal.getsignal(signal.SIGUSR1) is saved[signal.SIGUSR1]
        assert signal.getsignal(signal.SIGTERM) is saved[signal.SIGTERM]
    finally:
        restore()
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_sigterm_stops_a_command_once_then_has_its_default_action():
    """The first SIGTERM runs the command's Ctrl-C path (KeyboardInterrupt, said as a
    SIGTERM); from then on, and once the process exits with the command's status, SIGTERM
    is SIGTERM (a handler that outlived the command swallowed one, or raised into the exit)."""
    from semid_dist import signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # as a `semid` process starts (a Ray session earlier in this process set its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    restore = signals.one_interrupt()
    try:
        assert not signals.terminated() and callable(signal.getsignal(signal.SIGTERM))
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs here)
        assert signals.terminated()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # stopping: Ctrl-Cs ignored
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    try:
        signals.exiting_signals()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
