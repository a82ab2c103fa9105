"""RQ-VAE (TIGER): MLP encoder / decoder around a residual vector quantizer.

Each layer l picks the nearest codeword of the latent residual r_l (squared Euclidean
distance, ties to the lowest code) and passes r_{l+1} = r_l - c_l on. Gradients reach the
encoder through the straight-through estimator (z_q = z + sg(sum_l c_l - z)); codebooks learn
from the codebook loss ||sg(r_l) - c_l||^2 and the encoder from the commitment loss
beta * ||r_l - sg(c_l)||^2. Codebooks start from residual k-means on a first batch
(`semid_dist.quantize.kmeans.kmeans`); a code unused for `dead_code_window` steps is reset
to a random residual of the current batch.

The training loop (`train`) is shared with R^3-VAE: it runs over a local shard, takes an
optional `Sync` (sums / broadcasts over data-parallel workers) and an optional `wrap`
(e.g. Ray Train's `prepare_model`, which wraps the module in DDP), and returns plain
per-layer statistics with the per-epoch history.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from semid_dist.quantize.kmeans import kmeans

Progress = Callable[[str], None]
Wrap = Callable[[nn.Module], nn.Module]
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


class Sync(Protocol):
    """Collectives over data-parallel workers (identity when running alone)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `t` over workers (returns the summed tensor)."""

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every worker."""


class LocalSync:
    """`Sync` for a single process: both collectives are the identity."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
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


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of `sizes` with ReLU between them (none after the last)."""
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def nearest_code(r: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """r: (b, e), cb: (k, e) -> (b,) int64 index of the nearest codeword (ties: lowest),
    scored in fp32 even under mixed precision."""
    with torch.autocast(device_type=r.device.type, enabled=False):
        r, cb = r.float(), cb.float()
        scores = (cb * cb).sum(dim=1).unsqueeze(0) - 2.0 * r @ cb.T
        return torch.argmin(scores, dim=1)


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


class RQVAE(nn.Module):
    """x: (b, d) -> z = encoder(x): (b, e) -> residual VQ with L codebooks (k_l, e) ->
    x_hat = decoder(sum_l c_l): (b, d)."""

    method = "rq_vae"

    def __init__(self, input_dim: int, layers: tuple[int, ...] | list[int],
                 params: LearnedParams) -> None:
        super().__init__()
        self.input_dim, self.layers, self.params = input_dim, tuple(layers), params
        h = list(params.hidden_dims)
        self.encoder = mlp([input_dim, *h, params.latent_dim])
        self.decoder = mlp([params.latent_dim, *reversed(h), input_dim])
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, params.latent_dim)) for k in self.layers])

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """z: (b, e) -> (sum of chosen codewords (b, e), codes (b, L) int64, the L residuals
        each layer quantized (b, e))."""
        r, q_sum = z, torch.zeros_like(z)
        codes, residuals = [], []
        for cb in self.codebooks:
            idx = nearest_code(r.detach(), cb.detach())
            q = cb[idx]
            residuals.append(r)
            codes.append(idx)
            q_sum = q_sum + q
            r = r - q
        return q_sum, torch.stack(codes, dim=1), residuals

    def forward(self, x: torch.Tensor) -> Forward:
        z = self.encoder(x)
        q_sum, codes, residuals = self.quantize(z)
        vq = z.new_zeros(())
        for layer, r in enumerate(residuals):
            c = self.codebooks[layer][codes[:, layer]]
            vq = vq + ((r.detach() - c) ** 2).mean() + self.params.beta * (
                (r - c.detach()) ** 2).mean()
        z_q = z + (q_sum - z).detach()  # straight-through
        x_hat = self.decoder(z_q)
        recon = ((x - x_hat) ** 2).sum(dim=1)
        rec_loss = ((x - x_hat) ** 2).mean()
        loss = rec_loss + vq
        final = residuals[-1] - self.codebooks[-1][codes[:, -1]]
        return Forward(loss, recon.detach(), codes, residuals, final.detach(),
                       {"reconstruction_loss": float(rec_loss.detach()),
                        "vq_loss": float(vq.detach())})

    @torch.no_grad()
    def encode_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (b, d) -> (codes (b, L) int64, sq (b, L) float32): sq[:, l] = ||r_{l+1}||^2 in
        the latent space for l < L-1, sq[:, L-1] = ||x - decode(codes)||^2 in input space."""
        q_sum, codes, residuals = self.quantize(self.encoder(x))
        sq = torch.empty(len(x), len(self.layers), dtype=torch.float32, device=x.device)
        for layer in range(len(self.layers) - 1):
            sq[:, layer] = (residuals[layer + 1] ** 2).sum(dim=1)
        sq[:, -1] = ((x - self.decoder(q_sum)) ** 2).sum(dim=1)
        return codes, sq

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, *, niter: int = 10) -> None:
        """Residual k-means on the latents of `x` (b, d), b >= max k: every worker holding
        the same `x` and weights gets the same codebooks."""
        r = self.encoder(x).cpu().numpy().astype(np.float32)
        for layer, k in enumerate(self.layers):
            cb, _ = kmeans(r, k, niter=niter, seed=self.params.seed + 1000 * layer)
            t = torch.from_numpy(cb)
            idx = nearest_code(torch.from_numpy(r), t).numpy()
            r = r - cb[idx]
            self.codebooks[layer].copy_(t.to(self.codebooks[layer].device))

    def after_step(self, fwd: Forward, idle: list[torch.Tensor], sync: Sync,
                   gen: torch.Generator, *, window: int) -> list[int]:
        """Dead-code restart: codes whose idle count (steps since last use, all workers)
        reached `window` steps get a random residual of rank 0's current batch (plus a tiny
        jitter). idle: L tensors (k_l,) int64, updated in place; window 0 skips restarts.
        Returns restarts per layer."""
        restarts = []
        with torch.no_grad():
            for layer, cb in enumerate(self.codebooks):
                if window <= 0:
                    restarts.append(0)
                    continue
                dead = idle[layer] >= window
                n_dead = int(dead.sum())
                if n_dead:
                    r = fwd.residuals[layer].detach()
                    pick = torch.randint(len(r), (n_dead,), generator=gen)
                    fresh = r[pick.to(r.device)] + 1e-4 * torch.randn(
                        n_dead, r.shape[1], generator=gen).to(r.device)
                    fresh = sync.broadcast(fresh.contiguous())
                    cb.data[dead.to(cb.device)] = fresh
                    idle[layer][dead] = 0
                restarts.append(n_dead)
        return restarts


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """torch seeded with deterministic algorithms for the block (then restored)."""
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


def _batches(n_local: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n_local, generator=gen)
    return [b for b in torch.tensor_split(perm, steps) if len(b)]


def train(model: nn.Module, x: np.ndarray, params: LearnedParams, *, sync: Sync | None = None,
          wrap: Wrap | None = None, device: str = "cpu", progress: Progress | None = None,
          on_epoch: EpochHook | None = None, resume: TrainState | None = None,
          frozen_rows: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Train `model` (codebooks already initialised) on the local shard x: (n_local, d)
    float32 with AdamW. Every worker runs the same number of steps per epoch
    (ceil(n_total / batch_size), each a slice of its shard), so DDP stays in lock step.
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
    n_total = int(sync.all_reduce(torch.tensor([float(len(x))], dtype=torch.float64))[0])
    steps = max(1, math.ceil(n_total / params.batch_size))
    gen = torch.Generator().manual_seed(params.seed + 17)
    idle = [torch.zeros(k, dtype=torch.int64) for k in model.layers]
    history: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume.model)
        gen.set_state(resume.generator)
        idle = [t.clone() for t in resume.idle]
        history = list(resume.history)
        if progress is not None:
            progress(f"fit: resuming after epoch {resume.epoch} (checkpoint)")
    anchors = _freeze(model, frozen_rows)
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
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
        history.append(record)
        if progress is not None:
            progress(f"fit: epoch {epoch}: loss={record['loss']:.5g} "
                     f"reconstruction={record['reconstruction']:.5g} utilization="
                     + "/".join(f"{u:.2f}" for u in record["utilization"])
                     + f" restarts={sum(record['dead_restarts'])}")
        if on_epoch is not None:
            on_epoch(record, lambda epoch=epoch: TrainState(
                epoch=epoch, model={k: v.detach().clone() for k, v in model.state_dict().items()},
                optimizer=opt.state_dict(), generator=gen.get_state(),
                idle=[t.clone() for t in idle], history=list(history)))
    return layer_stats(history, model.layers, n_total)


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


def fit_rq_vae(x: np.ndarray, init_points: np.ndarray, layers: tuple[int, ...] | list[int],
               params: LearnedParams, *, sync: Sync | None = None, wrap: Wrap | None = None,
               device: str = "cpu", progress: Progress | None = None,
               on_epoch: EpochHook | None = None, resume: TrainState | None = None,
               ) -> tuple[RQVAE, list[dict[str, Any]]]:
    """Fit an RQ-VAE. x: (n_local, d) float32, this worker's shard; init_points: (m, d)
    float32 with m >= max(layers), held identically by every worker (codebook k-means init).
    Deterministic for a fixed `params.seed` on CPU. on_epoch / resume: checkpoints, see
    `train`. Returns (model on CPU, per-layer stats)."""
    with deterministic(params.seed):
        model = RQVAE(x.shape[1], layers, params)
        model.init_codebooks(torch.from_numpy(np.ascontiguousarray(init_points, np.float32)))
        model.to(device)
        stats = train(model, x, params, sync=sync, wrap=wrap, device=device, progress=progress,
                      on_epoch=on_epoch, resume=resume)
    return model.cpu().eval(), stats
