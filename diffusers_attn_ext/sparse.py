"""One call to turn on sparse video attention: :func:`enable_sparse_attention`.

Methods: "radial" (:class:`~diffusers_attn_ext.processors.radial_sparse.RadialSparseProcessor`, static mask
with energy decay over temporal distance) and "adaptive"
(:class:`~diffusers_attn_ext.processors.adaptive_sparse.AdaptiveSparseProcessor`, blocks chosen from a
draft attention map and cached across steps), and "rettention"
(:class:`~diffusers_attn_ext.processors.rettention.RettentionProcessor`, very sparse attention reshaped by the
statistics of the last refresh step). ``uninstall(pipe)`` turns it off.
"""

from __future__ import annotations

from typing import Any

from .install import install
from .processors.adaptive_sparse import AdaptiveSparseProcessor
from .processors.radial_sparse import RadialSparseProcessor, SparseVideoProcessor
from .processors.rettention import DEFAULT_DENSITY as RETTENTION_DENSITY
from .processors.rettention import RettentionProcessor
from .validation import choice
from .validation import options as check_options

SPARSE_METHODS = ("radial", "adaptive", "rettention")
# The other arguments of each method (``options`` of :func:`sparse_processor`).
SPARSE_OPTIONS = {"radial": ("decay_factor", "block_size", "model"), "adaptive": ("mass", "cache_steps", "block_size"),
                  "rettention": ("pattern", "refresh_steps", "ratio_ramp", "use_ratio", "block_size")}


def sparse_processor(
    method: str = "radial", *, density: float | None = None, dense_steps: int = 0, dense_layers: int = 0,
    **options: Any,
) -> SparseVideoProcessor:
    """The processor of a sparse method.

    Args:
        method: "radial", "adaptive" or "rettention".
        density: kept fraction of key blocks (adaptive and rettention; radial's density follows from the grid and
            its ``decay_factor``).
        dense_steps: first denoising steps run dense.
        dense_layers: first transformer blocks run dense.
        options: the method's other arguments (radial: ``decay_factor``, ``block_size``, ``model``;
            adaptive: ``mass``, ``cache_steps``, ``block_size``; rettention: ``pattern``, ``refresh_steps``,
            ``ratio_ramp``, ``use_ratio``, ``block_size``).
    """
    method = choice("method", method, SPARSE_METHODS)
    options = check_options(f"options of method={method!r}", options, SPARSE_OPTIONS[method])
    if method == "radial":
        if density is not None:
            raise ValueError(
                f"density={density!r} is not a parameter of method='radial' (its density follows from the grid "
                "and decay_factor); allowed: None, or use method='adaptive'"
            )
        return RadialSparseProcessor(dense_steps=dense_steps, dense_layers=dense_layers, **options)
    if method == "rettention":
        return RettentionProcessor(density=RETTENTION_DENSITY if density is None else density, dense_steps=dense_steps,
                                   dense_layers=dense_layers, **options)
    return AdaptiveSparseProcessor(density=density, dense_steps=dense_steps, dense_layers=dense_layers, **options)


def enable_sparse_attention(
    pipe: Any, method: str = "radial", *, density: float | None = None, dense_steps: int = 0,
    dense_layers: int = 0, layers: str | list[str] | None = None, **options: Any,
) -> SparseVideoProcessor:
    """Install a sparse video attention method on a Wan or CogVideoX pipeline (or transformer).

    Arguments as in :func:`sparse_processor`; ``layers`` selects attention modules as in
    :func:`~diffusers_attn_ext.install.install`. Returns the installed processor; ``uninstall(pipe)``
    restores the stock processors.
    """
    processor = sparse_processor(method, density=density, dense_steps=dense_steps, dense_layers=dense_layers, **options)
    install(pipe, processor, layers=layers)
    return processor
