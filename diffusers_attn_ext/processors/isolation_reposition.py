"""Isolation and Reposition Attention (IR-Diffusion, He et al., arXiv 2411.19261, Sec. 3.2-3.3; authors' code
``hehuiguo/DreamStory``, ``DreamStoryScaledAttnProcessor``) for the joint attention of SD3 and FLUX.

The batch holds groups of ``n`` images (``n`` = images of the :class:`~diffusers_attn_ext.subjects.SubjectLayout`),
image 0 of each group being the reference; classifier-free guidance batches ``[uncond x n, cond x n]`` are two
groups. In every self-attention call (SD3 joint blocks, FLUX double and single blocks, SD3.5 ``attn2``):

- the reference row, and every target token outside the subjects (text, background), attend as stock;
- a token of subject ``s`` in a target attends its own image and text except the tokens of the other subjects
  (Isolation Attention), plus the reference's subject ``s`` repositioned into the target's box (Reposition
  Attention) and nothing else of the reference:

      o_q = sum_{j own, allowed} e^{s_qj} v_j + sum_{m} e^{s_qm} v~_m  /  (same sums of e^{s})

  where ``k~_m, v~_m`` are the reference keys and values resampled (nearest by default, as the authors; or
  bilinear) from the reference box onto target position ``m``.

Positions: FLUX rotates keys with RoPE before attention. A repositioned key must carry the RoPE of its new
position ``m``, not of its source ``n``: since RoPE is a rotation per frequency pair, ``R(m) k_raw =
R(m - n) R(n) k_raw``, so the already rotated reference key is rotated by the difference ``m - n`` (cos and
sin of the difference from those of ``m`` and ``n``); for bilinear blends each neighbour is rotated by its own
difference before blending, which equals blending the raw keys and rotating by ``m``. SD3 has no RoPE (its
positions are in the hidden states), so its keys are resampled as they are.

Kernel: the stock kernel runs first on every row (it is exact for all rows and tokens but the target subject
tokens); :meth:`IsolationRepositionProcessor.edit_output` then recomputes the target subject queries only,
subject by subject and in query chunks, with the isolation mask as a boolean key vector and the repositioned
keys as a second key segment merged in one softmax. No N x N tensor and no copy of a row's keys: the extra
memory is the repositioned keys of one subject and one chunk of scores (``max_chunk_bytes``).
"""

from __future__ import annotations

import torch

from ..families.base import AttentionCall
from ..subjects import INTERPOLATIONS, SubjectLayout, SubjectTokens, subject_tokens
from .base import AttnExtProcessor

DEFAULT_CHUNK_BYTES = 16 * 2**20


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's real RoPE (diffusers ``apply_rotary_emb``, ``use_real_unbind_dim=-1``) on ``[M, H, D]`` with
    per-token ``cos, sin`` of shape ``[M, D]``, in float32."""
    x = x.float()
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], -1).flatten(-2)
    return x * cos[:, None] + rotated * sin[:, None]


def repositioned_reference(
    key: torch.Tensor, value: torch.Tensor, tokens: SubjectTokens, rotary=None, keep: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference subject's keys and values resampled into the target box: ``[M, H, D]`` each.

    ``key``/``value`` are one reference row ``[S, H, D]`` (keys already rotated when ``rotary`` is given);
    ``rotary`` is FLUX's ``(cos, sin)``, each ``[S, D]``, or None; ``keep`` selects repositioned keys (dropout).
    Tokens run in chunks whose float32 temporaries take about ``max_chunk_bytes``.
    """
    sources, weights, positions = tokens.ref_sources, tokens.ref_weights, tokens.ref_positions
    if keep is not None:
        sources, weights, positions = sources[keep], weights[keep], positions[keep]
    if rotary is not None and not (isinstance(rotary, tuple) and len(rotary) == 2 and rotary[0].shape[0] == key.shape[0]):
        raise ValueError(
            "IsolationRepositionProcessor repositions RoPE keys given as FLUX's (cos, sin) over the whole sequence; "
            f"got {type(rotary).__name__}"
        )
    acc = torch.float32 if key.dtype in (torch.float16, torch.bfloat16) else key.dtype
    weights = weights.to(key.device, acc)[..., None, None]
    count, taps = sources.shape
    k_new = key.new_empty(count, *key.shape[1:])
    v_new = value.new_empty(count, *value.shape[1:])
    chunk = max(1, max_chunk_bytes // (taps * key[0].numel() * 16))
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        src, w = sources[part], weights[part]
        v_new[part] = (value[src].to(acc) * w).sum(1)
        gathered = key[src]  # [c, taps, H, D]
        if rotary is not None:
            # R(m - n) applied to the key rotated at its source n gives the RoPE of its new position m.
            cos, sin = (r.to(key.device, torch.float32) for r in rotary)
            cos_m, sin_m = cos[positions[part]][:, None], sin[positions[part]][:, None]
            cos_n, sin_n = cos[src], sin[src]
            delta_cos, delta_sin = cos_m * cos_n + sin_m * sin_n, sin_m * cos_n - cos_m * sin_n
            gathered = _rotate(gathered.flatten(0, 1), delta_cos.flatten(0, 1), delta_sin.flatten(0, 1))
            gathered = gathered.unflatten(0, (src.shape[0], taps))
        k_new[part] = (gathered.to(acc) * w).sum(1)
    return k_new, v_new


def subject_attention(
    query: torch.Tensor, queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_allowed: torch.Tensor,
    extra_key: torch.Tensor, extra_value: torch.Tensor, scale: float, out: torch.Tensor,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """softmax attention of the tokens ``queries`` (indices) of one row ``query [S, H, D]`` over the allowed
    keys of ``key [S, H, D]`` (``key_allowed``, bool ``[S]``) together with every key of ``extra_key [E, H, D]``;
    the results overwrite the same tokens of ``out [S, H, D]``.

    Queries run in chunks so that one chunk's scores take at most ``max_chunk_bytes``; statistics are float32
    for half-precision inputs (scores are computed in the input dtype, as diffusers' ``get_attention_scores``).
    """
    k, v = key.transpose(0, 1), value.transpose(0, 1)  # [H, S, D]
    ke, ve = extra_key.transpose(0, 1), extra_value.transpose(0, 1)
    stats = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
    blocked = (~key_allowed).to(k.device)
    heads = k.shape[0]
    per_query = heads * (k.shape[1] + ke.shape[1]) * (torch.empty((), dtype=stats).element_size() + k.element_size())
    chunk = max(1, max_chunk_bytes // per_query)
    for start in range(0, queries.numel(), chunk):
        rows = queries[start:start + chunk]
        qc = query[rows].transpose(0, 1)  # [H, c, D]
        own = (qc @ k.transpose(-1, -2)).to(stats).mul_(scale).masked_fill_(blocked, float("-inf"))
        extra = (qc @ ke.transpose(-1, -2)).to(stats).mul_(scale)
        peak = own.amax(-1, keepdim=True)
        if extra.shape[-1]:
            peak = torch.maximum(peak, extra.amax(-1, keepdim=True))
        own.sub_(peak).exp_()
        extra.sub_(peak).exp_()
        total = own.sum(-1, keepdim=True) + extra.sum(-1, keepdim=True)
        mixed = (own.to(k.dtype) @ v).to(stats) + (extra.to(k.dtype) @ ve).to(stats)
        out[rows] = (mixed / total).to(out.dtype).transpose(0, 1)


def isolation_reposition_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, plans: list[list[SubjectTokens]],
    rotary=None, scale: float | None = None, keep: dict | None = None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Overwrite, in ``out [B, S, H, D]`` (the stock attention of every row), the target subject queries with
    Isolation + Reposition attention. ``plans[i - 1]`` are the :class:`SubjectTokens` of target image ``i``
    (on ``query``'s device); rows are groups of ``len(plans) + 1`` images, reference first. ``keep[(i, s)]``
    selects the repositioned keys of subject ``s`` in image ``i`` (reference dropout). Returns ``out``."""
    images = len(plans) + 1
    batch = query.shape[0]
    if batch % images:
        raise ValueError(
            f"batch of {batch} rows does not split into groups of {images} images (reference + {images - 1} targets)"
        )
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    for reference in range(0, batch, images):
        for image, image_plans in enumerate(plans, start=1):
            row = reference + image
            for s, tokens in enumerate(image_plans):
                k_ref, v_ref = repositioned_reference(
                    key[reference], value[reference], tokens, rotary, None if keep is None else keep[(image, s)],
                    max_chunk_bytes,
                )
                subject_attention(query[row], tokens.queries, key[row], value[row], tokens.own_allowed, k_ref, v_ref,
                                  scale, out[row], max_chunk_bytes)
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


class IsolationRepositionProcessor(AttnExtProcessor):
    """IR-Diffusion's Isolation and Reposition Attention; see the module docstring.

    Args:
        layout: subjects and their regions per image, reference first (``SubjectLayout.from_boxes``).
        start_step, end_step: denoising steps ``start_step <= i < end_step`` it acts on (authors: all 50
            steps, ``start_step=0``); None for the last step.
        interpolation: "nearest" (authors) or "bilinear" resampling of the reference subject.
        reference_dropout: probability of dropping each repositioned reference key, drawn anew at every step
            (authors' default 0.5 in ``pipe_test.py``; their ``_dropout_mask``), keeping at least one.
        dropout_seed: seeds the dropout draws (``seed + step``), so a generation is reproducible.
        max_chunk_bytes: memory of one chunk of scores of the subject queries.

    One image, or a layout without subjects, is the stock processor.
    """

    def __init__(self, layout: SubjectLayout, start_step: int = 0, end_step: int | None = None,
                 interpolation: str = "nearest", reference_dropout: float = 0.0, dropout_seed: int = 0,
                 max_chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if not isinstance(layout, SubjectLayout):
            raise ValueError(f"layout must be a SubjectLayout, got {type(layout).__name__}")
        if start_step < 0 or (end_step is not None and end_step <= start_step):
            raise ValueError(f"steps [{start_step}, {end_step}) are empty or negative: need 0 <= start_step < end_step")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
        if not 0.0 <= reference_dropout < 1.0:
            raise ValueError(f"reference_dropout={reference_dropout} is outside [0, 1)")
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes={max_chunk_bytes} must be > 0")
        self.layout = layout
        self.start_step, self.end_step = start_step, end_step
        self.interpolation = interpolation
        self.reference_dropout, self.dropout_seed = reference_dropout, dropout_seed
        self.max_chunk_bytes = max_chunk_bytes
        self._plans: dict[tuple, list[list[SubjectTokens]]] = {}

    def applies_to(self, call: AttentionCall) -> bool:
        if not call.is_self_attention or self.layout.num_images < 2 or not self.layout.names:
            return False
        step = call.context.step_index if call.context is not None else 0
        return step >= self.start_step and (self.end_step is None or step < self.end_step)

    def plans(self, height: int, width: int, visual_start: int, seq_len: int, device) -> list[list[SubjectTokens]]:
        """:class:`SubjectTokens` per target image and subject for one token layout (cached)."""
        cache_key = (height, width, visual_start, seq_len, str(device))
        if cache_key not in self._plans:
            self._plans[cache_key] = [
                [SubjectTokens(*(t.to(device) for t in (p.queries, p.own_allowed, p.ref_sources, p.ref_weights,
                                                        p.ref_positions)))
                 for p in subject_tokens(self.layout, image, height, width, visual_start, seq_len, self.interpolation)]
                for image in range(1, self.layout.num_images)
            ]
        return self._plans[cache_key]

    def keep_masks(self, plans: list[list[SubjectTokens]], step: int) -> dict | None:
        """Reference dropout of one step: ``{(image, subject): bool [M]}``, at least one key kept; None at 0."""
        if self.reference_dropout == 0:
            return None
        generator = torch.Generator().manual_seed(self.dropout_seed + step)
        keep = {}
        for image, image_plans in enumerate(plans, start=1):
            for s, tokens in enumerate(image_plans):
                count = tokens.ref_positions.numel()
                mask = torch.rand(count, generator=generator) >= self.reference_dropout
                if not bool(mask.any()):
                    mask[torch.randint(count, (1,), generator=generator)] = True
                keep[(image, s)] = mask.to(tokens.ref_positions.device)
        return keep

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if call.score_mods or call.block_mask is not None or call.attn_mask is not None:
            raise ValueError(
                "IsolationRepositionProcessor recomputes subject queries with plain softmax attention; it does not "
                "compose with score modifications, block masks or an attention_mask"
            )
        grid = call.require_grid("IsolationRepositionProcessor")
        plans = self.plans(grid.height, grid.width, call.visual.start, call.query.shape[1], call.query.device)
        step = call.context.step_index if call.context is not None else 0
        return isolation_reposition_attention(
            call.query, call.key, call.value, out, plans, call.rotary, call.scale, self.keep_masks(plans, step),
            self.max_chunk_bytes,
        )

    def __repr__(self) -> str:
        return (f"IsolationRepositionProcessor(subjects={list(self.layout.names)}, images={self.layout.num_images}, "
                f"steps=[{self.start_step}, {self.end_step}), interpolation={self.interpolation!r}, "
                f"reference_dropout={self.reference_dropout})")
