"""The benchmark run: `run_benchmark` measures every section (`semid_dist.bench.options`) in
one process on one machine and writes the table as JSON and Markdown where its options say."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from semid_dist.bench.options import DOCS_MD, BenchOptions, Layers
from semid_dist.signals import interrupt_raised

Log = Callable[[str], None]
BUSY_LOAD = 0.5  # a 1-minute load average per core above which the start line warns


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_benchmark(opts: BenchOptions, *, log: Log | None = None,
                  echo: bool = True) -> dict[str, Any]:
    """Measure every section of `opts.sections`, print the table, write JSON + Markdown
    where `opts` says; returns the results (with `table`: the rows).

    This process measures with huge pages as a build sets them (the GEMM ceiling, the
    kernels and their references, the decode rate, the fits); the `semid` runs it starts
    take the same default from their config."""
    from semid_dist.config import EncodeConfig
    from semid_dist.memory import huge_pages

    with huge_pages(EncodeConfig().huge_pages):
        return _run_benchmark(opts, log=log, echo=echo)


def _run_benchmark(opts: BenchOptions, *, log: Log | None, echo: bool) -> dict[str, Any]:
    from semid_dist.bench import page, report
    from semid_dist.bench.kernels import cpu_count, gemm_ceiling, set_threads

    log = log or _stderr_log()
    t0 = time.monotonic()
    cores = cpu_count()
    set_threads(cores)
    results: dict[str, Any] = {"date": _now(), "command": opts.command, "quick": opts.quick,
                               "options": _plain_options(opts),
                               "machine": page.machine_info(),
                               "code": page.code_version(),
                               "load_average": {"start": _load()}}
    log(f"bench: {cores} cores, load average {results['load_average']['start']}")
    if results["load_average"]["start"] >= BUSY_LOAD * cores:
        log(f"bench: warning: load average {results['load_average']['start']} on {cores} "
            "cores: other work takes cores from every rate this run measures (the GEMM "
            "ceiling and faiss too); run it on an idle machine")
    for warning in page.blas_lines(results["machine"])[1:]:  # before minutes are spent
        log("bench: " + warning.removeprefix("- ").removeprefix("**warning**: "))
    results["gemm"] = gemm_ceiling(size=opts.gemm_size)
    log(f"bench: fp32 GEMM ceiling {results['gemm']['gflops']:.1f} GFLOP/s")
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="semid-bench-"))
    done, interrupted = False, False
    try:
        loads = results["load_average"]
        if "kernels" in opts.sections or "e2e" in opts.sections:
            loads["kernels"] = _load()
            results["kernels"] = _kernels(opts, results["gemm"]["gflops"], log)
        if "e2e" in opts.sections or "rss" in opts.sections:
            loads["e2e"] = _load()
            results.update(_e2e(opts, workdir, results.get("kernels", []), cores, log))
        if "fit" in opts.sections:
            loads["fit"] = _load()
            results["fit"] = _fit(opts, cores, log)
        if "gpu" in opts.sections:
            results["gpu"] = _gpu(opts, log)
        done = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _settle_workdir(opts, workdir, done=done, interrupted=interrupted, log=log)
    results["load_average"]["end"] = _load()
    results["runtime_s"] = time.monotonic() - t0
    rows = report.all_rows(results)
    if echo:
        print(report.format_text(rows), flush=True)
    written = page.write_outputs(results, rows, json_path=opts.json_path, md_path=opts.md_path)
    log(f"bench: done in {results['runtime_s']:.0f} s; "
        + (f"wrote {' and '.join(written)}" if written else
           f"no page written: a --quick or --only run leaves {DOCS_MD} (the full run's) alone; "
           "give --out-md FILE and --out-json FILE to write this run's"))
    met, missed = report.summary(rows)
    log(f"bench: targets met {len(met)}, not met {len(missed)}"
        + (f" (quick mode: {page.QUICK_TARGETS})" if opts.quick else ""))
    results["table"] = [dataclasses.asdict(r) | {"status": r.status} for r in rows]
    return results


def _settle_workdir(opts: BenchOptions, workdir: Path, *, done: bool, interrupted: bool,
                    log: Log) -> None:
    """The work folder after the sections: a temporary one removed, unless a run that did
    not finish left something in it (kept and said, as one --workdir names always is)."""
    kept = opts.keep_workdir or opts.workdir
    interrupted = interrupted or interrupt_raised()  # (surfaced as another error)
    used = False
    with suppress(OSError):
        used = any(workdir.iterdir())
    if not done and (kept or used):
        log(f"bench: {'interrupted' if interrupted else 'failed'}; catalogs, job configs "
            f"and logs kept in {workdir}")
    elif not kept:
        shutil.rmtree(workdir, ignore_errors=True)


def _load() -> float:
    """1-minute load average (other work on the machine skews every rate)."""
    return round(os.getloadavg()[0], 2)


def _stderr_log() -> Log:
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _plain_options(opts: BenchOptions) -> dict[str, Any]:
    return dataclasses.asdict(opts)


def _kernel_configs(opts: BenchOptions) -> list[tuple[int, Layers]]:
    configs = [(d, layers) for d in opts.kernel_dims for layers in opts.kernel_layers]
    if "e2e" in opts.sections:  # every e2e config needs its kernel rate
        configs += [(opts.e2e_dim, layers) for layers, _ in opts.e2e
                    if (opts.e2e_dim, layers) not in configs]
    return configs


def _kernels(opts: BenchOptions, gflops: float, log: Log) -> list[dict[str, Any]]:
    from semid_dist.bench.kernels import bench_encode

    out = []
    for dim, layers in _kernel_configs(opts):
        res = bench_encode(dim, layers, target_s=opts.kernel_target_s, seed=opts.seed,
                           gflops=gflops, fast_rerank=opts.kernel_fast_rerank)
        log(f"kernel d={dim} {list(layers)}: ours {res['ours']['items_s']:.0f}/s, faiss flat "
            f"{res['faiss_flat']['items_s']:.0f}/s, faiss RQ {res['faiss_rq']['items_s']:.0f}/s"
            f", {res.get('ratio_ceiling', 0):.0%} of GEMM ceiling, agreement "
            f"{res['agreement_flat']:.4%}")
        out.append(res)
    return out


def _e2e(opts: BenchOptions, workdir: Path, kernels: list[dict[str, Any]], cores: int,
         log: Log) -> dict[str, Any]:
    """Per e2e config: a catalog, a build that makes its codebooks, then `semid encode` per
    engine. The first config's build runs on the whole catalog (4N rows) and on a quarter of
    it (N rows): the peak RSS pair."""
    from semid_dist.bench.pipeline import decode_rate
    from semid_dist.bench.synthetic import CatalogSpec, write_catalog

    spec = CatalogSpec(dim=opts.e2e_dim, seed=opts.seed)
    run_e2e = "e2e" in opts.sections
    blocks, rss, decode = [], None, None
    for i, (layers, rows) in enumerate(opts.e2e if run_e2e else opts.e2e[:1]):
        name = f"e2e{i}-{len(layers)}x{max(layers)}"
        catalog = str(workdir / f"{name}-catalog")
        t = time.perf_counter()
        info = write_catalog(catalog, spec, rows, chunk_rows=opts.chunk_rows)
        log(f"{name}: catalog {rows} x {opts.e2e_dim} ({info.files} files, "
            f"{info.bytes / 2**20:.0f} MiB) written in {time.perf_counter() - t:.1f} s")
        job = _Jobs(opts, workdir, cores, layers)
        if i == 0 and "rss" in opts.sections:
            quarter = str(workdir / f"{name}-catalog-quarter")
            write_catalog(quarter, spec, rows // 4, chunk_rows=opts.chunk_rows)
            run_n = job.run("build", quarter, f"{name}-rss-n")
            built = job.run("build", catalog, name)
            rss = {"dim": opts.e2e_dim, "layers": list(layers),
                   "n": {"rows": rows // 4, "maxrss_mb": run_n.maxrss_mb,
                         "wall_s": run_n.wall_s},
                   "4n": {"rows": rows, "maxrss_mb": built.maxrss_mb, "wall_s": built.wall_s}}
            log(f"rss: build at {rows // 4} rows {run_n.maxrss_mb:.0f} MiB, at {rows} rows "
                f"{built.maxrss_mb:.0f} MiB")
        else:  # codebooks from a build on a small catalog (only its fit matters)
            small = str(workdir / f"{name}-catalog-fit")
            write_catalog(small, spec, max(opts.build_sample, 2 * max(layers)),
                          chunk_rows=opts.chunk_rows)
            built = job.run("build", small, name)
        if not run_e2e:
            break
        decode = decode or decode_rate(catalog)
        kernel = next(k for k in kernels
                      if k["dim"] == opts.e2e_dim and tuple(k["layers"]) == layers)
        blocks.append(_engines_block(opts, job, catalog, name, rows, info, kernel, decode,
                                     built.output["version_id"], log))
    return {"e2e": blocks, "decode": decode, "rss": rss}


class _Jobs:
    """Runs `semid build` / `semid encode` jobs of one e2e config in subprocesses."""

    def __init__(self, opts: BenchOptions, workdir: Path, cores: int, layers: Layers) -> None:
        self.opts, self.workdir, self.cores, self.layers = opts, workdir, cores, layers

    def run(self, command: str, catalog: str, table: str, engine: str = "local",
            overrides: tuple[str, ...] = ()):
        from semid_dist.bench.pipeline import job_config, run_job

        o = self.opts
        if command == "build":  # a table's first version (a --workdir used before holds one:
            shutil.rmtree(self.workdir / "out" / table, ignore_errors=True)  # drift then)
        cfg = job_config(catalog, str(self.workdir / "out"), table, engine=engine,
                         layers=self.layers, cores=self.cores, sample_size=o.build_sample,
                         niter=o.build_niter, seed=o.seed, shard_rows=o.chunk_rows)
        name = f"{table}-{command}-{engine}"
        return run_job(command, cfg, self.workdir / "jobs", name, overrides)


def _engines_block(opts: BenchOptions, job: _Jobs, catalog: str, name: str, rows: int,
                   info: Any, kernel: dict[str, Any], decode: dict[str, Any], version: str,
                   log: Log) -> dict[str, Any]:
    """`semid encode` with `version`'s codebooks on every engine; rates against the kernel
    and the e2e ceiling 1 / (1 / kernel + 1 / decode). The engines take turns
    `opts.e2e_rounds` times and each keeps its run with the fastest encode stage (the kernel
    rate is a best of rounds too); `encode_items_s_runs` lists every run's rate."""
    from semid_dist.bench.pipeline import e2e_row, keep_best

    k_rate = kernel["ours"]["items_s"]
    ceiling = 1.0 / (1.0 / k_rate + 1.0 / decode["items_s"])
    block = {"dim": opts.e2e_dim, "layers": list(job.layers), "rows": rows,
             "catalog": {"files": info.files, "row_groups": info.row_groups,
                         "bytes": info.bytes, "chunk_rows": info.chunk_rows},
             "kernel_items_s": k_rate, "decode_items_s": decode["items_s"],
             "ceiling_items_s": ceiling, "engines": []}
    engines = [e for e in opts.engines if e != "spark" or _have("pyspark")]
    if len(engines) < len(opts.engines):
        log(f"{name}: spark skipped (pyspark is not installed)")
    best: dict[str, dict[str, Any]] = {}
    for engine in [e for _ in range(max(1, opts.e2e_rounds)) for e in engines]:
        run = job.run("encode", catalog, name, engine, (f"encode.from_version={version}",))
        row = e2e_row(engine, run, rows, info.row_groups)
        row["share_kernel"] = row["encode_items_s"] / k_rate
        row["share_ceiling"] = row["encode_items_s"] / ceiling
        log(f"{name}: {engine}: encode stage {row['encode_items_s']:.0f} items/s "
            f"({row['share_kernel']:.0%} of kernel), whole job {row['wall_s']:.1f} s")
        keep_best(best, engine, row, "encode_items_s", higher=True)
    block["engines"] = [best[e] for e in engines]
    return block


def _fit(opts: BenchOptions, cores: int, log: Log) -> list[dict[str, Any]]:
    from semid_dist.bench.kernels import bench_fit, layer_mse
    from semid_dist.bench.synthetic import CatalogSpec, embeddings

    out = []
    for i, (layers, rows) in enumerate(opts.fit):
        x = embeddings(CatalogSpec(dim=opts.fit_dim, seed=opts.seed + 17), rows)
        res, inits = bench_fit(x, layers, niter=opts.fit_niter, seed=opts.seed,
                               rounds=opts.fit_rounds)
        log(f"fit {list(layers)}: ours {res['s_per_iter'] * 1e3:.1f} ms/it, faiss "
            f"{res['faiss_s_per_iter'] * 1e3:.1f} ms/it, MSE ratio {res['mse_ratio']:.4f}")
        if i == 0 and opts.ray_workers and _have("ray"):
            from semid_dist.bench.pipeline import ray_train_fit

            runs = ray_train_fit(x, inits, layers, niter=opts.fit_niter,
                                 workers=opts.ray_workers, cores=cores, seed=opts.seed,
                                 rounds=opts.fit_rounds, log=log)
            for run in runs:
                mse = layer_mse(run.pop("codebooks"), x)[-1]
                run.update(mse=mse, mse_ratio=mse / res["faiss_mse"],
                           time_ratio=run["s_per_iter"] / res["faiss_s_per_iter"])
            res["ray_train"] = runs
        out.append(res)
    return out


def _gpu(opts: BenchOptions, log: Log) -> dict[str, Any]:
    """The GPU section: the card's GEMM rates, the encode kernel on every kernel config and
    the fit on every fit config, on the GPU (and the fit on the CPUs too)."""
    from semid_dist.bench import gpu
    from semid_dist.bench.synthetic import CatalogSpec, embeddings

    if not gpu.available():
        log("gpu: no CUDA device, skipped")
        return {"skipped": "no CUDA device"}
    out: dict[str, Any] = {"device": gpu.device_info(), "gemm": gpu.gemm_rates()}
    g = out["gemm"]
    log(f"gpu: {out['device']['name']}: GEMM fp32 {g['fp32_tflops']:.1f}, TF32 "
        f"{g['tf32_tflops']:.1f}, bf16 {g['bf16_tflops']:.1f} TFLOP/s")
    out["encode"] = []
    for dim in opts.kernel_dims:
        for layers in opts.kernel_layers:
            res = gpu.bench_gpu_encode(dim, layers, g, rows=opts.gpu_rows, seed=opts.seed)
            log(f"gpu encode d={dim} {list(layers)}: exact {res['exact']['items_s']:.3g}/s "
                f"({res['exact']['ratio_ceiling']:.0%} of fp32 GEMM; its GEMMs alone "
                f"{res['gemm']['ratio_ceiling']:.0%}), tf32 {res['tf32']['items_s']:.3g}/s "
                f"({res['tf32']['identical']:.4%} identical), bf16 "
                f"{res['fast']['items_s']:.3g}/s, from host {res['host']['items_s']:.3g}/s, "
                f"agreement with CPU {res['agreement_cpu']:.4%}")
            out["encode"].append(res)
    out["fit"] = []
    for layers, rows in opts.fit:
        x = embeddings(CatalogSpec(dim=opts.fit_dim, seed=opts.seed + 17), rows)
        res = gpu.bench_gpu_fit(x, layers, niter=opts.fit_niter, seed=opts.seed)
        log(f"gpu fit {list(layers)}: GPU {res['gpu']['seconds']:.2f} s, CPU "
            f"{res['cpu']['seconds']:.2f} s, MSE ratio {res['mse_ratio']:.4f}")
        out["fit"].append(res)
    return out


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
