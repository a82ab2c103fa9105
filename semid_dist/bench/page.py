"""The benchmark's written outputs: the Markdown page around the table (the machine, the
targets met and not, the per-layer fit figures and the end-to-end inputs, how each number
is measured) and the JSON of the whole run (`write_outputs`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from semid_dist.bench.blas import coretype, is_generic, loaded_openblas, record
from semid_dist.bench.report import Row, format_markdown_table, layers_name, rate, summary


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
    blas = record()  # what the bench set when it loaded faiss (`blas.import_faiss`)
    versions = {"python": platform.python_version(), "numpy": numpy.__version__,
                "torch": torch.__version__, "pyarrow": pyarrow.__version__}
    for name in ("faiss", "ray", "pyspark"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"cores": cpu_count(), "cpu_model": model or platform.processor(),
            "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
            "ram_gib": round(ram, 1), "platform": platform.platform(), "versions": versions,
            "openblas": loaded_openblas(paths=False), "openblas_forced": blas["forced"],
            "openblas_note": blas["note"],
            "cpu_simd": sorted(flags & {"avx2", "avx512f"})}


def code_version() -> dict[str, Any]:
    """The semid_dist that runs the bench: its version, and where it runs from a git
    checkout of its own (an editable install), the commit and whether tracked files differ
    from it; `commit` None elsewhere (an installed package)."""
    import semid_dist

    root = Path(semid_dist.__file__).resolve().parent.parent
    info: dict[str, Any] = {"version": semid_dist.__version__, "commit": None, "changed": None}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # (a package inside another repository: none)
    if top is None or Path(top).resolve() != root:
        return info
    changes = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    info.update(commit=git("rev-parse", "--short=7", "HEAD"),
                changed=None if changes is None else bool(changes))
    return info


def code_line(code: dict[str, Any] | None) -> list[str]:
    """The page's line naming the code that ran (none on a page of an older run)."""
    if not code:
        return []
    where = "not a git checkout" if code.get("commit") is None else (
        f"commit {code['commit']}" + (", with uncommitted changes" if code.get("changed")
                                      else ""))
    return [f"- code: semid_dist {code['version']}, {where}"]


def blas_lines(m: dict[str, Any]) -> list[str]:
    """The page's OpenBLAS line; what the bench set where faiss's chose its generic Prescott
    kernels on this CPU (`blas.import_faiss`), and a warning where one runs them on a CPU
    with AVX2 or AVX-512 (faiss's then measured below its best: the ratios are of that),
    with why the bench left them (`openblas_note`) and what to run instead."""
    libs = m.get("openblas") or []
    if not libs:
        return []
    lines = ["- OpenBLAS kernels: " + ", ".join(
        f"{lib['file']} {lib['version']} {lib['architecture']}" for lib in libs)]
    for lib in m.get("openblas_forced") or []:
        done = ("so faiss is measured at its best (pass --blas-as-is to measure it with the "
                "kernels it chooses)" if not is_generic({"architecture": lib["now"]}) else
                f"but it still runs its {lib['now']} kernels")
        lines.append(f"- {lib['file']} {lib['version']} (faiss's) does not know this CPU and "
                     f"chose its generic {lib['was']} kernels; the bench loaded it with "
                     f"OPENBLAS_CORETYPE={lib['coretype']}, {done}")
    simd = m.get("cpu_simd") or []
    core, note = coretype(simd), m.get("openblas_note")
    if core and any(is_generic(lib) for lib in libs):
        why = f" ({note})" if note else ""
        advice = ("run again without --blas-as-is" if note == "--blas-as-is" else
                  f"run again with OPENBLAS_CORETYPE={core}")
        lines.append(f"- **warning**: an OpenBLAS above runs its generic Prescott kernels on a "
                     f"CPU with {', '.join(simd)} (faiss's, as a rule: it does not know the "
                     f"CPU), so faiss is measured below its best and the ratios against it "
                     f"are too high{why}; {advice}")
    return lines


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
        *code_line(results.get("code")),
        "- load average (1 min): " + ", ".join(f"{k} {v}" for k, v in load.items())
        + f"; total runtime {results.get('runtime_s', 0):.0f} s",
        f"- fp32 GEMM ceiling: {results['gemm']['gflops']:.1f} GFLOP/s (torch "
        f"{results['gemm']['torch_gflops']:.1f}, numpy {results['gemm']['numpy_gflops']:.1f}; "
        f"{results['gemm']['size']}^3 sgemm, best of 3)",
    ]
    lines += blas_lines(m)
    lines += _gpu_lines(results.get("gpu"))
    if results.get("decode"):
        dec = results["decode"]
        lines.append(f"- Parquet decode of the embedding column: {rate(dec['items_s'])} "
                     f"({dec['bytes_s'] / 1e9:.2f} GB/s of float32)")
    lines += ["", "## Results", "", format_markdown_table(rows), "",
              f"## Targets: {len(met)} met, {len(missed)} not met", ""]
    if results["quick"]:
        lines += [f"Quick mode: {QUICK_TARGETS}.", ""]  # ("Quick mode: it measures ...")
    lines += [f"- NOT met: {r.benchmark}, {r.config}: {r.ratio_text} (target {r.target})"
              for r in missed]
    lines += [f"- met: {r.benchmark}, {r.config}: {r.ratio_text} (target {r.target})"
              for r in met]
    lines += [f"- not judged: {r.benchmark}, {r.config}: {r.ratio_text}, above its reference, "
              "which this run measured low (a busy machine?): rerun on an idle one"
              for r in rows if r.above_reference]
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
  seconds. Threads of torch, numpy's BLAS and faiss's OpenMP = the cores available; faiss's
  own OpenBLAS runs the kernels of this CPU's SIMD where it would choose its generic ones
  (the OpenBLAS lines above; `--blas-as-is` keeps its choice). Ceiling
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


QUICK_TARGETS = ("it measures sizes below the targets' own (smaller catalogs, fewer "
                 "rounds): only a full run judges them")


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file beside it, renamed into place (the page
    of an earlier run is never left half-written), its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(results: dict[str, Any], rows: list[Row], *, json_path: str | None,
                  md_path: str | None) -> list[str]:
    """Write the JSON and the Markdown page where given (None: not written); returns the
    paths written."""
    written = []
    for path, render in ((json_path, to_json), (md_path, format_markdown)):
        if path is None:
            continue
        write_atomically(Path(path), render(results, rows))
        written.append(str(path))
    return written
