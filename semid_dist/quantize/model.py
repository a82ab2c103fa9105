"""The encode seam: one `Quantizer` per artifact, whatever the method.

`load_quantizer(files)` rebuilds the quantizer of a verified codebook artifact;
`Quantizer.encode(x)` is the one batch function every engine calls. For rq_kmeans it is
`encode_batch` over the codebooks. For the learned methods (rq_vae, r3vae) it runs the
model: codes are the per-layer choices, `sq_residual[:, l]` for l < L-1 is the squared
latent residual after layer l, and the last column is the squared reconstruction error
||x - x_hat||^2 in the input space, so `EncodeResult.qerr` stays the reconstruction error.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from semid_dist.errors import ArtifactError
from semid_dist.quantize.artifact import artifact_files, load_artifact_tensors
from semid_dist.quantize.encode import EncodeResult, encode_batch
from semid_dist.quantize.r3vae import R3VAE
from semid_dist.quantize.rqvae import RQVAE
from semid_dist.quantize.training import LearnedParams, fit_model

LEARNED: dict[str, type[nn.Module]] = {"rq_vae": RQVAE, "r3vae": R3VAE}
Fitted = list[np.ndarray] | nn.Module  # what a fit returns: rq_kmeans codebooks or a model


class Quantizer(Protocol):
    method: str

    @property
    def sizes(self) -> tuple[int, ...]:
        """Codebook size per layer."""

    @property
    def dim(self) -> int:
        """Input embedding dimension d."""

    def encode(self, x: np.ndarray, *, chunk_rows: int = 8192, device: str = "cpu",
               candidates: int = 1, precision: str = "fp32", rerank: int = 8) -> EncodeResult:
        """x: (n, d) float32 -> codes (n, L) int32, sq_residual (n, L) float32."""


class KMeansQuantizer:
    """rq_kmeans (and acrq, whose fit yields the same kind of codebooks): greedy residual
    encode over L codebooks (k_l, d) float32."""

    def __init__(self, codebooks: list[np.ndarray], method: str = "rq_kmeans") -> None:
        self.codebooks = codebooks
        self.method = method

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(cb) for cb in self.codebooks)

    @property
    def dim(self) -> int:
        return int(self.codebooks[0].shape[1])

    def encode(self, x: np.ndarray, *, chunk_rows: int = 8192, device: str = "cpu",
               candidates: int = 1, precision: str = "fp32", rerank: int = 8) -> EncodeResult:
        return encode_batch(self.codebooks, x, chunk_rows=chunk_rows, device=device,
                            candidates=candidates, precision=precision, rerank=rerank)


class LearnedQuantizer:
    """rq_vae / r3vae (and acrq on rq_vae): a trained module (`RQVAE` or `R3VAE`) run in
    eval mode; `method` is the build's quantizer.method (the module's by default)."""

    def __init__(self, module: nn.Module, method: str | None = None) -> None:
        self.module = module.eval()
        self.method = method or module.method

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.module.layers)

    @property
    def dim(self) -> int:
        return int(self.module.input_dim)

    def encode(self, x: np.ndarray, *, chunk_rows: int = 8192, device: str = "cpu",
               candidates: int = 1, precision: str = "fp32", rerank: int = 8) -> EncodeResult:
        if candidates > 1:
            raise ValueError(f"{self.method} has no last-layer candidates (capacity-bounded "
                             "collisions are rq_kmeans only)")
        if precision != "fp32":
            raise ValueError(f"{self.method} encodes in fp32 only, not {precision}")
        n, n_layers = len(x), len(self.sizes)
        codes = np.empty((n, n_layers), dtype=np.int32)
        sq = np.empty((n, n_layers), dtype=np.float32)
        module = self.module.to(device)
        with torch.no_grad():
            for start in range(0, n, chunk_rows):
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk_rows],
                                                           dtype=np.float32)).to(device)
                c, s = module.encode_rows(xb)
                codes[start:start + len(xb)] = c.cpu().numpy()
                sq[start:start + len(xb)] = s.cpu().numpy()
        return EncodeResult(codes=codes, sq_residual=sq)


def as_quantizer(fitted: Fitted) -> Quantizer:
    """Wrap what a fit returned (codebooks or a learned module) as a `Quantizer`."""
    if isinstance(fitted, nn.Module):
        return LearnedQuantizer(fitted)
    return KMeansQuantizer(list(fitted))


def quantizer_files(fitted: Fitted, meta: dict[str, Any]) -> dict[str, bytes]:
    """The artifact of a fit: codebooks as `layer_<i>`, a learned module's other weights
    as `param.<state_dict name>`, and under meta["model"] what rebuilds the module."""
    if not isinstance(fitted, nn.Module):
        return artifact_files(list(fitted), meta)
    state = fitted.state_dict()
    books = [state[f"codebooks.{i}"].cpu().numpy() for i in range(len(fitted.layers))]
    tensors = {f"param.{k}": v.detach().cpu().numpy() for k, v in state.items()
               if not k.startswith("codebooks.")}
    model_meta = {"method": fitted.method, "input_dim": int(fitted.input_dim),
                  "layers": list(fitted.layers), "params": fitted.params.to_dict()}
    return artifact_files(books, dict(meta, model=model_meta), tensors=tensors)


def load_quantizer(files: dict[str, bytes], *, where: str = "artifact") -> Quantizer:
    """Verify an artifact (checksums) and rebuild its quantizer (no pickle anywhere)."""
    codebooks, tensors, meta = load_artifact_tensors(files, where=where)
    model_meta = meta.get("model")
    if model_meta is None:
        return KMeansQuantizer(codebooks, method=meta.get("method", "rq_kmeans"))
    try:
        cls = LEARNED[model_meta["method"]]
        module = cls(int(model_meta["input_dim"]), [int(k) for k in model_meta["layers"]],
                     LearnedParams.from_dict(model_meta["params"]))
        state = {k[len("param."):]: torch.from_numpy(v.copy()) for k, v in tensors.items()
                 if k.startswith("param.")}
        state.update({f"codebooks.{i}": torch.from_numpy(cb.copy())
                      for i, cb in enumerate(codebooks)})
        module.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{where}: cannot rebuild the {model_meta.get('method')} model "
                            f"({exc!r}); rebuild that version") from None
    return LearnedQuantizer(module, meta.get("method"))


METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "rq_vae": {"lr": 1e-3, "weight_decay": 0.0},
    "r3vae": {"lr": 5e-4, "weight_decay": 1e-5},  # paper 003, section 3.5.3
}


def learned_params(method: str, *, seed: int, lr: float | None = None,
                   weight_decay: float | None = None, **values: Any) -> LearnedParams:
    """LearnedParams of `method` with its defaults for lr / weight_decay when None."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"{method!r} is not a learned quantizer ({' | '.join(LEARNED)})")
    d = METHOD_DEFAULTS[method]
    return LearnedParams(lr=d["lr"] if lr is None else lr,
                         weight_decay=d["weight_decay"] if weight_decay is None else weight_decay,
                         seed=seed, **values)


def fit_learned(method: str, x: np.ndarray, init_points: np.ndarray,
                layers: tuple[int, ...] | list[int], params: LearnedParams,
                **kw: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
    """`method`'s model (`LEARNED`) fitted (`semid_dist.quantize.training.fit_model`, the
    same arguments)."""
    if method not in LEARNED:
        raise ValueError(f"{method!r} is not a learned quantizer ({' | '.join(LEARNED)})")
    return fit_model(LEARNED[method], x, init_points, layers, params, **kw)
