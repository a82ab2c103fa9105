"""Where a build's stages run: local paths made absolute for workers that run elsewhere
(`with_absolute_paths`), the table kept out of the catalog (`check_table_outside_catalog`),
an experiment job's output root and the keys it sets (`check_experiment_root`,
`refuse_overrides`), and the device, CPU or GPU, of
the fit and of the encode (`gpu_stages`, `torch_device`)."""

from __future__ import annotations

import dataclasses
import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from semid_dist.config import BuildConfig
from semid_dist.errors import ConfigError
from semid_dist.io import fs as fsio
from semid_dist.io.catalog import hidden

if TYPE_CHECKING:
    from semid_dist.io.store import TableStore


TABLE_PREFIX = "table:"  # input.path naming a table of the Spark session catalog


def is_local_path(url: str) -> bool:
    """Whether `url` is a path of this machine's file system (a plain path or file://)."""
    return not url.startswith(TABLE_PREFIX) and ("://" not in url or url.startswith("file://"))


def absolute_url(url: str) -> str:
    """A local path made absolute (`~` expanded); URLs as they are."""
    if "://" in url or url.startswith(TABLE_PREFIX):
        return url
    return str(Path(url).expanduser().resolve())


def refuse_overrides(overrides: list[str], job: str, replaced: tuple[str, ...]) -> None:
    """An experiment job (jobs/prune_sweep.py, jobs/compare_quantizers.py) sets the keys
    `replaced` for each of its builds: an override of one, itself or inside its section,
    would be lost, so it is refused (before the config is read: the job's value may be what
    makes it valid)."""
    for override in overrides:
        given, _, raw = override.partition("=")
        for key in replaced:
            if _sets(given.strip(), raw, key):
                fix = ("give its output root as --root DIR (the config's own table is left "
                       "alone)" if key == "output.root" else "drop the override (each row "
                       "sets it)")
                raise ConfigError(f"{given}: {key} is set by the {job} itself: {fix}")


def check_experiment_root(cfg: BuildConfig, root: str | None) -> None:
    """An experiment job's builds go to --root, by default a temporary directory on this
    machine: no place for a cluster's workers to write. A --root given is checked as a
    dry run checks output.root, before the first build (its error names --root)."""
    from semid_dist.engines.spark_session import session_master
    from semid_dist.io.store import TableStore
    from semid_dist.resume import check_writable

    master = session_master(cfg)  # None: spark-submit's, which may be a cluster's
    cluster = ((cfg.engine == "ray" and cfg.ray.address) or
               (cfg.engine == "spark" and not (master or "").startswith("local")))
    if cluster and root is None:
        raise ConfigError(f"engine {cfg.engine} runs on a cluster here: give "
                          "--root on storage every worker can reach (s3://..., hdfs://...), "
                          "not the default temporary directory on this machine")
    if root is not None:
        check_writable(TableStore(root, cfg.output.table), key="--root")


def _sets(given: str, raw: str, key: str) -> bool:
    """Whether override `given=raw` sets the dotted `key`: itself, or a section holding it
    (`output={root: /x}`)."""
    from semid_dist.config_checks import override_value

    if given == key:
        return True
    if not key.startswith(given + "."):
        return False
    value = override_value(given, raw.strip())
    for part in key[len(given) + 1:].split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


# where `ray job submit --working-dir` runs a job: a copy Ray removes with its session
RAY_WORKING_DIR = "/runtime_resources/working_dir_files/"


def with_absolute_paths(cfg: BuildConfig) -> BuildConfig:
    """Local paths made absolute, so workers that run elsewhere (another cwd) find them. A
    relative output.root in a Ray job's copy of its working directory is a ConfigError (the
    table went into the copy, and with it)."""
    root = absolute_url(cfg.output.root)
    if RAY_WORKING_DIR in root and RAY_WORKING_DIR not in cfg.output.root:
        raise ConfigError(f"output.root={cfg.output.root} is relative, and this job runs in "
                          f"the copy of its working directory Ray made ({Path.cwd()}), which "
                          "Ray removes: the table would go with it; give output.root as an "
                          "absolute path or a URL the cluster keeps (s3://...)")
    return dataclasses.replace(
        cfg, input=dataclasses.replace(cfg.input, path=absolute_url(cfg.input.path)),
        output=dataclasses.replace(cfg.output, root=root))


def check_table_outside_catalog(catalog: str, store: TableStore) -> None:
    """The table's folder (`<output.root>/<output.table>`) must not be the catalog's folder
    (`input.path`) or lie inside it: the first build wrote its versions there, and every
    later one read their Parquet files as catalog files (an error about the catalog's
    columns, naming a file of the table). A ConfigError naming both keys before anything is
    read or written. Left alone: a table under a folder of the catalog whose name starts
    with '_' or '.' (the catalog's scan skips those: `catalog.hidden`), a table whose
    folder holds the catalog (the catalog's files are not the table's), and file systems
    that differ in kind or settings (two HDFS clusters' paths compare alike)."""
    fs, path = fsio.resolve(catalog)
    if type(fs) is not type(store.fs) or fs.storage_options != store.fs.storage_options:
        return
    table = store.base
    if fsio.is_local(fs):
        path, table = os.path.realpath(path), os.path.realpath(table)
    path, table = posixpath.normpath(path), posixpath.normpath(table)
    if table == path or (table.startswith(path.rstrip("/") + "/") and not hidden(table, path)):
        raise ConfigError(
            f"output.root={fsio.redact_url(store.root)} and output.table={store.table} put the "
            f"table at {fsio.redact_url(store.url)}, inside input.path="
            f"{fsio.redact_url(catalog)}: the next build would read the table's files as "
            "catalog files; write the table outside the catalog (another output.root)")


def gpu_stages(cfg: BuildConfig) -> list[str]:
    """The stages whose GPU setting this job uses: "encode" with `encode.use_gpu`, "fit" with
    `fit.use_gpu` unless the codebooks come from `encode.from_version` (no fit then)."""
    return [stage for stage in ("fit", "encode") if getattr(cfg, stage).use_gpu
            and not (stage == "fit" and cfg.encode.from_version)]


def check_worker_gpu(device: str, stage: Literal["fit", "encode"]) -> None:
    """In a worker (a Ray Train worker, a Ray Data or Spark task) given a CUDA `device`: a
    torch that sees no GPU there (a CPU build on that node, no driver) is a named error,
    not torch's own assertion at the first tensor moved."""
    if not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise ConfigError(f"{stage}.use_gpu=true but torch {torch.__version__} ({build}) sees "
                          "no CUDA device on this worker's node; install a CUDA build of torch "
                          f"on every node that runs the {stage}, or set {stage}.use_gpu=false")


def torch_device(cfg: BuildConfig, stage: Literal["fit", "encode"]) -> str:
    """torch device of the fit or of the encode kernel: "cuda" where `fit.use_gpu` /
    `encode.use_gpu` is on, else "cpu". Where the engine runs the stage from this process
    (the local engine; Spark fits on its driver) torch must see a GPU here, or a ConfigError
    names the fix; on Ray every Train worker or encode task asks Ray for a GPU instead."""
    if not getattr(cfg, stage).use_gpu:
        return "cpu"
    if cfg.engine != "ray":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{stage}.use_gpu=true but no CUDA device is visible to torch "
                              f"here; install a CUDA build of torch or set "
                              f"{stage}.use_gpu=false")
    return "cuda"
