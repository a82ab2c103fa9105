"""Ray engine: shard tasks and Ray Data encode actors; the fit runs on Ray Train.

Submit to a cluster with `ray job submit --working-dir . -- semid build --config conf/x.yaml
engine=ray ray.address=auto`. Locally the engine starts an embedded Ray (no dashboard, small
object store) and shuts it down when done; it leaves an already running Ray alone.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from semid_dist.config import BuildConfig
from semid_dist.engines.local import LocalEngine
from semid_dist.engines.ray_session import (
    fit_cpus,
    fit_gpus,
    quiet_datasets,
    ray_init,
    ray_shutdown,
    too_few_cpus,
)
from semid_dist.engines.shared import resolve, split_shared
from semid_dist.errors import ConfigError, SemidError, wrapped_errors
from semid_dist.io.catalog import Shard, shard_from_dict, shard_to_dict
from semid_dist.runtime import gpu_stages
from semid_dist.signals import interrupt_raised
from semid_dist.stages import JobContext, job_worker


def _run_item(fn: Callable[..., Any], item: tuple, *shared: Any) -> Any:
    return fn(*resolve(item, shared))


@contextmanager
def task_errors() -> Iterator[None]:
    """Re-raise a named semid error from a Ray task as itself, on one line, so the CLI
    prints its reason: Ray's wrapper of it (an instance of it too) reads as the task's
    traceback, with ANSI colours, and Ray Data appends its retry note to the message."""
    from ray.exceptions import RayError

    try:
        yield
    except RayError as exc:
        cause = _task_cause(exc)
        if cause is None:
            raise
        reason = str(cause).split("\n", 1)[0]
        raise type(cause)(f"{reason} (raised in a Ray task)") from exc


def _task_cause(exc: BaseException) -> SemidError | None:
    """The named error inside Ray's wrappers (`wrapped_errors`)."""
    from ray.exceptions import RayError

    return next((node for node in wrapped_errors(exc)
                 if isinstance(node, SemidError) and not isinstance(node, RayError)), None)


def _encode_shards(batch: dict[str, np.ndarray], *, job: str, ctx: JobContext,
                   threads: int) -> Iterator[dict[str, list]]:
    """Ray Data task body: encode the shards of the batch's row (one task's, as JSON; see
    `task_shards`) one after the other, yielding each shard's result as it finishes (a
    block per shard, streamed to the driver). The `EncodeWorker` (codebooks) is built once
    per Ray worker process and encode job: tasks reuse the worker processes the scan
    already started, so the stage pays no actor start-up (about 9 s on 2 cores)."""
    from semid_dist.quantize.cpu_blas import set_cpu_threads

    set_cpu_threads(threads)
    worker = job_worker(job, ctx)
    for shards in batch["shards"]:
        for shard in json.loads(shards):
            result = worker(shard_from_dict(shard))
            # pickled here: Ray Data turns a column of dicts into Arrow structs, and on a
            # value it cannot (a shard's rejects file entry) warns and pickles the column
            yield {"index": [result["index"]], "result": [pickle.dumps(result)]}


def shards_per_task(shards: int, tasks: int) -> int:
    """Shards one encode task runs on a cluster, one after the other: up to 4, keeping at
    least 2 tasks per concurrent slot for the balance at the end of the stage. Between two
    tasks a slot waits for the driver to launch the next one (Ray Data looks for finished
    tasks every 0.1 s; 0.01-0.4 s per task measured on 2 cores, 15% of a slot's time at 2
    shards a task); within a task the next shard starts at once. The benchmark's 23 shards
    on 2 slots: 4 shards a task against 2 took the stage from 234-265k to 267-308k items/s
    (3 runs each, in turn; measured on one node, before it ran a task per slot)."""
    return max(1, min(4, shards // (2 * max(tasks, 1))))


def task_shards(shards: list[Shard], tasks: int, *, one_node: bool) -> list[list[Shard]]:
    """The shards of each encode task, in the order the task runs them.

    On this machine's Ray (no `ray.address`: the embedded Ray, or one the caller started) the
    slots are cores of one machine, alike: one task per slot, the shards dealt round-robin (task
    t runs shards t, t + tasks, t + 2 tasks, ...), so no slot waits for Ray Data to launch
    another task, and the results reach the driver about in shard order, the order it merges
    their statistics in (consecutive shards per task held every later task's results back until
    the first task ended). The benchmark's 23 shards on 2 slots, 6 runs each against tasks of 4
    shards, in turn: the stage 3.84-4.68 s against 4.06-5.61 s (faster in 5 of the 6 pairs), the
    stage's seconds beyond its workers' shard seconds per slot 0.21-0.80 (median 0.40) against
    0.52-1.01 (0.73). On a cluster, tasks of up to 4 consecutive shards (`shards_per_task`) keep
    the balance at the end of the stage between nodes of different speeds."""
    tasks = max(1, min(tasks, len(shards)))
    if one_node:
        return [shards[t::tasks] for t in range(tasks)]
    per_task = shards_per_task(len(shards), tasks)
    return [shards[i:i + per_task] for i in range(0, len(shards), per_task)]


def _one_stage(ds: Any, tasks: int) -> Any:
    """`ds`, one map stage run by `tasks` concurrent tasks, each output row its own block,
    and two of Ray Data's backpressure rules for multi-stage pipelines relaxed.

    A task's output rows are gathered into blocks of up to `target_max_block_size` (128
    MiB): a shard's result (a few hundred bytes) then reached the driver only when its task
    ended, and the driver read and merged a task's shards' statistics all at once, the last
    task's after the stage. With a limit of 1 byte each row is a block of its own, sent as
    the task yields it. While results wait unread, a task runs on only until its stream
    holds 2 of them (Ray Data's limit on a task's unread output), then pauses between
    shards. The rules relaxed:

    - the per-operator resource reservation is off: it would budget a single task until Ray
      Data's autoscaling actor first reports the cluster's CPUs, seconds into a stage on a
      small machine;
    - the downstream-capacity rule lets up to 4 results per task wait for the driver (its
      default, 2 in all, launched no task while the driver folded one shard's statistics
      in; on 2 cores each encode task then sat idle 0.1-1.2 s between shards; measured when
      the results still carried the statistics)."""
    ds.context.target_max_block_size = 1
    ds.context.op_resource_reservation_enabled = False
    ds.context.downstream_capacity_backpressure_ratio = float(4 * tasks)
    return ds


def _warm_task(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task body of the warm-up: pay what an encode task pays first (`warm_worker`)."""
    from semid_dist.stages import warm_worker

    warm_worker()
    return batch


_WARM: dict[tuple[str, str], threading.Thread] = {}  # (namespace, job id) -> its warm-up


def warm_up(tasks: int) -> threading.Thread:
    """Start Ray Data's helper actors and `tasks` worker processes with the encode modules
    imported, in a background thread, once per Ray driver.

    A driver's first dataset creates Ray Data's stats and autoscaling actors, and its worker
    processes import torch and pyarrow: seconds on a small machine, which the warm-up
    overlaps with the driver's own work (the catalog's footers, the fit sample, the
    codebooks) instead of the encode stage paying them. Best effort: an error here is the
    encode stage's to report."""
    import ray

    rt = ray.get_runtime_context()
    key = (rt.namespace, rt.get_job_id())
    if key not in _WARM:
        def run() -> None:
            import ray.data

            try:
                ds = _one_stage(ray.data.range(tasks, override_num_blocks=tasks).map_batches(
                    _warm_task, batch_size=1, batch_format="numpy",
                    compute=ray.data.TaskPoolStrategy(size=tasks), num_cpus=1), tasks)
                # iterated, not materialized: `materialize` warns that the job "will hang"
                # whenever no CPU is free at that moment, as while the scan's tasks run
                for _ in ds.iter_batches(batch_size=None, batch_format=None,
                                         prefetch_batches=0):
                    pass
            except Exception:  # noqa: BLE001
                pass

        _WARM[key] = threading.Thread(target=run, name="semid-ray-warm-up", daemon=True)
        _WARM[key].start()
    return _WARM[key]


class RayEngine:
    name = "ray"
    warm_up_beside_fit = False  # its warm-up runs beside the scan's tasks
    resolve_input = LocalEngine.resolve_input

    def __init__(self, cfg: BuildConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log
        self._started = ray_init(cfg)
        quiet_datasets()
        self._warm: threading.Thread | None = None
        try:
            self._check_gpus()
            self._check_fit_cpus()
        except BaseException:
            self.close()
            raise

    def _check_gpus(self) -> None:
        """`fit.use_gpu` / `encode.use_gpu` ask Ray for a GPU per Train worker or encode task;
        on a Ray with none, or with fewer than the fit's workers (they start together), those
        would wait for them forever. On this machine's own Ray (no
        `ray.address`) that is an error; a cluster may still add GPU nodes (an autoscaler):
        there it is a warning."""
        wanted = [f"{stage}.use_gpu=true" for stage in gpu_stages(self.cfg)]
        if not wanted:
            return
        import ray

        have = ray.cluster_resources().get("GPU", 0)
        need = fit_gpus(self.cfg) if "fit" in gpu_stages(self.cfg) else 1.0
        if have >= need:
            return
        if have > 0 and "fit" in gpu_stages(self.cfg):  # (its workers start together, a GPU
            # each)
            msg = (f"fit.use_gpu=true with fit.num_workers={self.cfg.fit.num_workers} takes "
                   f"{need:g} GPUs at once but the Ray cluster has {have:g}")
            fix = f"set fit.num_workers={int(have)} or fewer"
        else:
            msg = (f"{' and '.join(wanted)} but the Ray cluster has no GPU "
                   "(ray.cluster_resources() lists none)")
            fix = ("run on a machine with a GPU Ray can see, or set "
                   + " and ".join(w.replace("=true", "=false") for w in wanted))
        if not self.cfg.ray.address:
            raise ConfigError(f"{msg}; {fix}")
        self.log(f"warning: {msg}: its tasks wait until GPU nodes join")

    def _check_fit_cpus(self) -> None:
        """Ray Train starts the fit's workers together, `fit.cpus_per_worker` CPUs each; a Ray
        with fewer CPUs than they take waits for them forever (and Ctrl-C hung in Ray Train's
        abort). On this machine's own Ray that is an error; a cluster may add nodes."""
        if self.cfg.encode.from_version:  # the codebooks come from a version: no fit
            return
        import ray

        need, have = fit_cpus(self.cfg), ray.cluster_resources().get("CPU", 0)
        if need <= have:
            return
        if not self.cfg.ray.address:
            raise ConfigError(too_few_cpus(self.cfg, need, have))
        self.log(f"warning: {too_few_cpus(self.cfg, need, have, cluster=True)}")

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(interrupted=kind is not None and (issubclass(kind, KeyboardInterrupt)
                                                     or interrupt_raised()))

    def close(self, *, interrupted: bool = False) -> None:
        if self._started:
            if self._warm is not None:  # Ray is not shut down under a running warm-up
                self._warm.join(timeout=60)
            ray_shutdown(interrupted=interrupted)
            self._started = False

    def warm_up(self) -> None:
        """Start the encode stage's Ray Data helpers and worker processes in the background
        (`warm_up`), once per driver."""
        tasks = min(self.cfg.encode.num_actors, self.cfg.ray.num_cpus or os.cpu_count() or 1)
        self._warm = warm_up(max(1, tasks))

    def map(self, fn: Callable[..., Any], items: Iterable[tuple]) -> list[Any]:
        import ray

        task = ray.remote(num_cpus=1)(_run_item)
        shared, items = split_shared(list(items))
        refs = [ray.put(obj) for obj in shared]  # once, not once per task
        with task_errors():
            return ray.get([task.remote(fn, item, *refs) for item in items])

    def encode(self, ctx: JobContext, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        import ray
        import ray.data

        if not shards:
            return
        if self._warm is not None:  # one dataset at a time; the warm-up is long done, as a rule
            self._warm.join(timeout=120)  # bounded: a cluster short of CPUs delays both alike
        cpus, tasks = 1.0, min(self.cfg.encode.num_actors, len(shards))
        one_node = not self.cfg.ray.address  # this machine's Ray: its slots are alike
        if one_node:  # a task per slot: a task more would wait for a slot, its shards last
            kind = "GPU" if self.cfg.encode.use_gpu else "CPU"
            tasks = max(1, min(tasks, int(ray.cluster_resources().get(kind, 1))))
        # a row and a block per task, so that each task gets exactly its row's shards
        groups = task_shards(shards, tasks, one_node=one_node)
        ds = ray.data.from_items(
            [{"shards": json.dumps([shard_to_dict(s) for s in group])} for group in groups],
            override_num_blocks=len(groups))
        ds = _one_stage(ds.map_batches(
            _encode_shards, fn_kwargs={"job": uuid.uuid4().hex, "ctx": ctx,
                                       "threads": int(cpus)},
            batch_size=1, batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=tasks),
            num_cpus=cpus, num_gpus=1 if self.cfg.encode.use_gpu else 0), tasks)
        # no look-ahead: `iter_rows` holds each block back until the next one has arrived
        with task_errors():
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy",
                                         prefetch_batches=0):
                yield from (pickle.loads(blob) for blob in batch["result"])

    def fit(self, sample: np.ndarray, init_points: np.ndarray, cfg: BuildConfig,
            log: Callable[[str], None], staging_url: str, *,
            init_centroids: list[np.ndarray] | None = None, acrq: Any = None,
            ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        from semid_dist.engines.ray_train import fit_on_ray_train

        return fit_on_ray_train(sample, init_points, cfg, log, staging_url,
                                init_centroids=init_centroids, acrq=acrq)
