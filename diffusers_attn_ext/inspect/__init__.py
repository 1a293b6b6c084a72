"""Seeing what attention heads do: blockwise statistics of the attention that runs, and head importance.

- :class:`AttentionInspector`: a processor method recording, per layer, head and step, attention mass by
  temporal and spatial distance, text mass, entropy, attention sinks and sampled attention maps, without
  any N x N tensor; :func:`inspect_pipeline` installs it for one pipeline call.
- :func:`cluster_heads`: k-means over the heads' temporal/spatial profiles and text mass (kinds of heads).
- :func:`head_importance`: the output change when each head is perturbed; its ``top(k)`` is a candidate
  list for :func:`diffusers_attn_ext.headhunter.search`.

The name of this subpackage is ``diffusers_attn_ext.inspect``; absolute imports of the standard library's
``inspect`` are unaffected.
"""

from .capture import AttentionInspector, inspect_pipeline
from .clustering import HeadClusters, cluster_heads
from .head_importance import HeadImportance, HeadPerturbation, head_importance
from .statistics import AttentionStatistics, attention_statistics

__all__ = [
    "AttentionInspector",
    "AttentionStatistics",
    "HeadClusters",
    "HeadImportance",
    "HeadPerturbation",
    "attention_statistics",
    "cluster_heads",
    "head_importance",
    "inspect_pipeline",
]
