"""Block tables for the block-sparse kernel: validation, the compressed form the kernel reads, and caching it
for tables that do not change (no Triton here, so processors can import it on any machine)."""

from __future__ import annotations

import torch

BLOCK = 128  # the kernel's block size, in tokens, for queries and keys


def compress_block_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts ``[B, H, q_blocks]``, ascending kept indices ``[B, H, q_blocks, kv_blocks]``, query blocks by
    descending count ``[B, H, q_blocks]``: the order programs take them) of a bool table."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    order = torch.argsort(counts, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous(), order.contiguous()


STATIC_ATTR = "_attn_ext_static_table"


def mark_static(blocks: torch.Tensor) -> torch.Tensor:
    """Declare that ``blocks`` will not change while it is used (a method's cached mask: per grid, or per window
    of steps), so the kernel compresses it once and keeps the result on the tensor.
    Unmarked tables are compressed at every call. Returns ``blocks``."""
    setattr(blocks, STATIC_ATTR, None)
    return blocks


def compressed_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compress_block_table` of ``blocks``; computed once for a table marked by :func:`mark_static`."""
    if not hasattr(blocks, STATIC_ATTR):
        return compress_block_table(blocks)
    cached = getattr(blocks, STATIC_ATTR)
    if cached is None:
        cached = compress_block_table(blocks)
        setattr(blocks, STATIC_ATTR, cached)
    return cached


def check_block_table(blocks: torch.Tensor, batch: int, heads: int, tokens: int) -> None:
    """ValueError unless ``blocks`` is a bool ``[1|batch, 1|heads, q_blocks, q_blocks]`` table for ``tokens``."""
    q_blocks = -(-tokens // BLOCK)
    if (blocks.dtype != torch.bool or blocks.dim() != 4 or blocks.shape[0] not in (1, batch)
            or blocks.shape[1] not in (1, heads) or tuple(blocks.shape[-2:]) != (q_blocks, q_blocks)):
        raise ValueError(
            f"block table of dtype {blocks.dtype} and shape {tuple(blocks.shape)} is not allowed: it must be bool "
            f"[1 or {batch}, 1 or {heads}, {q_blocks}, {q_blocks}] for {tokens} tokens in blocks of {BLOCK}"
        )
