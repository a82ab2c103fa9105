"""GPU benchmarks: the card's measured matrix-multiply rates and the encode kernel against
them (exact fp32, its scoring GEMMs alone, the tf32 and bf16 fast paths, and from host
memory), and the residual k-means fit on the GPU against the same fit on this machine's CPUs.

Runs only where torch sees a CUDA device; every rate is the best of interleaved timed runs
with the device synchronized around each. Nothing here asserts on timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from semid_dist.bench.kernels import (
    encode_flop,
    interleaved_best_times,
    layer_mse,
    sampled_codebooks,
)
from semid_dist.bench.synthetic import CatalogSpec, embeddings
from semid_dist.quantize.encode import encode_batch, tile_rows
from semid_dist.quantize.residual import fit_residual_kmeans, init_subset
from semid_dist.quantize.torch_kernel import PRECISIONS, Tf32Switch, TorchBooks


def available() -> bool:
    return torch.cuda.is_available()


def device_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda}


def _synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """fn, returning once the device has finished the work it queued."""
    def run() -> Any:
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def gemm_rates(*, size: int = 8192, repeats: int = 10,
               device: str = "cuda") -> dict[str, Any]:
    """Best TFLOP/s of a (size x size) @ (size x size) product on the GPU in fp32 (TF32 off:
    the exact path's ceiling), TF32 and bf16, each timed over `repeats` back-to-back products
    after a warm-up."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen)
    b = torch.randn(size, size, device=device, generator=gen)
    flop = 2.0 * size ** 3 * repeats
    kinds = {"fp32": (a, b, False), "tf32": (a, b, True),
             "bf16": (a.bfloat16(), b.bfloat16(), False)}
    out: dict[str, Any] = {"size": size, "repeats": repeats}
    for name, (p, q, tf32) in kinds.items():
        with Tf32Switch(tf32):
            def products(p: torch.Tensor = p, q: torch.Tensor = q) -> None:
                for _ in range(repeats):
                    torch.mm(p, q)

            times = interleaved_best_times({name: _synced(products, device)}, rounds=3)
        out[f"{name}_tflops"] = flop / times[name] / 1e12
    return out


def _device_pass(books: TorchBooks, x: torch.Tensor, rows: int) -> Callable[[], Any]:
    """One encode of the device-resident x in chunks of `rows` (the kernel as a GPU engine
    runs it, less the copies in and out)."""
    def run() -> None:
        for start in range(0, len(x), rows):
            books.encode_rows(x[start:start + rows])

    return _synced(run, str(x.device))


def _gemm_pass(books: TorchBooks, x: torch.Tensor, rows: int) -> Callable[[], Any]:
    """The scoring GEMMs of one exact encode of x alone (each layer's codebook against the
    chunk, TF32 off): the rate of the kernel's own GEMM shape."""
    def run() -> None:
        with Tf32Switch(False):
            for start in range(0, len(x), rows):
                for cb, cb_sq in zip(books.books, books.sq):
                    torch.addmm(cb_sq.unsqueeze(0), x[start:start + rows], cb.T, beta=1.0,
                                alpha=-2.0)

    return _synced(run, str(x.device))


def bench_gpu_encode(dim: int, layers: Sequence[int], rates: dict[str, Any], *,
                     rows: int = 1_000_000, seed: int = 0, rerank: int = 8,
                     rounds: int = 5, agreement_rows: int = 65_536, unique_rows: int = 131_072,
                     device: str = "cuda") -> dict[str, Any]:
    """Items/s on data already on the GPU (passes over `rows` items) of the exact fp32
    kernel, its scoring GEMMs alone, the tf32 fast path (exact codes by a re-check) and the
    bf16 one (re-rank); and of the exact kernel called as engines call it (numpy in, numpy
    out: the copies included). Codes: the exact path's agreement with the CPU kernel's on
    `agreement_rows` items, each fast path's with the exact one's on all, and the share of
    rows x layers the tf32 path scored again. The items are `unique_rows` synthetic vectors
    repeated (generating 1M of d=768 takes a minute)."""
    books_np = sampled_codebooks(
        embeddings(CatalogSpec(dim=dim, seed=seed + 1), 4 * max(layers)), layers, seed=seed)
    base = embeddings(CatalogSpec(dim=dim, seed=seed), min(rows, unique_rows))
    x_np = np.ascontiguousarray(np.tile(base, (-(-rows // len(base)), 1))[:rows])
    x = torch.from_numpy(x_np).to(device, copy=True)
    chunk = tile_rows(8192, max(layers), dim, device)
    books = {name: TorchBooks(books_np, device, name, rerank) for name in PRECISIONS}
    times = interleaved_best_times({
        "exact": _device_pass(books["fp32"], x, chunk),
        "gemm": _gemm_pass(books["fp32"], x, chunk),
        "tf32": _device_pass(books["tf32"], x, chunk),
        "fast": _device_pass(books["bf16"], x, chunk),
        "host": lambda: encode_batch(books_np, x_np, device=device)}, rounds=rounds)
    flop = encode_flop(dim, layers)
    res: dict[str, Any] = {"dim": dim, "layers": list(layers), "rows": rows,
                           "chunk_rows": chunk, "flop_per_item": flop}
    for name, t in times.items():
        res[name] = {"seconds": t, "items_s": rows / t}
    res["exact"]["ceiling_items_s"] = rates["fp32_tflops"] * 1e12 / flop
    res["exact"]["ratio_ceiling"] = res["exact"]["items_s"] / res["exact"]["ceiling_items_s"]
    res["gemm"]["ratio_ceiling"] = res["gemm"]["items_s"] / res["exact"]["ceiling_items_s"]
    for name in ("tf32", "fast"):
        for kind in ("tf32", "bf16"):
            res[name][f"ratio_{kind}"] = res[name]["items_s"] * flop / (
                rates[f"{kind}_tflops"] * 1e12)
        res[name]["ratio_exact"] = res[name]["items_s"] / res["exact"]["items_s"]
    res["fast"]["rerank"] = rerank
    res["host"]["ratio_exact"] = res["host"]["items_s"] / res["exact"]["items_s"]
    exact = encode_batch(books_np, x_np, device=device).codes
    cpu = encode_batch(books_np, x_np[:agreement_rows]).codes
    res["agreement_cpu"] = float((exact[:agreement_rows] == cpu).all(axis=1).mean())
    res["agreement_items"] = min(rows, agreement_rows)
    tf32 = TorchBooks(books_np, device, "tf32")
    codes = [tf32.encode_rows(x[start:start + chunk])[0].cpu().numpy()
             for start in range(0, rows, chunk)]
    res["tf32"]["identical"] = float((np.concatenate(codes) == exact).all(axis=1).mean())
    res["tf32"]["rechecked"] = tf32.rechecked / (rows * len(layers))
    fast = encode_batch(books_np, x_np, device=device, precision="bf16", rerank=rerank).codes
    res["fast"]["identical"] = float((fast == exact).all(axis=1).mean())
    del x
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_gpu_fit(x: np.ndarray, layers: Sequence[int], *, niter: int, seed: int = 0,
                  device: str = "cuda") -> dict[str, Any]:
    """`fit_residual_kmeans` on the GPU and on this machine's CPUs, the same sample, start
    and iterations: wall time of the whole fit (k-means++ starts, on the CPU, on the seeded
    subset a build uses, included) and the MSE after the last layer."""
    out: dict[str, Any] = {"dim": x.shape[1], "layers": list(layers), "rows": len(x),
                           "niter": niter}
    seeds = init_subset(x, max(layers), seed=seed)  # the k-means++ points a build uses
    for key, on in (("gpu", device), ("cpu", "cpu")):
        t = time.perf_counter()
        books, _ = fit_residual_kmeans(x, list(layers), niter=niter, seed=seed, device=on,
                                       init_points=seeds)
        out[key] = {"seconds": time.perf_counter() - t, "mse": layer_mse(books, x)[-1]}
    out["speedup"] = out["cpu"]["seconds"] / out["gpu"]["seconds"]
    out["mse_ratio"] = out["gpu"]["mse"] / out["cpu"]["mse"]
    return out
