"""Residual k-means fit on Ray Train: exact data-parallel Lloyd iterations.

Every worker holds the same k-means++ seeding points and its own stride of the sample;
per-centroid sums and counts are summed with `torch.distributed.all_reduce` (gloo on CPU,
nccl on GPU) so every worker applies the same update. Rank 0 hands the codebooks back
through `staging_url`, a file inside the (uncommitted) version that every node can reach.

The learned quantizers (rq_vae, r3vae) train with DDP (`ray.train.torch.prepare_model`):
every worker starts from the same k-means-initialised model, trains on its stride of the
sample, reports once per epoch, and rank 0 writes the verified artifact bytes.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import numpy as np

from semid_dist.config import BuildConfig
from semid_dist.engines import train_files
from semid_dist.errors import InputError
from semid_dist.faults import ENV as FAULT_ENV
from semid_dist.faults import MARKER_ENV, die_once
from semid_dist.io import fs as fsio
from semid_dist.runtime import check_worker_gpu
from semid_dist.signals import interrupt_raised, terminated


def _start_worker(config: dict[str, Any]) -> tuple[int, int, str]:
    """Set up a Ray Train worker of the fit (its threads, huge pages and the fault switch's
    variables) -> (rank, world size, torch device)."""
    import ray.train

    from semid_dist.memory import set_huge_pages
    from semid_dist.quantize.cpu_blas import set_cpu_threads

    # the worker's CPUs, for torch and numpy's BLAS alike: a reused Ray worker process may
    # have started torch / OpenBLAS with another task's thread count
    set_cpu_threads(config["threads"])
    set_huge_pages(config["huge_pages"])  # where the engine did not start this process
    os.environ.update(config["fault_env"])
    _quiet_worker_logs()
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), "cuda" if config["use_gpu"] else "cpu"


def _train_logging() -> dict[str, Any]:
    """Ray Train's own logs (`ray.train`) on the console at WARNING and up, where Ray has
    `ray.train.LoggingConfig`: its INFO lines (resources requested, the worker group
    started, each checkpoint created) came between the build's progress lines."""
    import ray.train

    config = getattr(ray.train, "LoggingConfig", None)
    return {"logging_config": config(log_level="WARNING")} if config is not None else {}


def _quiet_worker_logs() -> None:
    """Ray Train logs every `ray.train.report` at INFO in each worker (`Reporting training
    result ...`, a line per worker and layer or epoch, sent to the driver's console); the
    fit logs its layers itself, so those lines are dropped. (Ray names that logger by its
    module's file; a Ray without the module logs them as before.) And the traceback of a
    storage that did not answer, which each worker logged (`Error in training function`,
    dozens of lines a worker, again at each restart) before the build said it in one line
    (`_storage_gone`); a traceback of any other error is logged as before."""
    try:
        from ray.train.v2._internal import util
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(util.__name__).addFilter(_no_storage_tracebacks)


def _no_storage_tracebacks(record: logging.LogRecord) -> bool:
    """A log record to keep: not a traceback whose error, on its last line, is a storage's
    client saying its server does not answer."""
    last = record.getMessage().rstrip().rsplit("\n", 1)[-1]
    return not any(f"{name}:" in last for name in fsio.NO_ANSWER)


def _fault_point(step: int) -> None:
    """Fault switch (`train_worker`): die holding a finished, unreported layer or epoch, once
    the previous one's checkpoint is registered (as it long is when one takes minutes)."""
    if step >= 1 and os.environ.get(FAULT_ENV) == "train_worker":
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=60)
        die_once("train_worker")


def _train_loop(config: dict[str, Any]) -> None:
    import json

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from semid_dist.quantize.acrq import fit_acrq, worker_rows
    from semid_dist.quantize.residual import fit_residual_kmeans

    rank, world, device = _start_worker(config)
    sample = ray.get(config["sample"])
    init_points = ray.get(config["init_points"])
    init_centroids = ray.get(config["init_centroids"])  # warm start (None: k-means++)
    fitted = _load_layers(ray.train.get_checkpoint())

    def checkpoint(layer: int, codebooks: list[np.ndarray], stats: list[dict]) -> None:
        """Every worker reports after each layer; rank 0 attaches the layers so far, so a
        restarted worker group resumes with the next layer."""
        _fault_point(layer)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                np.savez(os.path.join(tmp, "layers.npz"),
                         **{f"layer_{i}": cb for i, cb in enumerate(codebooks)})
                with open(os.path.join(tmp, "stats.json"), "w") as f:
                    json.dump(stats, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"layer": layer}, checkpoint=ckpt)

    def all_reduce(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    acrq = ray.get(config["acrq"])  # AcrqSample for quantizer.method=acrq, else None
    common = {"niter": config["niter"], "seed": config["seed"],
              "all_reduce": all_reduce if world > 1 else None,
              "chunk_rows": config["chunk_rows"], "device": device, "fitted": fitted,
              "on_layer": checkpoint,
              "progress": train_files.ProgressFile(config["out"], rank)}
    if acrq is not None:
        codebooks, stats = fit_acrq(*worker_rows(sample, acrq.head, rank, world),
                                    config["layers"], config["anchors"], acrq, **common)
    else:
        codebooks, stats = fit_residual_kmeans(
            sample[rank::world], config["layers"], init_points=init_points,
            init_centroids=init_centroids, **common)
    if rank == 0:
        buf = io.BytesIO()
        np.savez(buf, **{f"layer_{i}": cb for i, cb in enumerate(codebooks)})
        fs, path = fsio.resolve(config["out"])
        fsio.write_bytes(fs, path + ".json", json.dumps(stats).encode())
        fsio.write_bytes(fs, path, buf.getvalue())


def _load_layers(ckpt: Any) -> list[tuple[np.ndarray, dict[str, Any]]] | None:
    """(codebook, stats) of the layers in a Ray Train checkpoint, or None."""
    if ckpt is None:
        return None
    import json

    with ckpt.as_directory() as folder:
        with np.load(os.path.join(folder, "layers.npz"), allow_pickle=False) as z:
            books = [z[f"layer_{i}"] for i in range(len(z.files))]
        with open(os.path.join(folder, "stats.json")) as f:
            stats = json.load(f)
    return list(zip(books, stats))


class _DistSync:
    """`semid_dist.quantize.training.Sync` over torch.distributed (gloo on CPU, nccl on GPU)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def _collective(self, t: Any, op: Callable[[Any], None]) -> Any:
        out = t.to(self.device).contiguous()
        op(out)
        return out.to(t.device)

    def all_reduce(self, t: Any) -> Any:
        import torch.distributed as dist

        return self._collective(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))

    def broadcast(self, t: Any) -> Any:
        import torch.distributed as dist

        return self._collective(t, lambda x: dist.broadcast(x, src=0))

    def all_min(self, t: Any) -> Any:
        import torch.distributed as dist

        return self._collective(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.MIN))


def _learned_loop(config: dict[str, Any]) -> None:
    """rq_vae / r3vae (and acrq on rq_vae) with DDP: every worker trains on its stride of the
    sample with the same number of steps per epoch; gradients are averaged by DDP, code usage
    is summed and dead-code restarts are broadcast from rank 0. One `ray.train.report` per
    epoch, with a checkpoint (weights, optimizer, generator, history) from rank 0, so a
    restarted worker group resumes after the last finished epoch."""
    import ray.train

    from semid_dist.quantize.training import TrainState

    rank, world, device = _start_worker(config)
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            resume = TrainState.load(folder)

    def report(record: dict[str, Any], snapshot: Callable[[], TrainState]) -> None:
        _fault_point(record["epoch"])
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                snapshot().save(tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": record["epoch"], "loss": record["loss"],
                              "reconstruction": record["reconstruction"],
                              "min_utilization": min(record["utilization"])}, checkpoint=ckpt)

    with train_files.named_error_to(config["out"], rank):
        _fit_and_write(config, rank, world, device, report, resume)


def _fit_and_write(config: dict[str, Any], rank: int, world: int, device: str,
                   report: Callable[..., None], resume: Any) -> None:
    """`_learned_loop`'s fit, and rank 0's writing of its module and statistics."""
    import json

    import ray
    import ray.train.torch

    from semid_dist.quantize.model import fit_learned, quantizer_files
    from semid_dist.quantize.training import LearnedParams

    sample = ray.get(config["sample"])
    init_points = ray.get(config["init_points"])
    acrq = ray.get(config["acrq"])
    method = config["method"]
    kw = {"sync": _DistSync(device) if world > 1 else None,
          "wrap": ray.train.torch.prepare_model if world > 1 else None, "device": device,
          "on_epoch": report, "resume": resume,
          "progress": train_files.ProgressFile(config["out"], rank)}
    params = LearnedParams.from_dict(config["params"])
    if acrq is not None:
        from semid_dist.quantize.acrq import fit_acrq_vae, worker_rows

        model, stats = fit_acrq_vae(*worker_rows(sample, acrq.head, rank, world),
                                    config["layers"], config["anchors"], acrq, params, **kw)
    else:
        model, stats = fit_learned(method, sample[rank::world], init_points, config["layers"],
                                   params, **kw)
    if rank == 0:
        files = quantizer_files(model, {"method": method, "training": stats})
        fs, path = fsio.resolve(config["out"])
        fsio.write_bytes(fs, path + ".json", json.dumps(stats).encode())
        for name, blob in sorted(files.items()):
            fsio.write_bytes(fs, f"{path}.{name}", blob)


def fit_on_ray_train(sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig,
                     log: Callable[[str], None], staging_url: str, *,
                     init_centroids: list[np.ndarray] | None = None, acrq: Any = None,
                     ) -> tuple[Any, list[dict[str, Any]]]:
    """sample: (n, d) float32 -> (codebooks, per-layer stats) fitted by fit.num_workers;
    for a learned method (rq_vae, r3vae, acrq on rq_vae: `BuildConfig.learned`) the first
    item is the trained module (DDP fit).
    init_centroids: warm start, one (k_l, d) float32 array per layer (every worker starts
    Lloyd from them instead of k-means++). acrq: the sample's head / tail split
    (`semid_dist.quantize.acrq.AcrqSample`) for quantizer.method=acrq; every worker takes
    its stride of both, and checkpoints count the 2L layers of the two stages."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    fit = cfg.fit
    learned = cfg.learned
    _check_rows_per_worker(sample, fit.num_workers, acrq, learned=learned)
    if fit.use_gpu:
        log("fit: a GPU task asks its node's torch for the GPU (fit.use_gpu)")
        _check_gpu_torch()
    out = f"{staging_url}/fit-{'model' if learned else 'codebooks.npz'}"
    train_files.clear(out)  # (an earlier run's, of this version)
    loop_config = _loop_config(sample, init_points, cfg, out, init_centroids, acrq)
    # (a fit stopped by a Ctrl-C is aborted before the folder goes: `_fit`)
    with tempfile.TemporaryDirectory(prefix="semid-fit-", ignore_cleanup_errors=True) as tmp:
        trainer = _trainer_class()(
            _learned_loop if learned else _train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=fit.num_workers, use_gpu=fit.use_gpu,
                                         resources_per_worker={"CPU": fit.cpus_per_worker}),
            run_config=RunConfig(storage_path=tmp, name="fit",
                                 failure_config=FailureConfig(max_failures=fit.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 **_train_logging()),
        )
        log(f"fit: Ray Train, {fit.num_workers} worker(s), "
            f"{'GPU' if fit.use_gpu else 'CPU'}, sample {len(sample)} x {sample.shape[1]}")
        with train_files.relayed_progress(out, log):
            try:
                _fit(trainer)
            except Exception as exc:
                if (storage := _storage_gone(exc)) is not None:
                    raise storage from exc  # (the one line a build says of it)
                raise
    fitted, stats = _fit_output(out, cfg, log)
    log(f"fit: done on Ray Train, {len(stats)} layers")  # (what comes after the fit)
    return fitted, stats


def _storage_gone(exc: Exception) -> BaseException | None:
    """The error of a worker whose storage did not answer (the fit's progress and output are
    written there), where Ray Train's error holds one (`WorkerGroupError.worker_failures`:
    each failed worker's own error; the others' may be what its going broke, gloo's closed
    connections), the lowest rank's; else None."""
    failures = getattr(exc, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    errors = [getattr(failures[rank], "_base_exc", failures[rank])  # (a Ray that leaves its
              for rank in sorted(failures)]  # traceback wrapper on: the error inside)
    gone = [e for e in errors if isinstance(e, BaseException) and fsio.no_answer(e)]
    return gone[0] if gone else None


def _loop_config(sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig, out: str,
                 init_centroids: list[np.ndarray] | None, acrq: Any) -> dict[str, Any]:
    """What every Ray Train worker's loop is given: the sample and its starting points in
    Ray's object store, the fit's settings, `out` (where rank 0 writes)."""
    import ray

    config = {
        "sample": ray.put(sample), "init_points": ray.put(init_points),
        "init_centroids": ray.put(init_centroids), "acrq": ray.put(acrq),
        "anchors": list(cfg.anchor_sizes),
        "layers": list(cfg.quantizer.layers), "niter": cfg.quantizer.niter,
        "seed": cfg.seed, "chunk_rows": cfg.encode.chunk_rows, "use_gpu": cfg.fit.use_gpu,
        "threads": max(1, int(cfg.fit.cpus_per_worker)), "out": out,
        "huge_pages": cfg.encode.huge_pages,
        "fault_env": {k: v for k, v in os.environ.items() if k in (FAULT_ENV, MARKER_ENV)},
    }
    if cfg.learned:
        from semid_dist.engines.local import learned_config

        config.update(method=cfg.quantizer.method, params=learned_config(cfg).to_dict())
    return config


def _check_gpu_torch() -> None:
    """With fit.use_gpu: a task given a GPU asks its node's torch whether it sees one, before
    the fit (on a node whose torch is a CPU build the fit's workers failed in Ray Train's
    own set-up, and were started again `fit.max_failures` times): one line naming the
    setting and the torch build (`check_worker_gpu`)."""
    import ray

    from semid_dist.engines.ray_data import task_errors

    with task_errors():
        ray.get(ray.remote(num_gpus=1, num_cpus=0)(check_worker_gpu).remote("cuda", "fit"))


def _check_rows_per_worker(sample: np.ndarray, workers: int, acrq: Any, *,
                           learned: bool) -> None:
    """Every worker needs rows of its own: ACRQ's of the head and of the tail, a learned
    quantizer's (DDP: a worker with none ran fewer steps than the others, out of lock
    step)."""
    if acrq is not None and min(int(acrq.head.sum()), int((~acrq.head).sum())) < workers:
        raise InputError(f"acrq: the fit sample's head or tail holds fewer rows than "
                         f"fit.num_workers={workers}; use fewer workers or a larger "
                         "fit.sample_size")
    if learned and len(sample) < workers:
        raise InputError(f"the fit sample holds {len(sample)} rows, fewer than "
                         f"fit.num_workers={workers}; use fewer workers or a larger "
                         "fit.sample_size")


def _trainer_class() -> type:
    """Ray Train's TorchTrainer, leaving the process's SIGINT handler as it is (`_fit`); a
    V2 trainer keeps its fit's controller (`controller`) instead."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        controller: Any = None

        def _register_sigint_handler(self, controller: Any) -> None:
            self.controller = controller  # (Ray Train V2's one place for its handler)

    return Trainer


_TUNE_NO_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"  # Ray Tune's switch, read as a fit starts
ABORT_S = 10.0  # the longest wait for the abort call (its workers ended at once, measured)


def _fit(trainer: Any) -> None:
    """`trainer.fit()` (a `_trainer_class` trainer) with the process's signal handlers left
    as they are. Called from the main thread, Ray Train installs a SIGINT handler of its own
    (V2: its `_register_sigint_handler`, for good; V1: Ray Tune's, unless Tune's switch is
    set): a Ctrl-C during the fit then ended the build with status 1 and no message (V1: a
    FileNotFoundError traceback, the fit stopped without its codebooks), and one after it
    was ignored (the build went on and committed). With the handler left alone a Ctrl-C is
    the main thread's KeyboardInterrupt, raised where the driver waits on the fit, as
    everywhere else; a V2 fit stopped so is aborted as Ray Train's handler would
    (`_abort`). Any SIGINT, SIGTERM or SIGUSR1 handler the fit sets (V1: Tune's SIGUSR1) is
    undone as it ends.

    The fit ran from a thread of its own before (Ray Train sets no handler there), but the
    engine then shut Ray down under that thread's `ray.get`, and the thread going on in Ray
    ended the process with Ray's fatal "The core worker has already been shutdown" (status
    1) in one of the test suite's runs."""
    if threading.current_thread() is not threading.main_thread():
        trainer.fit()  # (Ray Train and Tune set no handler outside the main thread)
        return
    handlers = {sig: signal.getsignal(sig)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    switch = os.environ.get(_TUNE_NO_SIGINT)
    os.environ[_TUNE_NO_SIGINT] = "1"
    try:
        trainer.fit()
    except BaseException:
        _abort(trainer.controller)
        raise
    finally:
        if switch is None:
            os.environ.pop(_TUNE_NO_SIGINT, None)
        else:
            os.environ[_TUNE_NO_SIGINT] = switch
        handlers_back(handlers)


def handlers_back(handlers: dict[int, Any]) -> None:
    """Put back the signal handlers `handlers` (saved before a fit; None: one not set from
    Python) that differ now, but where the command's interrupt was raised during the fit: a
    Ctrl-C is ignored from then on and a SIGTERM after a SIGTERM is the default death, as
    semid's handlers left them as they fired (putting semid's handler back armed a second
    Ctrl-C, raised in the engine's clean-up, in Ray's shutdown)."""
    stopping = interrupt_raised()
    for sig, handler in handlers.items():
        if handler is None:
            continue
        if stopping and sig == signal.SIGINT:
            handler = signal.SIG_IGN
        elif stopping and sig == signal.SIGTERM and terminated():
            handler = signal.SIG_DFL
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def _abort(controller: Any) -> None:
    """Abort a V2 fit's controller (None: none started, or a V1 fit), as Ray Train's own
    SIGINT handler does: it stops its workers and ends (at once where the fit has ended).
    Done before the fit's temporary folder is removed: otherwise the fit ended only as the
    interrupt unwound (the driver's last handle to the controller gone) or as the engine
    shut Ray down, its workers free to write a checkpoint into the folder meanwhile."""
    import ray

    if controller is None or not ray.is_initialized():  # (a call would start a new Ray)
        return

    with suppress(Exception):  # (best effort: the build's interrupt or error goes on)
        ray.get(controller.abort.remote(), timeout=ABORT_S)  # (the actor exits: an error)


def _fit_output(out: str, cfg: BuildConfig, log: Callable[[str], None],
                ) -> tuple[Any, list[dict[str, Any]]]:
    """What rank 0 wrote to `out`: (the trained module or the codebooks, per-layer stats),
    or the named error that ended the fit, raised."""
    import json

    train_files.raise_named_error(out)
    fs, path = fsio.resolve(out)
    if cfg.learned:
        from semid_dist.quantize.artifact import ARRAYS_FILE, META_FILE
        from semid_dist.quantize.model import load_quantizer

        files = {n: fs.cat_file(f"{path}.{n}") for n in (ARRAYS_FILE, META_FILE)}
        module = load_quantizer(files, where="fit output of Ray Train").module
        stats = json.loads(fs.cat_file(path + ".json"))
        last = stats[0]["epochs"][-1] if stats and stats[0]["epochs"] else {}
        log(f"fit: {cfg.quantizer.method}: {len(stats[0]['epochs'])} epochs, loss="
            f"{last.get('loss', float('nan')):.5g} utilization="
            + "/".join(f"{s['utilization']:.2f}" for s in stats))
        return module, stats
    with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as z:
        codebooks = [z[f"layer_{i}"] for i in range(len(cfg.quantizer.layers))]
    return codebooks, json.loads(fs.cat_file(path + ".json"))  # (its layers: relayed)
