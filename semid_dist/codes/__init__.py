"""Pure SID analytics: mergeable partial statistics, metrics, collisions (numpy only)."""

from semid_dist.codes.metrics import finalize_metrics, layer_stats
from semid_dist.codes.partials import Partial, merge_all, partial_from_batch, sid_keys

__all__ = ["Partial", "finalize_metrics", "layer_stats", "merge_all", "partial_from_batch",
           "sid_keys"]
