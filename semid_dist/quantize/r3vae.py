"""R^3-VAE (paper 003): reference-vector projection + cosine rating residual quantization.

x: (b, d) -> z = encoder(x): (b, e). The reference vector r: (e,) is learned; each row is
projected on it, alpha = z.r / ||r||^2 (eq. 1), e0 = z - alpha r (eq. 2). Layer l rates every
codeword by cosine similarity s_k = e.c_k / (||e|| ||c_k||) (eq. 3), softmax w_k (eq. 4), and
mixes its top-K codewords, e_hat = sum_top-K w_k c_k (eq. 5; the K weights are renormalised to
sum to 1 so that e_hat is on the scale of the codewords), e <- e - e_hat (eq. 6). The SID is
the per-layer argmax of the rating (eq. 7). x_hat = decoder(alpha r + sum_l e_hat_l) (eq. 11:
the paper applies eq. 1-2 to the input embedding; here they act on the encoder's latent, the
VAE backbone of its Figure 1). Loss = ||x - x_hat||^2 (per item, eq. 11) + lambda (PD - SC)
(eq. 12-13), averaged over layers: SC in the form of the prose of section 3.4.1 (cosine
between each item's rated residual and its code embedding, averaged per code, then over the
codes of the batch) and PD over the layer's codewords (eq. 10, t = 2). The pairwise form of
eq. 8 as a loss let a handful of codes take every item on the demo catalog (8 of 256 used at
layer 0), so it is only used as the evaluation metric (`semid_dist.codes`). Codes unused for
`dead_code_window` epochs restart as in RQ-VAE: without that the rating alone collapsed to
about 10 used codes per layer on the demo catalog.

Encoding follows the same soft path, so the last column of `sq_residual` is ||x - x_hat||^2 of
that path (it uses the item's alpha and rating weights, not only its codes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semid_dist.quantize.kmeans import kmeans
from semid_dist.quantize.rqvae import RQVAE, mlp
from semid_dist.quantize.training import Forward, LearnedParams, Sync, fit_model


def rating(e: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """e: (b, m), cb: (k, m) -> cosine ratings s: (b, k) (eq. 3)."""
    return F.normalize(e, dim=1, eps=1e-12) @ F.normalize(cb, dim=1, eps=1e-12).T


def semantic_cohesion(e: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Training form of SC (section 3.4.1: cosine between the items of a cluster and their
    code embedding): per code present in the batch, the mean cos(e_i, c_code_i), averaged
    over those codes. e: (b, m) rated residuals, codes: (b,) int64, cb: (k, m) -> scalar."""
    cos = (F.normalize(e, dim=1, eps=1e-12) * F.normalize(cb[codes], dim=1, eps=1e-12)).sum(1)
    k = cb.shape[0]
    sums = torch.zeros(k, dtype=cos.dtype, device=cos.device).index_add(0, codes, cos)
    n = torch.bincount(codes, minlength=k).to(cos.dtype)
    keep = n > 0
    return (sums[keep] / n[keep]).mean()


def preference_discrimination(cb: torch.Tensor, t: float) -> torch.Tensor:
    """log of the mean over codeword pairs a < b of exp(-t (1 - cos(c_a, c_b))) (eq. 10).
    cb: (k, m) -> scalar."""
    u = F.normalize(cb, dim=1, eps=1e-12)
    cos = u @ u.T
    iu = torch.triu_indices(len(cb), len(cb), offset=1, device=cb.device)
    return torch.logsumexp(-t * (1.0 - cos[iu[0], iu[1]]), dim=0) - np.log(iu.shape[1])


class R3VAE(nn.Module):
    """Encoder, reference vector, L rating codebooks (k_l, e), decoder."""

    method = "r3vae"

    def __init__(self, input_dim: int, layers: tuple[int, ...] | list[int],
                 params: LearnedParams) -> None:
        super().__init__()
        self.input_dim, self.layers, self.params = input_dim, tuple(layers), params
        h = list(params.hidden_dims)
        self.encoder = mlp([input_dim, *h, params.latent_dim])
        self.decoder = mlp([params.latent_dim, *reversed(h), input_dim])
        self.reference = nn.Parameter(torch.ones(params.latent_dim))
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, params.latent_dim)) for k in self.layers])

    def project(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (b, e) -> (alpha r: (b, e), e0: (b, e)) (eq. 1-2)."""
        r = self.reference
        alpha = (z @ r) / (r @ r).clamp_min(1e-12)
        anchor = alpha.unsqueeze(1) * r.unsqueeze(0)
        return anchor, z - anchor

    def layer(self, e: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
        """One rating layer: e: (b, m) -> (e_hat (b, m), code (b,) int64, ratings (b, k))."""
        s = rating(e, cb)
        w = torch.softmax(s, dim=1)
        kk = min(self.params.topk, cb.shape[0])
        top_w, top_i = torch.topk(w, kk, dim=1)  # sorted: column 0 is the argmax
        top_w = top_w / top_w.sum(dim=1, keepdim=True)
        e_hat = (top_w.unsqueeze(2) * cb[top_i]).sum(dim=1)
        return e_hat, top_i[:, 0], s

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor],
                                                 torch.Tensor]:
        """z: (b, e) -> (z_hat = alpha r + sum e_hat (b, e), codes (b, L) int64, the L
        residuals rated (b, e), the final residual e_L (b, e))."""
        anchor, e = self.project(z)
        z_hat = anchor
        codes, residuals = [], []
        for cb in self.codebooks:
            e_hat, code, _ = self.layer(e, cb)
            residuals.append(e)
            codes.append(code)
            z_hat = z_hat + e_hat
            e = e - e_hat
        return z_hat, torch.stack(codes, dim=1), residuals, e

    def ratings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (b, d) -> the L rating matrices (b, k_l) along the soft residual path."""
        _, e = self.project(self.encoder(x))
        out = []
        for cb in self.codebooks:
            e_hat, _, s = self.layer(e, cb)
            out.append(s)
            e = e - e_hat
        return out

    def forward(self, x: torch.Tensor) -> Forward:
        z_hat, codes, residuals, final = self.quantize(self.encoder(x))
        x_hat = self.decoder(z_hat)
        recon = ((x - x_hat) ** 2).sum(dim=1)
        rec_loss = recon.mean()  # eq. 11: ||x - x_hat||^2 per item, so lambda keeps its scale
        sc = torch.stack([semantic_cohesion(e, codes[:, i], cb)
                          for i, (e, cb) in enumerate(zip(residuals, self.codebooks))]).mean()
        pd = torch.stack([preference_discrimination(cb, self.params.pd_t)
                          for cb in self.codebooks]).mean()
        loss = rec_loss + self.params.lam * (pd - sc)
        return Forward(loss, recon.detach(), codes, residuals, final.detach(),
                       {"reconstruction_loss": float(rec_loss.detach()), "sc": float(sc.detach()),
                        "pd": float(pd.detach())})

    @torch.no_grad()
    def encode_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (b, d) -> (codes (b, L) int64, sq (b, L) float32): sq[:, l] = ||e_{l+1}||^2 in
        the latent space for l < L-1, sq[:, L-1] = ||x - x_hat||^2 in the input space."""
        z_hat, codes, residuals, _ = self.quantize(self.encoder(x))
        sq = torch.empty(len(x), len(self.layers), dtype=torch.float32, device=x.device)
        for layer in range(len(self.layers) - 1):
            sq[:, layer] = (residuals[layer + 1] ** 2).sum(dim=1)
        sq[:, -1] = ((x - self.decoder(z_hat)) ** 2).sum(dim=1)
        return codes, sq

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, *, niter: int = 10) -> None:
        """Reference vector = mean latent of `x` (b, d); C^1 = k-means of e0, C^l = k-means
        of the residuals left by layer l-1 on the soft path (section 3.3.1)."""
        z = self.encoder(x)
        self.reference.copy_(z.mean(dim=0))
        _, e = self.project(z)
        for layer, k in enumerate(self.layers):
            cb, _ = kmeans(e.cpu().numpy().astype(np.float32), k, niter=niter,
                           seed=self.params.seed + 1000 * layer)
            self.codebooks[layer].copy_(torch.from_numpy(cb).to(e.device))
            e_hat, _, _ = self.layer(e, self.codebooks[layer])
            e = e - e_hat

    def after_step(self, fwd: Forward, idle: list[torch.Tensor], sync: Sync,
                   gen: torch.Generator, *, window: int) -> list[int]:
        """Dead-code restart as in RQ-VAE (`RQVAE.after_step`): not in the paper, but the
        cosine rating alone lets a few codewords win every item (observed on the demo
        catalog); `dead_code_window=0` turns it off."""
        return RQVAE.after_step(self, fwd, idle, sync, gen, window=window)


def fit_r3vae(x: np.ndarray, init_points: np.ndarray, layers: tuple[int, ...] | list[int],
              params: LearnedParams, **kw: Any) -> tuple[R3VAE, list[dict[str, Any]]]:
    """Fit an R^3-VAE (`semid_dist.quantize.training.fit_model`, the same arguments)."""
    return fit_model(R3VAE, x, init_points, layers, params, **kw)
