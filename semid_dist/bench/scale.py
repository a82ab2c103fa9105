"""Scale run: a large build end to end on this machine, measured (time per stage, peak memory
of the whole process tree: driver, Ray's own processes and workers; throughput), then a
projection for a larger catalog on a cluster, every assumption stated. `jobs/scale_run.py`
is the command; this module holds the work."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.bench.options import check_writable
from semid_dist.bench.page import write_atomically
from semid_dist.bench.scale_page import DRIVER_SID_BYTES, REPO, write_doc
from semid_dist.bench.synthetic import CatalogSpec, at_least, write_catalog
from semid_dist.errors import ConfigError, SemidError
from semid_dist.signals import terminated

SCALE_MD = REPO / "docs" / "SCALE.md"  # the documented run's page: DEFAULT_ROWS x DEFAULT_DIM
DEFAULT_ROWS, DEFAULT_DIM, DEFAULT_CONFIG = 20_000_000, 128, REPO / "conf" / "scale.yaml"


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 2**20


def run_semid(command: list[str], log_path: Path) -> dict:
    """`semid <command> --json` in a subprocess (build or encode), sampling the process
    tree's RSS twice a second. A Ctrl-C or SIGTERM of this job is passed on to it, and
    waited for: it gives up its version as a build does, and says so in its log."""
    cmd = [sys.executable, "-m", "semid_dist.cli", *command[:1], "--json", *command[1:]]
    peak = {"tree": 0.0, "driver": 0.0}
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        # a session of its own: a signal to this job's process group (`timeout`, a
        # scheduler, a terminal's Ctrl-C) reaches the build once, from `_stop` (a second
        # SIGTERM ends a build at once, its version not given up)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
                                start_new_session=True)
        try:
            out, wall = _measure(proc, peak, t0)
        except KeyboardInterrupt:
            _stop(proc, command[0], log_path)
            raise
    if proc.returncode != 0:
        raise SemidError(f"semid {command[0]} failed (status {proc.returncode}): "
                         f"{_last_line(log_path)} (its log: {log_path})")
    result = json.loads(out)
    return {"wall_s": wall, "peak_tree_mib": peak["tree"], "peak_driver_mib": peak["driver"],
            "result": result}


def _measure(proc: subprocess.Popen, peak: dict[str, float], t0: float) -> tuple[str, float]:
    """Wait for `proc`, sampling its RSS into `peak`; (its stdout, the wall seconds since
    t0)."""

    def sample() -> None:
        while proc.poll() is None:
            driver = 0.0
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    driver = next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024
            except (OSError, StopIteration):
                pass
            peak["driver"] = max(peak["driver"], driver)
            # the tree holds the driver: never below the driver read a moment earlier
            peak["tree"] = max(peak["tree"], tree_rss_mib(proc.pid), driver)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.monotonic() - t0
    sampler.join(timeout=2)
    return out, wall


def _stop(proc: subprocess.Popen, command: str, log_path: Path) -> None:
    """Pass this job's Ctrl-C or SIGTERM on to the `semid` subprocess (in a session of its
    own, nothing else reached it) and wait for it to give up its version, then say how it
    ended."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if terminated() else signal.SIGINT)
    try:
        proc.communicate(timeout=120)  # (reading its output: a full pipe would block it)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"scale: semid {command} did not stop within 120 s and was killed; processes "
              "of its engine (Ray's) may be left: `ray stop` ends them", file=sys.stderr)
    how = "had ended" if proc.returncode == 0 else "stopped"  # (it committed first)
    print(f"scale: semid {command} {how}: {_last_line(log_path)}", file=sys.stderr, flush=True)


def _last_line(log_path: Path) -> str:
    """The last line of a `semid` run's log: its error, or how it ended."""
    if not log_path.exists():
        return "(no log)"
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(its log is empty)"


def run_incremental(args: argparse.Namespace, work: Path, parent: str) -> dict:
    """A delta catalog of `args.delta_rows` items from a later draw of the same mixture (new
    embeddings around the same centres): its first half takes the catalog's last ids
    (changed items), the rest new ids. Then `semid encode --incremental` of it on top of the
    build's version `parent`, measured as the build is, with the log's lines on what it
    carried and how it ranked the suffixes."""
    delta = work / "delta"
    shutil.rmtree(delta, ignore_errors=True)
    changed = min(args.delta_rows // 2, args.rows)
    print(f"scale: writing a delta of {args.delta_rows:,} items ({changed:,} changed) to "
          f"{delta}; encoding it incrementally", flush=True)
    write_catalog(str(delta), CatalogSpec(dim=args.dim, draw=1), args.delta_rows,
                  chunk_rows=args.chunk_rows, chunks_per_file=8, first_id=args.rows - changed)
    log_path = work / "incremental.log"
    config = str(Path(args.config).resolve())
    measured = run_semid(["encode", "--config", config, "--incremental",
                          f"input.path={delta}", f"output.root={work / 'tables'}",
                          f"encode.from_version={parent}"], log_path)
    lines = log_path.read_text().splitlines()
    measured["log"] = [line.split("] ", 1)[-1] for line in lines
                       if "] incremental:" in line or "] collisions:" in line]
    measured.update(delta_rows=args.delta_rows, changed=changed)
    return measured


def sid_counts(metrics: dict) -> dict[str, int]:
    """Distinct SIDs of the build (before suffixes) and the SID key space (the product of
    the layer sizes)."""
    return {"distinct": metrics["collisions"]["distinct_sids"],
            "key_space": math.prod(g["size"] for g in metrics["layers"])}


def projection(rows: int, measured: dict, target_rows: int, nodes: int, cores: int) -> list[dict]:
    """Scale each measured stage to `target_rows` on `nodes` x `cores` CPU cores, assuming
    per-core throughput stays as measured (encode and finalize are shard-parallel; no GPU
    speed-up is assumed, it only shortens the kernel part) and the driver-side work (scan of
    ids / popularity, reduce over distinct SIDs) grows linearly with the rows on one driver."""
    timings = measured["result"]["metrics"]["timings"]
    scale = target_rows / rows
    speedup = (nodes * cores) / (os.cpu_count() or 1)
    fit = timings.get("fit_s", 0.0)  # a fixed-size sample: independent of the catalog size
    rows_out = [{"stage": "fit", "measured_s": fit, "projected_s": fit}]
    # shard-parallel: more rows, more cores (drift only when the build had a parent)
    for stage in ("encode", "reduce") + (("drift",) if timings.get("drift_s") else ()):
        secs = timings.get(f"{stage}_s", 0.0)
        rows_out.append({"stage": stage, "measured_s": secs, "projected_s": secs * scale / speedup})
    peak = measured["peak_driver_mib"]
    rows_out.append({"stage": "driver peak RSS, all of it scaled (MiB)", "measured_s": peak,
                     "projected_s": peak * scale})
    sids = sid_counts(measured["result"]["metrics"])
    more = min(sids["distinct"] * scale, sids["key_space"]) - sids["distinct"]
    rows_out.append({"stage": "driver peak RSS, per-SID part scaled (MiB)", "measured_s": peak,
                     "projected_s": peak + DRIVER_SID_BYTES * max(more, 0) / 2**20})
    return rows_out


def _dim(path: Path) -> int | None:
    """The embedding size of a synthetic catalog file (None: not a fixed-size list)."""
    field = pq.ParquetFile(path).schema_arrow.field("embedding").type
    return field.list_size if pa.types.is_fixed_size_list(field) else None


def out_md(args: argparse.Namespace) -> Path:
    """Where the page goes: --out-md; by default docs/SCALE.md for the documented run
    (DEFAULT_ROWS x DEFAULT_DIM, DEFAULT_CONFIG), the work folder's SCALE.md for any other (a
    quick try would replace the documented figures)."""
    if getattr(args, "out_md", None) is not None:
        return Path(args.out_md)
    if (args.rows, args.dim, Path(args.config).resolve()) == (DEFAULT_ROWS, DEFAULT_DIM,
                                                               DEFAULT_CONFIG):
        return SCALE_MD
    return Path(args.workdir) / "SCALE.md"


def check_args(args: argparse.Namespace, page: Path) -> None:
    """What would fail only after the catalog and the build, checked first: the page and
    its JSON can be written, and the config loads (with the paths the job sets)."""
    from semid_dist.config import load_config

    if page.suffix != ".md":
        raise ConfigError(f"--out-md {page}: give a .md file name (the figures go beside it, "
                          "of the same name ending .json)")
    check_writable("--out-md", page, folder=False)
    check_writable("--out-md's figures", page.with_suffix(".json"), folder=False)
    check_writable("--workdir", Path(args.workdir), folder=True)
    load_config(args.config, ["input.path=unused", "output.root=unused"])


def run_scale(args: argparse.Namespace) -> int:
    """Generate (or reuse) the catalog, run and measure the build, write the page."""
    page = out_md(args)
    check_args(args, page)
    work = Path(args.workdir).resolve()
    catalog = work / "catalog"
    t = time.monotonic()
    existing = sorted(catalog.glob("*.parquet")) if catalog.exists() else []
    if existing and sum(pq.ParquetFile(f).metadata.num_rows for f in existing) == args.rows \
            and _dim(existing[0]) == args.dim:
        print(f"scale: reusing the catalog at {catalog}", flush=True)
        info = {"files": len(existing),
                "row_groups": sum(pq.ParquetFile(f).metadata.num_row_groups for f in existing),
                "bytes": sum(f.stat().st_size for f in existing), "gen_s": 0.0}
    else:
        print(f"scale: writing {args.rows:,} x {args.dim} items to {catalog}", flush=True)
        made = write_catalog(str(catalog), CatalogSpec(dim=args.dim), args.rows,
                             chunk_rows=args.chunk_rows, chunks_per_file=8)
        info = {"files": made.files, "row_groups": made.row_groups, "bytes": made.bytes,
                "gen_s": time.monotonic() - t}
    info.update(dim=args.dim, date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(f"scale: catalog ready in {time.monotonic() - t:.0f} s; building", flush=True)
    measured = run_semid(["build", "--config", str(Path(args.config).resolve()),
                          f"input.path={catalog}", f"output.root={work / 'tables'}"],
                         work / "build.log")
    proj = projection(args.rows, measured, args.project_rows, args.nodes, args.cores)
    inc = (run_incremental(args, work, measured["result"]["version_id"])
           if args.delta_rows else None)
    write_doc(page, info, measured, proj, args, inc)
    summary = {"catalog": info, "wall_s": measured["wall_s"],
               "peak_tree_mib": measured["peak_tree_mib"],
               "peak_driver_mib": measured["peak_driver_mib"],
               "timings": measured["result"]["metrics"]["timings"],
               "rows": measured["result"]["metrics"]["rows"],
               "sids": sid_counts(measured["result"]["metrics"]), "projection": proj}
    if inc is not None:
        summary["incremental"] = {
            "delta_rows": inc["delta_rows"], "changed": inc["changed"],
            "wall_s": inc["wall_s"], "peak_tree_mib": inc["peak_tree_mib"],
            "peak_driver_mib": inc["peak_driver_mib"],
            "timings": inc["result"]["metrics"]["timings"],
            "rows": inc["result"]["metrics"]["rows"], "log": inc["log"]}
    write_atomically(page.with_suffix(".json"), json.dumps(summary, indent=2))
    print(f"scale: done in {measured['wall_s']:.0f} s; peak RSS driver "
          f"{measured['peak_driver_mib']:.0f} MiB, tree {measured['peak_tree_mib']:.0f} MiB; "
          f"wrote {page} and {page.with_suffix('.json').name}", flush=True)
    return 0



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scale_run.py", description="A 20M-item build on local Ray, measured, with a "
        "projection; writes docs/SCALE.md", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Relative paths are of the current directory; the defaults are the "
        "repository's.", allow_abbrev=False)
    p.add_argument("--rows", type=at_least(1), default=DEFAULT_ROWS,
                   help="catalog items (generated, or reused from --workdir)")
    p.add_argument("--dim", type=at_least(1), default=DEFAULT_DIM, help="embedding size")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="the build's config (the job sets input.path and output.root)")
    p.add_argument("--workdir", default=str(REPO / "out/scale"),
                   help="the catalog, the tables and the builds' logs")
    p.add_argument("--chunk-rows", type=at_least(1), default=131_072,
                   help="rows per Parquet row group of the catalog")
    p.add_argument("--out-md", default=argparse.SUPPRESS,
                   help="the page, its figures beside it as .json (default: "
                   f"{SCALE_MD.relative_to(REPO)} for a run of the default --rows, --dim and "
                   "--config, else SCALE.md in --workdir)")
    p.add_argument("--project-rows", type=at_least(1), default=300_000_000,
                   help="the projection's catalog size")
    p.add_argument("--nodes", type=at_least(1), default=8, help="the projection's nodes")
    p.add_argument("--cores", type=at_least(1), default=16,
                   help="the projection's CPU cores per node")
    p.add_argument("--delta-rows", type=at_least(0), default=0,
                   help="then encode a delta of this many items (half changed, half new) "
                        "incrementally on top of the build, measured too")
    return p
