"""Engines: the only place ray / pyspark are imported (lazily, inside the engine modules).

An engine (`Engine`) decides where the stage functions of `semid_dist.stages` run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from semid_dist.config import BuildConfig
    from semid_dist.io.catalog import Shard
    from semid_dist.stages import JobContext


class Engine(Protocol):
    """What the pipeline asks of an engine (local, Ray, Spark), used as a context manager
    that stops what it started."""

    name: str
    warm_up_beside_fit: bool  # its warm-up runs while the driver fits (else beside the scan)

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...

    def close(self) -> None: ...

    def warm_up(self) -> None:
        """Start the encode stage's workers in the background (once per driver)."""

    def resolve_input(self, path: str) -> str:
        """input.path as a Parquet location (Spark: a `table:` name's files)."""

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        """`fn(*item)` for every item, results in item order."""

    def encode(self, ctx: JobContext, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        """`EncodeWorker(ctx)` over the shards (codebooks loaded once per worker): each
        shard's result (counts; its statistics stay staged), in any order."""

    def fit(self, sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig,
            log: Callable[[str], None], staging_url: str, *,
            init_centroids: list[np.ndarray] | None = None, acrq: Any = None,
            ) -> tuple[Any, list[dict[str, Any]]]:
        """The codebooks (or a learned module) fitted on the in-memory sample, and per-layer
        stats; init_centroids: a warm start; acrq: the sample's head / tail split."""


def _check_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        from semid_dist.errors import ConfigError

        raise ConfigError(f"engine: spark needs pyspark, which this Python cannot import "
                          f"({exc}): it is the [spark] extra, pip install "
                          "'semid_dist[spark]' (`make` installs it); or use engine: ray "
                          "or local") from exc


def check_engine(cfg: BuildConfig) -> None:
    """What `make_engine(cfg)`'s engine checks before it starts, with nothing started (a
    dry run): pyspark, Java and a standalone master's address for Spark; a cluster's
    address for Ray (`check_startable` of the session modules)."""
    if cfg.engine == "spark":
        _check_pyspark()
        from semid_dist.engines.spark_session import check_startable

        check_startable(cfg)
    elif cfg.engine == "ray":
        from semid_dist.engines.ray_session import check_startable

        check_startable(cfg)


def make_engine(cfg: BuildConfig, log: Callable[[str], None] = print) -> Engine:
    """Engine named by `cfg.engine` (imports Ray only when it is asked for)."""
    if cfg.engine == "spark":
        _check_pyspark()
        from semid_dist.engines.spark import SparkEngine

        return SparkEngine(cfg, log=log)
    if cfg.engine == "ray":
        from semid_dist.engines.ray_data import RayEngine

        return RayEngine(cfg, log=log)
    from semid_dist.engines.local import LocalEngine

    return LocalEngine(cfg, log=log)
