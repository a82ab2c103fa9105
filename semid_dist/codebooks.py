"""The build's codebooks: fit new ones on a seeded sample of the catalog (cold, from the
parent version's codebooks with `fit.warm_start=parent`, or ACRQ's head / tail split), reuse
a committed version's (`encode.from_version`), or take up those a killed run of the same
version already wrote. `semid_dist.pipeline` calls `build_codebooks` between the scan and
the encode.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from semid_dist.config import BuildConfig
from semid_dist.errors import ConfigError, InputError
from semid_dist.faults import maybe_die
from semid_dist.io.catalog import CatalogPlan
from semid_dist.io.store import STAGING, FileEntry, TableStore
from semid_dist.io.validate import reasons_text
from semid_dist.quantize.acrq import AcrqSample, split_sample
from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE, load_artifact
from semid_dist.quantize.model import load_quantizer, quantizer_files
from semid_dist.quantize.residual import check_warm_start, init_subset
from semid_dist.stages import JobContext, sample_rows, sample_rows_by_id

if TYPE_CHECKING:
    from semid_dist.engines import Engine

Log = Callable[[str], None]
Reused = tuple[str, dict[str, bytes], dict[str, Any]]  # (version id, codebook files, metadata)


def choose_sample(plan: CatalogPlan, sample_size: int, seed: int) -> dict[int, np.ndarray]:
    """Seeded uniform sample of catalog rows -> {shard index: row indices inside the shard}.
    Depends only on the catalog's shard layout, the size and the seed, so on the rows' order
    and files too (`fit.sample_by: id`, `_drawn_by_id`, does not)."""
    total = plan.num_rows
    rows = (np.arange(total) if sample_size >= total else
            np.sort(np.random.default_rng([seed, 3]).choice(total, sample_size, replace=False)))
    out: dict[int, np.ndarray] = {}
    start = 0
    for shard in plan.shards:
        lo, hi = np.searchsorted(rows, [start, start + shard.num_rows])
        if hi > lo:
            out[shard.index] = rows[lo:hi] - start
        start += shard.num_rows
    return out


def hash_bound(sample_size: int, rows: int) -> int:
    """The seeded id hash (uint64) up to which a row is drawn for a sample of `sample_size`
    of `rows` (`fit.sample_by: id`): enough for it with a margin of six standard deviations
    and ten rows (the draws are Bernoulli), the sample then cut to the lowest hashes; every
    row where the sample is the catalog or near it."""
    want = sample_size + 6 * math.sqrt(sample_size) + 10
    if want >= rows:
        return 2**64 - 1
    return min(int(want / rows * 2**64), 2**64 - 1)


# the fit sample (n, d) float32, its popularity (n,) or None, the reject reasons of the rows
# it drew (of the whole catalog, drawn by id), and how many rows it set out to draw
_Drawn = tuple[np.ndarray, "np.ndarray | None", Counter, int]


def _drawn_by_position(engine: Engine, ctx: JobContext, plan: CatalogPlan,
                       cfg: BuildConfig) -> _Drawn:
    """`fit.sample_by: position`: the valid rows at seeded positions (`choose_sample`)."""
    picks = choose_sample(plan, cfg.fit.sample_size, cfg.seed)
    parts = engine.map(sample_rows, [(ctx, plan.shards[i], rows) for i, rows in picks.items()])
    sample = (np.concatenate([x for x, _, _ in parts]) if parts
              else np.zeros((0, ctx.dim), np.float32))
    popularity = (np.concatenate([p for _, p, _ in parts])
                  if parts and parts[0][1] is not None else None)
    reasons: Counter[str] = Counter()
    for *_, part in parts:
        reasons.update(part)
    return sample, popularity, reasons, sum(len(rows) for rows in picks.values())


def _drawn_by_id(engine: Engine, ctx: JobContext, plan: CatalogPlan, cfg: BuildConfig,
                 ) -> _Drawn:
    """`fit.sample_by: id`: the `fit.sample_size` valid rows of lowest seeded id hash (fewer
    where the catalog's bad rows, which are never drawn, exceed the draw's margin), in the
    order of their hashes. Neither the rows' order nor their files change it. The driver
    holds the shards' draws and the sample, as the position path does."""
    below = hash_bound(cfg.fit.sample_size, plan.num_rows)
    parts = engine.map(sample_rows_by_id, [(ctx, s, below, cfg.seed) for s in plan.shards])
    sizes = [len(h) for _, _, h, _ in parts]
    order = np.argsort(np.concatenate([h for _, _, h, _ in parts]),
                       kind="stable")[:cfg.fit.sample_size]
    slot = np.full(sum(sizes), -1, np.int64)  # each drawn row's place in the sample, or -1
    slot[order] = np.arange(len(order))
    sample = np.empty((len(order), ctx.dim), np.float32)
    popularity = (np.empty(len(order), parts[0][1].dtype) if parts[0][1] is not None
                  else None)
    reasons: Counter[str] = Counter()
    start = 0
    for i, size in enumerate(sizes):
        x, pop, _, part = parts[i]
        parts[i] = None  # (freed as it is placed)
        at = slot[start:start + size]
        kept = at >= 0
        sample[at[kept]] = x[kept]
        if popularity is not None:
            popularity[at[kept]] = pop[kept]
        reasons.update(part)
        start += size
    whole = below == 2**64 - 1  # (every row drawn: a larger sample would hold no more)
    return sample, popularity, reasons, plan.num_rows if whole else cfg.fit.sample_size


def _sample(engine: Engine, ctx: JobContext, plan: CatalogPlan, cfg: BuildConfig,
            log: Log) -> tuple[np.ndarray, np.ndarray | None]:
    """The fit sample (n, d) float32 and its popularity (n,) (None without the column)."""
    by_id = cfg.fit.sample_by == "id"
    sample, popularity, reasons, drawn = (_drawn_by_id if by_id else _drawn_by_position)(
        engine, ctx, plan, cfg)
    k_max = max(cfg.quantizer.layers)
    if len(sample) < k_max:
        bad = (f"; {drawn - len(sample)} of the {drawn} rows it drew are bad "
               f"({reasons_text(reasons)}: rows the encode rejects, see README's Bad input)"
               if drawn > len(sample) and not by_id else "")
        if by_id and reasons:
            bad = (f"; the catalog holds {sum(reasons.values())} bad rows "
                   f"({reasons_text(reasons)}: rows the encode rejects, see README's Bad "
                   "input), which take their share of the draw by item id")
        rows = f"{len(sample)} valid row{'' if len(sample) == 1 else 's'}"
        raise InputError(f"the fit sample holds {rows}, fewer than the largest codebook "
                         f"({k_max}){bad}; "
                         + ", or ".join(_sample_fixes(len(sample), drawn, plan.num_rows, k_max)))
    log(f"sample: {len(sample)} valid rows of {plan.num_rows} (seed {cfg.seed}"
        + (", by item id)" if by_id else ")"))
    if not cfg.learned and (far := far_from_origin(sample)) is not None:  # (k-means' codes)
        log(f"warning: {far}")
    return sample, popularity


FAR_RATIO = 1e5  # ||mean||^2 / spread past which float32 distances lose the codes' differences


def far_from_origin(x: np.ndarray, *, chunk_rows: int = 8192) -> str | None:
    """A warning where the rows (n, d) float32 sit far from the origin for their spread:
    distances are ||x||^2 - 2 x.c + ||c||^2 in float32 (as in faiss), whose rounding, about
    6e-8 of ||x||^2, then swamps the differences between codes (an offset of 100 on rows
    spread by 0.01 gave 2,937 of 3,000 items a layer-0 code that was not their nearest, and
    the fit's MSE read 0). None where the squared norm of their mean is under `FAR_RATIO`
    times their mean squared distance from it (or they are all equal). The distances are
    summed `chunk_rows` rows at a time (8,192 x 768 in float64: 50 MB beside the sample)."""
    if not len(x):
        return None
    mean = x.mean(axis=0, dtype=np.float64)
    centre = mean.astype(np.float32)
    spread = sum(float(np.square((x[i:i + chunk_rows] - centre).astype(np.float64)).sum())
                 for i in range(0, len(x), chunk_rows)) / len(x)
    ratio = float(mean @ mean) / spread if spread > 0 else 0.0
    if ratio < FAR_RATIO:
        return None
    return (f"the embeddings sit far from the origin for their spread (the squared norm of "
            f"their mean is {ratio:.1e} times their mean squared distance from it): float32 "
            "distances lose the differences between codes, so codes may not be the nearest "
            "and the fit's MSE reads too low; centre them (subtract the catalog's mean "
            "embedding) before the build")


def _sample_fixes(valid: int, drawn: int, rows: int, k_max: int) -> list[str]:
    """The fixes that give a fit sample of `valid` rows (of `drawn`, from a catalog of `rows`)
    a codebook's worth (`k_max`): the bad rows only where the drawn rows would reach it;
    smaller codebooks where the valid rows make one (a layer has 2 codes or more); where
    fewer than k_max rows were drawn, a sample of k_max rows if the catalog holds them, else a
    larger catalog; where enough were drawn, a larger sample if the catalog holds more."""
    fixes = ["fix the catalog's bad rows"] if drawn >= k_max else []
    if valid >= 2:
        fixes.append(f"use smaller quantizer.layers (at most {valid} codes)")
    if drawn < k_max:  # (a build's config and catalog hold k_max rows at least, checked
        # before it starts: `config_checks`, `preflight.check_rows_for_fit`; kept for a
        # BuildConfig made without `parse_config`, which skips the first)
        fixes.append(f"raise fit.sample_size (to {k_max} or more)" if rows >= k_max
                     else "use a larger catalog")
    elif rows > drawn:  # (more of the catalog's rows: more valid ones)
        fixes.append("raise fit.sample_size")
    return fixes


def _acrq_split(sample: np.ndarray, popularity: np.ndarray | None, ctx: JobContext,
                cfg: BuildConfig, log: Log) -> AcrqSample | None:
    """quantizer.method=acrq: the sample's head (popularity >= the scan's head threshold)
    and tail, with each stage's seeding points; None for other methods."""
    if cfg.quantizer.method != "acrq":
        return None
    if popularity is None or ctx.head_threshold is None:
        raise ConfigError("quantizer.method=acrq needs input.popularity_column")
    head = popularity >= ctx.head_threshold
    log(f"fit: acrq head = {int(head.sum())} sample rows (popularity >= "
        f"{ctx.head_threshold:g}), tail = {int((~head).sum())}; anchors "
        f"{list(cfg.anchor_sizes)} of {list(cfg.quantizer.layers)}")
    return split_sample(sample, head, cfg.quantizer.layers, cfg.anchor_sizes, seed=cfg.seed)


def build_codebooks(engine: Engine, ctx: JobContext, plan: CatalogPlan, cfg: BuildConfig,
                    store: TableStore, vid: str, log: Log, parent: str | None,
                    reused: Reused | None,
                    ) -> tuple[list[FileEntry], list[dict[str, Any]], str]:
    """Fit new codebooks (fit.warm_start=parent: starting from the parent's), or
    (encode.from_version) reuse a committed version's artifact (`reused`: as the build's
    checks read it, `preflight.check_inputs`: set exactly when encode.from_version is).
    Writes the artifact into the new version; returns (files, fit stats, source)."""
    if reused is not None:
        src, blobs, meta = reused
        log(f"codebooks: reusing version {src} ({list(cfg.quantizer.layers)})"
            + ("; fit.warm_start=parent has no effect: nothing is fit"
               if cfg.fit.warm_start == "parent" else ""))
        files = [store.write_file(vid, f"codebooks/{n}", b) for n, b in blobs.items()]
        return files, meta.get("training", []), src
    resumed = _resumed_codebooks(store, vid, log)
    if resumed is not None:
        return resumed
    sample, popularity = _sample(engine, ctx, plan, cfg, log)
    if engine.warm_up_beside_fit:  # the engine's workers are idle while the driver fits
        engine.warm_up()
    seeds = init_subset(sample, max(cfg.quantizer.layers), seed=cfg.seed)
    warm = warm_start_codebooks(store, parent, cfg, ctx.dim, log)
    acrq = _acrq_split(sample, popularity, ctx, cfg, log)
    fitted, fit_stats = engine.fit(sample, seeds, cfg, log,
                                   f"{store.version_url(vid)}/{STAGING}", init_centroids=warm,
                                   acrq=acrq)
    maybe_die("fit")
    meta = {"method": cfg.quantizer.method, "layers": list(cfg.quantizer.layers),
            **({"anchor_layers": list(cfg.anchor_sizes)} if acrq is not None else {}),
            "config": cfg.to_dict()["quantizer"], "seed": cfg.seed, "training": fit_stats,
            "warm_start": parent if warm is not None else None}
    files = [store.write_file(vid, f"codebooks/{n}", b)
             for n, b in quantizer_files(fitted, meta).items()]
    return files, fit_stats, "fit"


def reused_codebooks(store: TableStore, cfg: BuildConfig, dim: int) -> Reused:
    """encode.from_version: (its version id, its codebook files, their metadata), checked
    against the catalog's dimension and the quantizer settings. The build reads them once,
    before it writes anything (so a mismatch writes nothing: `preflight.check_inputs`), and
    `build_codebooks` copies what it read."""
    src = store.resolve(cfg.encode.from_version)
    blobs = {n: store.read_bytes(src, f"codebooks/{n}") for n in (ARRAYS_FILE, META_FILE)}
    _, meta = load_artifact(blobs, where=f"codebooks of version {src}")
    quantizer = load_quantizer(blobs, where=f"codebooks of version {src}")
    sizes = list(quantizer.sizes)
    if quantizer.dim != dim:
        raise InputError(f"embedding dim {dim} != codebook dim {quantizer.dim} (codebooks of "
                         f"version {src}, encode.from_version): encode with codebooks fitted "
                         f"on {dim}-dim embeddings, or fit new ones (`semid build` without "
                         "encode.from_version)")
    if quantizer.method != cfg.quantizer.method:
        raise ConfigError(f"quantizer.method={cfg.quantizer.method} but version {src} holds "
                          f"a {quantizer.method} quantizer; set "
                          f"quantizer.method={quantizer.method}")
    if sizes != list(cfg.quantizer.layers):
        raise ConfigError(f"quantizer.layers={list(cfg.quantizer.layers)} but version {src} "
                          f"has layers {sizes}; set quantizer.layers={sizes}")
    if quantizer.method == "acrq" and cfg.learned != ("model" in meta):
        base = "rq_vae" if "model" in meta else "rq_kmeans"
        raise ConfigError(f"quantizer.acrq_base={cfg.quantizer.acrq_base} but version {src} "
                          f"holds ACRQ on {base}; set quantizer.acrq_base={base}")
    _check_model_shape(cfg, src, meta.get("model"))
    return src, blobs, meta


def _check_model_shape(cfg: BuildConfig, src: str, model: dict[str, Any] | None) -> None:
    """A learned version's model is encoded as it was trained: its latent size, hidden
    layers and (r3vae) codewords mixed per layer, which the config must give as they are
    (the new version's manifest records the config; it recorded other values than the
    model's). Training-only keys (epochs, lr, ...) do not matter to an encode."""
    if model is None:
        return
    held = model.get("params", {})
    keys = {"latent_dim": "latent_dim", "hidden_dims": "hidden_dims"}  # config: model's
    if model.get("method") == "r3vae":
        keys["r3_topk"] = "topk"
    for key, name in keys.items():
        given = getattr(cfg.quantizer, key)
        given = list(given) if isinstance(given, tuple) else given
        if name in held and held[name] != given:
            value = str(held[name]).replace(" ", "")  # (an override's spelling: [256,128])
            raise ConfigError(f"quantizer.{key}={str(given).replace(' ', '')} but version "
                              f"{src}'s {model.get('method')} model has {value}; set "
                              f"quantizer.{key}={value}")


def warm_start_codebooks(store: TableStore, parent: str | None, cfg: BuildConfig, dim: int,
                         log: Log) -> list[np.ndarray] | None:
    """fit.warm_start=parent: the parent's codebooks (checked against quantizer.layers and
    the catalog dim) to start Lloyd from; None for a cold fit or the table's first build.
    The build calls it before it writes anything (so a mismatch writes nothing), and again
    to fit."""
    if cfg.fit.warm_start != "parent":
        return None
    if parent is None:
        log("fit: fit.warm_start=parent but the table has no committed version yet; "
            "k-means++ init")
        return None
    blobs = {n: store.read_bytes(parent, f"codebooks/{n}") for n in (ARRAYS_FILE, META_FILE)}
    codebooks, meta = load_artifact(blobs, where=f"codebooks of version {parent}")
    if "model" in meta:
        raise ConfigError(f"fit.warm_start=parent but version {parent} holds a learned "
                          f"{meta.get('method')} model, whose codebooks live in its latent "
                          "space; set fit.warm_start=none")
    checked = check_warm_start(codebooks, cfg.quantizer.layers, dim,
                               source=f"parent version {parent}")
    log(f"fit: warm start from the codebooks of version {parent}")  # (once they fit)
    return checked


def _resumed_codebooks(store: TableStore, vid: str, log: Log,
                       ) -> tuple[list[FileEntry], list[dict[str, Any]], str] | None:
    """The codebooks a killed run of this version already wrote (verified), or None."""
    names = (ARRAYS_FILE, META_FILE)
    if not all(store.fs.exists(f"{store.version_dir(vid)}/codebooks/{n}") for n in names):
        return None
    blobs = {n: store.read_bytes(vid, f"codebooks/{n}") for n in names}
    _, meta = load_artifact(blobs, where=f"codebooks of resumed run {vid}")
    log("codebooks: reusing the fit of the unfinished run")
    files = [FileEntry(f"codebooks/{n}", 0, len(b), hashlib.sha256(b).hexdigest())
             for n, b in blobs.items()]
    return files, meta.get("training", []), "fit"
