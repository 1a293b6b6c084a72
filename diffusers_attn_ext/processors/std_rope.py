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
2. scores (``isolate_duplicates``): a foreground token and a background token that now share a position
   do not attend to each other: ``s_ij = -inf`` when i is foreground and j a duplicated background token, or
   the reverse (the authors' ``fixrope_self_attention_mask``, here a FlexAttention score_mod, never an
   N x N tensor).

The per-generation work (positions, gather index, token groups) and the per-forward work (the gathered
table, shared by every block of a forward) are cached in ``context.state``; the isolation score_mod is
cached per token layout across generations, so compiled FlexAttention does not recompile per call.
"""

from __future__ import annotations

import functools

import torch

from ..context import TokenGrid
from ..families.base import AttentionCall
from ..trajectory import (
    Trajectory,
    duplicate_position_tokens,
    foreground_mask,
    position_source_index,
    std_rope_positions,
)
from .base import AttnExtProcessor

ROPE_FAMILIES = ("wan", "cogvideox")
# Token axis of each family's RoPE table: Wan (cos, sin) are [1, N, 1, D], CogVideoX's [N, D].
ROPE_TOKEN_DIM = {"wan": 1, "cogvideox": 0}
DEFAULT_ROPE_STEPS = 5  # the authors' fixRope_step
OTHER, FOREGROUND, DUPLICATE = 0, 1, 2


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
        """``source_index`` or ``groups`` on ``device`` (copied once)."""
        key = (name, device)
        if key not in self._on_device:
            tensor = getattr(self, name)
            self._on_device[key] = None if tensor is None else tensor.to(device)
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

    A trajectory that moves no position (e.g. a full-frame box) leaves the stock RoPE and kernel: the
    output equals stock. Models without 3D RoPE (CogVideoX with ``use_rotary_positional_embeddings=False``)
    raise a ValueError.
    """

    def __init__(self, trajectory: Trajectory, steps: int | None = DEFAULT_ROPE_STEPS, frame_stride: int = 4,
                 isolate_duplicates: bool = True):
        if not isinstance(trajectory, Trajectory):
            raise ValueError(f"trajectory must be a Trajectory, got {type(trajectory).__name__!r}")
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps={steps!r} must be an integer >= 0 or None (every step)")
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise ValueError(f"frame_stride={frame_stride!r} must be an integer >= 1")
        self.trajectory = trajectory
        self.steps = steps
        self.frame_stride = frame_stride
        self.isolate_duplicates = bool(isolate_duplicates)

    def applies_to(self, call: AttentionCall) -> bool:
        if call.family not in ROPE_FAMILIES:
            raise ValueError(f"STDRoPEProcessor applies to 3D-RoPE video families {ROPE_FAMILIES}, "
                             f"not family={call.family!r}")
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

    def edit_attention(self, call: AttentionCall) -> None:
        if not self.isolate_duplicates:
            return
        plan = self.plan(call)
        if plan.groups is None:
            return
        call.score_mods.append(_isolation_score_mod_for(
            plan.groups_bytes, call.visual.start, call.key.shape[1], str(call.query.device)))

    def __repr__(self) -> str:
        return (f"STDRoPEProcessor(trajectory=<{self.trajectory.num_frames} boxes>, steps={self.steps}, "
                f"frame_stride={self.frame_stride}, isolate_duplicates={self.isolate_duplicates})")
