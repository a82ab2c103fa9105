"""The benchmark's options: the full and quick presets, and `bench_options`, which checks a
`semid bench` command line before anything is measured (sections, faiss, output paths)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Layers = tuple[int, ...]
SECTIONS = ("kernels", "e2e", "fit", "rss", "gpu")
FAISS_SECTIONS = ("kernels", "e2e", "fit")  # measured against faiss (e2e: the kernel's rate)
DOCS_JSON, DOCS_MD = "docs/benchmarks.json", "docs/BENCHMARKS.md"  # the full run's pages


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of every section. `full()` is the 15-25 minute run on an idle 2-core machine,
    `quick_preset()` the ~3-minute check that everything works."""

    quick: bool = False
    seed: int = 0
    sections: tuple[str, ...] = SECTIONS
    gemm_size: int = 4096
    kernel_dims: tuple[int, ...] = (128, 768)
    kernel_layers: tuple[Layers, ...] = ((256, 256, 256), (4096, 4096, 4096))
    kernel_target_s: float = 1.5
    kernel_fast_rerank: int | None = 8  # also time the bf16 fast path, this encode.rerank (info)
    e2e_dim: int = 128
    e2e: tuple[tuple[Layers, int], ...] = (((256, 256, 256), 1_500_000),
                                           ((4096, 4096, 4096), 400_000))
    engines: tuple[str, ...] = ("local", "ray", "spark")
    e2e_rounds: int = 2  # `semid encode` runs per engine (in turns); the fastest stage counts
    chunk_rows: int = 65_536  # catalog row group = encode shard
    build_sample: int = 20_000  # fit sample of the builds that make the e2e codebooks
    build_niter: int = 4
    fit_dim: int = 128
    # 3x4096 at faiss.Kmeans's own minimum of 39 points per centroid (159,744; it warns below
    # that): at 12 per centroid the MSE compared the two starts on an overfitted sample
    fit: tuple[tuple[Layers, int], ...] = (((256, 256, 256), 100_000),
                                           ((4096, 4096, 4096), 160_000))
    fit_niter: int = 10
    fit_rounds: int = 3  # our fit and faiss's in turns; each layer's best time counts
    ray_workers: tuple[int, ...] = (1, 2)  # Ray Train fit on the first `fit` config
    gpu_rows: int = 1_000_000  # items on the GPU per timed encode pass (skipped without one)
    workdir: str | None = None  # default: a temporary directory, removed afterwards
    keep_workdir: bool = False
    json_path: str | None = None  # None: not written (`full()`: the docs' pages)
    md_path: str | None = None
    command: str = "semid bench"
    blas_as_is: bool = False  # faiss's OpenBLAS with the kernels it chooses (`blas.py`)

    @classmethod
    def full(cls, **over: Any) -> BenchOptions:
        return cls(**{"json_path": DOCS_JSON, "md_path": DOCS_MD, **over})

    @classmethod
    def quick_preset(cls, **over: Any) -> BenchOptions:
        base = dict(quick=True, gemm_size=2048, kernel_target_s=0.3,
                    e2e=(((256, 256, 256), 100_000), ((4096, 4096, 4096), 20_000)),
                    chunk_rows=16_384, build_sample=8_192, build_niter=2,
                    fit=(((256, 256, 256), 20_000),), fit_niter=4, ray_workers=(2,),
                    e2e_rounds=1, fit_rounds=1, gpu_rows=100_000)
        return cls(**{**base, **over})


def bench_options(*, quick: bool = False, only: str | None = None,
                  json_path: str | None = None, md_path: str | None = None,
                  workdir: str | None = None, blas_as_is: bool = False) -> BenchOptions:
    """Options of `semid bench [--quick] [--only a,b] ...` (the command is recorded in the
    report). A full run given neither --out-json nor --out-md writes both pages to docs/;
    otherwise each is written only where its option says (docs/ holds the full run's
    figures: a quick or partial run leaves them alone)."""
    from semid_dist.errors import ConfigError

    sections = SECTIONS
    if only is not None:
        sections = tuple(s.strip() for s in only.split(",") if s.strip())
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown or not sections:
            what = f"unknown section(s) {unknown}" if unknown else "no section given"
            raise ConfigError(f"--only {only!r}: {what}; choose from {','.join(SECTIONS)}")
    if not quick and set(sections) == set(SECTIONS) and json_path is None and md_path is None:
        json_path, md_path = DOCS_JSON, DOCS_MD
    if json_path and md_path and Path(json_path).resolve() == Path(md_path).resolve():
        raise ConfigError(f"--out-json and --out-md are both {md_path}: give two files")
    for option, path in (("--out-json", json_path), ("--out-md", md_path)):
        if path is not None:
            check_writable(option, Path(path), folder=False)
    _check_faiss(sections, fix_blas=not blas_as_is)  # (before --workdir is made)
    if workdir is not None:
        check_writable("--workdir", Path(workdir), folder=True)
        try:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--workdir {workdir}: cannot be made ({exc})") from None
    command = ("semid bench" + (" --quick" if quick else "") + (f" --only {only}" if only else "")
               + (" --blas-as-is" if blas_as_is else ""))
    preset = BenchOptions.quick_preset if quick else BenchOptions.full
    return preset(sections=sections, json_path=json_path, md_path=md_path, workdir=workdir,
                  command=command, blas_as_is=blas_as_is)


def check_writable(option: str, path: Path, *, folder: bool) -> None:
    """Fail before measuring anything where `path` (a file the run writes at its end, or a
    folder it works in) cannot be made: a file that is a folder, a folder that is a file, or
    no writable folder to make it in."""
    from semid_dist.errors import ConfigError

    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{option} {path}: is a {'file' if folder else 'folder'}; give "
                          f"{'a folder' if folder else 'a file name'}")
    above = path if folder and path.exists() else path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{option} {path}: cannot be written ({above} is not a folder)")
    try:  # (os.access says yes to root, and to /proc)
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot be written ({above}: {exc.strerror or exc})"
                          ) from None


def _check_faiss(sections: tuple[str, ...], *, fix_blas: bool) -> None:
    """Fail before measuring anything when a section compares against faiss and this Python
    cannot import it (an extra: `semid_dist[cpu]`, or `[gpu]`), rather than minutes into the
    run; where it can, load it, with its OpenBLAS's best kernels for this CPU (`fix_blas`:
    `blas.import_faiss`), whichever sections run (the bench gives faiss its threads)."""
    from semid_dist.bench.blas import import_faiss
    from semid_dist.errors import ConfigError
    from semid_dist.quantize.cpu_blas import cpuinfo

    need = [s for s in sections if s in FAISS_SECTIONS]
    try:
        import_faiss(set(cpuinfo().get("flags", "").split()), fix=fix_blas)
    except ImportError as exc:
        if not need:
            return
        rest = [s for s in SECTIONS if s not in FAISS_SECTIONS]
        raise ConfigError(
            f"the {', '.join(need)} section(s) compare against faiss, which this Python cannot "
            f"import ({exc}); install it with pip install 'semid_dist[cpu]' (or '[gpu]' on a "
            f"CUDA machine), or run only the sections that need none: --only {','.join(rest)}"
        ) from None
