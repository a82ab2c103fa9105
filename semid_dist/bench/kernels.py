"""In-memory benchmarks: the fp32 GEMM ceiling, the encode kernel against faiss, and the
residual k-means fit against `faiss.Kmeans`.

Every function returns plain dicts (rates in items/s, times in s). faiss is imported inside
the functions (it is the `[cpu]` / `[gpu]` extra). Nothing here asserts on timings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from semid_dist.bench.synthetic import CatalogSpec, embeddings
from semid_dist.quantize.cpu_blas import set_cpu_threads
from semid_dist.quantize.encode import encode_batch, nearest
from semid_dist.quantize.kmeans import kmeans, kmeans_plusplus
from semid_dist.quantize.residual import init_subset

Layers = tuple[int, ...]


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """Give torch, numpy's BLAS and faiss's OpenMP exactly `n` threads (oversubscription is
    up to 2x slower)."""
    set_cpu_threads(n)
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is an extra
        return
    faiss.omp_set_num_threads(n)


def best_time(fn: Callable[[], Any], *, repeats: int = 3,
              warmup: Callable[[], Any] | None = None) -> float:
    """Run `warmup` (default: `fn`) once, then `fn` `repeats` times; the best wall time in s."""
    (warmup or fn)()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def interleaved_best_times(fns: dict[str, Callable[[], Any]], *,
                           rounds: int = 4) -> dict[str, float]:
    """Best wall time in s of each function over `rounds` rounds that run each once in turn,
    after one warm-up each. On a shared machine the CPU's speed drifts over seconds (steal
    time reached 20%), so timing the methods in turn, not one after the other, keeps a burst
    from landing on one side of a ratio only."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def gemm_ceiling(*, size: int = 4096, repeats: int = 3) -> dict[str, Any]:
    """Best fp32 GFLOP/s of a (size x size) @ (size x size) product with torch and numpy."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flop = 2.0 * size ** 3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = np.empty((size, size), dtype=np.float32)
    t_torch = best_time(lambda: torch.mm(ta, tb), repeats=repeats)
    t_numpy = best_time(lambda: np.matmul(a, b, out=out), repeats=repeats)
    res = {"size": size, "torch_gflops": flop / t_torch / 1e9,
           "numpy_gflops": flop / t_numpy / 1e9}
    res["gflops"] = max(res["torch_gflops"], res["numpy_gflops"])
    return res


def encode_flop(dim: int, layers: Sequence[int]) -> float:
    """fp32 flop of one greedy residual encode: 2 d M per layer (the distance GEMM)."""
    return 2.0 * dim * float(sum(layers))


def sampled_codebooks(x: np.ndarray, layers: Sequence[int], *, seed: int = 0) -> list[np.ndarray]:
    """Cheap realistic codebooks: layer l = random rows of the residual after layers < l
    (k-means without Lloyd). Each layer draws rows that no earlier layer drew: a drawn row's
    residual is zero after its layer, and zero rows drawn again are duplicate codewords,
    exact ties that fitted codebooks do not have. x: (n, d) float32, n >= sum(layers)."""
    if len(x) < sum(layers):
        raise ValueError(f"{len(x)} rows cannot give {sum(layers)} distinct codewords")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    residual = x.copy()
    books = []
    for at, k in zip(np.cumsum([0, *layers[:-1]]), layers):
        cb = residual[order[at:at + k]].copy()
        labels, _ = nearest(residual, cb)
        residual -= cb[labels]
        books.append(cb)
    return books


def ours_encode(codebooks: list[np.ndarray], x: np.ndarray, *,
                rerank: int | None = None) -> np.ndarray:
    """x: (n, d) float32 -> (n, L) int32 with the library kernel at the pipeline's defaults:
    exact fp32, or with `rerank` the bf16 fast path (`encode.precision=bf16`) re-scoring that
    many candidates in fp32."""
    if rerank is None:
        return encode_batch(codebooks, x).codes
    return encode_batch(codebooks, x, precision="bf16", rerank=rerank).codes


def faiss_flat_encode(codebooks: list[np.ndarray], x: np.ndarray, *,
                      chunk_rows: int = 8192) -> np.ndarray:
    """Greedy residual encode with one `faiss.IndexFlatL2` per layer: search layer 0,
    subtract the chosen codeword, search layer 1 ... x: (n, d) float32 -> (n, L) int32."""
    import faiss

    indexes = []
    for cb in codebooks:
        index = faiss.IndexFlatL2(cb.shape[1])
        index.add(cb)
        indexes.append(index)
    codes = np.empty((len(x), len(codebooks)), dtype=np.int32)
    for start in range(0, len(x), chunk_rows):
        r = np.array(x[start:start + chunk_rows], dtype=np.float32, copy=True)
        for layer, (index, cb) in enumerate(zip(indexes, codebooks)):
            _, idx = index.search(r, 1)
            r -= cb[idx[:, 0]]
            codes[start:start + len(r), layer] = idx[:, 0]
    return codes


def faiss_rq(codebooks: list[np.ndarray]) -> Any:
    """A `faiss.ResidualQuantizer` holding our codebooks, beam 1 (plain greedy residual
    encode). Layer sizes must be powers of two."""
    import faiss

    nbits = faiss.UInt64Vector()
    for cb in codebooks:
        bits = int(len(cb)).bit_length() - 1
        if 1 << bits != len(cb):
            raise ValueError(f"faiss.ResidualQuantizer needs power-of-two layer sizes, got "
                             f"{len(cb)}")
        nbits.push_back(bits)
    rq = faiss.ResidualQuantizer(codebooks[0].shape[1], nbits)
    rq.max_beam_size = 1
    faiss.copy_array_to_vector(np.concatenate(codebooks).astype(np.float32).ravel(),
                               rq.codebooks)
    rq.is_trained = True
    return rq


def unpack_codes(packed: np.ndarray, nbits: Sequence[int]) -> np.ndarray:
    """faiss packed codes (n, code_size) uint8, LSB first -> (n, L) int32."""
    bits = np.unpackbits(packed, axis=1, bitorder="little").astype(np.int64)
    out = np.empty((len(packed), len(nbits)), dtype=np.int32)
    offset = 0
    for layer, nb in enumerate(nbits):
        out[:, layer] = bits[:, offset:offset + nb] @ (1 << np.arange(nb, dtype=np.int64))
        offset += nb
    return out


def faiss_rq_encode(rq: Any, x: np.ndarray) -> np.ndarray:
    """x: (n, d) float32 -> packed codes (n, code_size) uint8."""
    return rq.compute_codes(x)


class _Pool:
    """Synthetic clustered vectors, regenerated larger when more rows are asked for."""

    def __init__(self, spec: CatalogSpec, rows: int) -> None:
        self.spec, self.x = spec, embeddings(spec, rows)

    def get(self, rows: int) -> np.ndarray:
        if len(self.x) < rows:
            self.x = embeddings(self.spec, max(rows, 2 * len(self.x)))
        return self.x[:rows]


def _rows_for(fn: Callable[[np.ndarray], Any], pool: _Pool, *, target_s: float,
              start_rows: int, max_rows: int) -> int:
    """How many rows make one run of `fn` last about `target_s`: time runs on 8x more rows
    until one lasts a quarter of the target, then scale."""
    n = start_rows
    fn(pool.get(n))  # warm-up
    while True:
        x = pool.get(n)
        t = time.perf_counter()
        fn(x)
        elapsed = max(time.perf_counter() - t, 1e-6)
        if elapsed >= target_s / 4 or n >= max_rows:
            return int(min(max_rows, max(start_rows, n * target_s / elapsed)))
        n = min(max_rows, n * 8)


def bench_encode(dim: int, layers: Sequence[int], *, target_s: float = 1.5, seed: int = 0,
                 max_bytes: int = 512 * 2**20, gflops: float | None = None,
                 fast_rerank: int | None = None, rounds: int = 4) -> dict[str, Any]:
    """Items/s of our kernel, faiss flat per layer and faiss RQ (beam 1) on the same clustered
    data and codebooks; each rate is the best of `rounds` interleaved timed runs (see
    `interleaved_best_times`), on a number of items chosen so one run takes about
    `target_s`. Code agreement with faiss flat (and RQ) is the share of items whose L codes
    are all equal. With `fast_rerank`, also our bf16 fast path ("ours_fast", for information)
    and the share of items whose codes it leaves identical to the exact kernel's."""
    start_rows = max(2 * max(layers), 2048)
    max_rows = max(start_rows, max_bytes // (4 * dim))
    books = sampled_codebooks(embeddings(CatalogSpec(dim=dim, seed=seed + 1), 4 * max(layers)),
                              layers, seed=seed)
    pool = _Pool(CatalogSpec(dim=dim, seed=seed), start_rows)
    rq = faiss_rq(books)
    methods: dict[str, Callable[[np.ndarray], Any]] = {
        "ours": lambda a: ours_encode(books, a),
        "faiss_flat": lambda a: faiss_flat_encode(books, a),
        "faiss_rq": lambda a: faiss_rq_encode(rq, a),
    }
    if fast_rerank:
        methods["ours_fast"] = lambda a: ours_encode(books, a, rerank=fast_rerank)
    res: dict[str, Any] = {"dim": dim, "layers": list(layers),
                           "flop_per_item": encode_flop(dim, layers)}
    sizes = {name: _rows_for(fn, pool, target_s=target_s, start_rows=start_rows,
                             max_rows=max_rows) for name, fn in methods.items()}
    pool.get(max(sizes.values()))  # one array: every method reads a prefix of it
    inputs = {name: pool.get(n) for name, n in sizes.items()}
    times = interleaved_best_times(
        {name: (lambda fn=fn, xs=inputs[name]: fn(xs)) for name, fn in methods.items()},
        rounds=rounds)
    for name, n in sizes.items():
        res[name] = {"items": n, "seconds": times[name], "items_s": n / times[name]}
    if fast_rerank:
        res["ours_fast"]["rerank"] = fast_rerank
    x = pool.get(min(res[name]["items"] for name in methods))
    ours = ours_encode(books, x)
    flat = faiss_flat_encode(books, x)
    nbits = [int(len(cb)).bit_length() - 1 for cb in books]
    rq_codes = unpack_codes(faiss_rq_encode(rq, x), nbits)
    res["agreement_flat"] = float((ours == flat).all(axis=1).mean())
    res["agreement_rq"] = float((ours == rq_codes).all(axis=1).mean())
    res["agreement_items"] = len(x)
    if fast_rerank:
        fast = ours_encode(books, x, rerank=fast_rerank)
        res["ours_fast"]["identical"] = float((fast == ours).all(axis=1).mean())
        res["ours_fast"]["ratio_rq"] = res["ours_fast"]["items_s"] / res["faiss_rq"]["items_s"]
        res["ours_fast"]["ratio_ours"] = res["ours_fast"]["items_s"] / res["ours"]["items_s"]
    ours_rate = res["ours"]["items_s"]
    res["ratio_flat"] = ours_rate / res["faiss_flat"]["items_s"]
    res["ratio_rq"] = ours_rate / res["faiss_rq"]["items_s"]
    if gflops:
        res["ceiling_items_s"] = gflops * 1e9 / res["flop_per_item"]
        res["ratio_ceiling"] = ours_rate / res["ceiling_items_s"]
    return res


def layer_mse(codebooks: list[np.ndarray], x: np.ndarray) -> list[float]:
    """Mean squared residual norm after each layer of a greedy encode of x."""
    sq = encode_batch(codebooks, x).sq_residual.astype(np.float64)
    return [float(v) for v in sq.mean(axis=0)]


def fit_ours(x: np.ndarray, layers: Sequence[int], *, niter: int,
             seed: int = 0) -> dict[str, Any]:
    """Our residual k-means, layer by layer exactly as `fit_residual_kmeans` runs it (k-means++
    on a seeded init subset, then Lloyd), with the k-means++ init and the Lloyd iterations
    timed apart. Returns codebooks, the per-layer k-means++ starts and timings."""
    seeds = init_subset(x, max(layers), seed=seed).copy()
    residual = x.copy()
    books, inits, per_layer = [], [], []
    for layer, k in enumerate(layers):
        t = time.perf_counter()
        init = kmeans_plusplus(seeds, k, seed=seed + 1000 * layer)
        t_init = time.perf_counter() - t
        t = time.perf_counter()
        cb, _ = kmeans(residual, k, niter=niter, seed=seed + 1000 * layer, init_centroids=init)
        t_lloyd = time.perf_counter() - t
        residual -= cb[nearest(residual, cb)[0]]
        seeds -= cb[nearest(seeds, cb)[0]]
        books.append(cb)
        inits.append(init)
        per_layer.append({"layer": layer, "k": k, "init_s": t_init,
                          "s_per_iter": t_lloyd / niter})
    return {"codebooks": books, "inits": inits, "layers": per_layer}


def fit_faiss(x: np.ndarray, layers: Sequence[int], *, niter: int,
              seed: int = 0) -> dict[str, Any]:
    """Residual k-means with one `faiss.Kmeans` per layer (no subsampling: max_points_per_
    centroid above n / k), each on the residual of faiss's own earlier layers."""
    import faiss

    residual = x.copy()
    books, per_layer = [], []
    for layer, k in enumerate(layers):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + layer, verbose=False,
                          max_points_per_centroid=len(x) // k + 2, min_points_per_centroid=1)
        t = time.perf_counter()
        km.train(residual)
        t_train = time.perf_counter() - t
        cb = np.ascontiguousarray(km.centroids, dtype=np.float32)
        _, idx = km.index.search(residual, 1)
        residual -= cb[idx[:, 0]]
        books.append(cb)
        per_layer.append({"layer": layer, "k": k, "s_per_iter": t_train / niter})
    return {"codebooks": books, "layers": per_layer}


def bench_fit(x: np.ndarray, layers: Sequence[int], *, niter: int, seed: int = 0,
              rounds: int = 1) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Ours (local) vs faiss.Kmeans per layer on the same sample x: (n, d) float32 and
    iteration count: seconds per Lloyd iteration and MSE after each layer (both measured by
    one greedy encode of the sample with the fitted codebooks). With `rounds` > 1 both fits
    run that many times in turn (ours, faiss, ours, ...) and each layer's time is the best
    of its rounds, as the kernels' rates are; the MSEs are the first round's (ours is seeded
    and thread-invariant: every round fits the same codebooks). Returns (results, our
    per-layer k-means++ starts, for runs elsewhere from the same start)."""
    runs = [(fit_ours(x, layers, niter=niter, seed=seed),
             fit_faiss(x, layers, niter=niter, seed=seed)) for _ in range(max(1, rounds))]
    ours, theirs = runs[0]
    ours_mse, faiss_mse = layer_mse(ours["codebooks"], x), layer_mse(theirs["codebooks"], x)
    per_layer = []
    for i, (o, mo, mf) in enumerate(zip(ours["layers"], ours_mse, faiss_mse)):
        o = {**o, "init_s": min(r[0]["layers"][i]["init_s"] for r in runs),
             "s_per_iter": min(r[0]["layers"][i]["s_per_iter"] for r in runs)}
        f = {"s_per_iter": min(r[1]["layers"][i]["s_per_iter"] for r in runs)}
        per_layer.append({**o, "faiss_s_per_iter": f["s_per_iter"],
                          "time_ratio": o["s_per_iter"] / f["s_per_iter"],
                          "mse": mo, "faiss_mse": mf, "mse_ratio": mo / mf})
    t_ours = sum(p["s_per_iter"] for p in per_layer)
    t_faiss = sum(p["faiss_s_per_iter"] for p in per_layer)
    res = {"dim": x.shape[1], "layers": list(layers), "rows": len(x), "niter": niter,
           "rounds": len(runs), "per_layer": per_layer, "s_per_iter": t_ours / len(layers),
           "faiss_s_per_iter": t_faiss / len(layers), "time_ratio": t_ours / t_faiss,
           "init_s": sum(p["init_s"] for p in per_layer),
           "mse": ours_mse[-1], "faiss_mse": faiss_mse[-1],
           "mse_ratio": ours_mse[-1] / faiss_mse[-1]}
    return res, ours["inits"]
