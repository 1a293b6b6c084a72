"""STD-RoPE: DiTraj's inter-frame spatial-temporal decoupled 3D RoPE for trajectory control.

Paper: "DiTraj: training-free trajectory control for video diffusion transformer" (arXiv 2509.21839),
Sec. 3.3; the authors' code (HaofeiDing/DiTraj ``module/transformer_wan.py`` and
``module/pipe.py:create_fixrope_self_attention_mask``).

On the first ``steps`` denoising steps, in every video self-attention:

1. positions: each foreground token ``(t, h, w)`` of its frame's box takes the spatial position of the
   reference box, ``(t, h', w')`` (:func:`diffusers_attn_ext.trajectory.std_rope_positions`); the RoPE
   table rows are gathered from the stock table, ``cos'[n] = cos[src(n)]``, ``src(n) = (t H + h') W + w'``,
   which is the stock RoPE evaluated at the new positions (diffusers' ``WanRotaryPosEmbed`` or CogVideoX's
   ``get_3d_rotary_pos_embed``);
2. scores (``isolate_duplicates``): with ``F`` the foreground tokens (every frame's box) and ``D`` the
   background tokens whose position a foreground token took (the authors' ``redundant_token``), the
   authors' ``fixrope_self_attention_mask`` sets ``s_ij = -inf`` for ``i in F, j in D`` and ``i in D, j in F``.
   Every other pair is stock, so the attention is exactly::

       out_i = softmax_j(s_ij) v_j  over all keys         for i in O (all other tokens, text included)
       out_i = softmax over keys not in D                  for i in F
       out_i = softmax over keys not in F                  for i in D

   Kernel (:func:`isolated_attention`): the stock dense kernel runs on the ``O`` queries only; the ``F`` and
   ``D`` queries then run the same dense kernel, with no mask, over one per-row copy of the keys and values
   reordered ``[F, O, D]``, of which "not in D" is the prefix ``[F, O]`` and "not in F" the suffix ``[O, D]``
   (contiguous slices). The work is ``|O| N + |F| (N - |D|) + |D| (N - |F|) <= N^2`` query-key pairs, about
   that of the stock attention; extra memory: one batch row's K and V and the ``O`` rows' output. When other
   methods act on the same call (they may add score mods or read the query), the isolation is a FlexAttention
   score_mod instead (:func:`duplicate_isolation_score_mod`, the same function, composable, slower).

The per-generation work (positions, gather index, token groups, row indices) and the per-forward work (the
gathered table, shared by every block of a forward) are cached in ``context.state``; the isolation score_mod
is cached per token layout across generations, so compiled FlexAttention does not recompile per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..context import TokenGrid
from ..families.base import AttentionCall
from ..kernels.dense import dense_attention
from ..trajectory import (
    Trajectory,
    check_method_arguments,
    duplicate_position_tokens,
    foreground_mask,
    position_source_index,
    std_rope_positions,
)
from ..validation import boolean, integer
from .base import AttnExtProcessor, require

ROPE_FAMILIES = ("wan", "cogvideox")
# Token axis of each family's RoPE table: Wan (cos, sin) are [1, N, 1, D], CogVideoX's [N, D].
ROPE_TOKEN_DIM = {"wan": 1, "cogvideox": 0}
DEFAULT_ROPE_STEPS = 5  # the authors' fixRope_step
OTHER, FOREGROUND, DUPLICATE = 0, 1, 2
ISOLATION_EXTRA = "std_rope.isolation"  # call.extras: (full query, IsolationRows) between the two stages


def duplicate_isolation_score_mod(groups: torch.Tensor):
    """Score mod blocking foreground <-> duplicated-background pairs (attention-gym style).

    ``groups[n]`` is 0 (other), 1 (foreground) or 2 (background token whose position a foreground token
    took) for every token of the attention sequence; a pair is blocked when its groups sum to 3.
    """

    def isolate_duplicates(score, b, h, q_idx, kv_idx):
        blocked = (groups[q_idx] + groups[kv_idx]) == FOREGROUND + DUPLICATE
        return torch.where(blocked, torch.full_like(score, float("-inf")), score)

    return isolate_duplicates


@functools.lru_cache(maxsize=16)
def _isolation_score_mod_for(groups_bytes: bytes, start: int, length: int, device: str):
    """One closure per token layout, reused across generations: compiled FlexAttention guards on the
    score_mod closure and would recompile for every new one (see ``kernels/flex.py``)."""
    groups = torch.zeros(length, dtype=torch.int8)
    video = torch.frombuffer(bytearray(groups_bytes), dtype=torch.int8)
    groups[start:start + video.numel()] = video
    return duplicate_isolation_score_mod(groups.to(device))


def draw_duplicate_isolation(groups: torch.Tensor) -> torch.Tensor:
    """Dense boolean form of :func:`duplicate_isolation_score_mod` (True: may attend), for small inputs."""
    return (groups[:, None] + groups[None, :]) != FOREGROUND + DUPLICATE


@dataclass(frozen=True)
class IsolationRows:
    """Token indices of one attention sequence for :func:`isolated_attention` (int64, one device).

    ``others``: tokens attending every key (O, text included); ``foreground`` (F) and ``duplicates`` (D);
    ``key_order``: ``[F, O, D]``, a permutation of the sequence.
    """

    others: torch.Tensor
    foreground: torch.Tensor
    duplicates: torch.Tensor
    key_order: torch.Tensor

    @classmethod
    def from_groups(cls, groups: torch.Tensor, start: int, length: int) -> IsolationRows:
        """Rows of a sequence of ``length`` tokens whose visual tokens, grouped by ``groups``, begin at ``start``."""
        sequence = torch.full((length,), OTHER, dtype=torch.int8)
        sequence[start:start + groups.numel()] = groups
        others, foreground, duplicates = ((sequence == g).nonzero().squeeze(1) for g in (OTHER, FOREGROUND, DUPLICATE))
        return cls(others, foreground, duplicates, torch.cat([foreground, others, duplicates]))

    def to(self, device: torch.device) -> IsolationRows:
        return IsolationRows(*(t.to(device) for t in (self.others, self.foreground, self.duplicates, self.key_order)))


def isolated_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, others_out: torch.Tensor,
                       rows: IsolationRows, scale: float | None = None, via: str = "sdpa",
                       backend=None) -> torch.Tensor:
    """Duplicate-isolated self-attention ``[B, S, H, D]`` (see the module docstring) from ``others_out``, the
    dense attention of the ``rows.others`` queries ``[B, |O|, H, D]``.

    Per batch row: its K and V reordered ``[F, O, D]`` once (the only copy: one row's K and V); the F queries
    attend the prefix ``[F, O]``, the D queries the suffix ``[O, D]``, each with the dense kernel
    (:func:`~diffusers_attn_ext.kernels.dense.dense_attention` ``via``/``backend``: SDPA picks flash/cuDNN).
    """
    batch, length, heads, head_dim = query.shape
    out = others_out.new_empty(batch, length, heads, head_dim)
    out.index_copy_(1, rows.others, others_out)
    num_fg, num_dup = rows.foreground.numel(), rows.duplicates.numel()
    for b in range(batch):
        key_row, value_row = (x[b:b + 1].index_select(1, rows.key_order) for x in (key, value))
        for queries, keys in ((rows.foreground, slice(0, length - num_dup)), (rows.duplicates, slice(num_fg, length))):
            part = dense_attention(query[b:b + 1].index_select(1, queries), key_row[:, keys], value_row[:, keys],
                                   scale=scale, via=via, backend=backend)
            out[b].index_copy_(0, queries, part[0].to(out.dtype))
    return out


class STDRoPEPlan:
    """What STD-RoPE does on one grid: the gather index (None when no position moves) and token groups."""

    def __init__(self, trajectory: Trajectory, grid: TokenGrid, frame_stride: int):
        boxes = trajectory.token_boxes(grid, frame_stride)
        self.foreground = foreground_mask(boxes, grid)
        self.positions = std_rope_positions(boxes, grid)
        index = position_source_index(self.positions)
        self.source_index = None if torch.equal(index, torch.arange(grid.num_tokens)) else index
        duplicates = duplicate_position_tokens(self.positions, self.foreground)
        self.groups = None
        if duplicates.any():
            groups = torch.full((grid.num_tokens,), OTHER, dtype=torch.int8)
            groups[self.foreground.flatten()] = FOREGROUND
            groups[duplicates.flatten()] = DUPLICATE
            self.groups = groups
        self.groups_bytes = None if self.groups is None else self.groups.numpy().tobytes()
        self._on_device: dict = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor | None:
        """``source_index`` on ``device`` (copied once)."""
        key = (name, device)
        if key not in self._on_device:
            tensor = getattr(self, name)
            self._on_device[key] = None if tensor is None else tensor.to(device)
        return self._on_device[key]

    def isolation_rows(self, start: int, length: int, device: torch.device) -> IsolationRows:
        """:class:`IsolationRows` of a ``length``-token sequence whose visual tokens begin at ``start`` (cached)."""
        key = ("rows", start, length, device)
        if key not in self._on_device:
            self._on_device[key] = IsolationRows.from_groups(self.groups, start, length).to(device)
        return self._on_device[key]


class STDRoPEProcessor(AttnExtProcessor):
    """DiTraj's STD-RoPE on video self-attention (Wan attn1, CogVideoX joint attention).

    Args:
        trajectory: the foreground box of every video frame (:class:`~diffusers_attn_ext.trajectory.Trajectory`).
        steps: STD-RoPE acts on denoising steps ``0 .. steps - 1`` (the authors' ``fixRope_step``, 5 of
            50); None for every step. An integer >= 0.
        frame_stride: video frames per latent token frame: the VAE's temporal compression times the temporal
            patch (Wan 4, CogVideoX 1.0 4, CogVideoX 1.5 8). An integer >= 1.
        isolate_duplicates: block attention between foreground tokens and background tokens holding a
            position a foreground token took (the authors' self-attention mask on these steps). Default on.
            Alone on a call it costs about a dense attention (:func:`isolated_attention`); composed with other
            methods acting on the same call it is a FlexAttention score_mod. Not with an ``attention_mask``.

    A trajectory that moves no position (e.g. a full-frame box) leaves the stock RoPE and kernel: the
    output equals stock. Models without 3D RoPE (CogVideoX with ``use_rotary_positional_embeddings=False``)
    raise a ValueError.
    """

    families = ROPE_FAMILIES
    families_description = "3D-RoPE video families"

    def __init__(self, trajectory: Trajectory | None = None, steps: int | None = DEFAULT_ROPE_STEPS, frame_stride: int = 4,
                 isolate_duplicates: bool = True):
        require("STDRoPEProcessor", trajectory=trajectory)
        self.frame_stride = check_method_arguments(trajectory, frame_stride)
        self.trajectory = trajectory
        self.steps = integer("steps", steps, 0, allow_none=True)
        self.isolate_duplicates = boolean("isolate_duplicates", isolate_duplicates)

    def check_model(self, transformer, family: str, modules) -> None:
        """At install: a 3D-RoPE video family (a CogVideoX checkpoint needs ``use_rotary_positional_embeddings``)."""
        super().check_model(transformer, family, modules)
        if family == "cogvideox" and not transformer.config.get("use_rotary_positional_embeddings", False):
            raise ValueError(
                "STDRoPEProcessor needs 3D RoPE, but this CogVideoX transformer has "
                "use_rotary_positional_embeddings=False (supported: Wan, CogVideoX with "
                "use_rotary_positional_embeddings=True)"
            )

    def applies_to(self, call: AttentionCall) -> bool:
        self.check_family(call.family)
        if not call.is_self_attention:
            return False
        return self.steps is None or call.context is None or call.context.step_index < self.steps

    def plan(self, call: AttentionCall) -> STDRoPEPlan:
        """The plan of this call's grid, built once per generation."""
        grid = call.require_grid("STDRoPEProcessor")
        plans = call.context.state.setdefault(("std_rope.plans", id(self)), {})
        if grid not in plans:
            plans[grid] = STDRoPEPlan(self.trajectory, grid, self.frame_stride)
        return plans[grid]

    def edit_positions(self, call: AttentionCall) -> None:
        if call.rotary is None:
            raise ValueError(
                f"STDRoPEProcessor needs 3D RoPE, but module {call.module_name or type(call.module).__name__} "
                "gets no rotary embedding: a CogVideoX checkpoint with use_rotary_positional_embeddings=False "
                "has none (supported: Wan, CogVideoX with use_rotary_positional_embeddings=True)"
            )
        plan = self.plan(call)
        if plan.source_index is None:
            return
        cached = call.context.state.get(("std_rope.rotary", id(self)))
        if cached is not None and all(a is b for a, b in zip(cached[0], call.rotary, strict=True)):
            call.rotary = cached[1]
            return
        index = plan.on("source_index", call.rotary[0].device)
        dim = ROPE_TOKEN_DIM[call.family]
        moved = tuple(table.index_select(dim, index) for table in call.rotary)
        call.context.state[("std_rope.rotary", id(self))] = (tuple(call.rotary), moved)
        call.rotary = moved

    def acts_alone(self, call: AttentionCall) -> bool:
        """Whether no other method acts on ``call``: then nothing else reads the query or adds to the scores
        between this method's ``edit_attention`` and ``edit_output``."""
        return all(method is self for method in call.active_methods)

    def edit_attention(self, call: AttentionCall) -> None:
        """Isolation: alone, the kernel runs on the other queries only (:meth:`edit_output` adds the isolated
        rows); composed with other methods, the isolation score_mod (FlexAttention)."""
        if not self.isolate_duplicates:
            return
        plan = self.plan(call)
        if plan.groups is None:
            return
        if call.attn_mask is not None:
            raise ValueError(
                f"STDRoPEProcessor(isolate_duplicates=True) does not support the attention_mask the {call.family} model "
                f"passed to {call.module_name or type(call.module).__name__}: use isolate_duplicates=False"
            )
        if not self.acts_alone(call):
            call.score_mods.append(_isolation_score_mod_for(
                plan.groups_bytes, call.visual.start, call.key.shape[1], str(call.query.device)))
            return
        rows = plan.isolation_rows(call.visual.start, call.query.shape[1], call.query.device)
        call.extras[ISOLATION_EXTRA] = (call.query, rows)
        call.query = call.query.index_select(1, rows.others)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Restore the full query and add the foreground and duplicate rows (:func:`isolated_attention`)."""
        stashed = call.extras.pop(ISOLATION_EXTRA, None)
        if stashed is None:
            return out
        call.query, rows = stashed
        return isolated_attention(call.query, call.key, call.value, out, rows, scale=call.scale, via=call.dense_via,
                                  backend=call.backend)

    def __repr__(self) -> str:
        return (f"STDRoPEProcessor(trajectory=<{self.trajectory.num_frames} boxes>, steps={self.steps}, "
                f"frame_stride={self.frame_stride}, isolate_duplicates={self.isolate_duplicates})")
