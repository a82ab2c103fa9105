"""Typed, frozen job configuration.

A config is YAML (or a dict) validated into frozen dataclasses. Unknown keys, missing
required keys, wrong types and out-of-range values raise `ConfigError` naming the dotted
key. `key=value` overrides use dotted paths and YAML scalars (`fit.sample_size=50000`,
`quantizer.layers=[256,512]`). The file is read by `semid_dist.config_checks.read_yaml`
(UTF-8; one-line syntax errors; duplicate keys and self-referencing aliases refused); values
that each parse but do not go together are checked by `check_consistency` there.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from semid_dist.config_checks import (
    DOTTED_KEY,
    check_consistency,
    override_value,
    overrides_at_fault,
    read_yaml,
)
from semid_dist.errors import ConfigError

Engine = Literal["local", "ray", "spark"]
Method = Literal["rq_kmeans", "rq_vae", "r3vae", "acrq"]
AcrqBase = Literal["rq_kmeans", "rq_vae"]
PruneStrategy = Literal["none", "drop_layer", "top_k", "mass", "sarq"]
BadRowPolicy = Literal["reject", "fail"]
Precision = Literal["fp32", "bf16"]
EncodePrecision = Literal["fp32", "tf32", "bf16"]
DuplicatePolicy = Literal["reject", "keep_first", "fail"]
ZeroVectorPolicy = Literal["keep", "reject"]
WarmStart = Literal["none", "parent"]
SampleBy = Literal["position", "id"]
EmptyDelta = Literal["error", "skip"]


@dataclass(frozen=True)
class InputConfig:
    path: str
    id_column: str = "item_id"
    embedding_column: str = "embedding"
    popularity_column: str | None = None
    on_bad_rows: BadRowPolicy = "reject"
    max_reject_fraction: float = 0.01
    on_duplicate: DuplicatePolicy = "reject"  # reject every copy | keep the first (file, row)
    on_zero_vector: ZeroVectorPolicy = "keep"  # all-zero embeddings: keep or reject


@dataclass(frozen=True)
class OutputConfig:
    root: str
    table: str = "sids"


@dataclass(frozen=True)
class QuantizerConfig:
    method: Method = "rq_kmeans"
    layers: tuple[int, ...] = (256, 256, 256)
    niter: int = 20
    # acrq only: head (anchor) codebook size per layer, each below the layer's size and
    # non-decreasing over the layers; unset: half the smallest layer's size, for every layer
    anchor_layers: tuple[int, ...] | None = None
    acrq_base: AcrqBase = "rq_kmeans"  # acrq: residual k-means, or rq_vae (gradient masking)
    # learned methods (rq_vae, r3vae) only:
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    epochs: int = 20
    batch_size: int = 1024
    lr: float | None = None  # None: method default (rq_vae 1e-3, r3vae 5e-4)
    weight_decay: float | None = None  # None: method default (rq_vae 0, r3vae 1e-5)
    beta: float = 0.25  # rq_vae commitment weight
    dead_code_window: int = 2  # epochs unused before a code restarts (0: never)
    r3_topk: int = 4  # r3vae: codewords mixed per layer
    r3_lambda: float = 0.01  # r3vae: weight of PD - SC


@dataclass(frozen=True)
class FitConfig:
    sample_size: int = 100_000
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    max_failures: int = 2  # Ray Train: worker-group restarts, resuming from the last checkpoint
    warm_start: WarmStart = "none"  # parent: start Lloyd from the parent version's codebooks
    precision: Precision = "fp32"  # learned methods: bf16 = forward pass under bf16 autocast
    # id: the sample is chosen, and ordered, by a seeded hash of the item ids, so it does not
    # depend on the rows' order or files; position: seeded row positions in the catalog
    sample_by: SampleBy = "position"


@dataclass(frozen=True)
class EncodeConfig:
    from_version: str | None = None
    # true: the catalog holds new or changed items; the version extends encode.from_version
    # (its rows of other items are carried, its unchanged data parts referenced)
    incremental: bool = False
    # an incremental delta whose Parquet files hold no row: error, or skip (commit nothing,
    # status 0: a nightly delta of a day without changes)
    empty_delta: EmptyDelta = "error"
    num_actors: int = 2
    chunk_rows: int = 8192
    shard_rows: int = 65536
    use_gpu: bool = False
    # fp32: exact scores (codes identical on CPU and GPU). tf32 (GPUs with TF32 tensor
    # cores; a CPU runs fp32): scores by a TF32 GEMM, rows whose best two codewords are
    # within TF32's error bound scored again in fp32 (the fp32 codes); it pays where the GEMM
    # dominates (large d and codebooks). bf16: scores by a bf16 GEMM, the `rerank` best
    # codewords re-scored in fp32 (>= 99.9% identical codes).
    precision: EncodePrecision = "fp32"
    rerank: int = 8
    # encode workers decode Parquet into Arrow's jemalloc pool, set to keep freed pages for
    # the next shard (semid_dist.memory); false keeps Arrow's default pool
    reuse_memory: bool = True
    # transparent huge pages (numpy's and Arrow's advice, and Linux's own) in the driver and
    # the workers (semid_dist.memory): off by default; on the benchmark VMs memory faulted in
    # as huge pages cost ~15x as much as in 4 KiB pages
    huge_pages: bool = False


@dataclass(frozen=True)
class PruneConfig:
    strategy: PruneStrategy = "none"
    layer: int = 1  # drop_layer / top_k / mass: the layer pruned (0-based; 1 = the 2nd layer)
    k: int = 0  # top_k: how many of the most frequent tokens
    p: float = 0.0  # mass: prune the most frequent tokens until their item share reaches p
    tau: float = 0.0  # sarq: stop at the first prefix holding <= tau of the catalog


@dataclass(frozen=True)
class CollisionsConfig:
    max_per_sid: int | None = None  # capacity: overflow items move to a next-best last code
    candidates: int = 8  # last-layer codes kept per item for those moves


@dataclass(frozen=True)
class DriverConfig:
    # the most rows the driver gathers for one step: more item ids (the duplicate check) or
    # colliding items (their suffixes) go to engine tasks in buckets of about this many rows
    gather_rows: int = 1_000_000


@dataclass(frozen=True)
class MetricsConfig:
    quality_depth: int | None = None
    pd_max_clusters: int = 4096
    pd_t: float = 2.0
    head_share: float = 0.8  # head = most popular items holding this share of popularity


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int = 512


@dataclass(frozen=True)
class SparkConfig:
    master: str | None = None  # None: keep spark-submit's master, or local[*] when run alone
    app_name: str = "semid"
    driver_memory: str = "2g"
    arrow_batch_rows: int = 10000
    shuffle_partitions: int = 8
    # the JVM options of a session this job starts (driver, and executors off local mode):
    # its JVM only schedules tasks and ferries small results, and C2's compiler threads took
    # ~5 core-seconds of a 2-core machine's encode stage; null keeps the JVM's defaults
    java_options: str | None = "-XX:TieredStopAtLevel=1"


@dataclass(frozen=True)
class BuildConfig:
    input: InputConfig
    output: OutputConfig
    engine: Engine = "ray"
    seed: int = 0
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    collisions: CollisionsConfig = field(default_factory=CollisionsConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @property
    def quality_depth(self) -> int:
        """Prefix depth at which SC / PD group items (default: min(2, L))."""
        depth = self.metrics.quality_depth
        return min(2, len(self.quantizer.layers)) if depth is None else depth

    @property
    def learned(self) -> bool:
        """Whether the fit trains a model (rq_vae, r3vae, acrq on rq_vae) rather than
        residual k-means codebooks (rq_kmeans, acrq on rq_kmeans)."""
        q = self.quantizer
        return q.method in ("rq_vae", "r3vae") or (q.method == "acrq" and
                                                   q.acrq_base == "rq_vae")

    @property
    def anchor_sizes(self) -> tuple[int, ...]:
        """acrq: the anchor codebook size per layer (quantizer.anchor_layers or its default)."""
        q = self.quantizer
        if q.anchor_layers:
            return tuple(q.anchor_layers)
        return tuple(max(1, min(q.layers) // 2) for _ in q.layers)


_RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**63 - 1),
    "input.max_reject_fraction": (0.0, 1.0),
    "quantizer.niter": (1, 10_000),
    "quantizer.latent_dim": (1, 65_536),
    "quantizer.epochs": (1, 100_000),
    "quantizer.batch_size": (1, 10**7),
    "quantizer.lr": (1e-8, 10.0),
    "quantizer.weight_decay": (0.0, 10.0),
    "quantizer.beta": (0.0, 100.0),
    "quantizer.dead_code_window": (0, 100_000),
    "quantizer.r3_topk": (1, 65_536),
    "quantizer.r3_lambda": (0.0, 1e4),
    "fit.sample_size": (1, 10**10),
    "fit.num_workers": (1, 4096),
    "fit.cpus_per_worker": (0.01, 1024),
    "fit.max_failures": (0, 1000),
    "encode.num_actors": (1, 4096),
    "encode.chunk_rows": (1, 10**7),
    "encode.shard_rows": (1, 10**9),
    "encode.rerank": (2, 1024),
    "metrics.quality_depth": (1, 64),
    "metrics.pd_max_clusters": (2, 10**6),
    "metrics.pd_t": (0.0, 1e6),
    "metrics.head_share": (0.0, 1.0),
    "prune.layer": (0, 63),
    "collisions.max_per_sid": (1, 10**9),
    "collisions.candidates": (2, 256),
    "driver.gather_rows": (1, 10**12),
    "prune.k": (0, 10**7),
    "prune.p": (0.0, 1.0),
    "prune.tau": (0.0, 1.0),
    "ray.num_cpus": (1, 100_000),
    "ray.object_store_memory_mb": (64, 10**7),
    "spark.arrow_batch_rows": (1, 10**8),
    "spark.shuffle_partitions": (1, 100_000),
}


def settings_of(cfg: BuildConfig) -> dict[str, Any]:
    """Every setting of `cfg` by its dotted key ({"fit.sample_size": 100000, ...})."""
    return _flat(cfg.to_dict())


def changed_settings(cfg: BuildConfig) -> str:
    """The settings of `cfg` other than their defaults, as `key=value` with dotted keys
    (input.path and output.root first; text with a space shell-quoted, other values as
    JSON), for a build's first log line (the next gives the whole resolved config)."""
    defaults = _flat(BuildConfig(InputConfig(cfg.input.path),
                                 OutputConfig(cfg.output.root)).to_dict())
    flat = _flat(cfg.to_dict())
    shown = ["input.path", "output.root"] + [k for k, v in flat.items() if v != defaults[k]]
    return " ".join(f"{k}={_override_text(flat[k])}" for k in shown)


def _override_text(value: Any) -> str:
    """A setting's value for `changed_settings`, as an override on a shell's command line
    gives it back: text as it is where YAML reads it so (else in double quotes: `'010'`, a
    table named "010", not the number 8), others as JSON (`[64,64]`, `null`, `true`); then
    shell-quoted where the shell would change it (`'local[*]'`)."""
    text = json.dumps(value, separators=(",", ":"))
    if isinstance(value, str):
        try:
            text = value if override_value("", value) == value else text
        except ConfigError:  # (text YAML cannot read: quoted)
            pass
    return shlex.quote(text)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unquoted(key: str, value: Any, *, quoting: bool = True) -> str:
    """Where YAML made something other than text of an unquoted word: what it read, and
    (`quoting`: where text would do) to quote it, in a file and in an override."""
    if isinstance(value, bool):
        word = "on" if value else "off"
        what = "an unquoted yes / no / on / off / true / false as a boolean"
    elif isinstance(value, datetime.date):
        word, what = f"{value}", "an unquoted date as one"
    else:
        return ""
    fix = f": quote it, as '{word}' in a file or {key}=\"'{word}'\" in an override"
    return f" (YAML reads {what}{fix if quoting else ''})"


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key}: {value!r}{_unquoted(key, value, quoting=False)} is not "
                              f"one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, float) and value.is_integer():  # (1e5 and 100000.0 alike)
            raise ConfigError(f"{key}: expected a string, got the number {value!r} (YAML reads "
                              "an unquoted number as one: quote it as you wrote it, '1e5' or "
                              f"'100000.0', in a file or in an override, or check the value)")
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got the number {value!r} (YAML reads "
                              f"an unquoted number as one: quote it, as '{value}' in a file or "
                              f"{key}=\"'{value}'\" in an override, or check the value)")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got "
                              f"{value!r}{_unquoted(key, value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if not isinstance(data, dict):
        got = ("nothing (a section without keys: give it some, or remove it)" if data is None
               else f"{data!r}" if isinstance(data, bool | int | float) else
               type(data).__name__)
        raise ConfigError(f"{where}: expected a mapping, got {got}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys need not be strings
    if unknown:
        known = ", ".join(sorted(fields))
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        head, dot, rest = str(unknown[0]).partition(".")
        section = hints.get(head) if dot else None
        if dataclasses.is_dataclass(section) and rest.split(".")[0] in {
                f.name for f in dataclasses.fields(section)}:  # `fit.sample_size: 500`
            nested = f"{head}: {{{rest}: ...}}"
            raise ConfigError(
                f"{DOTTED_KEY}{name!r} is dotted: a config nests its keys "
                f"({f'{prefix}: {{{nested}}}' if prefix else nested}); dotted keys are for "
                "key=value overrides on the command line")
        raise ConfigError(f"unknown config key {name!r} (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            no_default = (f.default is dataclasses.MISSING
                          and f.default_factory is dataclasses.MISSING)
            if no_default:
                raise ConfigError(f"missing required config key {key!r}")
            continue
        value = _coerce(key, hints[name], data[name])
        lo_hi = _RANGES.get(key)
        if lo_hi is not None and value is not None and not lo_hi[0] <= value <= lo_hi[1]:
            raise ConfigError(f"{key}: {value!r} is out of range [{lo_hi[0]}, {lo_hi[1]}]")
        kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with `key=value` overrides (dotted keys, YAML values)."""
    out = _plain(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. fit.sample_size=50000)")
        key, raw = item.split("=", 1)
        value = override_value(key, raw)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: dict[str, Any], overrides: list[str] | None = None) -> BuildConfig:
    """Validate a plain dict (plus overrides) into a frozen `BuildConfig`."""
    merged = apply_overrides(data, overrides or []) if isinstance(data, dict) else data
    cfg = _build(BuildConfig, merged, "")
    check_consistency(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> BuildConfig:
    """Read a YAML config file and validate it. Relative input/output paths stay as written."""
    p = Path(path)
    data = read_yaml(p)
    data = {} if data is None else data  # (an empty file; `false` or `[]` is no mapping)
    try:
        return parse_config(data, overrides)
    except ConfigError as exc:
        at_fault = overrides_at_fault(parse_config, data, overrides or [], str(exc))
        origin = (f"{p} with override{'s' * (len(at_fault) > 1)} {', '.join(at_fault)}"
                  if at_fault else str(p))
        raise ConfigError(f"{origin}: {exc}") from None
