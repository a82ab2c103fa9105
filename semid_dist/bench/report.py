"""The benchmark's one table: rows of (benchmark, config, measured, reference, ratio, target,
status), printed as text and as a Markdown table (`semid_dist.bench.page` writes the page
and the JSON around it).

Targets are checked against the measured ratios as they are; a target whose inputs were not
measured in this run reads "n/a", never "met".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    # a share of a reference (a ceiling, the kernel) above 100%: the reference was measured
    # low in this run (a busy machine), so the target is not judged
    above_reference: bool = False

    @property
    def status(self) -> str:
        if self.above_reference:
            return "not judged: above its reference"
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
         *, fmt: str = "x", target: tuple[str, Callable[[float], bool]] | None = None,
         bounded: bool = False) -> Row:
    """A table row; `bounded`: the ratio is a share of what bounds it (a ceiling, the
    kernel), so one above 1 says the reference was measured low and is not judged."""
    text = f"{ratio:.0%}" if fmt == "%" else f"{ratio:.2f}x"
    if target is None:
        return Row(benchmark, config, measured, reference, ratio, text)
    if bounded and ratio > 1.0:
        return Row(benchmark, config, measured, reference, ratio, text, target[0],
                   above_reference=True)
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
                             rate(k["ceiling_items_s"]), k["ratio_ceiling"], fmt="%", bounded=True,
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
                             target=target, bounded=True))
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
                         fmt="%", target=(">= 50%", lambda r: r >= 0.5), bounded=True))
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
                         t["ratio_tf32"], fmt="%", target=(">= 50%", lambda r: r >= 0.5),
                         bounded=True))
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


def summary(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(targets met, targets not met)."""
    return [r for r in rows if r.met], [r for r in rows if r.met is False]
