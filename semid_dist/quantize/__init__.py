"""Pure numeric core: numpy / torch / faiss only (never ray or pyspark)."""

from semid_dist.quantize.encode import decode, encode_batch, nearest
from semid_dist.quantize.kmeans import kmeans, kmeans_plusplus, lloyd_stats
from semid_dist.quantize.residual import fit_residual_kmeans

__all__ = [
    "decode",
    "encode_batch",
    "fit_residual_kmeans",
    "kmeans",
    "kmeans_plusplus",
    "lloyd_stats",
    "nearest",
]
