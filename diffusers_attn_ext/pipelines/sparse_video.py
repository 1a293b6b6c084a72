"""Ready-made pipelines with sparse video attention: Wan and CogVideoX with Radial or adaptive block sparsity.

They are the diffusers pipelines (same components; ``from_pretrained`` and ``from_pipe`` work) whose
``__call__`` also takes the sparse settings; the method is installed for the call only, composed after any
method the user installed (e.g. UltraViCo), and the transformer's processors are restored afterwards.
"""

from __future__ import annotations

from typing import Any

from diffusers import CogVideoXPipeline, WanPipeline

from ..install import installed
from ..sparse import sparse_processor


class _SparseCall:
    """The shared ``__call__``: build the sparse processor, install it for the call, run the parent pipeline."""

    def __call__(self, *args, sparse_method: str | None = "radial", sparse_density: float | None = None,
                 sparse_dense_steps: int = 0, sparse_dense_layers: int = 0,
                 sparse_options: dict[str, Any] | None = None, **kwargs):
        """The parent pipeline's call with sparse attention.

        Args:
            sparse_method: "radial", "adaptive", or None for the plain pipeline.
            sparse_density: kept fraction of key blocks (adaptive only).
            sparse_dense_steps: first denoising steps run dense.
            sparse_dense_layers: first transformer blocks run dense.
            sparse_options: the method's other arguments (e.g. ``{"decay_factor": 0.2}`` for radial,
                ``{"cache_steps": 5}`` for adaptive); see :func:`diffusers_attn_ext.sparse.sparse_processor`.
            everything else: the parent pipeline's arguments.
        """
        if sparse_method is None:
            return super().__call__(*args, **kwargs)
        processor = sparse_processor(
            sparse_method, density=sparse_density, dense_steps=sparse_dense_steps, dense_layers=sparse_dense_layers,
            **(sparse_options or {}),
        )
        with installed(self, processor):
            return super().__call__(*args, **kwargs)


class WanSparsePipeline(_SparseCall, WanPipeline):
    """``WanPipeline`` with sparse video attention (default: Radial Attention with the authors' defaults).

    Extra ``__call__`` arguments: ``sparse_method``, ``sparse_density``, ``sparse_dense_steps``,
    ``sparse_dense_layers``, ``sparse_options``. The authors' Wan2.1 script setting for 50 steps is
    ``sparse_dense_steps=12, sparse_dense_layers=1, sparse_options={"decay_factor": 0.2}``.
    """


class CogVideoXSparsePipeline(_SparseCall, CogVideoXPipeline):
    """``CogVideoXPipeline`` with sparse video attention; text tokens stay dense. Same extra arguments as
    :class:`WanSparsePipeline`."""
