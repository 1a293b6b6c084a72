"""SoftPAG: selected attention heads interpolated toward identity attention on the perturbed branch.

"Fine-Grained Perturbation Guidance via Attention Head Selection" (Ahn et al., arXiv 2506.10978), Sec. 4.2,
Eq. 7: for each selected (layer, head) on the perturbed rows of the batch,

    A'_h = (1 - alpha) A_h + alpha A_h^PAG,
    O'_h = (1 - alpha) softmax(Q_h K_h^T / sqrt(d)) V_h + alpha A_h^PAG V_h.

Both terms are attention outputs, so no attention map is materialized: the dense kernel runs once and its
output is blended per head with the output of the perturbed map. alpha = 0 is no perturbation, alpha = 1 is
PAG's identity perturbation restricted to the selected heads. ``A^PAG`` depends on ``identity``:

- ``"image"`` (default): diffusers' PAG processor for joint attention. The image-image block of the joint map is
  the identity; an image query still attends to itself and to every text key (its scores keep those
  entries), and text queries are unchanged. For an image query i: ``softmax([s_ii, s_it for text t])``.
  At alpha = 1 on every head of a layer this equals diffusers' PAG pipeline of that model.
- ``"all"``: the authors' code (``[PROB_PERTURB]attention_identity``): the whole joint map is the identity,
  so every token, text tokens included, outputs its own value: ``A^PAG V = V``.

In self-attention without text tokens (an image-only self-attention beside a joint one) both are
``A^PAG V = V``.

Modules of a layer, as the authors' code (cvlab-kaist/HeadHunter, ``JointTransformerBlock.forward``): a head
set names blocks; the perturbation goes to the block's joint attention only, never to a second, image-only
self-attention of the block (``attn2``, beside the joint attention) unless the head set names that module
itself or ``dual_attention=True``.

Projections and norms are the stock model's (the family adapter's), added-token QK norms included. The authors'
joint attention processor has the added-token QK norm lines commented out, in every forward, perturbed or not:
on a QK-normed model their unperturbed passes are therefore not the stock model's, while on the model they ran
(no QK norm) the lines do nothing. We keep the norms (docs/softpag.md: a defect of their code, with the evidence).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from ..call import AttentionCall
from ..headset import HeadSet, as_headset
from ..validation import as_number, boolean, choice, real
from .base import AttnExtProcessor, require

IDENTITY_MODES = ("image", "all")


def image_identity_output(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text: slice | None, visual: slice, scale: float
) -> torch.Tensor:
    """Output of the visual queries under diffusers' PAG map: each visual query attends to its own key and
    to every text key. ``[B, N, H, D]`` in, ``[B, N_visual, H, D]`` out; O(N_visual x N_text) memory."""
    q, k, v = query[:, visual], key[:, visual], value[:, visual]
    self_score = (q * k).sum(-1, keepdim=True) * scale
    if text is None or text.stop == text.start:
        return v
    text_key, text_value = key[:, text], value[:, text]
    text_scores = torch.einsum("bnhd,bthd->bnht", q, text_key) * scale
    weights = torch.cat([self_score, text_scores], dim=-1).softmax(dim=-1)
    return weights[..., :1] * v + torch.einsum("bnht,bthd->bnhd", weights[..., 1:], text_value)


def identity_target(call: AttentionCall, query, key, value, out, identity: str) -> torch.Tensor:
    """``A^PAG V`` for the given rows and heads of ``call`` (see the module docstring), in the compute dtype
    (float32 at least). ``out`` is the dense attention output of the same rows and heads."""
    compute = torch.promote_types(query.dtype, torch.float32)
    query, key, value = query.to(compute), key.to(compute), value.to(compute)
    if identity == "all":
        return value
    scale = call.scale if call.scale is not None else query.shape[-1] ** -0.5
    target = out.to(compute).clone()
    target[:, call.visual] = image_identity_output(query, key, value, call.text, call.visual, scale)
    return target


def is_dual_attention(call: AttentionCall) -> bool:
    """Whether ``call`` is an image-only self-attention beside a joint one: a call without text tokens in a
    model whose sequences carry text (``context.text_len > 0``), e.g. a block's second self-attention ``attn2``.
    Python ints only."""
    return call.text is None and call.context is not None and call.context.text_len > 0


def per_head_alpha(
    headset: HeadSet, alpha: float | Mapping[str, float | Sequence[float]]
) -> dict[str, tuple[float, ...]]:
    """alpha per layer and head, aligned with ``headset.heads``, from a scalar or a ``{layer: alpha or
    [alpha per head]}`` mapping that covers every layer; ValueError outside [0, 1] or on a mismatch."""
    if isinstance(alpha, Mapping):
        missing = [layer for layer in headset.layers if layer not in alpha]
        extra = [layer for layer in alpha if layer not in headset.heads]
        if missing or extra:
            raise ValueError(f"alpha={dict(alpha)!r} has layers {sorted(alpha)}; it must cover exactly the head "
                             f"set's layers {list(headset.layers)}")
    elif as_number(alpha) is None:
        real("alpha", alpha, 0.0, 1.0)  # not a number, a sequence or a mapping: the ValueError naming alpha
    per_layer = {}
    for layer, heads in headset.heads.items():
        value = alpha[layer] if isinstance(alpha, Mapping) else alpha
        if as_number(value) is not None:
            values = [value] * len(heads)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            values = list(value)
        else:
            values = [value]  # not a number: refused below, naming the layer
        if len(values) != len(heads):
            raise ValueError(f"alpha[{layer!r}] has {len(values)} values for the {len(heads)} heads {list(heads)}")
        per_layer[layer] = tuple(real("alpha", item, 0.0, 1.0, note=f" (layer {layer!r})") for item in values)
    return per_layer


class SoftPAGProcessor(AttnExtProcessor):
    """SoftPAG on the heads of ``heads``, on the perturbed rows of the batch only.

    The perturbed rows come from the context (``AttnContext.rows("perturbed")``), which the head-PAG
    pipelines and guider declare; with no perturbed branch the processor changes nothing, so it can stay
    installed on every module.

    Args:
        heads: a :class:`~diffusers_attn_ext.headset.HeadSet`, a ``{layer: [heads]}`` mapping (e.g.
            ``{"transformer_blocks.12": [3, 7]}``), the path of a head set JSON or the name of a preset
            (:func:`~diffusers_attn_ext.headset.preset_names`).
        alpha: interpolation weight u of Eq. 7 in [0, 1]: a scalar, or ``{layer: alpha or [alpha per head]}``.
        identity: ``"image"`` (diffusers' PAG treatment of text tokens) or ``"all"`` (the authors' code).
        dual_attention: a layer that names a block also perturbs the block's image-only self-attention beside
            its joint attention (``attn2``). Default False, as the authors' block forward, which passes
            the perturbation to ``attn`` only; a head set entry that names the ``attn2`` module itself is
            perturbed either way.
    """

    kernel = ()  # it changes outputs only

    def __init__(self, heads=None, alpha: float | Mapping[str, float | Sequence[float]] = 1.0, identity: str = "image",
                 dual_attention: bool = False):
        require("SoftPAGProcessor", heads=heads)
        self.identity = choice("identity", identity, IDENTITY_MODES)
        self.dual_attention = boolean("dual_attention", dual_attention)
        self.headset = as_headset(heads)
        self.alpha = per_head_alpha(self.headset, alpha)

    def layer_of(self, module_name: str | None) -> str | None:
        """The head set's layer that contains the attention module ``module_name``, or None. Computed on each call
        (a few string comparisons), not cached: a cache filled while torch.compile traces makes every block
        recompile."""
        if module_name is None:
            return None
        return next(
            (layer for layer in self.headset.layers if module_name == layer or module_name.startswith(layer + ".")),
            None,
        )

    def validate(self, transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        """Check the head set against ``transformer`` (ValueError for an unknown layer or head out of range);
        returns attention module name -> heads."""
        return self.headset.modules(transformer)

    def check_model(self, transformer: torch.nn.Module, family: str, modules: dict[str, torch.nn.Module]) -> None:
        """At install: every layer of the head set exists in ``transformer`` and its heads are in range."""
        super().check_model(transformer, family, modules)
        self.validate(transformer)

    def module_patterns(self, transformer: torch.nn.Module) -> list[str]:
        """``layers`` patterns for :func:`~diffusers_attn_ext.install` / ``installed`` that select exactly the
        attention modules of the head set in ``transformer`` (validated)."""
        return [f"^{re.escape(name)}$" for name in self.validate(transformer)]

    def applies_to(self, call: AttentionCall) -> bool:
        # perturbed rows first: without them (plain CFG forwards) the module name is never read, so that under
        # torch.compile no block guards on its name
        if call.context is None or not call.is_self_attention or not call.context.rows("perturbed"):
            return False
        layer = self.layer_of(call.module_name)
        if layer is None:
            return False
        return self.dual_attention or layer == call.module_name or not is_dual_attention(call)

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Blend the selected heads of the perturbed rows of ``out`` toward ``A^PAG V`` (in place)."""
        layer = self.layer_of(call.module_name)
        heads = self.headset.heads[layer]
        if heads[-1] >= call.heads:
            raise ValueError(
                f"heads[{layer!r}] has head index {heads[-1]}; "
                f"allowed range for {call.module_name}: 0..{call.heads - 1}"
            )
        if call.parallel is not None and self.identity == "image" and call.text is not None:
            raise ValueError(
                f"SoftPAGProcessor(identity='image') on {call.family} {call.kind} attention under diffusers' context "
                "parallelism is not supported (the image queries' identity map needs every rank's text keys); "
                "allowed there: identity='all', or sequences without text tokens"
            )
        rows = torch.tensor(call.context.rows("perturbed"), device=out.device)
        index = torch.tensor(heads, device=out.device)
        picked = [x.index_select(0, rows).index_select(2, index) for x in (call.query, call.key, call.value, out)]
        target = identity_target(call, *picked, identity=self.identity)
        alpha = torch.tensor(self.alpha[layer], dtype=target.dtype, device=out.device).view(1, 1, -1, 1)
        blended = torch.lerp(picked[3].to(target.dtype), target, alpha).to(out.dtype)
        perturbed = out.index_select(0, rows)
        perturbed[:, :, index] = blended
        out[rows] = perturbed
        return out

    def __repr__(self) -> str:
        return (f"SoftPAGProcessor(heads={dict(self.headset.heads)}, alpha={self.alpha}, identity={self.identity!r}, "
                f"dual_attention={self.dual_attention})")
