"""Adaptive block-sparse attention: blocks chosen per head from a draft attention map, reused across steps.

Training-free and dynamic, after DraftAttention (shawnricecake/draft-attention; arXiv 2505.14708) and AdaSpa
(arXiv 2502.21079). For each (batch row, head):

1. draft: mean-pool q and k over blocks of ``block_size`` consecutive tokens, ``q_a = mean(q_t, t in a)``,
   and take the block-level attention ``P[a, b] = softmax_b(q_a . k_b * scale + log n_b)`` (n_b tokens in key
   block b, so a block counts as n_b tokens of its mean key);
2. keep, per query block a, the ``ceil(density * kv_blocks)`` key blocks of largest P[a, b], or with ``mass``
   the fewest blocks whose P sums to at least ``mass``; the diagonal block is always kept and blocks holding
   text tokens (of a joint sequence) are dense in rows and columns;
3. reuse the pattern for ``cache_steps`` denoising steps (AdaSpa: patterns are stable across steps), and run
   dense attention for the first ``dense_steps`` steps and ``dense_layers`` blocks.

Differences from the papers: DraftAttention pools 8x8 spatial patches per frame and reorders tokens so the
kept blocks are contiguous; here blocks are consecutive tokens of the frame-major sequence (no reordering),
which matches the kernel's block grid. AdaSpa's exact LSE-based search is replaced by the draft map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..call import AttentionCall
from ..kernels.block_sparse_table import mark_static
from ..parallel import ParallelLayout, sequence_sum
from ..validation import integer, real
from .radial_sparse import SparseVideoProcessor, dense_text_blocks

DEFAULT_DENSITY = 0.25


def _pool_blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``[B, N, H, D]`` over blocks of consecutive tokens -> ``[B, H, blocks, D]`` (float32), and the
    tokens per block (the last block may be partial). Sums in float32 without copying the input."""
    n = x.shape[1]
    full = n // block_size
    sums = [x[:, :full * block_size].unflatten(1, (full, block_size)).sum(2, dtype=torch.float32)]
    counts = [float(block_size)] * full
    if n > full * block_size:
        sums.append(x[:, full * block_size:].sum(1, keepdim=True, dtype=torch.float32))
        counts.append(float(n - full * block_size))
    counts = torch.tensor(counts, device=x.device)
    return (torch.cat(sums, 1) / counts[None, :, None, None]).transpose(1, 2), counts


def _pool_global_blocks(
    x: torch.Tensor, block_size: int, layout: ParallelLayout, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_pool_blocks` of the whole sequence under context parallelism: each rank sums its tokens
    ``[B, n, H, D]`` into the global blocks they fall in (its first and last block may be shared with a
    neighbour), one all-reduce of ``[B, blocks, H, D]`` float32 sums, then the mean per block."""
    start, n = layout.token_range(num_tokens).start, x.shape[1]
    blocks = -(-num_tokens // block_size)
    sums = torch.zeros((x.shape[0], blocks, *x.shape[2:]), dtype=torch.float32, device=x.device)
    head = min(-start % block_size, n)  # tokens completing the block this rank starts inside
    if head:
        sums[:, start // block_size] += x[:, :head].sum(1, dtype=torch.float32)
    first, full = (start + head) // block_size, (n - head) // block_size
    if full:
        sums[:, first:first + full] += x[:, head:head + full * block_size].unflatten(1, (full, block_size)).sum(
            2, dtype=torch.float32
        )
    if n - head - full * block_size:
        sums[:, first + full] += x[:, head + full * block_size:].sum(1, dtype=torch.float32)
    counts = torch.full((blocks,), float(block_size), device=x.device)
    counts[-1] = float(num_tokens - (blocks - 1) * block_size)
    return (sequence_sum(sums, layout) / counts[None, :, None, None]).transpose(1, 2), counts


def draft_block_pattern(
    query: torch.Tensor, key: torch.Tensor, block_size: int, density: float | None = None,
    mass: float | None = None, scale: float | None = None, layout: ParallelLayout | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """Kept blocks ``[B, H, q_blocks, kv_blocks]`` (bool) from the draft attention of pooled q and k.

    Exactly one of ``density`` (fraction of key blocks per query block) and ``mass`` (draft probability to
    cover) is given. The diagonal block is always kept (self-attention: q_blocks == kv_blocks). Under
    context parallelism (``layout``), q and k are this rank's tokens of a ``num_tokens`` sequence and the
    pattern is that of the whole sequence, every head, identical on every rank.
    """
    if layout is None:
        q, _ = _pool_blocks(query, block_size)
        k, counts = _pool_blocks(key, block_size)
    else:
        q, _ = _pool_global_blocks(query, block_size, layout, num_tokens)
        k, counts = _pool_global_blocks(key, block_size, layout, num_tokens)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale + counts.log(), dim=-1)
    kv_blocks = probs.shape[-1]
    diagonal = torch.eye(probs.shape[-2], kv_blocks, dtype=torch.bool, device=probs.device)
    if density is not None:
        keep_count = min(kv_blocks, math.ceil(density * kv_blocks))
        ranked = probs.masked_fill(diagonal, float("inf"))
        chosen = ranked.topk(keep_count, dim=-1).indices
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, chosen, True)
    if mass >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the blocks ranked above each block
    keep_sorted = before < mass
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) | diagonal


@dataclass
class PatternState:
    """Per generation: ``(module, branch, shapes) -> (cache window, pattern)``, the patterns searched."""

    patterns: dict = field(default_factory=dict)


class AdaptiveSparseProcessor(SparseVideoProcessor):
    """Dynamic block-sparse attention from a draft attention map, searched once per cache window.

    Args:
        density: fraction of key blocks kept per (head, query block), in (0, 1]; 1 is dense attention.
            Default 0.25 when ``mass`` is not given either.
        mass: instead of ``density``, keep the fewest blocks covering this draft probability, in (0, 1].
        cache_steps: steps a searched pattern is reused (>= 1); searches happen at steps
            ``dense_steps + k * cache_steps``.
        dense_steps, dense_layers, block_size: see :class:`SparseVideoProcessor`.

    Patterns live in the per-generation state (:class:`PatternState`), one per attention module, guidance branch
    (separate cond / uncond forwards) and input shape.
    """

    def __init__(
        self, density: float | None = None, mass: float | None = None, cache_steps: int = 5, dense_steps: int = 0,
        dense_layers: int = 0, block_size: int = 128,
    ):
        super().__init__(dense_steps, dense_layers, block_size)
        if mass is not None and density is not None:
            raise ValueError(f"density={density!r} and mass={mass!r} are both given: give one of them")
        self.mass = real("mass", mass, 0.0, 1.0, low_open=True, allow_none=True)
        density = DEFAULT_DENSITY if density is None and mass is None else density
        self.density = real("density", density, 0.0, 1.0, low_open=True, allow_none=True)
        self.cache_steps = integer("cache_steps", cache_steps, 1)

    def new_state(self) -> PatternState:
        return PatternState()

    def pattern(self, call: AttentionCall) -> torch.Tensor:
        """This call's block pattern: searched at the first step of each cache window, else reused."""
        if torch.compiler.is_compiling():
            if self.cache_steps > 1:
                raise ValueError(
                    f"AdaptiveSparseProcessor(cache_steps={self.cache_steps}) reuses each module's pattern across "
                    "steps from a per-module cache, which a torch.compile'd region cannot fill; under torch.compile "
                    "use cache_steps=1 (a fresh pattern every step), or run eagerly"
                )
            return self._search(call)  # no cache filled while tracing
        window = (call.context.step_index - self.dense_steps) // self.cache_steps
        key = (id(call.module), call.context.branch, tuple(call.query.shape), tuple(call.key.shape))
        cache = call.context.state_of(self).patterns
        if key not in cache or cache[key][0] != window:
            cache[key] = (window, mark_static(self._search(call)))
        return cache[key][1]

    def _search(self, call: AttentionCall) -> torch.Tensor:
        """A fresh block pattern for ``call``: the searched video blocks, and the text blocks dense."""
        pattern = draft_block_pattern(
            call.query, call.key, self.block_size, self.density, self.mass, call.scale, call.parallel,
            call.require_grid(self).num_tokens,
        )
        return pattern | dense_text_blocks(call, pattern.shape[-1], self.block_size, pattern.device)

    def edit_attention(self, call: AttentionCall) -> None:
        call.add_block_mask(self.pattern(call), self.block_size)

    def __repr__(self) -> str:
        target = f"mass={self.mass}" if self.mass is not None else f"density={self.density}"
        return (
            f"AdaptiveSparseProcessor({target}, cache_steps={self.cache_steps}, dense_steps={self.dense_steps}, "
            f"dense_layers={self.dense_layers}, block_size={self.block_size})"
        )
