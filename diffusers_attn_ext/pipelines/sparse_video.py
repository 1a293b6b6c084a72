"""Ready-made pipelines with sparse video attention: Wan and CogVideoX with Radial or adaptive block sparsity.

They are the diffusers pipelines (same components; ``from_pretrained`` and ``from_pipe`` work) whose
``__call__`` also takes the sparse settings; the method is installed for the call only, in every transformer of
the pipeline (both experts of Wan 2.2 A14B), composed after any method the user installed (e.g. UltraViCo), and
the processors are restored afterwards.
"""

from __future__ import annotations

from typing import Any

from diffusers import CogVideoXPipeline, WanPipeline

from ..install import installed
from ..sparse import SPARSE_METHODS, SPARSE_OPTIONS, sparse_processor
from ..validation import choice, integer, options, schedule_length


class _SparseCall:
    """The shared ``__call__``: build the sparse processor, install it for the call, run the parent pipeline."""

    method_prefix = "sparse"
    method_inputs = ()

    def __call__(self, *args, sparse_method: str | None = "radial", sparse_density: float | None = None,
                 sparse_dense_steps: int = 0, sparse_dense_layers: int = 0,
                 sparse_options: dict[str, Any] | None = None, **kwargs):
        """The parent pipeline's call with sparse attention.

        Args:
            sparse_method: "radial", "adaptive", or None for the plain pipeline.
            sparse_density: kept fraction of key blocks (adaptive only).
            sparse_dense_steps: first denoising steps run dense (steps of the whole schedule: with two experts,
                the low-noise expert's steps count from where the high-noise expert stopped).
            sparse_dense_layers: first transformer blocks run dense.
            sparse_options: the method's other arguments (e.g. ``{"decay_factor": 0.2}`` for radial,
                ``{"cache_steps": 5}`` for adaptive); see :func:`diffusers_attn_ext.sparse.sparse_processor`.
            everything else: the parent pipeline's arguments.
        """
        if choice("sparse_method", sparse_method, SPARSE_METHODS, allow_none=True) is None:
            return super().__call__(*args, **kwargs)
        method_options = options("sparse_options", sparse_options, SPARSE_OPTIONS[sparse_method])
        dense_steps = integer("sparse_dense_steps", sparse_dense_steps, 0)
        dense_layers = integer("sparse_dense_layers", sparse_dense_layers, 0)
        steps = schedule_length(super().__call__, kwargs)
        if steps is not None:  # dense for every step would silently be the plain pipeline
            integer("sparse_dense_steps", sparse_dense_steps, 0, steps - 1)
        try:
            processor = sparse_processor(sparse_method, density=sparse_density, dense_steps=dense_steps,
                                         dense_layers=dense_layers, **method_options)
        except ValueError as error:  # name the pipeline's argument: sparse_density, or a key of sparse_options
            message = str(error)
            raise ValueError(f"sparse_{message}" if message.startswith("density")
                             else f"sparse_options: {message}") from None
        with installed(self, processor):
            return super().__call__(*args, **kwargs)


class WanSparsePipeline(_SparseCall, WanPipeline):
    """``WanPipeline`` with sparse video attention (default: Radial Attention with the authors' defaults); on a
    Wan 2.2 A14B pipeline in both experts.

    Extra ``__call__`` arguments: ``sparse_method``, ``sparse_density``, ``sparse_dense_steps``,
    ``sparse_dense_layers``, ``sparse_options``. The authors' Wan2.1 script setting for 50 steps is
    ``sparse_dense_steps=12, sparse_dense_layers=1, sparse_options={"decay_factor": 0.2}``.
    """


class CogVideoXSparsePipeline(_SparseCall, CogVideoXPipeline):
    """``CogVideoXPipeline`` with sparse video attention; text tokens stay dense. Same extra arguments as
    :class:`WanSparsePipeline`."""
