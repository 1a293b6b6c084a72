"""Seeing what attention heads do: blockwise statistics of the attention that runs, and head importance.

- :class:`AttentionInspector`: a processor method recording, per layer, head and step, attention mass by
  temporal and spatial distance, text mass, entropy, attention sinks and sampled attention maps, without
  any N x N tensor; :func:`inspect_pipeline` installs it for one pipeline call.
- :func:`head_importance`: the output change when each head is perturbed; its ``top(k)`` is a candidate
  list for :func:`diffusers_attn_ext.headhunter.search`.

The name of this subpackage is ``diffusers_attn_ext.inspect``; absolute imports of the standard library's
``inspect`` are unaffected.
"""

from .capture import AttentionInspector, inspect_pipeline
from .head_importance import HeadImportance, HeadPerturbation, head_importance
from .statistics import AttentionStatistics, attention_statistics

__all__ = [
    "AttentionInspector",
    "AttentionStatistics",
    "HeadImportance",
    "HeadPerturbation",
    "attention_statistics",
    "head_importance",
    "inspect_pipeline",
]
