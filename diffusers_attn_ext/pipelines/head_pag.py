"""Head-level perturbation guidance (HeadHunter / SoftPAG, arXiv 2506.10978) for SD3 and FLUX.1.

Guidance combines as in diffusers' PAG pipelines (``pipelines/pag/pag_utils.py``), batch
``[uncond, cond, perturbed]``::

    eps = eps_uncond + cfg (eps_cond - eps_uncond) + pag (eps_cond - eps_perturbed)      (SD3, CFG)
    eps = eps_cond + pag (eps_cond - eps_perturbed)                                      (FLUX, distilled)

with ``pag = max(0, pag_scale - pag_adaptive_scale (1000 - t))``. The perturbed rows run
:class:`~diffusers_attn_ext.processors.softpag.SoftPAGProcessor` on the heads of ``pag_heads`` with weight
``pag_alpha`` (Eq. 7); every other row and head is the stock computation.

- :class:`StableDiffusion3HeadPAGPipeline` is diffusers' ``StableDiffusion3PAGPipeline`` with head sets in
  place of ``pag_applied_layers``: same batch, same guidance code, SoftPAG instead of PAG's layer processor.
- :class:`FluxHeadPAGPipeline` is ``FluxPipeline`` with a transformer hook that runs each conditional forward
  on the batch ``[cond, perturbed]`` and returns the guided prediction. With true CFG
  (``true_cfg_scale > 1`` and a negative prompt) the hook applies ``pag / true_cfg_scale``, so the pipeline's
  ``uncond + true_cfg (cond' - uncond)`` is the three-term formula above.
- :class:`HeadPerturbedAttentionGuidance` is the same guidance as a guider for modular diffusers (its
  perturbed pass labels its rows "perturbed").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3PAGPipeline,
)
from diffusers.guiders import PerturbedAttentionGuidance
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..context import _forward_kwargs, attach_context
from ..headset import HeadSet, as_headset
from ..install import installed
from ..processors.softpag import IDENTITY_MODES, SoftPAGProcessor
from ..validation import boolean, choice, real
from .arguments import pipeline_argument_errors

PAG_HOOK_NAME = "diffusers_attn_ext.head_pag"
AlphaSpec = float | Mapping[str, float | Sequence[float]]


class HeadPAGMixin:
    """Default head set and alpha of a head-PAG pipeline (``pag_heads`` / ``pag_alpha`` of ``__init__``),
    overridable per call; diffusers' ``set_pag_applied_layers`` becomes :meth:`set_pag_heads`."""

    method_prefix = "pag"
    method_inputs = ()

    def set_pag_heads(self, pag_heads: HeadSet | Mapping | str | None, pag_alpha: AlphaSpec = 1.0) -> None:
        """Set the default head set (a HeadSet, ``{layer: [heads]}``, a JSON path or a preset name) and alpha;
        ValueError, before anything is set, when they do not fit each other or this transformer."""
        headset = None if pag_heads is None else as_headset(pag_heads, "pag_heads")
        if headset is not None and len(headset):
            softpag_with_pag_names(headset, pag_alpha).validate(self.transformer)
        elif as_number_or_mapping(pag_alpha):
            real("pag_alpha", pag_alpha, 0.0, 1.0)
        self._pag_heads = headset
        self._pag_alpha = pag_alpha
        # in model_index.json, so that a saved pipeline reloads with its defaults (from_pretrained passes them back)
        heads = None if headset is None else {layer: list(heads) for layer, heads in headset.heads.items()}
        self.register_to_config(pag_heads=heads, pag_alpha=pag_alpha)

    def softpag_processor(self, pag_heads=None, pag_alpha: AlphaSpec | None = None, pag_identity: str = "image",
                          pag_dual_attention: bool = False):
        """The SoftPAG processor of a call (the defaults where an argument is None), or None without heads;
        ValueError when the head set does not fit this transformer, or for a bad argument (heads or not)."""
        choice("pag_identity", pag_identity, IDENTITY_MODES)
        boolean("pag_dual_attention", pag_dual_attention)
        heads = self._pag_heads if pag_heads is None else as_headset(pag_heads, "pag_heads")
        if heads is None or not len(heads):
            return None
        processor = softpag_with_pag_names(heads, self._pag_alpha if pag_alpha is None else pag_alpha, pag_identity,
                                           pag_dual_attention)
        processor.validate(self.transformer)
        return processor


def softpag_with_pag_names(heads, alpha, identity: str = "image", dual_attention: bool = False) -> SoftPAGProcessor:
    """``SoftPAGProcessor(heads, alpha, identity, dual_attention)`` whose ValueErrors name the pipelines' arguments
    (``pag_alpha``, ``pag_identity``, ``pag_dual_attention``)."""
    with pipeline_argument_errors("pag", ("alpha", "identity", "dual_attention")):
        return SoftPAGProcessor(heads, alpha, identity, dual_attention)


def as_number_or_mapping(alpha) -> bool:
    """Whether ``alpha`` is a scalar to check on its own (a mapping or per-head list needs a head set)."""
    return not isinstance(alpha, (Mapping, Sequence)) or isinstance(alpha, str)


def guidance_scales(kwargs: dict, pag_scale_default: float = 3.0) -> tuple[float, float]:
    """``pag_scale`` and ``pag_adaptive_scale`` of a call (diffusers' defaults 3.0 and 0.0 when absent), each a
    finite number >= 0: a negative or NaN scale would silently turn guidance off, an infinite one give NaN."""
    return (real("pag_scale", kwargs.get("pag_scale", pag_scale_default), 0.0),
            real("pag_adaptive_scale", kwargs.get("pag_adaptive_scale", 0.0), 0.0))


class StableDiffusion3HeadPAGPipeline(HeadPAGMixin, StableDiffusion3PAGPipeline):
    """diffusers' ``StableDiffusion3PAGPipeline`` with SoftPAG on a head set instead of PAG on whole layers.

    Extra ``__call__`` arguments: ``pag_heads`` (a HeadSet, ``{layer: [heads]}``, a head set JSON path or a preset
    name of :func:`~diffusers_attn_ext.headset.preset_names`; default the one given to ``__init__``),
    ``pag_alpha`` (u of Eq. 7, scalar or per head), ``pag_identity`` ("image" as diffusers' PAG, "all" as
    the authors' code), ``pag_dual_attention`` (False, as the authors: a named SD3.5 block perturbs its joint
    attention, not ``attn2``); ``pag_scale`` and ``pag_adaptive_scale`` as in diffusers. No head set or
    ``pag_scale=0`` is the plain pipeline.
    """

    # Annotated like the parent: ``from_pipe`` and ``from_pretrained`` match components by these types.
    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 vae: AutoencoderKL, text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                 text_encoder_2: CLIPTextModelWithProjection, tokenizer_2: CLIPTokenizer,
                 text_encoder_3: T5EncoderModel, tokenizer_3: T5TokenizerFast, pag_heads=None,
                 pag_alpha: AlphaSpec = 1.0):
        super().__init__(transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         text_encoder_3, tokenizer_3, pag_applied_layers=[])
        self.set_pag_heads(pag_heads, pag_alpha)

    def __call__(self, *args, pag_heads=None, pag_alpha: AlphaSpec | None = None, pag_identity: str = "image",
                 pag_dual_attention: bool = False, **kwargs):
        kwargs["pag_scale"], kwargs["pag_adaptive_scale"] = guidance_scales(kwargs)
        processor = self.softpag_processor(pag_heads, pag_alpha, pag_identity, pag_dual_attention)
        # PAGMixin runs PAG when pag_scale > 0 and pag_applied_layers is not empty.
        self.pag_applied_layers = list(processor.headset.layers) if processor is not None else []
        if processor is None:
            return super().__call__(*args, **kwargs)
        # Installed for the call; it acts only once _set_pag_attn_processor has labelled the perturbed rows.
        with installed(self, processor, layers=processor.module_patterns(self.transformer)):
            try:
                return super().__call__(*args, **kwargs)
            finally:
                attach_context(self).set_branch_labels(None)

    def _set_pag_attn_processor(self, pag_applied_layers, do_classifier_free_guidance):
        """Called by the parent's ``__call__`` after it built the batch [uncond, cond, cond] (or [cond, cond])."""
        labels = ("uncond", "cond", "perturbed") if do_classifier_free_guidance else ("cond", "perturbed")
        attach_context(self).set_branch_labels(labels)


class _PerturbedBranchHook(ModelHook):
    """Runs each conditional FLUX forward on ``[cond, perturbed]`` and returns the guided prediction."""

    _is_stateful = True  # receives the pipeline's cache context ("cond" / "uncond")
    BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")

    def __init__(self, context, pag_scale: float, pag_adaptive_scale: float, divisor: float):
        super().__init__()
        self.context = context
        self.pag_scale, self.pag_adaptive_scale, self.divisor = pag_scale, pag_adaptive_scale, divisor
        self.cache_context = StateManager(None)
        self._scale = None

    def pre_forward(self, module, *args, **kwargs):
        cache = self.cache_context._context
        if cache is not None and cache.name == "uncond":
            self._scale = None
            return args, kwargs
        kwargs = _forward_kwargs(module, args, kwargs)
        kwargs.pop("self", None)
        t = float(kwargs["timestep"].flatten()[0]) * 1000  # FluxPipeline passes t / 1000
        self._scale = max(0.0, self.pag_scale - self.pag_adaptive_scale * (1000 - t)) / self.divisor
        for name in self.BATCHED:
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = torch.cat([kwargs[name], kwargs[name]])
        self.context.set_branch_labels(("cond", "perturbed"))
        return (), kwargs

    def post_forward(self, module, output):
        if self._scale is None:
            return output
        self.context.set_branch_labels(None)
        prediction = output[0] if isinstance(output, tuple) else output.sample
        cond, perturbed = prediction.chunk(2)
        guided = cond + self._scale * (cond - perturbed)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def reset_state(self, module):
        return module


class FluxHeadPAGPipeline(HeadPAGMixin, FluxPipeline):
    """``FluxPipeline`` with head-level perturbation guidance; arguments as in
    :class:`StableDiffusion3HeadPAGPipeline` (``pag_scale``, ``pag_adaptive_scale``, ``pag_heads``,
    ``pag_alpha``, ``pag_identity``). Layers are "transformer_blocks.i" (double) and
    "single_transformer_blocks.j" (single blocks)."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder: CLIPVisionModelWithProjection = None,
                 feature_extractor: CLIPImageProcessor = None, pag_heads=None, pag_alpha: AlphaSpec = 1.0):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        self.set_pag_heads(pag_heads, pag_alpha)

    def __call__(self, *args, pag_scale: float = 3.0, pag_adaptive_scale: float = 0.0, pag_heads=None,
                 pag_alpha: AlphaSpec | None = None, pag_identity: str = "image", **kwargs):
        pag_scale, pag_adaptive_scale = guidance_scales(
            {"pag_scale": pag_scale, "pag_adaptive_scale": pag_adaptive_scale})
        processor = self.softpag_processor(pag_heads, pag_alpha, pag_identity)
        if processor is None or pag_scale == 0:
            return super().__call__(*args, **kwargs)
        has_negative = kwargs.get("negative_prompt") is not None or (
            kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None
        )
        true_cfg_scale = kwargs.get("true_cfg_scale", 1.0)
        divisor = true_cfg_scale if true_cfg_scale > 1 and has_negative else 1.0
        with installed(self, processor, layers=processor.module_patterns(self.transformer)):
            context = attach_context(self)  # registered before the hook below, so it sees the doubled batch
            registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
            registry.register_hook(_PerturbedBranchHook(context, pag_scale, pag_adaptive_scale, divisor), PAG_HOOK_NAME)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                registry.remove_hook(PAG_HOOK_NAME, recurse=False)
                context.set_branch_labels(None)


class HeadPerturbedAttentionGuidance(PerturbedAttentionGuidance):
    """diffusers' ``PerturbedAttentionGuidance`` guider (modular diffusers) with SoftPAG on a head set.

    Its passes are [cond, uncond, perturbed] (or [cond, perturbed] without CFG), as in diffusers; the
    perturbed pass installs SoftPAG on the head set and labels its rows "perturbed". Guidance, with diffusers'
    guider conventions: ``uncond + guidance_scale (cond - uncond) + perturbed_guidance_scale (cond - perturbed)``;
    without CFG ``perturbed + s (cond - perturbed)``, or the pipelines' ``cond + s (cond - perturbed)`` with
    ``use_original_formulation=True`` (then ``guidance_scale=0`` turns CFG off). PAG is active on the steps
    between ``perturbed_guidance_start`` and ``perturbed_guidance_stop`` (fractions of the steps).
    """

    ignore_for_config = ["perturbed_guidance_layers", "perturbed_guidance_config"]

    def __init__(self, pag_heads, pag_alpha: AlphaSpec = 1.0, pag_identity: str = "image", guidance_scale: float = 7.0,
                 perturbed_guidance_scale: float = 3.0, perturbed_guidance_start: float = 0.0,
                 perturbed_guidance_stop: float = 1.0, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 pag_dual_attention: bool = False):
        guidance_scale = real("guidance_scale", guidance_scale)
        perturbed_guidance_scale = real("perturbed_guidance_scale", perturbed_guidance_scale, 0.0)
        perturbed_guidance_start = real("perturbed_guidance_start", perturbed_guidance_start, 0.0, 1.0)
        perturbed_guidance_stop = real("perturbed_guidance_stop", perturbed_guidance_stop, perturbed_guidance_start, 1.0)
        guidance_rescale = real("guidance_rescale", guidance_rescale, 0.0, 1.0)
        start, stop = real("start", start, 0.0, 1.0), real("stop", stop, 0.0, 1.0)
        use_original_formulation = boolean("use_original_formulation", use_original_formulation)
        enabled = boolean("enabled", enabled)
        super().__init__(guidance_scale, perturbed_guidance_scale, perturbed_guidance_start, perturbed_guidance_stop,
                         perturbed_guidance_config=[], guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        self.processor = softpag_with_pag_names(as_headset(pag_heads, "pag_heads"), pag_alpha, pag_identity,
                                                pag_dual_attention)
        self.register_to_config(pag_heads=dict(self.processor.headset.heads), pag_alpha=pag_alpha,
                                pag_identity=pag_identity, pag_dual_attention=pag_dual_attention)
        self._installation = ExitStack()

    def _passes(self) -> list[tuple[int, str]]:
        """(input tuple index, prediction) per pass. diffusers 0.42's guider feeds the perturbed pass the
        negative inputs (tuple index 1) when CFG is off; the perturbed pass is conditional, index 0."""
        if self.num_conditions == 1:
            return [(0, "pred_cond")]
        if self.num_conditions == 2:
            return [(0, "pred_cond"), (1, "pred_uncond") if self._is_cfg_enabled() else (0, "pred_cond_skip")]
        return [(0, "pred_cond"), (1, "pred_uncond"), (0, "pred_cond_skip")]

    def prepare_inputs(self, data):
        return [self._prepare_batch(data, index, prediction) for index, prediction in self._passes()]

    def prepare_inputs_from_block_state(self, data, input_fields):
        return [self._prepare_batch_from_block_state(input_fields, data, index, prediction)
                for index, prediction in self._passes()]

    def _is_slg_enabled(self) -> bool:
        """PAG is active on steps ``start <= i < stop`` (diffusers' guider excludes the start step)."""
        if not self._enabled or self.skip_layer_guidance_scale == 0:
            return False
        if self._num_inference_steps is None:
            return True
        start = int(self.skip_layer_guidance_start * self._num_inference_steps)
        return start <= self._step < int(self.skip_layer_guidance_stop * self._num_inference_steps)

    def _is_perturbed_pass(self) -> bool:
        """The perturbed pass is the last prepared one when PAG is active."""
        return self._is_slg_enabled() and self.num_conditions > 1 and self._count_prepared == self.num_conditions

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._is_perturbed_pass():
            self._installation.enter_context(
                installed(denoiser, self.processor, layers=self.processor.module_patterns(denoiser))
            )
            attach_context(denoiser).set_branch_labels(("perturbed",))

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._is_perturbed_pass():
            attach_context(denoiser).set_branch_labels(None)
            self._installation.close()
