"""In-process engine: the reference every other engine must match."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from semid_dist.config import BuildConfig
from semid_dist.errors import ConfigError
from semid_dist.io.catalog import Shard
from semid_dist.quantize.acrq import AcrqSample, fit_acrq, fit_acrq_vae
from semid_dist.quantize.model import Fitted, fit_learned, learned_params
from semid_dist.quantize.residual import fit_residual_kmeans
from semid_dist.quantize.training import LearnedParams
from semid_dist.runtime import TABLE_PREFIX, torch_device
from semid_dist.stages import EncodeWorker, JobContext


def learned_config(cfg: BuildConfig) -> LearnedParams:
    """The learned quantizer's hyper-parameters of a build config (method defaults applied)."""
    q = cfg.quantizer
    method = q.acrq_base if q.method == "acrq" else q.method  # acrq's model and defaults
    return learned_params(method, seed=cfg.seed, lr=q.lr, weight_decay=q.weight_decay,
                          latent_dim=q.latent_dim, hidden_dims=tuple(q.hidden_dims),
                          epochs=q.epochs, batch_size=q.batch_size, beta=q.beta,
                          dead_code_window=q.dead_code_window, topk=q.r3_topk, lam=q.r3_lambda,
                          pd_t=cfg.metrics.pd_t, precision=cfg.fit.precision)


class LocalEngine:
    name = "local"
    # when the pipeline starts `warm_up`: as the job starts, or (an engine that runs jobs
    # first come, first served, whose warm-up would hold up the scan's and the sample's
    # tasks) when the driver starts fitting; as the job starts, too, when the codebooks
    # come from encode.from_version (nothing is fitted)
    warm_up_beside_fit = False

    def __init__(self, cfg: BuildConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def resolve_input(self, path: str) -> str:
        """The catalog URL to read; only the Spark engine resolves `table:<name>`."""
        if path.startswith(TABLE_PREFIX):
            raise ConfigError(f"input.path={path!r} names a Spark catalog table; use "
                              "engine: spark, or point input.path at the table's Parquet files")
        return path

    def warm_up(self) -> None:
        """Get the encode stage's workers ready in the background while the driver plans,
        scans and fits (the Ray engine starts its worker processes), or fits
        (`warm_up_beside_fit`); nothing to do in this process. The pipeline may call it
        more than once: an engine warms up once."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        return [fn(*item) for item in items]

    def encode(self, ctx: JobContext, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        """Encode the shards in order in this process, reading each next shard in a thread
        while the current one is encoded (`EncodeWorker.read_ahead`, at most one shard
        ahead): Parquet decoding releases the GIL and runs beside the current shard's steps
        (mostly its kernel, which then shares the cores with it), and the shard's one-thread
        steps no longer wait for a read. On the benchmark's 1.5M x 128 catalog (3 x 256,
        2 cores) the stage took 4.7-5.2 s instead of 6.3."""
        if not shards:
            return
        worker = EncodeWorker(ctx)
        with ThreadPoolExecutor(1, thread_name_prefix="semid-read") as reader:
            ahead = reader.submit(worker.read_ahead, shards[0])
            try:
                for i, shard in enumerate(shards):
                    ahead.result()  # a failed read raises here, at its shard's turn
                    if i + 1 < len(shards):
                        ahead = reader.submit(worker.read_ahead, shards[i + 1])
                    yield worker(shard)
            finally:  # stopped or failed: the read in flight ends, and its rows are dropped
                if not ahead.cancel():
                    ahead.exception()  # waits for it, raising nothing
                worker.drop_reads()

    def fit(self, sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig,
            log: Callable[[str], None], staging_url: str, *,
            init_centroids: list[np.ndarray] | None = None, acrq: AcrqSample | None = None,
            ) -> tuple[Fitted, list[dict[str, Any]]]:
        """sample: (n, d) float32; init_centroids: warm start, one (k_l, d) per layer
        (rq_kmeans only); acrq: the sample's head / tail split (quantizer.method=acrq). On
        the GPU with `fit.use_gpu` (this process's; Spark's driver too).
        Returns (rq_kmeans / acrq codebooks or a learned module, stats)."""
        q, device = cfg.quantizer, torch_device(cfg, "fit")

        def progress(msg: str) -> None:  # as the Ray Train fit's lines read
            log(f"fit: {msg}")

        if q.method == "acrq" and cfg.learned:
            return fit_acrq_vae(sample, acrq.head, q.layers, cfg.anchor_sizes, acrq,
                                learned_config(cfg), device=device, progress=progress)
        if q.method == "acrq":
            return fit_acrq(sample, acrq.head, q.layers, cfg.anchor_sizes, acrq, niter=q.niter,
                            seed=cfg.seed, chunk_rows=cfg.encode.chunk_rows, device=device,
                            progress=progress)
        if cfg.learned:
            return fit_learned(q.method, sample, init_points, q.layers, learned_config(cfg),
                               device=device, progress=progress)
        return fit_residual_kmeans(sample, q.layers, niter=q.niter, seed=cfg.seed,
                                   init_points=init_points, init_centroids=init_centroids,
                                   chunk_rows=cfg.encode.chunk_rows, device=device,
                                   progress=progress)
