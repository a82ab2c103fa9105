"""In-process engine: the reference every other engine must match."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from semid_dist.config import BuildConfig
from semid_dist.io.catalog import Shard
from semid_dist.quantize.residual import fit_residual_kmeans
from semid_dist.stages import EncodeWorker, JobContext


class LocalEngine:
    name = "local"

    def __init__(self, cfg: BuildConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        return [fn(*item) for item in items]

    def encode(self, ctx: JobContext, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        worker = EncodeWorker(ctx)
        for shard in shards:
            yield worker(shard)

    def fit(self, sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig,
            log: Callable[[str], None], staging_url: str,
            ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        q = cfg.quantizer
        return fit_residual_kmeans(sample, q.layers, niter=q.niter, seed=cfg.seed,
                                   init_points=init_points, chunk_rows=cfg.encode.chunk_rows,
                                   progress=log)
