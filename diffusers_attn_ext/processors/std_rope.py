"""STD-RoPE: DiTraj's inter-frame spatial-temporal decoupled 3D RoPE for trajectory control.

Paper: "DiTraj: training-free trajectory control for video diffusion transformer" (arXiv 2509.21839),
Sec. 3.3; the authors' code (HaofeiDing/DiTraj ``module/transformer_wan.py`` and
``module/pipe.py:create_fixrope_self_attention_mask``).

On the first ``steps`` denoising steps, in every video self-attention:

1. positions: each foreground token ``(t, h, w)`` of its frame's box takes the spatial position of the
   reference box, ``(t, h', w')`` (:func:`diffusers_attn_ext.trajectory.std_rope_positions`); the RoPE
   table rows are gathered from the stock table, ``cos'[n] = cos[src(n)]``, ``src(n) = (t H + h') W + w'``,
   which is the stock RoPE evaluated at the new positions (the family adapter re-indexes its table:
   :meth:`~diffusers_attn_ext.families.base.FamilyAdapter.gather_rotary`);
2. scores (``isolate_duplicates``): with ``F`` the foreground tokens (every frame's box) and ``D`` the
   background tokens whose position a foreground token took (the authors' ``redundant_token``), the
   authors' ``fixrope_self_attention_mask`` sets ``s_ij = -inf`` for ``i in F, j in D`` and ``i in D, j in F``.
   Every other pair is stock, so the attention is exactly::

       out_i = softmax_j(s_ij) v_j  over all keys         for i in O (all other tokens, text included)
       out_i = softmax over keys not in D                  for i in F
       out_i = softmax over keys not in F                  for i in D

   Kernel (:func:`isolated_attention`): the stock dense kernel runs on the ``O`` queries only (``attend_rows``); the
   ``F`` and
   ``D`` queries then run the same dense kernel, with no mask, over one per-row copy of the keys and values
   reordered ``[F, O, D]``, of which "not in D" is the prefix ``[F, O]`` and "not in F" the suffix ``[O, D]``
   (contiguous slices). The work is ``|O| N + |F| (N - |D|) + |D| (N - |F|) <= N^2`` query-key pairs, about
   that of the stock attention; extra memory: one batch row's K and V and the ``O`` rows' output. When other
   methods act on the same call (they may add score mods or read the query), the isolation is a FlexAttention
   score_mod instead (:func:`duplicate_isolation_score_mod`, the same function, composable, slower).

The plan (positions, gather index, token groups, row indices, the isolation score_mod) is a pure function of the
trajectory and the token grid, built once, eagerly, and cached across generations (:func:`_plan`); the per-forward
work (the gathered table, shared by every block of a forward) lives in the method's per-generation state
(:class:`STDRoPEState`). torch.compile (fullgraph): the plan's tensors enter a compiled region as constants
(``torch.compiler.assume_constant_result``, guarded by the trajectory's key and the grid), so nothing
data-dependent is traced and no cache is filled by traced code; there the table is gathered in every block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ..call import AttentionCall
from ..context import TokenGrid
from ..kernels.dense import dense_attention
from ..trajectory import (
    Trajectory,
    check_method_arguments,
    duplicate_position_tokens,
    foreground_mask,
    position_source_index,
    std_rope_positions,
    trajectory_key,
    trajectory_of_key,
)
from ..validation import boolean, integer
from .base import AttnExtProcessor, require

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

    def sequence_groups(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """``groups`` of a ``length``-token sequence whose visual tokens begin at ``start`` (OTHER elsewhere; cached),
        for :func:`duplicate_isolation_score_mod`."""
        key = ("groups", start, length, device)
        if key not in self._on_device:
            groups = torch.full((length,), OTHER, dtype=torch.int8)
            groups[start:start + self.groups.numel()] = self.groups
            self._on_device[key] = groups.to(device)
        return self._on_device[key]

    def isolation_score_mod(self, start: int, length: int, device: torch.device):
        """:func:`duplicate_isolation_score_mod` of that sequence, one closure per layout (cached): compiled
        FlexAttention guards on the score_mod closure and would recompile for every new one (``kernels/flex.py``)."""
        key = ("score_mod", start, length, device)
        if key not in self._on_device:
            self._on_device[key] = duplicate_isolation_score_mod(self.sequence_groups(start, length, device))
        return self._on_device[key]


PLAN_CACHE_SIZE = 16


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(key: str, frames: int, height: int, width: int) -> STDRoPEPlan:
    """The plan of the trajectory named ``key`` (:func:`~diffusers_attn_ext.trajectory.trajectory_key`) on a grid: a
    pure function of its arguments, so cached across generations; built eagerly, never traced (the functions below
    hand its tensors to a compiled region)."""
    trajectory, frame_stride = trajectory_of_key(key)
    return STDRoPEPlan(trajectory, TokenGrid(frames, height, width), frame_stride)


# Plans come into a compiled region through these: dynamo runs them at trace time, outside the graph, and bakes
# their results in as constants (guarded by the value of their arguments: Python strings and ints), so no
# data-dependent op (nonzero, any, equal) is traced and no cache is filled by traced code.
@torch.compiler.assume_constant_result
def _source_index(key: str, frames: int, height: int, width: int, device: str) -> torch.Tensor | None:
    return _plan(key, frames, height, width).on("source_index", torch.device(device))


@torch.compiler.assume_constant_result
def _has_duplicates(key: str, frames: int, height: int, width: int) -> bool:
    return _plan(key, frames, height, width).groups is not None


@torch.compiler.assume_constant_result
def _isolation_rows(key: str, frames: int, height: int, width: int, start: int, length: int,
                    device: str) -> tuple[torch.Tensor, ...]:
    rows = _plan(key, frames, height, width).isolation_rows(start, length, torch.device(device))
    return rows.others, rows.foreground, rows.duplicates, rows.key_order


@torch.compiler.assume_constant_result
def _sequence_groups(key: str, frames: int, height: int, width: int, start: int, length: int,
                     device: str) -> torch.Tensor:
    return _plan(key, frames, height, width).sequence_groups(start, length, torch.device(device))


@dataclass
class STDRoPEState:
    """Per generation (eager forwards only): the last forward's stock rotary embedding and its gathered one."""

    stock_rotary: Any = None
    moved_rotary: Any = None


class STDRoPEProcessor(AttnExtProcessor):
    """DiTraj's STD-RoPE on video self-attention (the joint or self-attention of a 3D-RoPE video model).

    Args:
        trajectory: the foreground box of every video frame (:class:`~diffusers_attn_ext.trajectory.Trajectory`).
        steps: STD-RoPE acts on denoising steps ``0 .. steps - 1`` (the authors' ``fixRope_step``, 5 of
            50); None for every step. An integer >= 0.
        frame_stride: video frames per latent token frame: the VAE's temporal compression times the temporal
            patch (4 or 8 in the supported models). An integer >= 1.
        isolate_duplicates: block attention between foreground tokens and background tokens holding a
            position a foreground token took (the authors' self-attention mask on these steps). Default on.
            Alone on a call it costs about a dense attention (:func:`isolated_attention`); composed with other
            methods acting on the same call it is a FlexAttention score_mod. Not with an ``attention_mask``.

    A trajectory that moves no position (e.g. a full-frame box) leaves the stock RoPE and kernel: the
    output equals stock. Checkpoints without rotary positions raise a ValueError (their family adapter says why).
    """

    media = ("video",)
    needs_rotary = True
    context_parallel = None
    kernel = ("rows", "score_mod")

    def __init__(self, trajectory: Trajectory | None = None, steps: int | None = DEFAULT_ROPE_STEPS, frame_stride: int = 4,
                 isolate_duplicates: bool = True):
        require("STDRoPEProcessor", trajectory=trajectory)
        self.frame_stride = check_method_arguments(trajectory, frame_stride)
        self.trajectory = trajectory
        self.steps = integer("steps", steps, 0, allow_none=True)
        self.isolate_duplicates = boolean("isolate_duplicates", isolate_duplicates)
        self._key = trajectory_key(trajectory, self.frame_stride)

    def new_state(self) -> STDRoPEState:
        return STDRoPEState()

    def applies_to(self, call: AttentionCall) -> bool:
        if not call.is_self_attention:
            return False
        return self.steps is None or call.context is None or call.context.in_steps(0, self.steps)

    def plan(self, call: AttentionCall) -> STDRoPEPlan:
        """The plan of this call's grid (built once per trajectory and grid, eagerly; see :func:`_plan`)."""
        grid = call.require_grid(self)
        return _plan(self._key, grid.frames, grid.height, grid.width)

    def _grid_key(self, call: AttentionCall) -> tuple[str, int, int, int]:
        grid = call.require_grid(self)
        return self._key, grid.frames, grid.height, grid.width

    def edit_positions(self, call: AttentionCall) -> None:
        """The rotary table re-indexed by the adapter at the STD-RoPE positions. Eagerly once per forward (the blocks
        of a forward share the stock table object); inside a compiled region in every block (no state is kept
        there: the compiler sees the same gather repeated)."""
        index = _source_index(*self._grid_key(call), str(call.query.device))
        if index is None:
            return
        if torch.compiler.is_compiling():
            call.rotary = call.adapter.gather_rotary(call.rotary, index)
            return
        state = call.context.state_of(self)
        if state.stock_rotary is not None and state.stock_rotary is call.rotary:
            call.rotary = state.moved_rotary
            return
        state.stock_rotary, state.moved_rotary = call.rotary, call.adapter.gather_rotary(call.rotary, index)
        call.rotary = state.moved_rotary

    def acts_alone(self, call: AttentionCall) -> bool:
        """Whether no other method acts on ``call``: then nothing else reads the query or adds to the scores
        between this method's ``edit_attention`` and ``edit_output``."""
        return all(method is self for method in call.active_methods)

    def isolation_rows(self, call: AttentionCall) -> IsolationRows | None:
        """The rows of the row-recompute path when it runs on ``call`` (isolation on, some duplicates, no other
        method acting), else None; the same answer in both stages."""
        if not self.isolate_duplicates or not self.acts_alone(call) or not _has_duplicates(*self._grid_key(call)):
            return None
        return IsolationRows(*_isolation_rows(*self._grid_key(call), call.visual.start, call.query.shape[1],
                                              str(call.query.device)))

    def edit_attention(self, call: AttentionCall) -> None:
        """Isolation: alone, the kernel runs on the other queries only (``attend_rows``; :meth:`edit_output` adds the
        isolated rows); composed with other methods, the isolation score_mod (FlexAttention)."""
        if not self.isolate_duplicates or not _has_duplicates(*self._grid_key(call)):
            return
        if call.attn_mask is not None:
            raise ValueError(
                f"STDRoPEProcessor(isolate_duplicates=True) does not support the attention_mask the {call.family} model "
                f"passed to {call.module_name or type(call.module).__name__}: use isolate_duplicates=False"
            )
        if not self.acts_alone(call):
            layout = call.visual.start, call.key.shape[1]
            if torch.compiler.is_compiling():  # the closure over the constant groups is part of the traced graph
                mod = duplicate_isolation_score_mod(_sequence_groups(*self._grid_key(call), *layout,
                                                                     str(call.query.device)))
            else:
                mod = self.plan(call).isolation_score_mod(*layout, call.query.device)
            call.add_score_mod(mod)
            return
        call.attend_rows(self.isolation_rows(call).others)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Add the foreground and duplicate rows to the kernel's other rows (:func:`isolated_attention`)."""
        rows = self.isolation_rows(call) if self.isolate_duplicates else None
        if rows is None:
            return out
        return isolated_attention(call.query, call.key, call.value, out, rows, scale=call.scale, via=call.dense_via,
                                  backend=call.backend)

    def __repr__(self) -> str:
        return (f"STDRoPEProcessor(trajectory=<{self.trajectory.num_frames} boxes>, steps={self.steps}, "
                f"frame_stride={self.frame_stride}, isolate_duplicates={self.isolate_duplicates})")
