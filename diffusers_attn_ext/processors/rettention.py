"""Re-ttention: very sparse attention whose output is reshaped with attention statistics of an earlier step.

Paper: R. Chen, K. G. Mills, L. Jiang, C. Gao, D. Niu, "Re-ttention: Ultra Sparse Visual Generation via Attention
Statistical Reshape", NeurIPS 2025 (arXiv 2505.22918), Section 4.2. Code: cccrrrccc/Re-ttention at bbec1f5,
``module/Cog_processor.py`` (their video model; ``module/pixart_processor.py`` and ``module/hunyuan_processor.py``
do the same arithmetic for images), with the settings of ``scripts/Vbench_category.py``.

For query i with scores ``s_ij = scale * q_i . k_j`` and the kept keys ``S_i`` (the mask M):

- full softmax ``A_ij = e^{s_ij} / sum_j e^{s_ij}`` (Eq. 4), sparse softmax ``A^s_ij = e^{s_ij} / sum_{j in S_i}
  e^{s_ij}`` on ``S_i`` (Eq. 5); sparse output ``O^s_i = sum_{j in S_i} A^s_ij v_j``;
- denominator ratio ``rho_i = sum_{j in S_i} e^{s_ij} / sum_j e^{s_ij}`` in (0, 1] (Eq. 8); the reshaped sparse
  softmax is ``rho_i A^s_ij`` (Eq. 9), which equals ``A_ij`` on ``S_i`` at the step rho was measured;
- residual ``R_i = O^full_i - rho_i O^s_i = sum_{j not in S_i} A_ij v_j`` (Eq. 10: the output of the dropped keys).

Schedule, as ``Rettention_AttnProcessor.__call__`` of ``Cog_processor.py``: steps ``t < dense_steps`` run full
attention (``full_attention_no_cache``); at a refresh step ``tau`` (their ``stepi % 5 == 0``) the output is full
attention and ``rho(tau)``, ``R(tau)`` are stored (``full_attention_cache``, ``cached_residual = full -
window``); at every other step ``t`` the output is

    O_t = (rho(tau) + lambda * (t - tau - 1)) * O^s_t + R(tau),

their ``window_attention`` with ``use_ratio=True`` (the probabilities ``e^{s} / (sum_S e^{s} / rho)``) plus the
cached residual, ``cached_ratio += 0.04`` after each such step (lambda, the ramp-up of Section 4.2, Table 3).
With ``use_ratio=False`` (their flag) the factor is 1: ``O_t = O^s_t + R(tau)`` with ``R = O^full - O^s``.

How it is computed here: the block-sparse kernel gives ``O^s`` (the call's block mask is the kept blocks at every
step). At a refresh step two FlexAttention passes return log-sum-exps: ``L_s`` over the kept blocks and ``(O^c,
L_c)`` over the dropped ones; ``rho = sigmoid(L_s - L_c)``, ``R = sigmoid(L_c - L_s) O^c``, and the output
``rho O^s + R`` is the log-sum-exp merge of the two halves, i.e. full attention (to the kernels' rounding; the
authors compute the full score matrix explicitly). No N x N tensor is formed on CUDA.

Deviations from the authors, each a documented option or rule (docs/rettention.md):

- blocks, not tokens: the kept set is a table of ``block_size`` x ``block_size`` blocks and ``density`` is the
  fraction of key blocks kept per query block (default 0.03125, their scripts' ``sparsity = 0.03125``: 96.9%
  sparsity). ``pattern="window"`` keeps ``ceil(density * blocks)`` consecutive key blocks centred on the diagonal,
  moved inward at the edges so that every row keeps as many (their ``create_local_attention_mask_old`` at
  token level; their image processors use the unclamped band ``|i - j| <= int(N * sparsity) // 2`` and their
  video script a per-frame 42-token window repeated in every frame, which at 128-token blocks would keep far
  more than 3% of the blocks). ``pattern="adaptive"`` keeps the blocks of the draft attention map
  (:func:`~diffusers_attn_ext.processors.adaptive_sparse.draft_block_pattern`), searched at each refresh step and
  reused until the next, so that the statistics always belong to the pattern they were measured with (the
  paper's Section 6 leaves dynamic masks open). Blocks holding text (of a joint sequence) are dense, as in their
  mask;
- the refresh steps are ``dense_steps + k * refresh_steps``; equal to their ``stepi % 5 == 0`` after
  ``stepi < 15`` (their video model), ``< 10`` and ``< 5`` (their two image models) since those are multiples of 5;
- state per attention module *and guidance branch*: a pipeline may run cond and uncond as separate forwards (their
  video model batches both in one call), so one state per module would mix the branches' statistics and ramp
  twice per step;
- the ramp is computed from the step offset instead of accumulated in place (the same values);
- the reference "full" attention includes the score modifications and block mask of methods composed before
  this one (install(pipe, other, RettentionProcessor()): the reshape restores *their* attention). A method
  composed after it must not change the block mask (ValueError).

All state lives in the method's per-generation state (:class:`RettentionState`, cleared at every pipeline call), per
module, branch and shape. ``rho + lambda * k`` is not clamped to 1, as the authors' code. Identity: ``density=1`` with
``ratio_ramp=0`` (or ``use_ratio=False``) is full attention at every step.

Compile: the statistics are carried across steps in a per-generation cache, which a torch.compile'd region cannot
fill; under torch.compile ``refresh_steps`` must be 1 (every sparse step refreshes and nothing is stored), as
AdaptiveSparseProcessor's ``cache_steps=1``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import flex_attention

try:  # torch >= 2.9 asks for the log-sum-exp through ``return_aux``; ``return_lse`` is deprecated there
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

from ..call import AttentionCall
from ..kernels.block_sparse_table import mark_static
from ..kernels.flex import _compiled_flex, compose_score_mods, flex_block_mask
from ..validation import boolean, choice, integer, real
from .adaptive_sparse import draft_block_pattern
from .radial_sparse import SparseVideoProcessor, dense_text_blocks

PATTERNS = ("window", "adaptive")
DEFAULT_DENSITY = 0.03125  # the authors' scripts: ``sparsity = 0.03125``


def window_block_pattern(blocks: int, density: float, device=None) -> torch.Tensor:
    """``[blocks, blocks]`` bool: each query block keeps ``min(blocks, ceil(density * blocks))`` consecutive key
    blocks centred on its own (one more to the right for an even count), shifted inward at the edges so that
    every row keeps the same number. ``density=1`` keeps every block."""
    keep = min(blocks, math.ceil(density * blocks))
    rows = torch.arange(blocks, device=device)
    start = (rows - (keep - 1) // 2).clamp(0, blocks - keep)
    cols = torch.arange(blocks, device=device)
    return (cols[None, :] >= start[:, None]) & (cols[None, :] < start[:, None] + keep)


def _flex_with_lse(call: AttentionCall, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention of ``call`` (its score mods) over the block table ``blocks``: the output ``[B, N, H, D]`` and
    the natural log-sum-exp of the kept scores ``[B, N, H]`` (-inf, output 0, for a row that keeps no block)."""
    q, k, v = (x.transpose(1, 2) for x in (call.query, call.key, call.value))
    block_mask = flex_block_mask(blocks, call.block_size, q.shape[2], k.shape[2])
    kwargs = dict(score_mod=compose_score_mods(call.score_mods), block_mask=block_mask, scale=call.scale)
    if AuxRequest is None:
        kwargs["return_lse"] = True
    else:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if torch.compiler.is_compiling():
        out, aux = flex_attention(q, k, v, **kwargs)
    elif q.is_cuda:
        out, aux = _compiled_flex()(q, k, v, **kwargs)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out, aux = flex_attention(q, k, v, **kwargs)
    lse = aux if AuxRequest is None else aux.lse
    return out.transpose(1, 2), lse.transpose(1, 2)


def rettention_statistics(
    call: AttentionCall, kept: torch.Tensor, reference: torch.Tensor | None, sparse_out: torch.Tensor,
    use_ratio: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rho [B, N, H], R [B, N, H, D], full output [B, N, H, D])`` of one attention call (Eqs. 8 and 10).

    ``kept`` is the block table the kernel used for ``sparse_out`` (O^s); ``reference`` the block table of the full
    attention (None: every block). rho = sigmoid(L_s - L_c) from the log-sum-exps of the kept and dropped blocks;
    with ``use_ratio`` R = sigmoid(L_c - L_s) O^c (the dropped keys' output), else R = O^full - O^s (the authors'
    ``use_ratio=False``: the factor is 1). The full output is rho O^s + (1 - rho) O^c.
    """
    dropped = ~kept if reference is None else reference & ~kept
    _, lse_kept = _flex_with_lse(call, kept)
    out_dropped, lse_dropped = _flex_with_lse(call, dropped)
    dtype = torch.promote_types(sparse_out.dtype, torch.float32)
    ratio = torch.sigmoid(lse_kept - lse_dropped).to(dtype)
    dropped_part = torch.sigmoid(lse_dropped - lse_kept).to(dtype)[..., None] * out_dropped.to(dtype)
    full = ratio[..., None] * sparse_out.to(dtype) + dropped_part
    residual = dropped_part if use_ratio else full - sparse_out.to(dtype)
    return ratio, residual.to(sparse_out.dtype), full.to(sparse_out.dtype)


def reshape_sparse_output(sparse_out: torch.Tensor, ratio: torch.Tensor | float, residual: torch.Tensor,
                          ramp: float = 0.0) -> torch.Tensor:
    """``(rho + ramp) * O^s + R`` (Eq. 9 applied to the output, plus Eq. 10's residual), in at least float32, in
    ``sparse_out``'s dtype. ``ratio`` is ``[B, N, H]`` (or 1.0 for the authors' ``use_ratio=False``)."""
    dtype = torch.promote_types(sparse_out.dtype, torch.float32)
    factor = ratio.to(dtype)[..., None] + ramp if isinstance(ratio, torch.Tensor) else ratio + ramp
    return (factor * sparse_out.to(dtype) + residual.to(dtype)).to(sparse_out.dtype)


@dataclass
class _Statistics:
    """What a refresh step leaves for the following steps of one module, branch and shape."""

    step: int
    ratio: torch.Tensor | None  # None for use_ratio=False
    residual: torch.Tensor
    pattern: torch.Tensor


@dataclass
class RettentionState:
    """Per generation: the window tables built, and the statistics of each module, branch and shape."""

    windows: dict = field(default_factory=dict)
    statistics: dict[tuple, _Statistics] = field(default_factory=dict)


@dataclass(frozen=True)
class _Carried:
    """What ``edit_attention`` leaves for ``edit_output`` on one call."""

    stored: _Statistics | None  # the statistics reused, None at a refresh step
    kept: torch.Tensor  # the blocks this method keeps
    reference: torch.Tensor | None  # the block mask of earlier methods (None: every block)
    applied: torch.Tensor  # the call's block mask after this method


class RettentionProcessor(SparseVideoProcessor):
    """Re-ttention on video self-attention: ~3% of the blocks, reshaped by cached statistics.

    Args:
        density: fraction of key blocks kept per query block, in (0, 1]. Default 0.03125 (the authors' scripts).
        pattern: "window" (static band of blocks around the diagonal; the authors use static masks) or
            "adaptive" (blocks of the draft attention map, searched at every refresh step).
        dense_steps: first steps with full attention and no statistics; default 15 (the authors' video model, 50
            steps; their image models 10 and 5 of 20).
        refresh_steps: a refresh step (full attention, statistics stored) every this many steps from
            ``dense_steps`` on; default 5 (the authors' caching period). 1: every step refreshes (full attention).
        ratio_ramp: lambda, added to the cached ratio after every reused step, in [0, 1]; default 0.04 (the
            authors' code; Table 3 ablates 0-0.04).
        use_ratio: rescale the sparse output by the cached ratio (Eq. 9); False: residual caching alone (the
            authors' switch, their default True).
        dense_layers, block_size: see :class:`SparseVideoProcessor`.

    Not under diffusers' context parallelism (the statistics are per rank's rows of a local FlexAttention).
    """

    context_parallel = None

    def __init__(
        self, density: float = DEFAULT_DENSITY, pattern: str = "window", dense_steps: int = 15,
        refresh_steps: int = 5, ratio_ramp: float = 0.04, use_ratio: bool = True, dense_layers: int = 0,
        block_size: int = 128,
    ):
        super().__init__(dense_steps, dense_layers, block_size)
        self.density = real("density", density, 0.0, 1.0, low_open=True)
        self.pattern = choice("pattern", pattern, PATTERNS)
        self.refresh_steps = integer("refresh_steps", refresh_steps, 1)
        self.ratio_ramp = real("ratio_ramp", ratio_ramp, 0.0, 1.0)
        self.use_ratio = boolean("use_ratio", use_ratio)

    def new_state(self) -> RettentionState:
        return RettentionState()

    # -- which blocks are kept -------------------------------------------------------------------------------
    def _window(self, call: AttentionCall) -> torch.Tensor:
        blocks = -(-call.query.shape[1] // self.block_size)
        table = window_block_pattern(blocks, self.density, call.query.device)
        return (table | dense_text_blocks(call, blocks, self.block_size, table.device))[None, None]

    def _window_cached(self, call: AttentionCall) -> torch.Tensor:
        if torch.compiler.is_compiling():  # no cache filled while tracing: the table is built into the graph
            return self._window(call)
        text = None if call.text is None else (call.text.start, call.text.stop)
        key = (call.query.shape[1], text, call.query.device)
        cache = call.context.state_of(self).windows
        if key not in cache:
            cache[key] = mark_static(self._window(call))
        return cache[key]

    def _search(self, call: AttentionCall) -> torch.Tensor:
        pattern = draft_block_pattern(call.query, call.key, self.block_size, density=self.density, scale=call.scale)
        return pattern | dense_text_blocks(call, pattern.shape[-1], self.block_size, pattern.device)

    # -- the schedule ----------------------------------------------------------------------------------------
    def _state_key(self, call: AttentionCall) -> tuple:
        return (id(call.module), call.context.branch, tuple(call.query.shape), tuple(call.key.shape))

    def _stored(self, call: AttentionCall) -> _Statistics | None:
        """The statistics this call reuses, or None when it is a refresh step."""
        if self.refresh_steps == 1:
            return None
        if torch.compiler.is_compiling():
            raise ValueError(
                f"RettentionProcessor(refresh_steps={self.refresh_steps}) carries attention statistics across "
                "steps in a per-generation cache, which a torch.compile'd region cannot fill; under torch.compile "
                "use refresh_steps=1 (every sparse step refreshes), or run eagerly"
            )
        step = call.context.step_index
        if (step - self.dense_steps) % self.refresh_steps == 0:
            return None
        # None (refresh now) when this branch missed its refresh step
        return call.context.state_of(self).statistics.get(self._state_key(call))

    def edit_attention(self, call: AttentionCall) -> None:
        stored = self._stored(call)
        if stored is not None:
            kept = stored.pattern
        elif self.pattern == "adaptive":
            kept = self._search(call)
            if self.refresh_steps > 1:  # reused until the next refresh: compressed once for the kernel
                mark_static(kept)
        else:
            kept = self._window_cached(call)
        reference = call.block_mask
        call.add_block_mask(kept, self.block_size)
        call.carry(self, _Carried(stored, kept, reference, call.block_mask))

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        carried = call.carried_by(self)
        stored, kept, reference, applied = carried.stored, carried.kept, carried.reference, carried.applied
        if call.block_mask is not applied:
            raise ValueError(
                "a method composed after RettentionProcessor changed the block mask: compose Re-ttention after "
                "the other block-sparse methods (its statistics belong to the blocks it kept)"
            )
        if stored is not None:
            ratio = stored.ratio if self.use_ratio else 1.0
            ramp = self.ratio_ramp * (call.context.step_index - stored.step - 1) if self.use_ratio else 0.0
            return reshape_sparse_output(out, ratio, stored.residual, ramp)
        ratio, residual, full = rettention_statistics(call, applied, reference, out, self.use_ratio)
        if self.refresh_steps > 1:
            call.context.state_of(self).statistics[self._state_key(call)] = _Statistics(
                call.context.step_index, ratio if self.use_ratio else None, residual, kept
            )
        return full

    def __repr__(self) -> str:
        return (
            f"RettentionProcessor(density={self.density}, pattern={self.pattern!r}, dense_steps={self.dense_steps}, "
            f"refresh_steps={self.refresh_steps}, ratio_ramp={self.ratio_ramp}, use_ratio={self.use_ratio}, "
            f"dense_layers={self.dense_layers}, block_size={self.block_size})"
        )
