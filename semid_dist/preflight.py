"""What a build checks before it writes anything (`check_inputs`: the catalog's schema and
dimension, the GPU settings, the codebooks it warm-starts from or reuses, an incremental
parent's data parts), and what it says of its parent once its version is chosen
(`parent_notes`). `semid_dist.pipeline` runs both."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pyarrow as pa

from semid_dist.codebooks import Reused, reused_codebooks, warm_start_codebooks
from semid_dist.config import BuildConfig
from semid_dist.errors import InputError, StoreError
from semid_dist.incremental import check_extendable
from semid_dist.io.catalog import CatalogPlan, read_piece
from semid_dist.io.store import TableStore
from semid_dist.io.validate import check_schemas, infer_dim
from semid_dist.runtime import gpu_stages, torch_device

Log = Callable[[str], None]


def _dimension(plan: CatalogPlan, cfg: BuildConfig) -> int:
    """The embedding dimension: the fixed_size_list type's where every file has it, else
    (`DIMENSION_RULE`) decided by the first shard's piece (file) holding an embedding, as its
    file's type says or its most common length (`infer_dim`): a file without rows decides
    nothing, nor does a file whose column has type null. Read a piece at a time (a shard may
    hold thousands of small files)."""
    col = cfg.input.embedding_column
    types = {schema.field(col).type for _, schema in plan.schemas} or {
        plan.schema.field(col).type}
    types -= {pa.null()}  # files whose every embedding is null: they decide nothing
    if len(types) == 1 and pa.types.is_fixed_size_list(t := next(iter(types))):
        return t.list_size
    for piece in (p for shard in plan.shards for p in shard.pieces):  # (files with rows)
        dim = infer_dim(read_piece(plan.url, piece, [col]).column(0))
        if dim:
            return dim
    raise InputError(f"column {col!r} holds no non-null embedding; nothing to encode")


class Checked(NamedTuple):
    """What `check_inputs` found: the catalog's embedding dimension, and with
    encode.from_version the codebooks the build reuses, as read and checked
    (`build_codebooks` copies them: the artifact is read once)."""

    dim: int
    reused: Reused | None


def check_inputs(plan: CatalogPlan, cfg: BuildConfig, store: TableStore,
                 parent: str | None, log: Log | None = None) -> Checked:
    """The embedding dimension (and the codebooks to reuse), once the checks that need no
    version are passed (every file's schema, the GPU settings, the parent's codebooks to
    warm-start from or the codebooks to reuse, what an incremental version needs of its
    parent: `check_extendable`), so a build they fail writes nothing. log: where the warm
    start's lines go (the build says them as it fits; a dry run here)."""
    check_schemas(plan.schemas, cfg.input.id_column, cfg.input.embedding_column,
                  popularity_column(cfg))
    for stage in gpu_stages(cfg):
        torch_device(cfg, stage)
    dim, reused = _dimension(plan, cfg), None
    if cfg.encode.from_version:
        reused = reused_codebooks(store, cfg, dim)
    else:
        check_rows_for_fit(plan.num_rows, cfg.quantizer.layers)
        warm_start_codebooks(store, parent, cfg, dim, log=log or (lambda msg: None))
    if cfg.encode.incremental and parent is not None:  # its parts, stats/ and ids
        check_extendable(store, parent, cfg, plan)
    return Checked(dim, reused)


def check_rows_for_fit(rows: int, layers: tuple[int, ...]) -> None:
    """A catalog of fewer rows than the largest codebook has codes: no fit sample could hold
    a codebook's worth (the build failed at its sample step, a version started)."""
    k_max = max(layers)
    if rows < k_max:
        fix = f"use smaller quantizer.layers (at most {rows} codes), or " if rows >= 2 else ""
        raise InputError(f"the catalog holds {rows} row{'' if rows == 1 else 's'}, fewer than "
                         f"the largest codebook's {k_max} codes (quantizer.layers="
                         f"{list(layers)}); {fix}use a larger catalog")


def check_empty_delta(plan: CatalogPlan, cfg: BuildConfig, store: TableStore,
                      parent: str | None) -> None:
    """What `check_inputs` checks of an incremental delta whose files hold no row, before it
    is skipped (`encode.empty_delta: skip`), so that a failed export (files of another
    form) is not taken for a day without changes: every file's schema, the dimension where
    the column's type gives it against the codebooks', and what the parent needs (its
    parts, stats/ and item id type)."""
    check_schemas(plan.schemas, cfg.input.id_column, cfg.input.embedding_column,
                  popularity_column(cfg))
    kind = plan.schema.field(cfg.input.embedding_column).type
    if pa.types.is_fixed_size_list(kind) and cfg.encode.from_version:
        reused_codebooks(store, cfg, kind.list_size)
    if parent is not None:
        check_extendable(store, parent, cfg, plan)


def parent_notes(store: TableStore, cfg: BuildConfig, parent: str | None, dim: int,
                 log: Log, *, latest: str | None = None) -> None:
    """Lines on what a re-index changes against its parent that the plan line does not show:
    another embedding dimension (a new embedding model), and for an incremental version
    another embedding column than its parent's, another capacity bound
    (`collisions.max_per_sid`), or a parent that is
    not `latest` (what "latest" meant as the build started, the one its commit compares
    with: the table's latest then moves to this branch)."""
    if parent is None:
        return
    try:
        manifest = store.manifest(parent)
    except (StoreError, FileNotFoundError):  # removed by gc meanwhile: the drift says so
        return
    before = (manifest.get("input") or {}).get("dim")
    if before is not None and before != dim:
        log(f"plan: version {parent} encoded {before}-dim embeddings, this catalog holds "
            f"{dim}-dim ones (another embedding model?): new codebooks, and the drift "
            "against it measures the re-index")
    if not cfg.encode.incremental:
        return
    column = ((manifest.get("config") or {}).get("input") or {}).get("embedding_column")
    if column and column != cfg.input.embedding_column:
        log(f"warning: input.embedding_column={cfg.input.embedding_column}, but version "
            f"{parent}, whose rows this version carries, was encoded from column {column}: if "
            "the two hold another model's embeddings, the table mixes them; `semid build` "
            "re-indexes every item")
    bound = ((manifest.get("config") or {}).get("collisions") or {}).get("max_per_sid")
    if bound != cfg.collisions.max_per_sid:
        log(f"warning: version {parent} was built with collisions.max_per_sid="
            f"{_bound(bound)}, this version with {_bound(cfg.collisions.max_per_sid)}: it "
            "applies to this version's new items only (the carried items keep their SIDs); "
            f"set collisions.max_per_sid={'null' if bound is None else bound} to keep the "
            "table's bound")
    if latest is not None and latest != parent:
        log(f"warning: encode.from_version={parent} is not the latest version ({latest}): "
            f"this version extends {parent}, not {latest}, and becomes the latest when it "
            "commits (unless another version is committed meanwhile)")


def _bound(max_per_sid: int | None) -> str:
    return "none" if max_per_sid is None else str(max_per_sid)


def popularity_column(cfg: BuildConfig) -> str | None:
    """input.popularity_column, or None for an incremental version (it uses no popularity:
    a delta without the column is fine)."""
    return None if cfg.encode.incremental else cfg.input.popularity_column
