"""The scale job (jobs/scale_run.py over semid_dist/bench/scale.py) on a small catalog: it
generates the catalog, runs a real `semid build` in a subprocess, and its page reports the
build's own figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from semid_dist.bench.scale import out_md, parser, tree_rss_mib
from semid_dist.io.store import TableStore
from tests.conftest import REPO


def test_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); "
                              "x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while tree_rss_mib(child.pid) <= 60 and time.monotonic() < deadline:
            time.sleep(0.1)  # until the child has touched its 64 MiB
        assert tree_rss_mib(child.pid) > 60
        assert tree_rss_mib(os.getpid()) >= tree_rss_mib(child.pid) + 10
    finally:
        child.kill()
        child.wait()


def test_scale_job_builds_and_reports(tmp_path):
    """The build, then an incremental version of a 3,000-item delta on top of it (past
    driver.gather_rows: its suffixes ranked by tasks), both on the page."""
    cfg = tmp_path / "scale.yaml"
    cfg.write_text(json.dumps({
        "engine": "local", "seed": 0, "input": {"path": "unused"},
        "output": {"root": "unused", "table": "sids"},
        "quantizer": {"layers": [16, 8, 8], "niter": 4}, "fit": {"sample_size": 2000},
        "encode": {"shard_rows": 4096}, "driver": {"gather_rows": 2000}}))
    md = tmp_path / "SCALE.md"
    out = subprocess.run([sys.executable, "jobs/scale_run.py", "--rows", "12000", "--dim", "16",
                          "--config", str(cfg), "--workdir", str(tmp_path / "work"),
                          "--chunk-rows", "4096", "--out-md", str(md),
                          "--delta-rows", "3000"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    store = TableStore(str(tmp_path / "work" / "tables"), "sids")
    child = store.manifest()
    manifest = store.manifest(child["parent"])
    assert manifest["rows"] == {"input": 12000, "encoded": 12000, "rejected": 0}
    page = md.read_text()
    assert f"`{manifest['version_id']}`" in page
    assert "input 12,000, encoded 12,000, rejected 0" in page
    assert "| drift against the parent version | none (no parent version) |" in page
    # the encode workers' steps, as shares of their time in the build's own timings
    timings = store.read_json(manifest["version_id"], "metrics.json")["timings"]
    steps = {k[len("encode_worker_"):-2]: v for k, v in timings.items()
             if k.startswith("encode_worker_")}
    assert list(steps) == ["read", "validate", "quantize", "write", "statistics", "result"]
    total = sum(steps.values())
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in steps.items())
    assert (f"| encode workers' time by step (share of their {total:.1f} s) | {shares} |"
            in page)
    assert f"(quantize: {steps['quantize'] / total:.0%} of the encode workers' time)" in page
    figures = json.loads(md.with_suffix(".json").read_text())
    assert figures["rows"]["input"] == 12000 and figures["catalog"]["row_groups"] == 3
    assert figures["peak_tree_mib"] >= figures["peak_driver_mib"] > 50
    encode = next(r for r in figures["projection"] if r["stage"] == "encode")
    assert encode["projected_s"] > encode["measured_s"]  # 25,000x the rows on 64x the cores
    upper, per_sid = (next(r for r in figures["projection"] if r["stage"].startswith(name))
                      for name in ("driver peak RSS, all", "driver peak RSS, per-SID"))
    assert upper["measured_s"] == per_sid["measured_s"] == figures["peak_driver_mib"]
    # the distinct SIDs grow with the rows up to the key space (16 x 8 x 8)
    sids = figures["sids"]
    assert sids["key_space"] == 1024 and 0 < sids["distinct"] <= 1024
    assert per_sid["projected_s"] == pytest.approx(
        per_sid["measured_s"] + 16 * (1024 - sids["distinct"]) / 2**20)
    assert upper["projected_s"] > per_sid["projected_s"]
    # the delta: its first half replaces the catalog's last 1,500 items, the rest is new
    rows = {"input": 3000, "encoded": 3000, "rejected": 0, "carried": 10500, "replaced": 1500}
    assert child["rows"] == figures["incremental"]["rows"] == rows
    assert store.read_data(child["version_id"]).num_rows == 13500
    assert "## Incremental version on top of it" in page
    assert f"`{child['version_id']}`" in page
    assert "| rows: carried / replaced / encoded | 10,500 / 1,500 / 3,000 |" in page
    ranked = [m for m in figures["incremental"]["log"] if m.startswith("collisions: ranking")]
    assert len(ranked) == 1 and "of carried parts" in ranked[0] and ranked[0] in page
    assert figures["incremental"]["peak_tree_mib"] >= figures["incremental"]["peak_driver_mib"]
    assert "too small to project from" in page  # 12,000 items


def _small_config(path, **over):
    path.write_text(json.dumps({
        "engine": "local", "seed": 0, "input": {"path": "unused"},
        "output": {"root": "unused", "table": "sids"},
        "quantizer": {"layers": [16, 8, 8], "niter": 4}, "fit": {"sample_size": 2000},
        "encode": {"shard_rows": 4096}, **over}))
    return path


def _scale(*args, **kwargs):
    return subprocess.run([sys.executable, "jobs/scale_run.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kwargs)


def test_a_small_scale_run_leaves_the_documented_page_alone(tmp_path):
    """docs/SCALE.md holds the documented 20M run: a run of other sizes writes its page into
    its work folder unless --out-md says where; an --out-md or config that cannot work is
    one line before the catalog is made (after the whole build before, as a traceback)."""
    cfg = _small_config(tmp_path / "scale.yaml")
    work = tmp_path / "work"
    args = parser().parse_args(["--rows", "12000", "--workdir", str(work)])
    assert out_md(args) == work / "SCALE.md"
    assert out_md(parser().parse_args([])) == REPO / "docs" / "SCALE.md"
    capacity = parser().parse_args(["--config", str(REPO / "conf" / "scale_capacity.yaml")])
    assert out_md(capacity) == REPO / "out" / "scale" / "SCALE.md"
    assert out_md(parser().parse_args(["--rows", "5", "--out-md", "a.md"])) == Path("a.md")
    small = ["--rows", "12000", "--dim", "16", "--config", str(cfg), "--workdir", str(work),
             "--chunk-rows", "4096"]
    for extra, message in (
            (["--out-md", str(tmp_path / "p.json")], "give a .md file name (the figures go "
                                                     "beside it, of the same name ending "
                                                     ".json)"),
            (["--out-md", "/proc/nope/SCALE.md"], "--out-md /proc/nope/SCALE.md: cannot be "
                                                  "written"),
            (["--config", str(tmp_path / "nope.yaml")], "nope.yaml")):
        run = _scale(*small, *extra)
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.startswith("scale_run.py: error: ") and message in run.stderr
        assert len(run.stderr.splitlines()) == 1 and not (work / "catalog").exists()
    before = (REPO / "docs" / "SCALE.md").read_bytes()
    run = _scale(*small)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"wrote {work / 'SCALE.md'} and SCALE.json" in run.stdout
    assert "input 12,000, encoded 12,000" in (work / "SCALE.md").read_text()
    assert (REPO / "docs" / "SCALE.md").read_bytes() == before


def _processes_naming(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, False), (signal.SIGTERM, False),
                                        (signal.SIGTERM, True)])
def test_a_stopped_scale_run_stops_its_build_and_says_so(tmp_path, sig, group):
    """Ctrl-C or SIGTERM of the job alone (`kill -INT`) or of its process group (`timeout`,
    a scheduler): one line of how its build ended, the job's own, status 130 / 143, and its
    `semid build` stopped with it, giving up its version (a KeyboardInterrupt traceback
    before, the build left running without its parent)."""
    cfg = _small_config(tmp_path / "scale.yaml", quantizer={"layers": [16, 8, 8],
                                                            "niter": 10_000})
    work = tmp_path / "work"
    job = subprocess.Popen([sys.executable, "jobs/scale_run.py", "--rows", "20000", "--dim",
                            "16", "--config", str(cfg), "--workdir", str(work),
                            "--chunk-rows", "4096"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = work / "build.log"
        while (not log.exists() or "fit:" not in log.read_text()) and \
                time.monotonic() < deadline:
            time.sleep(0.2)  # until the build fits 10,000 Lloyd iterations a layer
        assert job.poll() is None
        if group:
            os.killpg(job.pid, sig)
        else:
            job.send_signal(sig)
        _, err = job.communicate(timeout=180)
    finally:
        job.kill()
        for pid in _processes_naming(str(work)):  # (the build, where the test failed)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert job.returncode == (130 if sig == signal.SIGINT else 143), err[-2000:]
    assert "Traceback" not in err
    ended = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert f"scale: semid build stopped: semid build: {ended}; nothing was committed" in err
    assert err.splitlines()[-1].startswith("scale_run.py: ")
    assert _processes_naming(str(work)) == []  # the build ended with the job
    assert TableStore(str(work / "tables"), "sids").versions() == []
