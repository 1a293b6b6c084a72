"""Attention statistics of one attention call, computed blockwise over query rows (no N x N tensor).

For a head h, a batch row b and a visual query i, the attention row is the softmax over every key j of the
scores the kernel computes, score mods and masks included:

    P_ij = softmax_j( mod(scale * q_i . k_j, b, h, i, j) )     (-inf where a block mask or attn_mask drops j)

Each chunk of query rows is computed with the full key set, so every row is exact; only the chunk's
``rows x keys`` scores of one head exist at a time. Over the visual queries i (and batch rows and calls),
each statistic is a mean per head:

- ``text_mass``: sum of P_ij over text keys j (0 without text keys in the sequence);
- ``temporal[d]``: sum of P_ij over visual keys whose latent frame is d frames from the query's, the
  energy-decay profile over time (Radial Attention, arXiv 2506.19852, Sec. 3);
- ``spatial[d]``: sum over visual keys at Chebyshev distance max(|dy|, |dx|) = d on the latent grid (any
  frame);
- ``entropy``: -sum_j P_ij log P_ij in nats, over all keys;
- ``received[j]``: P_ij summed over queries i, averaged like the rest: the mass key j receives from a
  query on average; its largest entries are the attention sinks;
- ``maps``: the rows P_i. of sampled visual queries (every visual query for small inputs), mean over batch
  rows and calls.

The views are those of "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt" (Li et
al., IEEE TVCG 2023, Sec. 4: head importance, attention strength by spatial distance, attention patterns)
for diffusion transformers, with time as a further axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import TokenGrid
from ..families.base import AttentionCall
from ..kernels.flex import compose_score_mods


@dataclass
class HeadProfiles:
    """Sums over ``rows`` query rows (batch rows x visual queries x calls) of the small per-head statistics.

    Tensors are float64 on the CPU, indexed by position in ``heads``; the properties give means per query row;
    :meth:`merge` adds the sums of another call or step.
    """

    heads: tuple[int, ...]
    grid: TokenGrid
    rows: int
    text_mass_sum: torch.Tensor  # [H]
    entropy_sum: torch.Tensor  # [H]
    temporal_sum: torch.Tensor  # [H, frames]
    spatial_sum: torch.Tensor  # [H, max(height, width)]

    _sums = ("text_mass_sum", "entropy_sum", "temporal_sum", "spatial_sum")

    @property
    def text_mass(self) -> torch.Tensor:
        return self.text_mass_sum / self.rows

    @property
    def entropy(self) -> torch.Tensor:
        return self.entropy_sum / self.rows

    @property
    def temporal(self) -> torch.Tensor:
        """``[H, frames]``: mean attention mass at each temporal distance (in latent frames)."""
        return self.temporal_sum / self.rows

    @property
    def spatial(self) -> torch.Tensor:
        """``[H, max(height, width)]``: mean attention mass at each spatial (Chebyshev) distance in tokens."""
        return self.spatial_sum / self.rows

    def profiles(self) -> HeadProfiles:
        """A copy of the small statistics alone (what is kept per step)."""
        return HeadProfiles(self.heads, self.grid, self.rows,
                            *(getattr(self, name).clone() for name in HeadProfiles._sums))

    def _check_same_layout(self, other: HeadProfiles) -> None:
        if other.heads != self.heads or other.grid != self.grid:
            raise ValueError(
                f"cannot merge statistics of heads {other.heads} on grid {other.grid} into heads {self.heads} on "
                f"grid {self.grid}: a layer changed its token layout within one inspection; call reset() between sizes"
            )

    def merge(self, other: HeadProfiles) -> None:
        """Add the sums of another call with the same heads and layout."""
        self._check_same_layout(other)
        self.rows += other.rows
        for name in self._sums:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class AttentionStatistics(HeadProfiles):
    """:class:`HeadProfiles` plus the mass each key receives and the stored attention rows.

    The stored maps are float32 (float64 for float64 inputs), summed over ``map_count`` batch rows and calls.
    """

    received_sum: torch.Tensor  # [H, keys]
    map_rows: torch.Tensor  # [R] query indices (in the attention sequence) of the stored maps
    maps_sum: torch.Tensor  # [H, R, keys]
    map_count: int
    text: slice | None
    visual: slice

    _sums = (*HeadProfiles._sums, "received_sum", "maps_sum")

    @property
    def received(self) -> torch.Tensor:
        """``[H, keys]``: mean mass each key receives from one query."""
        return self.received_sum / self.rows

    @property
    def maps(self) -> torch.Tensor:
        """``[H, R, keys]``: attention rows of the queries ``map_rows``."""
        return self.maps_sum / self.map_count

    def sinks(self, top: int = 8) -> list[list[tuple[int, float]]]:
        """Per head, the ``top`` keys receiving the most mass: (key index, mean mass received)."""
        values, indices = self.received.topk(min(top, self.received.shape[-1]), dim=-1)
        return [[(int(i), float(v)) for i, v in zip(idx, val, strict=True)] for idx, val in zip(indices, values, strict=True)]

    def visual_maps(self) -> torch.Tensor:
        """``[H, R, frames, height, width]``: the stored rows restricted to visual keys, on the latent grid."""
        g = self.grid
        return self.maps[..., self.visual].reshape(*self.maps.shape[:2], g.frames, g.height, g.width)

    def merge(self, other: AttentionStatistics) -> None:
        """Add the sums of another call with the same heads, layout and sampled rows."""
        self._check_same_layout(other)
        if not torch.equal(other.map_rows, self.map_rows):
            raise ValueError(f"cannot merge statistics with stored rows {other.map_rows.tolist()} into rows "
                             f"{self.map_rows.tolist()}; call reset() between sizes")
        super().merge(other)
        self.map_count += other.map_count


def sampled_query_rows(visual: slice, samples: int, full_map_tokens: int) -> torch.Tensor:
    """Query indices whose full rows are stored: every visual query when there are at most ``full_map_tokens``,
    else ``samples`` evenly spaced ones."""
    count = visual.stop - visual.start
    if count <= full_map_tokens:
        return torch.arange(visual.start, visual.stop)
    if samples == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(visual.start, visual.stop - 1, samples).round().long()


class _CallIndices:
    """Index tensors of one call, built once on its device: query/key positions, each visual token's frame and
    grid coordinates, the grid's coordinates, and the frame-distance table."""

    def __init__(self, call: AttentionCall, grid: TokenGrid):
        device = call.query.device
        self.tokens = torch.arange(max(call.query.shape[1], call.key.shape[1]), device=device)
        self.batch = torch.arange(call.query.shape[0], device=device).view(-1, 1, 1, 1)
        local = torch.arange(grid.num_tokens, device=device)
        position = local % grid.tokens_per_frame
        self.frame, self.y, self.x = local // grid.tokens_per_frame, position // grid.width, position % grid.width
        self.grid_y, self.grid_x = self.y[: grid.tokens_per_frame], self.x[: grid.tokens_per_frame]
        frames = torch.arange(grid.frames, device=device)
        self.frame_distance = (frames[:, None] - frames[None, :]).abs()


def _masked_scores(
    call: AttentionCall, head: int, key_t: torch.Tensor, rows: slice | torch.Tensor, indices: _CallIndices
) -> torch.Tensor:
    """``[B, rows, keys]`` scores of one head for the query rows ``rows`` (a slice or indices), as the kernel
    computes them; ``key_t`` is the head's keys ``[B, D, keys]`` in the compute dtype."""
    scale = call.head_dim**-0.5 if call.scale is None else call.scale
    q = call.query[:, rows, head].to(key_t.dtype) * scale
    scores = q @ key_t  # [B, rows, keys]
    q_idx, kv_idx = indices.tokens[rows], indices.tokens[: key_t.shape[-1]]
    mod = compose_score_mods(call.score_mods)
    if mod is not None:
        h = torch.full((1, 1, 1, 1), head, device=scores.device)
        scores = mod(scores.unsqueeze(1), indices.batch, h, q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1))[:, 0]
    if call.block_mask is not None:
        blocks = call.block_mask[:, head if call.block_mask.shape[1] > 1 else 0]
        keep = blocks[:, (q_idx // call.block_size)[:, None], (kv_idx // call.block_size)[None, :]]
        scores = scores.masked_fill(~keep, float("-inf"))
    if call.attn_mask is not None:
        mask = call.attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask[:, head if mask.shape[1] > 1 else 0]
        mask = mask[:, rows] if mask.shape[1] > 1 else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(scores.dtype)
    return scores


def attention_statistics(
    call: AttentionCall,
    heads: tuple[int, ...],
    grid: TokenGrid,
    *,
    chunk_elements: int = 2**21,
    map_rows: torch.Tensor | None = None,
) -> AttentionStatistics:
    """Statistics (module docstring) of the given heads of a self-attention ``call``, blockwise.

    Query rows are processed in chunks of ``max(1, chunk_elements // (batch * keys))`` rows per head, so the
    extra memory is a few ``chunk_elements``-sized tensors in the compute dtype (float32, or float64 for
    float64 inputs) and one head's keys. ``map_rows`` (query indices) selects the stored attention rows; None
    stores none.

    Per chunk the temporal mass is gathered by (query frame, key frame) and the spatial mass by Chebyshev
    distance; the frame pairs are folded into distances once per head.
    """
    device = call.query.device
    compute = torch.promote_types(call.query.dtype, torch.float32)
    batch, keys = call.query.shape[0], call.key.shape[1]
    visual = call.visual
    map_rows = torch.zeros(0, dtype=torch.long) if map_rows is None else map_rows.cpu()
    chunk = max(1, chunk_elements // (batch * keys))
    indices = _CallIndices(call, grid)
    zeros = lambda *shape: torch.zeros(len(heads), *shape, dtype=compute, device=device)  # noqa: E731
    sums = {"text": zeros(), "entropy": zeros(), "temporal": zeros(grid.frames),
            "spatial": zeros(max(grid.height, grid.width)), "received": zeros(keys), "maps": zeros(len(map_rows), keys)}
    for slot, head in enumerate(heads):
        key_t = call.key[:, :, head].to(compute).transpose(1, 2).contiguous()
        text, entropy, received, spatial = (sums[name][slot] for name in ("text", "entropy", "received", "spatial"))
        frame_pairs = torch.zeros(grid.frames, grid.frames, dtype=compute, device=device)
        for start in range(visual.start, visual.stop, chunk):
            rows = slice(start, min(start + chunk, visual.stop))
            local = slice(rows.start - visual.start, rows.stop - visual.start)
            probs = _masked_scores(call, head, key_t, rows, indices).softmax(-1)  # [B, rows, keys]
            if call.text is not None:
                text += probs[..., call.text].sum()
            entropy += torch.special.entr(probs).sum()
            received += probs.sum((0, 1))
            on_grid = probs[..., visual].unflatten(-1, (grid.frames, grid.tokens_per_frame))
            frame_pairs.index_add_(0, indices.frame[local], on_grid.sum((0, 3)))  # [query frame, key frame]
            distance = (indices.y[local, None] - indices.grid_y).abs_()
            distance = torch.maximum(distance, (indices.x[local, None] - indices.grid_x).abs_())
            spatial.index_add_(0, distance.flatten(), on_grid.sum((0, 2)).flatten())
        sums["temporal"][slot].index_add_(0, indices.frame_distance.flatten(), frame_pairs.flatten())
        if len(map_rows):
            rows = map_rows.to(device)
            sums["maps"][slot] = _masked_scores(call, head, key_t, rows, indices).softmax(-1).sum(0)
    cpu = {name: value.to("cpu", torch.float64) for name, value in sums.items() if name != "maps"}
    cpu["maps"] = sums["maps"].to("cpu")
    return AttentionStatistics(
        heads=tuple(heads), grid=grid, rows=batch * (visual.stop - visual.start),
        text_mass_sum=cpu["text"], entropy_sum=cpu["entropy"], temporal_sum=cpu["temporal"],
        spatial_sum=cpu["spatial"], received_sum=cpu["received"], map_rows=map_rows, maps_sum=cpu["maps"],
        map_count=batch, text=call.text, visual=visual,
    )
