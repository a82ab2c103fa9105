"""Engines: the only place ray / pyspark are imported (lazily, inside the engine modules).

An engine decides where the stage functions of `semid_dist.stages` run:
- `map(fn, items)`: run `fn(*item)` for every item, results in item order;
- `encode(ctx, shards)`: run `EncodeWorker(ctx)` over the shards (codebooks loaded once per
  worker), yielding per-shard results (counts; the statistics stay staged) in any order;
- `fit(sample, init_points, cfg, log)`: fit the codebooks on the in-memory sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semid_dist.config import BuildConfig
    from semid_dist.engines.local import LocalEngine


def make_engine(cfg: BuildConfig, log=print) -> LocalEngine:
    """Engine named by `cfg.engine` (imports Ray only when it is asked for)."""
    if cfg.engine == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError as exc:
            from semid_dist.errors import ConfigError

            raise ConfigError(f"engine: spark needs pyspark, which this Python cannot import "
                              f"({exc}): it is the [spark] extra, pip install "
                              "'semid_dist[spark]' (`make` installs it); or use engine: ray "
                              "or local") from exc
        from semid_dist.engines.spark import SparkEngine

        return SparkEngine(cfg, log=log)
    if cfg.engine == "ray":
        from semid_dist.engines.ray_data import RayEngine

        return RayEngine(cfg, log=log)
    from semid_dist.engines.local import LocalEngine

    return LocalEngine(cfg, log=log)
