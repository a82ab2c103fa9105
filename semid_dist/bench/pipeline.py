"""End-to-end benchmarks: `semid build` / `semid encode` per engine in subprocesses (wall
time, encode-stage time from metrics.json, peak RSS), the Parquet decode rate of the
embedding column, and the Ray Train fit.

Each job runs as `python -m semid_dist.cli ...` in its own process, as a scheduler would run
it, started by a tiny launcher process that reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`:
the job's own peak RSS. (Waiting on the job straight from this process would not do: a
forked child's peak RSS includes the pages it shared with this large parent before `exec`.)
Engines are never imported here at module top.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from semid_dist.errors import SemidError

Log = Callable[[str], None]

JOB_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "PYSPARK_PYTHON": sys.executable,
    "SPARK_LOCAL_IP": "127.0.0.1",
    "PYTHONUNBUFFERED": "1",
}


class BenchJobError(SemidError):
    """A benchmarked `semid` job failed; the message holds the tail of its log."""


@dataclass(frozen=True)
class JobRun:
    wall_s: float
    maxrss_mb: float
    output: dict[str, Any]  # the job's --json output
    log_path: str


def job_config(catalog: str, root: str, table: str, *, engine: str, layers: Sequence[int],
               cores: int, sample_size: int, niter: int, seed: int = 0,
               shard_rows: int = 65536) -> dict[str, Any]:
    """A `semid build` config (plain dict) for a synthetic catalog."""
    return {
        "engine": engine, "seed": seed,
        "input": {"path": catalog, "popularity_column": "popularity"},
        "output": {"root": root, "table": table},
        "quantizer": {"layers": list(layers), "niter": niter},
        "fit": {"sample_size": sample_size, "num_workers": 1, "cpus_per_worker": 1.0},
        "encode": {"num_actors": cores, "shard_rows": shard_rows},
        "ray": {"num_cpus": cores, "object_store_memory_mb": 512},
        "spark": {"master": f"local[{cores}]", "driver_memory": "2g"},
    }


def release_memory() -> None:
    """Hand the memory this process has freed back to the system: Arrow's pool keeps what
    `decode_rate` decoded (+730 MiB after the 1.5M x 128 catalog) and glibc some of the
    kernels' (a benchmark process held 1.6 GiB through its e2e jobs). Held, it slowed the
    jobs it started: the Ray engine's encode stage took 4.40-5.10 s with 1.6 GiB held in the
    launching process against 4.12-4.45 s without (3 runs each, in turn), its workers' read
    and validate steps most (page faults)."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    try:  # glibc's; other C libraries have no such call
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass


def run_job(command: str, config: dict[str, Any], workdir: Path, name: str,
            overrides: Sequence[str] = ()) -> JobRun:
    """Run `semid <command> --config <config> --json [overrides]` in a subprocess, this
    process's freed memory handed back first (`release_memory`); returns its wall time, peak
    RSS (MiB; for Ray / Spark jobs the largest single process among the driver and the
    helpers it reaped) and JSON output. Raises `BenchJobError` when it fails."""
    release_memory()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / f"{name}.log"
    out_path = workdir / f"{name}.json"
    rss_path = workdir / f"{name}.maxrss"
    job = [sys.executable, "-m", "semid_dist.cli", command, "--config", str(cfg_path), "--json",
           *overrides]
    env = {**os.environ, **JOB_ENV}
    with open(out_path, "wb") as out, open(log_path, "wb") as err:
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, "-S", "-c", _LAUNCHER, str(rss_path), *job],
                             stdout=out, stderr=err, env=env)
        wall = time.perf_counter() - t
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchJobError(f"benchmark job {name!r} (semid {command} --config {cfg_path}) "
                            f"exited with {rc}; see {log_path}: " + " | ".join(tail))
    return JobRun(wall, int(rss_path.read_text()) / 1024.0, json.loads(out_path.read_text()),
                  str(log_path))


# argv: RSS_FILE CMD...: run CMD, write its peak RSS (KiB, Linux) to RSS_FILE, exit with its status
_LAUNCHER = """import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""


def decode_rate(catalog: str, column: str = "embedding", *, repeats: int = 2) -> dict[str, Any]:
    """Best rate of reading + decoding the catalog's embedding column into one float32
    matrix per row group (pyarrow, all cores), in items/s and bytes/s of float32 output."""
    files = sorted(str(p) for p in Path(catalog).glob("*.parquet"))
    best, rows, width = float("inf"), 0, 0
    for _ in range(repeats):
        t = time.perf_counter()
        rows = 0
        for path in files:
            col = pq.read_table(path, columns=[column]).column(0)
            for chunk in col.chunks:
                width = chunk.type.list_size
                flat = chunk.flatten().to_numpy()
                rows += len(flat) // max(width, 1)
        best = min(best, time.perf_counter() - t)
    return {"rows": rows, "seconds": best, "items_s": rows / best,
            "bytes_s": rows * width * 4 / best}


WORKER_STEP = "encode_worker_"  # metrics.json timings of the encode workers' steps


def worker_seconds(timings: dict[str, float]) -> dict[str, float]:
    """The encode workers' seconds in each step, {step: s} in the order the steps ran, from
    a build's `metrics.json` timings (`encode_worker_<step>_s`); {} without step times."""
    return {k.removeprefix(WORKER_STEP).removesuffix("_s"): v
            for k, v in timings.items() if k.startswith(WORKER_STEP)}


def e2e_row(engine: str, run: JobRun, rows: int, shards: int) -> dict[str, Any]:
    """One engine's `semid encode` run as plain numbers. The steady pace is the stage's rate
    after its first shard result (engine start-up and one shard left out): rows of the other
    shards / (encode_s - encode_first_shard_s); None with a single shard, and for Spark,
    whose first result comes when a whole wave of shards is done (a job hands back its
    results when all its tasks end). `worker_ms`: the
    encode workers' mean milliseconds per shard in each step (read, validate, quantize,
    write, statistics, result)."""
    timings = run.output["metrics"]["timings"]
    worker_ms = {step: s / shards * 1e3 for step, s in worker_seconds(timings).items()}
    first = timings.get("encode_first_shard_s")
    streams = engine != "spark" and first is not None and shards > 1
    steady = (rows * (shards - 1) / shards / (timings["encode_s"] - first)
              if streams and timings["encode_s"] > first else None)
    return {"engine": engine, "rows": rows, "encode_s": timings["encode_s"],
            "encode_items_s": rows / timings["encode_s"], "first_shard_s": first,
            "steady_items_s": steady, "wall_s": run.wall_s,
            "wall_items_s": rows / run.wall_s, "maxrss_mb": run.maxrss_mb,
            "worker_ms": worker_ms, "version_id": run.output["version_id"]}


def keep_best(best: dict[Any, dict[str, Any]], key: Any, run: dict[str, Any], field: str, *,
              higher: bool) -> None:
    """Keep in best[key] whichever of it and `run` has the better run[field] (higher or lower
    is better; the earlier run on a tie), with every run's value, in run order, in its
    `<field>_runs`."""
    kept = best.get(key)
    runs = (kept[f"{field}_runs"] if kept else []) + [run[field]]
    if kept is None or (run[field] > kept[field] if higher else run[field] < kept[field]):
        best[key] = run
    best[key][f"{field}_runs"] = runs


def ray_train_fit(sample: np.ndarray, inits: list[np.ndarray], layers: Sequence[int], *,
                  niter: int, workers: Sequence[int], cores: int, seed: int = 0,
                  rounds: int = 1, log: Log = print) -> list[dict[str, Any]]:
    """Seconds per Lloyd iteration of the fit on `w` Ray Train workers for each w in
    `workers`, from the same start (`inits`, one (k_l, d) array per layer): the mean of the
    iteration times the workers record (`seconds` in each layer's `iterations`; an iteration
    includes its all-reduce), so the worker start-up is not counted, and that mean per layer.
    Also returns the run's wall time and codebooks (for the MSE). With `rounds` > 1 the
    worker counts take turns that many times on one Ray, and each keeps its run with the
    fewest seconds per iteration (`s_per_iter_runs` lists them all)."""
    from semid_dist.config import parse_config
    from semid_dist.engines import make_engine

    with tempfile.TemporaryDirectory(prefix="semid-bench-ray-") as tmp:
        def cfg(w: int):
            return parse_config({
                "engine": "ray", "seed": seed, "input": {"path": tmp},
                "output": {"root": tmp, "table": "fit"},
                "quantizer": {"layers": list(layers), "niter": niter},
                "fit": {"num_workers": w, "cpus_per_worker": max(1.0, cores / w)},
                "ray": {"num_cpus": cores},
            })

        best: dict[int, dict[str, Any]] = {}
        with make_engine(cfg(1), log=lambda msg: None) as engine:
            turns = [(n, w) for n in range(max(1, rounds)) for w in workers]
            for n, w in turns:
                t = time.perf_counter()
                books, stats = engine.fit(sample, sample[:0], cfg(w), lambda msg: None,
                                          f"{tmp}/staging-{w}-{n}", init_centroids=inits)
                wall = time.perf_counter() - t
                seconds = [it["seconds"] for layer in stats for it in layer["iterations"]]
                per_iter = sum(seconds) / len(seconds)
                by_layer = [sum(it["seconds"] for it in layer["iterations"])
                            / max(len(layer["iterations"]), 1) for layer in stats]
                log(f"ray train fit: {w} worker(s): {per_iter:.4f} s/iteration (run {wall:.1f} s)")
                keep_best(best, w, {"workers": w, "threads_per_worker": int(max(1, cores // w)),
                                    "s_per_iter": per_iter, "s_per_iter_by_layer": by_layer,
                                    "run_s": wall, "codebooks": books},
                          "s_per_iter", higher=False)
    return [best[w] for w in workers]
