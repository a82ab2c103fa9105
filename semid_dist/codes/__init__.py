"""Pure SID analytics: mergeable partial statistics, metrics, collisions, drift, lookups (numpy;
pyarrow where a function takes or makes a table, torch for the float64 group sums)."""

from semid_dist.codes.metrics import finalize_metrics, layer_stats
from semid_dist.codes.partials import Partial, merge_all, partial_from_batch, sid_keys

__all__ = ["Partial", "finalize_metrics", "layer_stats", "merge_all", "partial_from_batch",
           "sid_keys"]
