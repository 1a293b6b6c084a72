"""FlexAttention with score modifications and block-sparse masks.

On CUDA the kernel is ``torch.compile``d (the fused Triton kernel); elsewhere the eager FlexAttention
runs, which computes the same function with the explicit score matrix: that is the CPU reference path for
tests and small inputs, never a default at video lengths on GPU.

Compiled FlexAttention guards on the score_mod closure: methods build one closure per parameter set and
reuse it (the score mod generators of ``masks.py`` are cached), else every call recompiles until dynamo's
recompile limit and then falls back to the eager path, which materialises the score matrix.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def compose_score_mods(score_mods: list[ScoreMod]) -> ScoreMod | None:
    """One score_mod applying ``score_mods`` in order (None for an empty list)."""
    if not score_mods:
        return None
    if len(score_mods) == 1:
        return score_mods[0]

    def composed(score, b, h, q_idx, kv_idx):
        for mod in score_mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    return composed


def block_table_mask_mod(blocks: torch.Tensor, block_size: int):
    """The token-level mask_mod of a block table: (q, kv) allowed when its block is kept."""
    batch_wide, head_wide = blocks.shape[0] == 1, blocks.shape[1] == 1

    def block_table(b, h, q_idx, kv_idx):
        return blocks[0 if batch_wide else b, 0 if head_wide else h, q_idx // block_size, kv_idx // block_size]

    return block_table


def flex_block_mask(blocks: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> BlockMask:
    """A FlexAttention ``BlockMask`` from a boolean block table ``[B|1, H|1, q_blocks, kv_blocks]``.

    Kept blocks are full blocks, so the compiled kernel evaluates no mask inside them; the mask_mod reads
    the same table (eager FlexAttention evaluates it at every position). Tokens past ``q_len`` / ``kv_len``
    in the last block are excluded by FlexAttention's sequence lengths.
    """
    if blocks.dim() != 4 or blocks.dtype != torch.bool:
        raise ValueError(
            f"blocks must be a 4-d bool tensor [B, H, q_blocks, kv_blocks], got {tuple(blocks.shape)} {blocks.dtype}"
        )
    q_blocks, kv_blocks = -(-q_len // block_size), -(-kv_len // block_size)
    if blocks.shape[-2:] != (q_blocks, kv_blocks):
        raise ValueError(
            f"block table of shape {tuple(blocks.shape[-2:])} does not cover q_len={q_len}, kv_len={kv_len} "
            f"with block_size={block_size}: expected ({q_blocks}, {kv_blocks})"
        )
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts), indices, full_kv_num_blocks=counts, full_kv_indices=indices,
        BLOCK_SIZE=block_size, mask_mod=block_table_mask_mod(blocks, block_size), seq_lengths=(q_len, kv_len),
    )


def compiled_tile_options(block_mask: BlockMask | None) -> dict | None:
    """Tile sizes for compiled FlexAttention when the block mask's blocks are smaller than its default tiles.

    Inductor's FlexAttention kernel needs each mask block to be a multiple of its tiles (``BLOCK_M`` for query
    blocks, ``BLOCK_N`` for key blocks, 64-128 by default) and refuses a 32-token block mask ("Q and KV block size
    must be divisible by BLOCK_M and BLOCK_N"; the world model's sparse attention uses 32-token blocks, H200
    2026-12-02). A side whose blocks are a multiple of 128 keeps its default tile; another gets the largest power
    of two up to 64 that divides its blocks. ValueError for blocks that are not a multiple of 16 (the smallest
    tile). None: the defaults."""
    if block_mask is None:
        return None
    options = {}
    for name, size in zip(("BLOCK_M", "BLOCK_N"), block_mask.BLOCK_SIZE, strict=True):
        if size % 128 == 0:
            continue
        if size % 16:
            raise ValueError(
                f"block_size={size}: compiled FlexAttention on CUDA needs blocks of a multiple of 16 tokens"
            )
        tile = 64
        while size % tile:
            tile //= 2
        options[name] = tile
    return options or None


def flex_attention_bnhd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """FlexAttention on ``[B, N, H, D]`` tensors, returning ``[B, N, H, D]``."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    options = compiled_tile_options(block_mask) if q.is_cuda else None
    if torch.compiler.is_compiling():  # inside the user's compiled region: it compiles flex itself, no warnings context
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, kernel_options=options)
    elif q.is_cuda:
        out = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                               kernel_options=options)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)
