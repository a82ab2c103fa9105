"""RQ-VAE (TIGER): MLP encoder / decoder around a residual vector quantizer.

Each layer l picks the nearest codeword of the latent residual r_l (squared Euclidean
distance, ties to the lowest code) and passes r_{l+1} = r_l - c_l on. Gradients reach the
encoder through the straight-through estimator (z_q = z + sg(sum_l c_l - z)); codebooks learn
from the codebook loss ||sg(r_l) - c_l||^2 and the encoder from the commitment loss
beta * ||r_l - sg(c_l)||^2. Codebooks start from residual k-means on a first batch
(`semid_dist.quantize.kmeans.kmeans`); a code unused for `dead_code_window` epochs is reset
to a random residual of the current batch.

The training loop (`semid_dist.quantize.training.train`) is shared with R^3-VAE and ACRQ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from semid_dist.quantize.kmeans import kmeans
from semid_dist.quantize.training import Forward, LearnedParams, Sync, fit_model


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


def fit_rq_vae(x: np.ndarray, init_points: np.ndarray, layers: tuple[int, ...] | list[int],
               params: LearnedParams, **kw: Any) -> tuple[RQVAE, list[dict[str, Any]]]:
    """Fit an RQ-VAE (`semid_dist.quantize.training.fit_model`, the same arguments)."""
    return fit_model(RQVAE, x, init_points, layers, params, **kw)
