"""The scale run's page (`jobs/scale_run.py`, `semid_dist.bench.scale`): the build's
measures, the projection with its assumptions, the incremental version on top of it."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from semid_dist.bench.page import write_atomically
from semid_dist.bench.pipeline import worker_seconds

REPO = Path(__file__).resolve().parents[2]
# what the driver holds per distinct SID in the reduce; past driver.gather_rows it holds
# nothing per catalog row (the rows of over-full and of colliding SIDs and the popularity
# stay in tasks; the ids too, but for an incremental version's delta)
DRIVER_SID_BYTES = 16
SMALL_ROWS = 1_000_000  # below this a projection is mostly the run's fixed costs, scaled


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
    write_atomically(path, "\n".join(lines) + "\n")


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
        *([f"**A run of {args.rows:,} items is too small to project from**: start-up and "
           "per-task costs, which do not grow with the rows, weigh in every measured stage "
           f"and are scaled as if they did (run {SMALL_ROWS:,} items or more).", ""]
          if args.rows < SMALL_ROWS else []),
        "| stage | measured here | projected |",
        "|---|---|---|",
    ]
    for r in proj:
        unit = "" if "MiB" in r["stage"] else " s"
        lines.append(f"| {r['stage']} | {r['measured_s']:,.0f}{unit} | "
                     f"{r['projected_s']:,.0f}{unit} |")
    return lines


def _shown(path: str) -> str:
    """A path for the page: relative to the repository where it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path
