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
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from semid_dist.bench.pipeline import worker_seconds
from semid_dist.bench.synthetic import CatalogSpec, at_least, write_catalog

REPO = Path(__file__).resolve().parents[2]


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
    tree's RSS twice a second."""
    cmd = [sys.executable, "-m", "semid_dist.cli", *command[:1], "--json", *command[1:]]
    peak = {"tree": 0.0, "driver": 0.0}
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)

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
    if proc.returncode != 0:
        raise SystemExit(f"semid {command[0]} failed ({proc.returncode}); see {log_path}")
    result = json.loads(out)
    return {"wall_s": wall, "peak_tree_mib": peak["tree"], "peak_driver_mib": peak["driver"],
            "result": result}


# what the driver holds per distinct SID in the reduce; past driver.gather_rows it holds
# nothing per catalog row (the rows of over-full and of colliding SIDs and the popularity
# stay in tasks; the ids too, but for an incremental version's delta)
DRIVER_SID_BYTES = 16


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


def incremental_lines(inc: dict) -> list[str]:
    """The scale page's section on the incremental version."""
    m = inc["result"]["metrics"]
    t, rows = m["timings"], m["rows"]
    return [
        "",
        "## Incremental version on top of it",
        "",
        f"`semid encode --incremental` of a delta of {inc['delta_rows']:,} items from a later "
        f"draw of the same mixture: {inc['changed']:,} changed items (the catalog's last ids) "
        f"and {inc['delta_rows'] - inc['changed']:,} new ones, on top of the version above: "
        f"version `{inc['result']['version_id']}`. Log:",
        "",
        *[f"    {line}" for line in inc["log"]],
        "",
        "| measure | value |",
        "|---|---|",
        f"| whole job (process wall time) | {inc['wall_s']:.0f} s |",
        f"| encode stage | {t.get('encode_s', 0):.0f} s |",
        f"| carry + reduce + finalize + lookups | {t.get('reduce_s', 0):.0f} s |",
        f"| drift against the parent version | {t.get('drift_s', 0):.0f} s |",
        f"| rows: carried / replaced / encoded | {rows['carried']:,} / {rows['replaced']:,} / "
        f"{rows['encoded']:,} |",
        f"| peak RSS, driver process | {inc['peak_driver_mib']:,.0f} MiB |",
        f"| peak RSS, whole process tree (driver + Ray) | {inc['peak_tree_mib']:,.0f} MiB |",
        "",
        "The driver gathers the delta's ids (8 bytes each) and the replaced rows' old codes; "
        "the suffixes of the SIDs the delta's items join, carried rows included, are ranked "
        "by engine tasks in key ranges past `driver.gather_rows`.",
    ]


def worker_shares(timings: dict) -> tuple[float, dict[str, float]]:
    """(the encode workers' seconds, {step: its share of them}) from a build's timings
    (`encode_worker_<step>_s`); (0.0, {}) without step times."""
    steps = worker_seconds(timings)
    total = sum(steps.values())
    return total, ({step: v / total for step, v in steps.items()} if total > 0 else {})


def write_doc(path: Path, info: dict, measured: dict, proj: list[dict],
              args: argparse.Namespace, inc: dict | None = None) -> None:
    """The scale page: the build's measures, the projection, the incremental version."""
    worker_s, shares = worker_shares(measured["result"]["metrics"]["timings"])
    kernel = (f" (quantize: {shares['quantize']:.0%} of the encode workers' time)"
              if "quantize" in shares else "")
    lines = (build_lines(info, measured, args, worker_s, shares)
             + projection_lines(proj, args, kernel))
    if inc is not None:
        lines += incremental_lines(inc)
    path.write_text("\n".join(lines) + "\n")


def build_lines(info: dict, measured: dict, args: argparse.Namespace, worker_s: float,
                shares: dict[str, float]) -> list[str]:
    """The page's head and the build's table of measures; worker_s / shares: the encode
    workers' seconds and each step's share of them (`worker_shares`)."""
    m = measured["result"]["metrics"]
    t = m["timings"]
    rows = m["rows"]
    by_step = ", ".join(f"{step} {share:.0%}" for step, share in shares.items())
    return [
        "# Scale run",
        "",
        f"Written by `jobs/scale_run.py` on {info['date']}: `semid build --config "
        f"{_shown(args.config)}` "
        f"(embedded local Ray) on a seeded synthetic catalog of {rows['input']:,} x {info['dim']} "
        "items made by `scripts/gen_synthetic.py` (clustered, Zipf cluster sizes, long-tailed "
        "popularity, norm growing with popularity).",
        "",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}",
        f"- catalog: {info['files']} files, {info['row_groups']} row groups, "
        f"{info['bytes'] / 2**30:.1f} GiB; "
        + (f"generated in {info['gen_s']:.0f} s" if info["gen_s"] else
           "reused from an earlier run of this job"),
        f"- rows: input {rows['input']:,}, encoded {rows['encoded']:,}, rejected "
        f"{rows['rejected']:,}",
        f"- version: `{measured['result']['version_id']}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| whole job (process wall time) | {measured['wall_s']:.0f} s |",
        f"| fit (sample, Ray Train) | {t.get('fit_s', 0):.0f} s |",
        f"| encode stage (Ray Data) | {t.get('encode_s', 0):.0f} s "
        f"({rows['input'] / max(t.get('encode_s', 1e-9), 1e-9):,.0f} items/s) |",
        *([f"| encode workers' time by step (share of their {worker_s:.1f} s) | {by_step} |"]
          if shares else []),
        f"| reduce + finalize + lookups | {t.get('reduce_s', 0):.0f} s |",
        "| drift against the parent version | "
        + (f"{t['drift_s']:.0f} s |" if t.get("drift_s") else "none (no parent version) |"),
        f"| throughput, whole job | {rows['input'] / measured['wall_s']:,.0f} items/s |",
        f"| peak RSS, driver process | {measured['peak_driver_mib']:,.0f} MiB |",
        f"| peak RSS, whole process tree (driver + Ray) | {measured['peak_tree_mib']:,.0f} MiB |",
        f"| distinct SIDs (before suffixes) | {m['collisions']['distinct_sids']:,} |",
        f"| unique-SID rate (before suffixes) | {m['collisions']['unique_sid_rate']:.4f} |",
        f"| reconstruction MSE (relative error) | {m['reconstruction']['mse']:.4f} "
        f"({m['reconstruction']['relative_error']:.4f}) |",
        "",
    ]


def projection_lines(proj: list[dict], args: argparse.Namespace, kernel: str) -> list[str]:
    """The projection's assumptions and table; kernel: the quantize step's share as a
    parenthesis (" (quantize: 62% of the encode workers' time)"), or ""."""
    lines = [
        f"## Projection: {args.project_rows:,} items on {args.nodes} nodes x {args.cores} cores",
        "",
        "Assumptions: per-core throughput of the encode, reduce and drift stages stays as "
        "measured here (they run shard by shard, or bucket by bucket, on every core; a GPU "
        "per node would shorten the kernel part only" + kernel + ", so none is assumed); "
        "the fit "
        "uses a fixed-size sample, so its time does not grow with the catalog. The driver's "
        "memory is given two ways: the whole measured peak scaled with the rows, its fixed "
        "part too (an upper bound); and the measured peak plus what grows with the catalog "
        "past `driver.gather_rows`: the reduce's distinct SIDs, "
        f"{DRIVER_SID_BYTES} bytes each, scaled with the rows up to the SID key space (the "
        "product of the layer sizes). No colliding rows, rows of over-full SIDs or "
        "popularity values reach the driver then, nor ids in a full build (an incremental "
        "version gathers its delta's ids); the popularity's "
        "value-range histograms, at most 80-320 KB per group of `driver.gather_rows` rows, "
        "are left out. "
        "Network and object-store reads at cluster scale are not modelled.",
        "",
        "| stage | measured here | projected |",
        "|---|---|---|",
    ]
    for r in proj:
        unit = "" if "MiB" in r["stage"] else " s"
        lines.append(f"| {r['stage']} | {r['measured_s']:,.0f}{unit} | "
                     f"{r['projected_s']:,.0f}{unit} |")
    return lines


def _dim(path: Path) -> int | None:
    """The embedding size of a synthetic catalog file (None: not a fixed-size list)."""
    field = pq.ParquetFile(path).schema_arrow.field("embedding").type
    return field.list_size if pa.types.is_fixed_size_list(field) else None


def _shown(path: str) -> str:
    """A path for the page: relative to the repository where it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def run_scale(args: argparse.Namespace) -> None:
    """Generate (or reuse) the catalog, run and measure the build, write the page."""
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
    write_doc(Path(args.out_md), info, measured, proj, args, inc)
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
    Path(args.out_md).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(f"scale: done in {measured['wall_s']:.0f} s; peak RSS driver "
          f"{measured['peak_driver_mib']:.0f} MiB, tree {measured['peak_tree_mib']:.0f} MiB; "
          f"wrote {args.out_md}", flush=True)



def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="20M-item build, measured; writes docs/SCALE.md",
                                epilog="Relative paths are of the current directory; the "
                                "defaults are the repository's.")
    p.add_argument("--rows", type=at_least(1), default=20_000_000)
    p.add_argument("--dim", type=at_least(1), default=128)
    p.add_argument("--config", default=str(REPO / "conf/scale.yaml"))
    p.add_argument("--workdir", default=str(REPO / "out/scale"))
    p.add_argument("--chunk-rows", type=at_least(1), default=131_072)
    p.add_argument("--out-md", default=str(REPO / "docs/SCALE.md"))
    p.add_argument("--project-rows", type=at_least(1), default=300_000_000)
    p.add_argument("--nodes", type=at_least(1), default=8)
    p.add_argument("--cores", type=at_least(1), default=16)
    p.add_argument("--delta-rows", type=at_least(0), default=0,
                   help="then encode a delta of this many items (half changed, half new) "
                        "incrementally on top of the build, measured too")
    return p
