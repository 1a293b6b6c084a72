"""Isolation and Reposition Attention (IR-Diffusion, He et al., arXiv 2411.19261, Sec. 3.2-3.3; authors' code
``hehuiguo/DreamStory``, ``DreamStoryScaledAttnProcessor``) for the joint attention of image models.

The batch holds groups of ``n`` images (``n`` = images of the :class:`~diffusers_attn_ext.subjects.SubjectLayout`),
image 0 of each group being the reference; classifier-free guidance batches ``[uncond x n, cond x n]`` are two
groups. In every self-attention call (joint, single-stream and image-only self-attention):

- the reference row, and every target token outside the subjects (text, background), attend as stock;
- a token of subject ``s`` in a target attends its own image and text except the tokens of the other subjects
  (Isolation Attention), plus the reference's subject ``s`` repositioned into the target's box (Reposition
  Attention) and nothing else of the reference:

      o_q = sum_{j own, allowed} e^{s_qj} v_j + sum_{m} e^{s_qm} v~_m  /  (same sums of e^{s})

  where ``k~_m, v~_m`` are the reference keys and values resampled (nearest by default, as the authors; or
  bilinear) from the reference box onto target position ``m``.

Positions: a model with RoPE rotates keys before attention. A repositioned key must carry the RoPE of its new
position ``m``, not of its source ``n``: since RoPE is a rotation per frequency pair, ``R(m) k_raw =
R(m - n) R(n) k_raw``, so the already rotated reference key is rotated by the difference ``m - n``, which the
family adapter computes from its rotary table (:meth:`~diffusers_attn_ext.families.base.FamilyAdapter.key_rotation`);
for bilinear blends each neighbour is rotated by its own difference before blending, which equals blending the
raw keys and rotating by ``m``. Without RoPE (positions in the hidden states) keys are resampled as they are.

Kernel: the stock kernel runs first on every row (it is exact for all rows and tokens but the target subject
tokens); :meth:`IsolationRepositionProcessor.edit_output` then recomputes the target subject queries with
``F.scaled_dot_product_attention`` without a mask: for each target image, subject and chunk of heads, the
allowed keys (the row's own keys but the other subjects' tokens, then the subject's repositioned reference
keys, none of them for queries dropped by reference dropout) are gathered into one contiguous K and V, so the
gather is the mask and the fused kernels (flash, cuDNN, memory-efficient) apply; the results are scattered back
into the output rows.
Nothing of size queries x keys is materialised by this code. Memory: the heads of one chunk are chosen so that
its gathered K, V, Q and SDPA's output, or K, V and the float32 (float64) temporaries of the resampling, stay under
``max_chunk_bytes`` (see :func:`heads_per_chunk`); at least one head per chunk.

Reference dropout (authors' ``_dropout_mask``, ``dropout=0.5`` in their ``pipe_test.py``): one Bernoulli draw per
target subject token multiplies the target mask, and in the reposition path that mask gates the query rows of
the reference block (``mask_attention_multi_subj``): a dropped token of subject ``s`` attends no reference key,
only its own image under isolation. ``dropout_mode="queries"`` (default) does that; ``dropout_mode="keys"``
drops repositioned reference keys for all of the subject's queries instead (this package's earlier rule).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from ..call import AttentionCall, accumulation_dtype
from ..families.base import KeyRotation
from ..subjects import INTERPOLATIONS, SubjectLayout, SubjectTokens, layout_key, layout_of_key, subject_tokens
from ..validation import choice, integer, real
from .base import AttnExtProcessor, require

DEFAULT_CHUNK_BYTES = 16 * 2**20
DROPOUT_MODES = ("queries", "keys")


def _deltas(rotation: KeyRotation | None, tokens: SubjectTokens, key: torch.Tensor):
    """The rotations ``R(m - n)`` of every repositioned key (target position m) and source tap n, or None."""
    return None if rotation is None else rotation.deltas(tokens.ref_positions, tokens.ref_sources, key)


def _kept(tokens: SubjectTokens, keep: torch.Tensor | None) -> SubjectTokens:
    """``tokens`` with only the repositioned keys ``keep`` (bool mask or indices) selects."""
    if keep is None:
        return tokens
    return replace(tokens, ref_sources=tokens.ref_sources[keep], ref_weights=tokens.ref_weights[keep],
                   ref_positions=tokens.ref_positions[keep])


def split_queries(tokens: SubjectTokens, attending: torch.Tensor, isolated: torch.Tensor) -> list[SubjectTokens]:
    """The authors' query dropout of one subject: the queries at positions ``attending`` of ``tokens.queries``
    keep every repositioned reference key; those at ``isolated`` attend no reference key (their own image under
    isolation only). Index tensors on the plans' device; an empty group is left out."""
    groups = [replace(tokens, queries=tokens.queries[attending])]
    if isolated.numel():
        groups.append(replace(tokens, queries=tokens.queries[isolated], ref_sources=tokens.ref_sources[:0],
                              ref_weights=tokens.ref_weights[:0], ref_positions=tokens.ref_positions[:0]))
    return groups


def _resample_into(key: torch.Tensor, value: torch.Tensor, tokens: SubjectTokens, rotation: KeyRotation | None, deltas,
                   k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Write the repositioned reference keys and values ``[M, H, D]`` into ``k_out``, ``v_out``.

    Nearest without RoPE is a plain gather. Otherwise the temporaries are float32 (float64 for float64
    input): about 3 accumulation-dtype elements per (key, tap, head, channel), the ``RESAMPLE_TEMPORARIES``
    of :func:`heads_per_chunk`. Keys are rotated in that dtype by ``rotation`` with ``deltas`` (:func:`_deltas`), then
    blended.
    """
    sources, taps = tokens.ref_sources, tokens.ref_sources.shape[1]
    acc = accumulation_dtype(key.dtype)
    if taps == 1:  # nearest: weights are exactly 1
        torch.index_select(value, 0, sources[:, 0], out=v_out)
        if deltas is None:
            torch.index_select(key, 0, sources[:, 0], out=k_out)
            return
    else:
        weights = tokens.ref_weights.to(key.device, acc)[..., None, None]
        v_out.copy_((value[sources].to(acc) * weights).sum(1))
    gathered = key[sources]  # [M, taps, H, D]
    if deltas is not None:
        rotated = rotation.rotate_(gathered.flatten(0, 1).to(acc), tuple(d.flatten(0, 1) for d in deltas))
        gathered = rotated.unflatten(0, sources.shape)
    k_out.copy_(gathered[:, 0] if taps == 1 else (gathered.to(acc) * weights).sum(1))


def repositioned_reference(
    key: torch.Tensor, value: torch.Tensor, tokens: SubjectTokens, rotation: KeyRotation | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference subject's keys and values resampled into the target box: ``[M, H, D]`` each.

    ``key``/``value`` are one reference row ``[S, H, D]`` (keys already rotated when ``rotation`` is given);
    ``rotation`` is the family adapter's :class:`~diffusers_attn_ext.families.base.KeyRotation` of the call's rotary
    embedding, or None without RoPE; ``keep`` selects repositioned keys (dropout).
    """
    tokens = _kept(tokens, keep)
    deltas = _deltas(rotation, tokens, key)
    count = tokens.ref_positions.numel()
    k_new, v_new = key.new_empty(count, *key.shape[1:]), value.new_empty(count, *value.shape[1:])
    _resample_into(key, value, tokens, rotation, deltas, k_new, v_new)
    return k_new, v_new


RESAMPLE_TEMPORARIES = 3  # accumulation-dtype elements per resampled (key, tap, head, channel), see _resample_into


def heads_per_chunk(heads: int, head_dim: int, keys: int, queries: int, resampled: int, element_size: int,
                    accumulation_size: int, max_chunk_bytes: int, fixed_bytes: int = 0) -> int:
    """Heads per SDPA call of one target subject, so that a chunk stays under ``max_chunk_bytes``.

    Per head a chunk holds the gathered keys and values (``keys`` tokens each) and then either the
    accumulation-dtype temporaries of resampling ``resampled`` (key, tap) pairs (0 when resampling is a plain gather) or the
    gathered queries and SDPA's output (``queries`` tokens each)::

        per_head = head_dim * (2 e keys + max(2 e queries, RESAMPLE_TEMPORARIES a resampled))

    (``e``, ``a``: element sizes of the inputs and of the accumulation). ``fixed_bytes`` (the RoPE deltas,
    held for the whole subject) comes off the budget first. The largest count that fits (at least 1) is then
    evened out over the chunks: 24 heads fitting 5 per chunk run as 5 chunks of 5, 5, 5, 5, 4.
    """
    per_head = head_dim * (2 * element_size * keys
                           + max(2 * element_size * queries, RESAMPLE_TEMPORARIES * accumulation_size * resampled))
    fit = min(heads, max(1, (max_chunk_bytes - fixed_bytes) // per_head))
    chunks = -(-heads // fit)
    return -(-heads // chunks)


def _head_chunk(query, key, value, ref_key, ref_value, tokens: SubjectTokens, rotation, deltas, scale, out) -> None:
    """Attention of one subject's queries over its gathered keys, for the heads of these ``[S, h, D]`` slices;
    results overwrite the subject's tokens of ``out``. Buffers die on return, before the next chunk."""
    own = tokens.own_keys.numel()
    count = own + tokens.ref_positions.numel()
    k = key.new_empty(count, *key.shape[1:])
    v = value.new_empty(count, *value.shape[1:])
    torch.index_select(key, 0, tokens.own_keys, out=k[:own])
    torch.index_select(value, 0, tokens.own_keys, out=v[:own])
    _resample_into(ref_key, ref_value, tokens, rotation, deltas, k[own:], v[own:])
    q = query.index_select(0, tokens.queries)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       scale=scale)
    out.index_copy_(0, tokens.queries, o[0].transpose(0, 1).to(out.dtype))


def subject_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ref_key: torch.Tensor, ref_value: torch.Tensor,
    tokens: SubjectTokens, out: torch.Tensor, rotation: KeyRotation | None = None, scale: float | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Isolation + Reposition attention of one target subject: the queries ``tokens.queries`` of the target row
    ``query [S, H, D]`` over its keys ``tokens.own_keys`` and the repositioned keys of the reference row
    ``ref_key, ref_value`` (``tokens`` already reduced to the kept ones), overwriting those tokens of ``out``.

    Heads run in chunks of :func:`heads_per_chunk`, one unmasked SDPA call each.
    """
    deltas = _deltas(rotation, tokens, key)
    heads, head_dim = query.shape[1], query.shape[2]
    taps = tokens.ref_sources.shape[1]
    resampled = 0 if taps == 1 and deltas is None else tokens.ref_sources.numel()
    fixed = 0 if deltas is None else sum(d.numel() * d.element_size() for d in deltas)
    step = heads_per_chunk(
        heads, head_dim, tokens.own_keys.numel() + tokens.ref_positions.numel(), tokens.queries.numel(), resampled,
        key.element_size(), torch.finfo(accumulation_dtype(key.dtype)).bits // 8, max_chunk_bytes, fixed,
    )
    for start in range(0, heads, step):
        part = slice(start, start + step)
        _head_chunk(query[:, part], key[:, part], value[:, part], ref_key[:, part], ref_value[:, part], tokens,
                    rotation, deltas, scale, out[:, part])


def isolation_reposition_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, plans: list[list[SubjectTokens]],
    rotation: KeyRotation | None = None, scale: float | None = None, keep: dict | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Overwrite, in ``out [B, S, H, D]`` (the stock attention of every row), the target subject queries with
    Isolation + Reposition attention. ``plans[i - 1]`` are the :class:`SubjectTokens` of target image ``i``
    (on ``query``'s device; several entries may share a subject, e.g. :func:`split_queries`); rows are groups
    of ``len(plans) + 1`` images, reference first. ``keep[(i, s)]`` (bool mask or indices) selects the
    repositioned keys of entry ``s`` of image ``i`` (``dropout_mode="keys"``).
    ``max_chunk_bytes`` bounds the working memory (:func:`heads_per_chunk`). Returns ``out``."""
    images = len(plans) + 1
    batch = query.shape[0]
    if batch % images:
        raise ValueError(
            f"batch of {batch} rows does not split into groups of {images} images (reference + {images - 1} targets)"
        )
    for reference in range(0, batch, images):
        for image, image_plans in enumerate(plans, start=1):
            row = reference + image
            for s, tokens in enumerate(image_plans):
                subject_attention(
                    query[row], key[row], value[row], key[reference], value[reference],
                    _kept(tokens, None if keep is None else keep[(image, s)]), out[row], rotation, scale,
                    max_chunk_bytes,
                )
    return out


def allowed_pairs(plans: list[SubjectTokens], seq_len: int) -> torch.Tensor:
    """The (query, key) pairs one target row may attend, as a dense bool table for drawing and tests:
    ``[seq_len, seq_len + M]``, keys being the row's own sequence then the repositioned reference keys of
    each subject in order (``M`` of them in all)."""
    appended = sum(int(t.ref_positions.numel()) for t in plans)
    table = torch.zeros(seq_len, seq_len + appended, dtype=torch.bool)
    table[:, :seq_len] = True
    offset = seq_len
    for tokens in plans:
        count = int(tokens.ref_positions.numel())
        table[tokens.queries, :seq_len] = tokens.own_allowed
        table[tokens.queries, offset:offset + count] = True
        offset += count
    return table


def layout_plans(layout: SubjectLayout, height: int, width: int, visual_start: int, seq_len: int, device,
                 interpolation: str) -> list[list[SubjectTokens]]:
    """:class:`SubjectTokens` per target image and subject of ``layout`` for one token layout, on ``device``."""
    return [
        [SubjectTokens(**{f.name: getattr(p, f.name).to(device) for f in fields(SubjectTokens)})
         for p in subject_tokens(layout, image, height, width, visual_start, seq_len, interpolation)]
        for image in range(1, layout.num_images)
    ]


@functools.lru_cache(maxsize=16)
def _cached_plan_tensors(key: str, height: int, width: int, visual_start: int, seq_len: int, interpolation: str,
                         device: str) -> tuple:
    plans = layout_plans(layout_of_key(key), height, width, visual_start, seq_len, torch.device(device), interpolation)
    return tuple(tuple(tuple(getattr(t, f.name) for f in fields(SubjectTokens)) for t in image) for image in plans)


@torch.compiler.assume_constant_result
def compiled_plan_tensors(key: str, height: int, width: int, visual_start: int, seq_len: int, interpolation: str,
                          device: str) -> tuple:
    """The plans of the layout of ``key`` (:func:`~diffusers_attn_ext.subjects.layout_key`) as nested tuples of the
    :class:`SubjectTokens` fields, for a compiled region: dynamo runs this at trace time and bakes the tensors in as
    constants (their ``nonzero`` traced would be data-dependent), guarded by the arguments' values; cached across
    generations (a pure function of its arguments)."""
    return _cached_plan_tensors(key, height, width, visual_start, seq_len, interpolation, device)


@dataclass
class SubjectState:
    """Per generation: the plans of each token layout, and the last step's plans with its dropout applied."""

    plans: dict[tuple, list[list[SubjectTokens]]] = field(default_factory=dict)
    step_plans: tuple[tuple, list[list[SubjectTokens]]] | None = None


class IsolationRepositionProcessor(AttnExtProcessor):
    """IR-Diffusion's Isolation and Reposition Attention; see the module docstring.

    Args:
        layout: subjects and their regions per image, reference first (``SubjectLayout.from_boxes``).
        start_step, end_step: denoising steps ``start_step <= i < end_step`` it acts on (authors: all 50
            steps, ``start_step=0``); None for the last step.
        interpolation: "nearest" (authors) or "bilinear" resampling of the reference subject.
        reference_dropout: dropout probability of the authors' ``_dropout_mask`` (their default 0.5 in
            ``pipe_test.py``), drawn anew at every step; when a subject would lose all, it keeps all, as the
            authors restore the undropped mask.
        dropout_mode: what is dropped. ``"queries"`` (authors): each target token of a subject, which then
            attends no reference key (the target mask gates the reference block's query rows). ``"keys"`` (not
            the authors'): each repositioned reference key, for all the subject's queries.
        dropout_seed: seeds the dropout draws (``seed + step``), so a generation is reproducible.
        max_chunk_bytes: working memory of the subject queries' attention: one chunk of heads' gathered keys,
            values, queries and output (:func:`heads_per_chunk`; at least one head per chunk).

    One image, or a layout without subjects, is the stock processor. Image models only; not under diffusers'
    context parallelism; it does not compose with methods that change the scores of the same call.

    torch.compile (fullgraph, whole or regional): with ``reference_dropout=0`` one graph per region (the plans are
    constants of the graph, the step window the context's flags); the dropout draws token sets of data-dependent
    sizes at every step, so under compile it raises a ValueError.
    """

    media = ("image",)
    context_parallel = None
    kernel = ("rows",)

    def __init__(self, layout: SubjectLayout | None = None, start_step: int = 0, end_step: int | None = None,
                 interpolation: str = "nearest", reference_dropout: float = 0.0, dropout_seed: int = 0,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, dropout_mode: str = "queries"):
        require("IsolationRepositionProcessor", layout=layout)
        if not isinstance(layout, SubjectLayout):
            raise ValueError(f"layout must be a SubjectLayout, got {type(layout).__name__}")
        self.layout = layout
        self.start_step = integer("start_step", start_step, 0)
        self.end_step = integer("end_step", end_step, self.start_step + 1, allow_none=True)
        self.interpolation = choice("interpolation", interpolation, INTERPOLATIONS)
        self.reference_dropout = real("reference_dropout", reference_dropout, 0.0, 1.0, high_open=True)
        self.dropout_seed = integer("dropout_seed", dropout_seed, 0)
        self.dropout_mode = choice("dropout_mode", dropout_mode, DROPOUT_MODES)
        self.max_chunk_bytes = integer("max_chunk_bytes", max_chunk_bytes, 1)
        self._key = layout_key(layout)

    def new_state(self) -> SubjectState:
        return SubjectState()

    def applies_to(self, call: AttentionCall) -> bool:
        if not call.is_self_attention or self.layout.num_images < 2 or not self.layout.names:
            return False
        if call.context is None:
            return self.start_step == 0
        return call.context.in_steps(self.start_step, self.end_step)

    def plans(self, height: int, width: int, visual_start: int, seq_len: int, device,
              state: SubjectState | None = None) -> list[list[SubjectTokens]]:
        """:class:`SubjectTokens` per target image and subject for one token layout (kept in ``state`` when given)."""
        cache = {} if state is None else state.plans
        cache_key = (height, width, visual_start, seq_len, str(device))
        if cache_key not in cache:
            cache[cache_key] = layout_plans(self.layout, height, width, visual_start, seq_len, device,
                                            self.interpolation)
        return cache[cache_key]

    def keep_masks(self, plans: list[list[SubjectTokens]], step: int) -> dict | None:
        """Reference dropout of one step: ``{(image, subject): bool}`` on the CPU, where they are drawn, over the
        subject's target tokens (``dropout_mode="queries"``, ``[queries]``) or its repositioned keys
        (``"keys"``, ``[M]``); a subject that would lose all keeps all (authors' ``_dropout_mask``); None at 0."""
        if self.reference_dropout == 0:
            return None
        generator = torch.Generator().manual_seed(self.dropout_seed + step)
        keep = {}
        for image, image_plans in enumerate(plans, start=1):
            for s, tokens in enumerate(image_plans):
                count = (tokens.queries if self.dropout_mode == "queries" else tokens.ref_positions).numel()
                mask = torch.rand(count, generator=generator) >= self.reference_dropout
                keep[(image, s)] = mask | ~mask.any()
        return keep

    def step_plans(self, plans: list[list[SubjectTokens]], step: int,
                   state: SubjectState | None = None) -> list[list[SubjectTokens]]:
        """``plans`` with the step's reference dropout applied (:meth:`keep_masks`), made once per step and
        layout (kept in ``state`` when given) and reused by every layer of the step. ``"keys"``: each subject keeps
        its kept repositioned keys; ``"queries"``: each subject splits into its attending and its isolated queries
        (:func:`split_queries`). Masks become indices on the plans' device here, so no attention call synchronises
        the device."""
        state = SubjectState() if state is None else state
        cache_key = (id(plans), step)
        if state.step_plans is None or state.step_plans[0] != cache_key:
            masks = self.keep_masks(plans, step)
            result = plans
            if masks is not None:
                result = []
                for image, image_plans in enumerate(plans, start=1):
                    entries = []
                    for s, tokens in enumerate(image_plans):
                        mask, device = masks[(image, s)], tokens.queries.device
                        if self.dropout_mode == "keys":
                            entries.append(_kept(tokens, mask.nonzero().flatten().to(device)))
                        else:
                            entries.extend(split_queries(tokens, mask.nonzero().flatten().to(device),
                                                         (~mask).nonzero().flatten().to(device)))
                    result.append(entries)
            state.step_plans = (cache_key, result)
        return state.step_plans[1]

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Recompute the target subject queries of ``out`` (the stock attention of every row). Inside a compiled region
        (no reference dropout) the plans are constants of the graph (:func:`compiled_plan_tensors`)."""
        grid = call.require_grid(self)
        if torch.compiler.is_compiling():
            if self.reference_dropout > 0:
                raise ValueError(
                    f"IsolationRepositionProcessor(reference_dropout={self.reference_dropout}) draws new token sets "
                    "at every step, which a torch.compile'd region would recompile for; under torch.compile use "
                    "reference_dropout=0 (ir_reference_dropout=0 in the multi-subject pipelines), or run eagerly"
                )
            plans = [[SubjectTokens(*tokens) for tokens in image] for image in compiled_plan_tensors(
                self._key, grid.height, grid.width, call.visual.start, call.query.shape[1], self.interpolation,
                str(call.query.device))]
        else:
            state = call.context.state_of(self)
            plans = self.plans(grid.height, grid.width, call.visual.start, call.query.shape[1], call.query.device,
                               state)
            plans = self.step_plans(plans, call.context.step_index, state)
        return isolation_reposition_attention(
            call.query, call.key, call.value, out, plans, call.adapter.key_rotation(call.rotary), call.scale,
            max_chunk_bytes=self.max_chunk_bytes,
        )

    def __repr__(self) -> str:
        return (f"IsolationRepositionProcessor(subjects={list(self.layout.names)}, images={self.layout.num_images}, "
                f"steps=[{self.start_step}, {self.end_step}), interpolation={self.interpolation!r}, "
                f"reference_dropout={self.reference_dropout}, dropout_mode={self.dropout_mode!r})")
