"""The training loop of the learned quantizers (RQ-VAE, R^3-VAE, ACRQ's stages): their
hyper-parameters, the collectives over data-parallel workers (`Sync`), one forward pass's
outputs (`Forward`), the resumable checkpoint state (`TrainState`) and `train`.

`train` runs over a local shard, takes an optional `Sync` (sums / broadcasts over
data-parallel workers) and an optional `wrap` (e.g. Ray Train's `prepare_model`, which wraps
the module in DDP), and returns plain per-layer statistics with the per-epoch history. The
model is any module with `layers`, `codebooks` and `after_step` (`rqvae.RQVAE`,
`r3vae.R3VAE`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from semid_dist.quantize import divergence

Progress = Callable[[str], None]
Wrap = Callable[[nn.Module], nn.Module]
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


class Sync(Protocol):
    """Collectives over data-parallel workers (identity when running alone)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `t` over workers (returns the summed tensor)."""

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every worker."""

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise minimum of `t` over workers."""


class LocalSync:
    """`Sync` for a single process: the collectives are the identity."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_min(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass(frozen=True)
class LearnedParams:
    """Hyper-parameters of a learned quantizer (the resolved values, method defaults applied)."""

    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta: float = 0.25
    dead_code_window: int = 2  # epochs a code may stay unused before a restart (0: never)
    topk: int = 4  # R^3-VAE: codewords mixed per layer
    lam: float = 0.01  # R^3-VAE: weight of PD - SC
    pd_t: float = 2.0  # R^3-VAE: temperature t of PD (eq. 10)
    seed: int = 0
    precision: str = "fp32"  # bf16: encoder / decoder under bf16 autocast (codes in fp32)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnedParams:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if "hidden_dims" in kw:
            kw["hidden_dims"] = tuple(int(h) for h in kw["hidden_dims"])
        return cls(**kw)


@dataclass
class Forward:
    """One forward pass: loss (scalar), recon (b,) squared input-space error per row,
    codes (b, L) int64, residuals: L latent tensors (b, e) the layers quantized, final: the
    latent residual (b, e) left after the last layer, and the loss terms (floats)."""

    loss: torch.Tensor
    recon: torch.Tensor
    codes: torch.Tensor
    residuals: list[torch.Tensor]
    final: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """torch seeded with deterministic algorithms for the block (then restored). On CUDA
    these need cuBLAS's fixed workspace, which torch reads from `CUBLAS_WORKSPACE_CONFIG`
    (unset, every matrix product on a GPU raised a RuntimeError): set where unset."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@dataclass
class TrainState:
    """Everything `train` needs to go on after a finished epoch, as a checkpoint: weights,
    optimizer moments, the dead-code restart generator, idle counts and the history so far
    (the batch order needs no state: each epoch seeds its own).
    Saved as safetensors + JSON (no pickle); a run resumed from it ends bit-identical to an
    uninterrupted one on CPU."""

    epoch: int  # the last finished epoch
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    generator: torch.Tensor
    idle: list[torch.Tensor]
    history: list[dict[str, Any]]
    stage: int = 1  # ACRQ: the stage the epoch belongs to (1 head, 2 tail)
    notes: dict[str, Any] = field(default_factory=dict)  # JSON the caller carries along

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.items()}
        tensors["generator"] = self.generator.clone()
        tensors.update({f"idle.{i}": t.clone() for i, t in enumerate(self.idle)})
        slots = {}
        for idx, st in self.optimizer["state"].items():
            slots[str(idx)] = sorted(st)
            tensors.update({f"opt.{idx}.{k}": torch.as_tensor(v).detach().cpu().contiguous()
                            for k, v in st.items()})
        save_file(tensors, f"{folder}/{STATE_TENSORS}")
        meta = {"epoch": self.epoch, "stage": self.stage, "history": self.history,
                "notes": self.notes, "idle": len(self.idle),
                "param_groups": self.optimizer["param_groups"], "slots": slots}
        with open(f"{folder}/{STATE_JSON}", "w") as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, folder: str) -> TrainState:
        from safetensors.torch import load_file

        tensors = load_file(f"{folder}/{STATE_TENSORS}")
        with open(f"{folder}/{STATE_JSON}") as f:
            meta = json.load(f)
        state = {int(idx): {k: tensors[f"opt.{idx}.{k}"] for k in keys}
                 for idx, keys in meta["slots"].items()}
        return cls(epoch=meta["epoch"],
                   model={k[len("model."):]: v for k, v in tensors.items()
                          if k.startswith("model.")},
                   optimizer={"state": state, "param_groups": meta["param_groups"]},
                   generator=tensors["generator"],
                   idle=[tensors[f"idle.{i}"] for i in range(meta["idle"])],
                   history=meta["history"], stage=meta["stage"], notes=meta["notes"])


EpochHook = Callable[[dict[str, Any], Callable[[], TrainState]], None]


def fit_model(cls: Callable[..., nn.Module], x: np.ndarray, init_points: np.ndarray,
              layers: tuple[int, ...] | list[int], params: LearnedParams, *,
              sync: Sync | None = None, wrap: Wrap | None = None, device: str = "cpu",
              progress: Progress | None = None, on_epoch: EpochHook | None = None,
              resume: TrainState | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fit a learned quantizer `cls(dim, layers, params)` (RQ-VAE, R^3-VAE). x: (n_local, d)
    float32, this worker's shard; init_points: (m, d) float32 with m >= max(layers), held
    identically by every worker (the codebooks' k-means start). Deterministic for a fixed
    `params.seed` on CPU. on_epoch / resume: checkpoints, see `train`. Returns (the model on
    CPU, in eval mode, per-layer stats as `train` gives them)."""
    with deterministic(params.seed):
        model = cls(x.shape[1], layers, params)
        model.init_codebooks(torch.from_numpy(np.array(init_points, np.float32)))
        model.to(device)
        stats = train(model, x, params, sync=sync, wrap=wrap, device=device, progress=progress,
                      on_epoch=on_epoch, resume=resume)
    return model.cpu().eval(), stats


def _batches(n_local: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n_local, generator=gen)
    return [b for b in torch.tensor_split(perm, steps) if len(b)]


def train(model: nn.Module, x: np.ndarray, params: LearnedParams, *, sync: Sync | None = None,
          wrap: Wrap | None = None, device: str = "cpu", progress: Progress | None = None,
          on_epoch: EpochHook | None = None, resume: TrainState | None = None,
          frozen_rows: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Train `model` (codebooks already initialised) on the local shard x: (n_local, d)
    float32 with AdamW. Every worker runs the same number of steps per epoch
    (ceil(n_total / batch_size), each a slice of its shard; at most the smallest shard's
    rows, so that no worker has an empty step), so DDP stays in lock step.
    Returns per-layer statistics: layer, k, n, final_mse (mean ||r_{l+1}||^2 in the
    latent space, last epoch), utilization, dead_restarts, epochs (per-epoch history with
    loss, reconstruction (mean ||x - x_hat||^2), utilization and restarts of this layer).

    on_epoch(record, snapshot) runs after each epoch; `snapshot()` gives the `TrainState`
    to checkpoint. resume: a state to go on from (its epoch is not run again).
    frozen_rows: per layer, the first codewords that never change (ACRQ anchors): their
    gradient is masked, they are restored after every step (AdamW's weight decay would
    move them otherwise) and never restarted. params.precision=bf16 runs the forward pass
    under bf16 autocast (codes are chosen in fp32)."""
    sync = sync or LocalSync()
    xt, n_total, steps, bound = _shard(model, x, params, sync, device)
    gen, idle, history = _start_state(model, params, resume, progress)
    anchors = _freeze(model, frozen_rows)
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=params.precision == "bf16")
    first = 0 if resume is None else resume.epoch + 1
    for epoch in range(first, params.epochs):
        net.train()
        acc = _EpochStats(model.layers)
        # no restart in the last epoch, so that the decoder adapts to every restarted code
        last = epoch == params.epochs - 1 and params.epochs > 1
        window = 0 if last else params.dead_code_window * steps
        # the batch order comes from a generator of its own per epoch: shards of different
        # sizes draw different amounts, so a shared one would leave the workers' states
        # apart, and a checkpoint holds one state (`gen`, the restarts', is drawn alike)
        order = torch.Generator().manual_seed(params.seed + 17 + 7919 * (epoch + 1))
        for idx in _batches(len(x), steps, order):
            with autocast:
                fwd: Forward = net(xt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            fwd.loss.backward()
            opt.step()
            _restore(model, anchors)
            acc.add(fwd, idle, sync)
            for layer, rows in enumerate(frozen_rows or ()):
                idle[layer][:rows] = 0  # anchors are never restarted
            acc.restarts += np.array(model.after_step(fwd, idle, sync, gen, window=window))
        record = acc.record(epoch, sync)
        divergence.check_diverged(record, params, bound, last=epoch == params.epochs - 1)
        history.append(record)
        if progress is not None:
            progress(_epoch_line(record))
        if on_epoch is not None:
            on_epoch(record, lambda epoch=epoch: TrainState(
                epoch=epoch, model={k: v.detach().clone() for k, v in model.state_dict().items()},
                optimizer=opt.state_dict(), generator=gen.get_state(),
                idle=[t.clone() for t in idle], history=list(history)))
    return layer_stats(history, model.layers, n_total)


def _shard(model: nn.Module, x: np.ndarray, params: LearnedParams, sync: Sync, device: str,
           ) -> tuple[torch.Tensor, int, int, dict[str, float]]:
    """(this worker's rows as a tensor, the rows of all workers, the steps of an epoch, the
    errors a diverged fit is measured against: `divergence.bound`). The steps:
    ceil(n_total / batch_size), at most the smallest shard's rows (a worker out of steps
    before the others left DDP's collectives out of lock step: a gloo abort)."""
    n_total = int(sync.all_reduce(torch.tensor([float(len(x))], dtype=torch.float64))[0])
    fewest = int(sync.all_min(torch.tensor([len(x)], dtype=torch.int64))[0])
    steps = max(1, min(math.ceil(n_total / params.batch_size), fewest))
    with warnings.catch_warnings():  # (a sample from Ray's object store is read-only; the
        warnings.filterwarnings(  # loop only reads it: no copy)
            "ignore", message="The given NumPy array is not writable", category=UserWarning)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return xt, n_total, steps, divergence.bound(model, x, xt, n_total, sync, device)


def _start_state(model: nn.Module, params: LearnedParams, resume: TrainState | None,
                 progress: Progress | None,
                 ) -> tuple[torch.Generator, list[torch.Tensor], list[dict[str, Any]]]:
    """(the dead-code restarts' generator, idle counts per layer, history so far) of a new
    run, or of `resume`'s, whose weights are loaded into `model`."""
    gen = torch.Generator().manual_seed(params.seed + 17)
    idle = [torch.zeros(k, dtype=torch.int64) for k in model.layers]
    history: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume.model)
        gen.set_state(resume.generator)
        idle = [t.clone() for t in resume.idle]
        history = list(resume.history)
        if progress is not None:
            progress(f"resuming after epoch {resume.epoch} (checkpoint)")
    return gen, idle, history


def _epoch_line(record: dict[str, Any]) -> str:
    """The progress line of a finished epoch's record (the engine adds `fit: `)."""
    return (f"epoch {record['epoch']}: loss={record['loss']:.5g} "
            f"reconstruction={record['reconstruction']:.5g} utilization="
            + "/".join(f"{u:.2f}" for u in record["utilization"])
            + f" restarts={sum(record['dead_restarts'])}")


def _freeze(model: nn.Module, frozen_rows: tuple[int, ...] | None) -> list[torch.Tensor]:
    """Mask the gradient of each layer's first `frozen_rows[l]` codewords; returns copies of
    them for `_restore`."""
    if not frozen_rows:
        return []
    kept = []
    for cb, rows in zip(model.codebooks, frozen_rows):
        mask = torch.ones(cb.shape[0], 1, dtype=cb.dtype, device=cb.device)
        mask[:rows] = 0
        cb.register_hook(lambda grad, mask=mask: grad * mask)
        kept.append(cb.detach()[:rows].clone())
    return kept


def _restore(model: nn.Module, anchors: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for cb, rows in zip(model.codebooks, anchors):
            cb[:len(rows)] = rows


class _EpochStats:
    """Sums over one epoch's steps (code counts all-reduced every step for the idle counts;
    loss / reconstruction / residual sums all-reduced once at the end)."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.used = [torch.zeros(k, dtype=torch.float64) for k in layers]
        self.res_sq = torch.zeros(len(layers), dtype=torch.float64)
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss * rows, recon sum, rows
        self.restarts = np.zeros(len(layers), dtype=np.int64)
        self.terms: dict[str, float] = {}  # loss term -> sum of term * rows

    def add(self, fwd: Forward, idle: list[torch.Tensor], sync: Sync) -> None:
        """Count this step's codes (over all workers) and update `idle` in place."""
        layers = self.layers
        counts = [torch.bincount(fwd.codes[:, i].cpu(), minlength=k).to(torch.float64)
                  for i, k in enumerate(layers)]
        counts = list(torch.split(sync.all_reduce(torch.cat(counts)), list(layers)))
        for i in range(len(layers)):
            self.used[i] += counts[i]
            idle[i] = torch.where(counts[i] > 0, 0, idle[i] + 1)
            nxt = fwd.residuals[i + 1] if i + 1 < len(layers) else fwd.final
            self.res_sq[i] += float((nxt.detach() ** 2).sum())
        rows = len(fwd.codes)
        for name, value in fwd.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value * rows
        self.sums += torch.tensor([float(fwd.loss.detach()) * rows, float(fwd.recon.sum()),
                                   rows], dtype=torch.float64)

    def record(self, epoch: int, sync: Sync) -> dict[str, Any]:
        sums = sync.all_reduce(self.sums)
        res_sq = sync.all_reduce(self.res_sq)
        names = sorted(self.terms)
        terms = sync.all_reduce(torch.tensor([self.terms[n] for n in names], dtype=torch.float64))
        rows = max(float(sums[2]), 1.0)
        return {"epoch": epoch, "loss": float(sums[0]) / rows,
                **{n: float(v) / rows for n, v in zip(names, terms)},
                "reconstruction": float(sums[1]) / rows,
                "utilization": [float((u > 0).double().mean()) for u in self.used],
                "dead_restarts": [int(r) for r in self.restarts],
                "residual_mse": [float(v) / rows for v in res_sq]}


_PER_LAYER = ("utilization", "dead_restarts", "residual_mse")


def layer_stats(history: list[dict[str, Any]], layers: tuple[int, ...],
                n_total: int) -> list[dict[str, Any]]:
    """Per-epoch history -> per-layer statistics (the shape the build's metrics expect)."""
    out = []
    for i, k in enumerate(layers):
        last = history[-1] if history else None
        out.append({
            "layer": i, "k": k, "n": n_total, "init": "kmeans",
            "final_mse": last["residual_mse"][i] if last else None,
            "utilization": last["utilization"][i] if last else None,
            "dead_restarts": sum(h["dead_restarts"][i] for h in history),
            "epochs": [{**{k: v for k, v in h.items() if k not in _PER_LAYER},
                        "utilization": h["utilization"][i],
                        "dead_restarts": h["dead_restarts"][i]} for h in history],
        })
    return out
