"""Pure numeric core: numpy / torch only (never ray or pyspark)."""

from semid_dist.quantize.encode import decode, encode_batch, nearest
from semid_dist.quantize.kmeans import kmeans, kmeans_plusplus, lloyd_stats
from semid_dist.quantize.model import Quantizer, load_quantizer, quantizer_files
from semid_dist.quantize.r3vae import fit_r3vae
from semid_dist.quantize.residual import fit_residual_kmeans
from semid_dist.quantize.rqvae import fit_rq_vae

__all__ = [
    "Quantizer",
    "decode",
    "encode_batch",
    "fit_r3vae",
    "fit_residual_kmeans",
    "fit_rq_vae",
    "kmeans",
    "kmeans_plusplus",
    "lloyd_stats",
    "load_quantizer",
    "nearest",
    "quantizer_files",
]
