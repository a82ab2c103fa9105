"""The benchmark's one table: rows of (benchmark, config, measured, reference, ratio, target,
status), printed as text and written as JSON and Markdown.

Targets are checked against the measured ratios as they are; a target whose inputs were not
measured in this run reads "n/a", never "met".
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    benchmark: str
    config: str
    measured: str
    reference: str
    ratio: float | None
    ratio_text: str
    target: str = ""
    met: bool | None = None  # None: no target on this row, or (target set) not measured

    @property
    def status(self) -> str:
        if self.met is None:
            return "n/a" if self.target else ""
        return "met" if self.met else "NOT met"


def layers_name(layers: list[int] | tuple[int, ...]) -> str:
    """[256, 256, 256] -> '3x256'; [256, 512] -> '256/512'."""
    return (f"{len(layers)}x{layers[0]}" if len(set(layers)) == 1
            else "/".join(str(k) for k in layers))


def rate(items_s: float) -> str:
    if items_s >= 1e6:
        return f"{items_s / 1e6:.2f}M items/s"
    if items_s >= 1e3:
        return f"{items_s / 1e3:.1f}k items/s"
    return f"{items_s:.0f} items/s"


def _row(benchmark: str, config: str, measured: str, reference: str, ratio: float,
         *, fmt: str = "x", target: tuple[str, Callable[[float], bool]] | None = None) -> Row:
    text = f"{ratio:.0%}" if fmt == "%" else f"{ratio:.2f}x"
    if target is None:
        return Row(benchmark, config, measured, reference, ratio, text)
    return Row(benchmark, config, measured, reference, ratio, text, target[0],
               bool(target[1](ratio)))


def kernel_rows(kernels: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for k in kernels:
        cfg = f"d={k['dim']} {layers_name(k['layers'])}"
        ours = k["ours"]["items_s"]
        agree = f" (codes agree {k['agreement_flat']:.4%})"
        rows.append(_row("encode kernel vs faiss IndexFlatL2", cfg, rate(ours),
                         rate(k["faiss_flat"]["items_s"]) + agree, k["ratio_flat"],
                         target=(">= 1.0x", lambda r: r >= 1.0)))
        rows.append(_row("encode kernel vs faiss RQ (beam 1)", cfg, rate(ours),
                         rate(k["faiss_rq"]["items_s"]), k["ratio_rq"],
                         target=(">= 2.0x", lambda r: r >= 2.0)))
        if "ratio_ceiling" in k:
            big = max(k["layers"]) >= 4096
            rows.append(_row("encode kernel vs fp32 GEMM ceiling", cfg, rate(ours),
                             rate(k["ceiling_items_s"]), k["ratio_ceiling"], fmt="%",
                             target=(">= 70%", lambda r: r >= 0.7) if big else None))
        if "ours_fast" in k:
            fast = k["ours_fast"]
            rows.append(_row(f"(info) encode fast path (bf16, rerank {fast['rerank']}) vs "
                             "faiss RQ (beam 1)", cfg,
                             f"{rate(fast['items_s'])} ({fast['ratio_ours']:.2f}x exact)",
                             f"{rate(k['faiss_rq']['items_s'])} (codes identical to exact "
                             f"{fast['identical']:.4%})", fast["ratio_rq"]))
    return rows


def e2e_rows(e2e: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for block in e2e:
        cfg = f"d={block['dim']} {layers_name(block['layers'])}, {block['rows']:,} items"
        share = 0.6 if max(block["layers"]) >= 4096 else 0.5
        for run in block["engines"]:
            name = {"ray": "Ray Data", "spark": "Spark", "local": "local"}[run["engine"]]
            target = ((f">= {share:.0%}", lambda r, s=share: r >= s)
                      if run["engine"] == "ray" else None)
            rows.append(_row(f"{name} encode stage vs kernel", cfg, rate(run["encode_items_s"]),
                             rate(block["kernel_items_s"]), run["share_kernel"], fmt="%",
                             target=target))
            if run.get("steady_items_s"):
                rows.append(_row(f"(info) {name} encode stage after its first shard vs kernel",
                                 cfg, f"{rate(run['steady_items_s'])} (first shard at "
                                 f"{run['first_shard_s']:.1f} s)", rate(block["kernel_items_s"]),
                                 run["steady_items_s"] / block["kernel_items_s"], fmt="%"))
            rows.append(_row(f"{name} encode stage vs e2e ceiling", cfg,
                             rate(run["encode_items_s"]), rate(block["ceiling_items_s"]),
                             run["share_ceiling"], fmt="%"))
            rows.append(_row(f"{name} whole `semid encode` vs kernel", cfg,
                             f"{rate(run['wall_items_s'])} ({run['wall_s']:.1f} s)",
                             rate(block["kernel_items_s"]), run["wall_items_s"]
                             / block["kernel_items_s"], fmt="%"))
    return rows


def fit_rows(fits: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for f in fits:
        cfg = f"d={f['dim']} {layers_name(f['layers'])}, {f['rows']:,} pts, {f['niter']} it"
        ref = f"faiss.Kmeans {f['faiss_s_per_iter'] * 1e3:.1f} ms/it"
        runs = [("local", f["s_per_iter"], f["mse_ratio"])]
        runs += [(f"Ray Train {r['workers']}w x {r['threads_per_worker']}t", r["s_per_iter"],
                  r["mse_ratio"]) for r in f.get("ray_train", [])]
        for name, s_it, mse_ratio in runs:
            ok_mse = mse_ratio <= 1.01
            rows.append(_row(f"fit {name}: time per Lloyd iteration", cfg,
                             f"{s_it * 1e3:.1f} ms/it (MSE {mse_ratio:.4f}x faiss)", ref,
                             s_it / f["faiss_s_per_iter"],
                             target=("<= 1.25x at MSE <= 1.01x",
                                     lambda r, ok=ok_mse: r <= 1.25 and ok)))
    return rows


def rss_rows(rss: dict[str, Any] | None) -> list[Row]:
    if not rss:
        return []
    n, big = rss["n"], rss["4n"]
    cfg = f"local `semid build`, d={rss['dim']} {layers_name(rss['layers'])}"
    return [_row("peak RSS at 4N vs N", cfg,
                 f"{big['maxrss_mb']:.0f} MiB at {big['rows']:,}",
                 f"{n['maxrss_mb']:.0f} MiB at {n['rows']:,}",
                 big["maxrss_mb"] / n["maxrss_mb"], target=("<= 1.1x", lambda r: r <= 1.1))]


def gpu_rows(gpu: dict[str, Any] | None) -> list[Row]:
    """The GPU section's rows (none where the run had no GPU)."""
    if not gpu or "encode" not in gpu:
        return []
    rows = []
    for k in gpu["encode"]:
        cfg = f"d={k['dim']} {layers_name(k['layers'])}"
        exact, fast, host = k["exact"], k["fast"], k["host"]
        rows.append(_row("GPU encode kernel, exact fp32 (data on the GPU) vs the GPU's fp32 "
                         "GEMM rate", cfg, rate(exact["items_s"]),
                         f"{rate(exact['ceiling_items_s'])} (codes agree with the CPU "
                         f"kernel's {k['agreement_cpu']:.4%})", exact["ratio_ceiling"],
                         fmt="%", target=(">= 50%", lambda r: r >= 0.5)))
        rows.append(_row("(info) GPU scoring GEMMs alone (the kernel's shapes) vs the GPU's "
                         "fp32 GEMM rate", cfg, rate(k["gemm"]["items_s"]),
                         rate(exact["ceiling_items_s"]), k["gemm"]["ratio_ceiling"], fmt="%"))
        per_tf32 = gpu["gemm"]["tf32_tflops"] * 1e12 / k["flop_per_item"]
        t = k["tf32"]
        rows.append(_row("GPU encode fast path tf32 (exact codes: rows within TF32's error "
                         "bound scored again in fp32) vs the GPU's TF32 GEMM rate", cfg,
                         f"{rate(t['items_s'])} ({t['ratio_exact']:.2f}x exact; "
                         f"{t['rechecked']:.1%} of rows x layers scored again)",
                         f"{rate(per_tf32)} (codes identical to exact {t['identical']:.4%})",
                         t["ratio_tf32"], fmt="%", target=(">= 50%", lambda r: r >= 0.5)))
        per_bf16 = gpu["gemm"]["bf16_tflops"] * 1e12 / k["flop_per_item"]
        rows.append(_row(f"(info) GPU encode fast path bf16 (rerank {fast['rerank']}) vs the "
                         "GPU's bf16 GEMM rate", cfg,
                         f"{rate(fast['items_s'])} ({fast['ratio_exact']:.2f}x exact)",
                         f"{rate(per_bf16)} (codes identical to exact {fast['identical']:.4%})",
                         fast["ratio_bf16"], fmt="%"))
        rows.append(_row("(info) GPU encode from host memory (numpy in and out, as engines "
                         "call it) vs data on the GPU", cfg, rate(host["items_s"]),
                         rate(exact["items_s"]), host["ratio_exact"], fmt="%"))
    for f in gpu.get("fit", []):
        cfg = f"d={f['dim']} {layers_name(f['layers'])}, {f['rows']:,} pts, {f['niter']} it"
        rows.append(_row("(info) fit (residual k-means) on the GPU vs on this machine's CPUs",
                         cfg, f"{f['gpu']['seconds']:.2f} s (MSE {f['mse_ratio']:.4f}x CPU)",
                         f"{f['cpu']['seconds']:.2f} s", f["speedup"]))
    return rows


def all_rows(results: dict[str, Any]) -> list[Row]:
    return (kernel_rows(results.get("kernels", [])) + e2e_rows(results.get("e2e", []))
            + fit_rows(results.get("fit", [])) + rss_rows(results.get("rss"))
            + gpu_rows(results.get("gpu")))


COLUMNS = ("benchmark", "config", "measured", "reference", "ratio", "target", "status")


def _cells(row: Row) -> list[str]:
    return [row.benchmark, row.config, row.measured, row.reference, row.ratio_text,
            row.target, row.status]


def format_text(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))).rstrip()
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, RAM and library versions of this machine."""
    import numpy
    import pyarrow
    import torch

    from semid_dist.bench.kernels import cpu_count
    from semid_dist.quantize.cpu_blas import cpuinfo

    info = cpuinfo()
    model, flags = info.get("model name", ""), set(info.get("flags", "").split())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version(), "numpy": numpy.__version__,
                "torch": torch.__version__, "pyarrow": pyarrow.__version__}
    for name in ("faiss", "ray", "pyspark"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"cores": cpu_count(), "cpu_model": model or platform.processor(),
            "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "ram_gib": round(ram, 1), "platform": platform.platform(), "versions": versions}


def summary(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(targets met, targets not met)."""
    return [r for r in rows if r.met], [r for r in rows if r.met is False]


def format_markdown(results: dict[str, Any], rows: list[Row]) -> str:
    m = results["machine"]
    met, missed = summary(rows)
    load = results.get("load_average", {})
    lines = [
        "# Benchmarks",
        "",
        "Written by `jobs/benchmark.py` (`semid bench`); every ratio below was measured side "
        "by side in one run on one machine. Rerun it on yours; absolute rates vary, ratios "
        "less.",
        "",
        f"- date: {results['date']}",
        f"- command: `{results['command']}`" + (" (quick mode)" if results["quick"] else ""),
        f"- machine: {m['cores']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
        f"{m['platform']}; native bf16: "
        f"{', '.join(m.get('cpu_bf16') or []) or 'none found'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "- load average (1 min): " + ", ".join(f"{k} {v}" for k, v in load.items())
        + f"; total runtime {results.get('runtime_s', 0):.0f} s",
        f"- fp32 GEMM ceiling: {results['gemm']['gflops']:.1f} GFLOP/s (torch "
        f"{results['gemm']['torch_gflops']:.1f}, numpy {results['gemm']['numpy_gflops']:.1f}; "
        f"{results['gemm']['size']}^3 sgemm, best of 3)",
    ]
    lines += _gpu_lines(results.get("gpu"))
    if results.get("decode"):
        dec = results["decode"]
        lines.append(f"- Parquet decode of the embedding column: {rate(dec['items_s'])} "
                     f"({dec['bytes_s'] / 1e9:.2f} GB/s of float32)")
    lines += ["", "## Results", "", format_markdown_table(rows), "",
              f"## Targets: {len(met)} met, {len(missed)} not met", ""]
    lines += [f"- NOT met: {r.benchmark}, {r.config}: {r.ratio_text} (target {r.target})"
              for r in missed]
    lines += [f"- met: {r.benchmark}, {r.config}: {r.ratio_text} (target {r.target})"
              for r in met]
    lines += ["", *details(results), METHOD]
    return "\n".join(lines) + "\n"


def _gpu_lines(gpu: dict[str, Any] | None) -> list[str]:
    if gpu is None:
        return []
    if "device" not in gpu:
        return [f"- GPU: none ({gpu.get('skipped', 'not measured')})"]
    dev, g = gpu["device"], gpu["gemm"]
    return [f"- GPU: {dev['name']} ({dev['memory_gib']} GiB, {dev['multiprocessors']} SMs, "
            f"compute capability {dev['capability']}; torch {dev['torch']}, CUDA "
            f"{dev['cuda']}); measured GEMM rates fp32 {g['fp32_tflops']:.1f}, TF32 "
            f"{g['tf32_tflops']:.1f}, bf16 {g['bf16_tflops']:.1f} TFLOP/s ({g['size']}^3, "
            f"best of 3 rounds of {g.get('repeats', 10)})"]


def details(results: dict[str, Any]) -> list[str]:
    """Markdown sections behind the table: per-layer fit figures and the e2e inputs."""
    out = []
    for f in results.get("fit", []):
        out += [f"## Fit per layer: d={f['dim']} {layers_name(f['layers'])}, {f['rows']:,} "
                f"points, {f['niter']} iterations", "",
                "| layer | k | ours ms/it | faiss ms/it | time ratio | ours k-means++ s "
                "| ours MSE | faiss MSE | MSE ratio |", "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {p['layer']} | {p['k']} | {p['s_per_iter'] * 1e3:.1f} | "
                f"{p['faiss_s_per_iter'] * 1e3:.1f} | {p['time_ratio']:.2f}x | "
                f"{p['init_s']:.2f} | {p['mse']:.5f} | {p['faiss_mse']:.5f} | "
                f"{p['mse_ratio']:.4f} |" for p in f["per_layer"]]
        for r in f.get("ray_train", []):
            layers = " / ".join(f"{v * 1e3:.1f}" for v in r.get("s_per_iter_by_layer", []))
            by_layer = f"; ms per iteration by layer {layers}" if layers else ""
            runs = r.get("s_per_iter_runs", [])
            all_runs = (f" (ms per iteration of each run: "
                        f"{' / '.join(f'{v * 1e3:.1f}' for v in runs)})" if len(runs) > 1
                        else "")
            out.append(f"\nRay Train {r['workers']} worker(s) x {r['threads_per_worker']} "
                       f"thread(s): the fit took {r['run_s']:.1f} s in all (worker start-up "
                       f"included){by_layer}; MSE {r['mse']:.5f}{all_runs}.")
        out.append("")
    for b in results.get("e2e", []):
        cat = b["catalog"]
        out.append(f"- e2e d={b['dim']} {layers_name(b['layers'])}: {b['rows']:,} items in "
                   f"{cat['files']} files, {cat['row_groups']} row groups of <= "
                   f"{cat['chunk_rows']:,} rows ({cat['bytes'] / 2**20:.0f} MiB); kernel "
                   f"{rate(b['kernel_items_s'])}, decode {rate(b['decode_items_s'])}, "
                   f"ceiling {rate(b['ceiling_items_s'])}; whole-job wall times: "
                   + ", ".join(f"{e['engine']} {e['wall_s']:.1f} s" for e in b["engines"])
                   + _stage_runs(b["engines"]))
    out += _worker_steps(results.get("e2e", []))
    if results.get("rss"):
        r = results["rss"]
        out.append(f"- peak RSS builds: {r['n']['rows']:,} items {r['n']['maxrss_mb']:.0f} MiB "
                   f"in {r['n']['wall_s']:.1f} s; {r['4n']['rows']:,} items "
                   f"{r['4n']['maxrss_mb']:.0f} MiB in {r['4n']['wall_s']:.1f} s")
    return out + ([""] if out else [])


METHOD = """## How each number is measured

- **encode kernel**: `semid_dist.quantize.encode.encode_batch` (default `chunk_rows`, as the
  pipeline runs it) on clustered synthetic vectors with codebooks sampled from the data's
  residuals; faiss flat = one `IndexFlatL2` per layer, search k=1, subtract, next layer
  (8,192-row chunks, like ours); faiss RQ = `ResidualQuantizer` with our codebooks and
  `max_beam_size = 1`, `compute_codes`. Each: one warm-up, then the best of 4 rounds that
  time every method once in turn (so a burst of a neighbour's load or hypervisor steal falls
  on both sides of a ratio), the item count chosen so a run takes about the configured
  seconds. Threads of torch, numpy's BLAS and faiss's OpenMP = the cores available. Ceiling
  items/s = GEMM GFLOP/s / (2 d sum(M_l)). "codes agree" = share of items whose L codes
  equal faiss flat's. "(info) encode fast path" rows time the opt-in
  `encode.precision: bf16` path in the same rounds (a bf16 GEMM ranks the codewords, the
  `rerank` best are re-scored in fp32), with its rate against the exact kernel's and the
  share of items whose L codes it leaves identical to the exact kernel's; no target is
  judged on them. It pays only where the CPU multiplies bf16 natively (AVX512_BF16 or AMX,
  which torch's oneDNN uses) and the GEMM dominates (large d and codebooks).
- **e2e**: `semid encode` (codebooks of an existing version) in a fresh process per engine,
  on a synthetic Parquet catalog (one row group per encode shard, several files), started
  after the benchmark process has handed the memory it freed back to the system (the
  kernels' and the decode rate's: 1.6 GiB held slowed the Ray engine's encode stage); the
  engines take turns, twice by default (`e2e_rounds`), and each engine's rows are from its
  run with the fastest encode stage (every run's rate is listed below the tables). "encode
  stage" = `metrics.json` `timings.encode_s` (read Parquet, validate, encode, write staged
  codes, per-shard statistics); "whole" = the process's wall time (start-up, scan, reduce,
  report, commit included). The encode workers time each step of a shard (read the row
  groups, validate, quantize = the encode kernel, write the staged codes and rejects,
  statistics, result = stage the statistics); the table of steps gives their mean per shard. "(info)
  after its first shard" = the stage's steady pace: the other shards' rows / (encode_s -
  `timings.encode_first_shard_s`), i.e. without the engine's start-up (worker processes,
  Ray Data's executor, a Spark job) and its first shard; on a catalog of hundreds of
  millions of items the stage runs at this pace. Targets are judged on the whole stage.
  e2e ceiling = 1 / (1 / kernel + 1 / decode), decode = the pyarrow rate of reading the
  catalog's embedding column into float32 matrices.
- **fit**: residual k-means per layer on the same sample and iteration count. Ours: the
  library's `kmeans` (Lloyd over mergeable statistics) from its k-means++ start, timed
  without the k-means++ init (reported apart in the JSON); faiss: `faiss.Kmeans` with
  `max_points_per_centroid` above n/k (no subsampling), its own random init. MSE = mean
  squared residual after the last layer, by one greedy encode of the sample with each
  codebook set. Both fits run in turn, three times by default (`fit_rounds`), and a
  layer's time is its best round's, as the kernels' rates are best-of rounds. Ray Train:
  the same start on w workers; time per iteration = the mean of the iteration times the
  workers record (each Lloyd iteration with its all-reduce, the worker start-up left out),
  the best of `fit_rounds` runs per worker count, the worker counts taking turns on one Ray.
- **GPU** (only where torch sees a CUDA device): the card's GEMM rates are 8192^3 products
  (fp32 with TF32 off, TF32, bf16). The encode kernel runs on vectors already on the GPU, in
  the chunks a GPU engine uses (256 MiB of scores and rows), passes over `gpu_rows` items
  (1M; 100k in quick mode; 131,072 distinct ones, repeated) timed with the device
  synchronized, best of 5 interleaved rounds; ceiling items/s = the GEMM rate /
  (2 d sum(M_l)). "scoring GEMMs alone" = the same passes running only each layer's `addmm`
  of codebook and chunk (no argmin, no residual update): what the GEMM of these shapes
  reaches by itself. The exact path's codes are compared with the CPU kernel's on the first
  65,536 items, the fast paths' with the exact path's on all; "scored again" = the share of
  rows x layers the tf32 path re-scored in fp32. "from host memory" =
  `encode_batch(..., device="cuda")` on a numpy array (copies in and out included), as the
  engines call it. GPU fit = `fit_residual_kmeans` on the GPU and on the CPUs (every core),
  same sample, seed and iterations, wall time of the whole fit.
- **peak RSS**: `semid build` (local engine, fixed fit sample) in a subprocess at N and 4N
  items; a tiny launcher process runs it and reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`
  (the job's own peak, not the benchmark process's pages it was forked from).
"""


def _worker_steps(e2e: list[dict[str, Any]]) -> list[str]:
    """A table of the encode workers' mean milliseconds per shard in each step, per e2e
    config and engine (the kept runs), with the quantize step's share of the workers' time."""
    runs = [(b, e) for b in e2e for e in b["engines"] if e.get("worker_ms")]
    if not runs:
        return []
    steps = list(dict.fromkeys(step for _, e in runs for step in e["worker_ms"]))
    out = ["", "Encode workers' time per shard, by step (mean ms; the kept run of each "
           "engine; `metrics.json` `timings.encode_worker_<step>_s` over the shards):", "",
           "| config | engine | " + " | ".join(steps) + " | quantize share |",
           "|---|---|" + "---|" * (len(steps) + 1)]
    for b, e in runs:
        ms = e["worker_ms"]
        total = sum(ms.values()) or 1.0
        out.append(f"| d={b['dim']} {layers_name(b['layers'])} | {e['engine']} | "
                   + " | ".join(f"{ms[s]:.0f}" if s in ms else "-" for s in steps)
                   + f" | {ms.get('quantize', 0.0) / total:.0%} |")
    return out + [""]


def _stage_runs(engines: list[dict[str, Any]]) -> str:
    """'; encode stage of each run (the best counts): local 1.2M / 1.1M, ...' when the
    engines ran more than once, else ''."""
    runs = [(e["engine"], e.get("encode_items_s_runs", [])) for e in engines]
    if all(len(r) < 2 for _, r in runs):
        return ""
    return "; encode stage of each run (the best counts): " + ", ".join(
        f"{name} {' / '.join(rate(v).removesuffix(' items/s') for v in r)}" for name, r in runs)


def to_json(results: dict[str, Any], rows: list[Row]) -> str:
    out = {**results, "table": [{**asdict(r), "status": r.status} for r in rows]}
    return json.dumps(out, indent=2, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_outputs(results: dict[str, Any], rows: list[Row], *, json_path: str,
                  md_path: str) -> None:
    for path, text in ((json_path, to_json(results, rows)),
                       (md_path, format_markdown(results, rows))):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(p)
