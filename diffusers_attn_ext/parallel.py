"""Methods under diffusers' context parallelism: who holds which heads and tokens, and the exchanges.

diffusers 0.42 (``ContextParallelConfig`` + ``transformer.enable_parallelism``) shards a transformer's
sequence over a ``(ring, ulysses)`` device mesh: the model's ``_cp_plan`` hooks split the hidden states and
the RoPE tables along the tokens (``tensor.chunk`` over the flattened mesh; ``tensor_split`` in the
``*_anything`` modes), so every attention processor sees q, k, v ``[B, N/P, H, D]`` of its rank's tokens.
Stock attention then exchanges inside ``dispatch_attention_fn``:

- Ulysses (degree U): an all-to-all turns ``[B, N/U, H, D]`` into ``[B, N, H/U, D]`` (rank u of the Ulysses
  group gets heads ``u*H/U .. (u+1)*H/U - 1``, contiguous), attention runs on the full sequence, and the
  inverse all-to-all returns ``[B, N/U, H, D]``;
- ring (degree R): K/V of all ranks are all-gathered, and each rank's queries attend chunk by chunk with
  an LSE merge.

A method that changes scores or masks must see global indices. :func:`parallel_attention` does that for
our kernels: under Ulysses it uses diffusers' own all-to-all helpers, runs the kernel on the full sequence
with the rank's heads (per-head block masks sliced to them) and converts back; under ring it all-gathers K/V
over the ring group (as diffusers' ``rotate_method="allgather"`` does: every rank holds the whole K/V) and runs
the kernel on the local queries with their global indices (score_mods and block-mask rows shifted by the
rank's first token). With both degrees > 1 the Ulysses exchange runs first, then the ring gather.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask

from .validation import boolean, integer


def _check_positive(name: str, value) -> int:
    return integer(name, value, 1)


def _check_index(name: str, value, size: int) -> int:
    return integer(name, value, 0, size - 1)


def sequence_range(num_tokens: int, parts: int, index: int, anything: bool = False) -> range:
    """Global tokens of part ``index`` when ``num_tokens`` are split into ``parts`` along the sequence.

    As diffusers' sharders: ``tensor.chunk`` (``EquipartitionSharder``), which requires ``parts`` to divide
    ``num_tokens``; with ``anything`` (``ulysses_anything`` / ``ring_anything``) ``tensor_split``: the first
    ``num_tokens % parts`` parts hold one token more. E.g. 10 tokens in 4 parts: 0-2, 3-5, 6-7, 8-9.
    """
    num_tokens = _check_positive("num_tokens", num_tokens)
    anything = boolean("anything", anything)
    parts = _check_positive("parts", parts)
    index = _check_index("index", index, parts)
    if not anything and num_tokens % parts:
        raise ValueError(
            f"num_tokens={num_tokens} is not a multiple of the {parts} context-parallel ranks: diffusers shards "
            "evenly unless ContextParallelConfig(ulysses_anything=True) or ring_anything=True"
        )
    if anything and num_tokens < parts:
        raise ValueError(f"num_tokens={num_tokens} is outside the allowed range: at least parts={parts}")
    base, extra = divmod(num_tokens, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def ulysses_head_range(num_heads: int, degree: int, rank: int, anything: bool = False) -> range:
    """Global heads that Ulysses rank ``rank`` attends with, of ``num_heads`` over ``degree`` ranks.

    diffusers splits the heads contiguously: ``H / U`` per rank. With ``ulysses_anything`` it pads the heads to
    a multiple of U (the pad must be smaller than the padded local count) and the last rank holds fewer.
    E.g. 12 heads over 2 ranks: rank 1 has 6..11; 30 heads over 8 ranks (anything): 4 per rank, rank 7 has 28, 29.
    """
    num_heads = _check_positive("num_heads", num_heads)
    anything = boolean("anything", anything)
    degree = _check_positive("degree", degree)
    rank = _check_index("rank", rank, degree)
    if num_heads % degree:
        if not anything:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of ulysses_degree={degree}: diffusers' Ulysses attention "
                "splits heads evenly unless ContextParallelConfig(ulysses_anything=True)"
            )
        pad = degree - num_heads % degree
        if pad >= (num_heads + pad) // degree:
            raise ValueError(
                f"num_heads={num_heads} cannot be padded for ulysses_degree={degree}: the pad {pad} must be smaller "
                f"than the padded heads per rank {(num_heads + pad) // degree} (diffusers' ulysses_anything rule)"
            )
    per_rank = -(-num_heads // degree)
    return range(rank * per_rank, min((rank + 1) * per_rank, num_heads))


def ulysses_head_owner(head: int, num_heads: int, degree: int, anything: bool = False) -> tuple[int, int]:
    """``(rank, local head)`` holding global ``head`` under Ulysses of ``degree`` (see :func:`ulysses_head_range`)."""
    num_heads = _check_positive("num_heads", num_heads)
    head = _check_index("head", head, num_heads)
    degree = _check_positive("degree", degree)
    for rank in range(degree):
        heads = ulysses_head_range(num_heads, degree, rank, anything)
        if head in heads:
            return rank, head - heads.start
    raise AssertionError("unreachable: the ranks' head ranges cover every head")


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in a context-parallel mesh, read from diffusers' ``ParallelConfig``.

    ``rank`` is the index in the flattened ``(ring, ulysses)`` mesh (``ring_rank * ulysses_degree +
    ulysses_rank``), which is the chunk of the sequence the ``_cp_plan`` hooks give this rank.
    """

    rank: int
    world_size: int
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int
    anything: bool = False
    config: Any = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(cls, parallel_config) -> ParallelLayout | None:
        """The layout of ``call.parallel_config`` (a ``ParallelConfig`` or ``ContextParallelConfig``); None on
        a single GPU (no config, no context parallelism, or a mesh of one)."""
        cp = getattr(parallel_config, "context_parallel_config", parallel_config)
        if cp is None or getattr(cp, "_mesh", None) is None:
            return None
        degree = cp.ulysses_degree * cp.ring_degree
        if degree == 1:
            return None
        return cls(
            rank=cp._ring_local_rank * cp.ulysses_degree + cp._ulysses_local_rank, world_size=degree,
            ulysses_degree=cp.ulysses_degree, ring_degree=cp.ring_degree, ulysses_rank=cp._ulysses_local_rank,
            ring_rank=cp._ring_local_rank, anything=bool(cp.ulysses_anything or cp.ring_anything), config=cp,
        )

    def token_range(self, num_tokens: int) -> range:
        """Global tokens of this rank's local sequence (what the processor sees)."""
        return sequence_range(num_tokens, self.world_size, self.rank, self.anything)

    def segment_range(self, num_tokens: int) -> range:
        """Global tokens after the Ulysses all-to-all: the ring segment of this rank (all tokens without ring)."""
        first = sequence_range(num_tokens, self.world_size, self.ring_rank * self.ulysses_degree, self.anything)
        last = sequence_range(num_tokens, self.world_size, (self.ring_rank + 1) * self.ulysses_degree - 1, self.anything)
        return range(first.start, last.stop)

    def head_range(self, num_heads: int) -> range:
        """Global heads this rank attends with after the Ulysses all-to-all (all heads without Ulysses)."""
        return ulysses_head_range(num_heads, self.ulysses_degree, self.ulysses_rank, self.anything)


def _flat_group(layout: ParallelLayout):
    return layout.config._flattened_mesh.get_group()


def sequence_sum(x: torch.Tensor, layout: ParallelLayout | None) -> torch.Tensor:
    """``x`` summed over the ranks of the sequence (a float32 partial sum per rank, e.g. of keys or pooled
    blocks); ``x`` itself on a single GPU."""
    if layout is None:
        return x
    total = x.clone()
    dist.all_reduce(total, group=_flat_group(layout))
    return total


def sequence_mean(x: torch.Tensor, layout: ParallelLayout | None, num_tokens: int) -> torch.Tensor:
    """Mean over the global sequence (dim 1) of ``[B, N_local, ...]`` in float32 (float64 for float64 input),
    keepdim: one all-reduce of a ``[B, 1, ...]`` sum under context parallelism."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if layout is None:
        return x.mean(dim=1, keepdim=True, dtype=dtype)
    return sequence_sum(x.sum(dim=1, keepdim=True, dtype=dtype), layout) / num_tokens


def gather_sequence(x: torch.Tensor, layout: ParallelLayout, mesh) -> torch.Tensor:
    """All-gather ``[B, n, ...]`` along the tokens over ``mesh`` with diffusers' sharder (uneven under ``*_anything``)."""
    from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder

    if layout.anything:
        return PartitionAnythingSharder.unshard_anything(x, 1, mesh)
    return EquipartitionSharder.unshard(x, 1, mesh)


def to_head_parallel(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """``[B, N/U, H, D] -> [B, N, H/U, D]`` over the Ulysses group, with diffusers' all-to-all helpers."""
    from diffusers.models import attention_dispatch

    group = layout.config._ulysses_mesh.get_group()
    if layout.anything:
        return attention_dispatch.all_to_all_single_any_qkv_async(x, group)()
    return attention_dispatch._all_to_all_dim_exchange(x.contiguous(), scatter_idx=2, gather_idx=1, group=group)


def to_sequence_parallel(x: torch.Tensor, layout: ParallelLayout, num_heads: int, local_tokens: int) -> torch.Tensor:
    """``[B, N, H/U, D] -> [B, N/U, H, D]``: the inverse of :func:`to_head_parallel`."""
    from diffusers.models import attention_dispatch

    group = layout.config._ulysses_mesh.get_group()
    if layout.anything:
        return attention_dispatch.all_to_all_single_any_o_async(
            x, group, NUM_QO_HEAD=num_heads, Q_S_LOCAL=local_tokens
        )()
    return attention_dispatch._all_to_all_dim_exchange(x.contiguous(), scatter_idx=1, gather_idx=2, group=group)


@functools.lru_cache(maxsize=256)
def shifted_score_mod(score_mod: Callable, head_offset: int, query_offset: int) -> Callable:
    """``score_mod`` evaluated at global head and query indices: ``mod(s, b, h + h0, q + q0, kv)``.

    Cached per (mod, offsets), so compiled FlexAttention sees one closure per rank and layout."""

    def shifted(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h + head_offset, q_idx + query_offset, kv_idx)

    return shifted


def global_index_score_mod(score_mod: Callable, head_offset: int, query_offset: int) -> Callable:
    """``score_mod`` at global indices; unchanged where the offsets are 0. (A call's fused rule, which the fused
    kernels run instead of its only score_mod, is head-independent and travels beside it: a head offset leaves
    the call eligible.)"""
    if not head_offset and not query_offset:
        return score_mod
    return shifted_score_mod(score_mod, head_offset, query_offset)


def local_heads(blocks: torch.Tensor, heads: range) -> torch.Tensor:
    """A block table ``[B|1, H|1, ...]`` restricted to the rank's heads (a head-wide table stays as it is)."""
    return blocks if blocks.shape[1] == 1 else blocks[:, heads.start:heads.stop]


def offset_block_mask(
    blocks: torch.Tensor, block_size: int, query_offset: int, q_len: int, kv_len: int
) -> BlockMask:
    """FlexAttention ``BlockMask`` for ``q_len`` local queries that start at global token ``query_offset``,
    from a global block table ``[B|1, H|1, q_blocks, kv_blocks]`` over ``kv_len`` keys.

    A local query block spans global rows ``(q0 + a*bs) // bs`` .. ``(q0 + a*bs + bs - 1) // bs`` (two when
    ``q0`` is not a multiple of ``bs``). Key blocks kept by both rows are full blocks (no mask evaluated), key
    blocks kept by one are partial (the token-level mask reads the global table at ``(q + q0) // bs``), key
    blocks kept by neither are skipped in compute (all K/V blocks were gathered; only kept ones are read).
    """
    q_blocks = -(-q_len // block_size)
    first = (query_offset + torch.arange(q_blocks, device=blocks.device) * block_size) // block_size
    last_token = torch.clamp(torch.arange(1, q_blocks + 1, device=blocks.device) * block_size, max=q_len) - 1
    last = (query_offset + last_token) // block_size
    any_row = blocks[:, :, first] | blocks[:, :, last]
    full = blocks[:, :, first] & blocks[:, :, last]
    partial = any_row & ~full

    def table(kept):
        return kept.sum(-1, dtype=torch.int32), torch.argsort(
            kept.to(torch.int8), dim=-1, descending=True, stable=True
        ).to(torch.int32)

    partial_counts, partial_indices = table(partial)
    full_counts, full_indices = table(full)
    batch_wide, head_wide = blocks.shape[0] == 1, blocks.shape[1] == 1

    def global_rows(b, h, q_idx, kv_idx):
        return blocks[0 if batch_wide else b, 0 if head_wide else h, (q_idx + query_offset) // block_size,
                      kv_idx // block_size]

    return BlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_kv_num_blocks=full_counts, full_kv_indices=full_indices,
        BLOCK_SIZE=block_size, mask_mod=global_rows, seq_lengths=(q_len, kv_len),
    )


def parallel_attention(call, layout: ParallelLayout, local_attention: Callable, offset_attention: Callable):
    """Run a score-modified or block-sparse attention ``call`` (q, k, v ``[B, N/P, H, D]`` of this rank's
    tokens) as one GPU would compute it; returns ``[B, N/P, H, D]``.

    ``local_attention(call)`` runs our kernel on a call that holds the whole sequence (Ulysses without ring);
    ``offset_attention(call, query_offset)`` runs it for queries that start at a global token (ring).
    """
    heads, local_tokens = call.heads, call.query.shape[1]
    query, key, value, blocks = call.query, call.key, call.value, call.block_mask
    head_offset = 0
    if layout.ulysses_degree > 1:
        query, key, value = (to_head_parallel(x, layout) for x in (query, key, value))
        head_range = layout.head_range(heads)
        head_offset = head_range.start
        if blocks is not None:
            blocks = local_heads(blocks, head_range)
    query_offset = 0
    if layout.ring_degree > 1:
        ring_mesh = layout.config._ring_mesh
        key, value = gather_sequence(key, layout, ring_mesh), gather_sequence(value, layout, ring_mesh)
        query_offset = layout.segment_range(key.shape[1]).start
    score_mods = [global_index_score_mod(mod, head_offset, query_offset) for mod in call.score_mods]
    local = dataclasses.replace(
        call, query=query, key=key, value=value, block_mask=blocks, score_mods=score_mods, parallel_config=None,
    )
    out = offset_attention(local, query_offset) if layout.ring_degree > 1 else local_attention(local)
    if layout.ulysses_degree > 1:
        out = to_sequence_parallel(out, layout, heads, local_tokens)
    return out
