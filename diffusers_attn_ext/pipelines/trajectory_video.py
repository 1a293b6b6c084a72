"""Ready-made pipelines for trajectory control (DiTraj, arXiv 2509.21839): Wan and 3D-RoPE CogVideoX.

They are the diffusers pipelines (same components; ``from_pretrained`` and ``from_pipe`` work) whose
``__call__`` also takes a ``trajectory`` and DiTraj's settings. For the call only, in every transformer of the
pipeline (both experts of Wan 2.2 A14B, each on the steps it runs), composed after any method the user installed:

- :class:`~diffusers_attn_ext.processors.std_rope.STDRoPEProcessor` on the video self-attention of the
  first ``trajectory_rope_steps`` steps (both guidance branches, as the authors' code);
- with a foreground and a background prompt (Wan): on the conditional forwards of the first
  ``trajectory_mask_steps`` steps the text context becomes ``[background; foreground]`` (a transformer hook swaps it in, as the
  authors' loop does) and
  :class:`~diffusers_attn_ext.processors.fg_bg_guidance.ForegroundBackgroundCrossAttnProcessor` masks the
  cross-attention; the base prompt conditions the later steps.

No trajectory: the parent pipeline, unchanged; a DiTraj setting or a foreground/background prompt other than its
default is then a ValueError (it would be ignored). The settings' ranges are checked in every call.

torch.compile (fullgraph, whole transformer or ``compile_repeated_blocks``): STD-RoPE compiles as the stock
transformer does; each schedule that ends inside the loop adds one graph for its later phase (never one per step),
and the conditional forwards that get ``[background; foreground]`` have a graph of their own (another text length).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import CogVideoXPipeline, WanPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from ..context import _forward_kwargs
from ..install import installed, pipeline_transformers
from ..processors.fg_bg_guidance import DEFAULT_MASK_STEPS, ForegroundBackgroundCrossAttnProcessor
from ..processors.std_rope import DEFAULT_ROPE_STEPS, STDRoPEProcessor
from ..trajectory import Trajectory
from ..validation import boolean, integer, layer_patterns
from .arguments import deprecated_aliases, settings_need_input

FG_BG_HOOK_NAME = "diffusers_attn_ext.fg_bg_prompts"


class _SwapDecision(StateManager):
    """Receives the pipeline's cache context, outside any compiled region, and decides there whether the coming
    forward is a conditional one of a step < ``steps``: a compiled forward then reads one bool, never the step."""

    def __init__(self, steps: int):
        super().__init__(state_cls=None)
        self.steps, self.swap = steps, False

    def set_context(self, context) -> None:
        super().set_context(context)
        self.swap = (context is not None and context.name == "cond" and context.step_index is not None
                     and context.step_index < self.steps)


class _ForegroundBackgroundPromptHook(ModelHook):
    """Replaces the text of conditional forwards of steps < ``steps`` by ``[background; foreground]``."""

    _is_stateful = True  # receives the pipeline's cache context ("cond" / "uncond", step_index)

    def __init__(self, text: torch.Tensor, steps: int):
        super().__init__()
        self.text, self.steps = text, steps
        self.cache_context = _SwapDecision(steps)

    def pre_forward(self, module, *args, **kwargs):
        if not self.cache_context.swap:
            return args, kwargs
        kwargs = _forward_kwargs(module, args, kwargs)
        kwargs.pop("self", None)
        batch = kwargs["hidden_states"].shape[0]
        kwargs["encoder_hidden_states"] = self.text.to(kwargs["encoder_hidden_states"].dtype).expand(batch, -1, -1)
        return (), kwargs

    def reset_state(self, module):
        return module


class _TrajectoryCall:
    """The shared ``__call__``: check the trajectory, install DiTraj's processors, run the parent pipeline."""

    method_prefix = "trajectory"
    method_inputs = ("trajectory", "foreground_prompt", "background_prompt", "foreground_prompt_embeds",
                     "background_prompt_embeds")

    @deprecated_aliases(rope_steps="trajectory_rope_steps", isolate_duplicates="trajectory_isolate_duplicates",
                        mask_steps="trajectory_mask_steps")
    def __call__(self, *args, trajectory: Trajectory | None = None,
                 trajectory_rope_steps: int | None = DEFAULT_ROPE_STEPS, trajectory_isolate_duplicates: bool = True,
                 foreground_prompt: str | None = None, background_prompt: str | None = None,
                 foreground_prompt_embeds: torch.Tensor | None = None,
                 background_prompt_embeds: torch.Tensor | None = None,
                 trajectory_mask_steps: int = DEFAULT_MASK_STEPS, trajectory_layers: str | list[str] | None = None,
                 **kwargs):
        """The parent pipeline's call with DiTraj installed for it, in every transformer (both experts of a Wan 2.2
        A14B pipeline, each on the steps it runs).

        Args:
            trajectory: a :class:`~diffusers_attn_ext.trajectory.Trajectory` with one box per frame of this
                video (``num_frames`` boxes, drawn on ``width x height``); None: the plain pipeline.
            trajectory_rope_steps: STD-RoPE on steps ``0 .. trajectory_rope_steps - 1`` (authors: 5); None for
                every step.
            trajectory_isolate_duplicates: the authors' self-attention mask on those steps (default on).
            foreground_prompt, background_prompt (or ``*_prompt_embeds``): what is inside the box and what is
                around it; both or neither (Wan only).
            trajectory_mask_steps: foreground/background guidance on steps ``0 .. trajectory_mask_steps - 1``
                (authors: 30).
            trajectory_layers: attention modules to install on (``install``'s ``layers`` patterns); None:
                every module, as the authors.
            everything else: the parent pipeline's arguments.

        ``rope_steps``, ``isolate_duplicates`` and ``mask_steps`` are deprecated aliases of the ``trajectory_*``
        settings.
        """
        if trajectory is not None and not isinstance(trajectory, Trajectory):
            raise ValueError(f"trajectory must be a Trajectory or None, got {type(trajectory).__name__!r}")
        rope_steps = integer("trajectory_rope_steps", trajectory_rope_steps, 0, allow_none=True)
        mask_steps = integer("trajectory_mask_steps", trajectory_mask_steps, 0)
        isolate_duplicates = boolean("trajectory_isolate_duplicates", trajectory_isolate_duplicates)
        layer_patterns("trajectory_layers", trajectory_layers)
        if trajectory is None:  # every DiTraj argument acts on the trajectory: none may be silently ignored
            settings_need_input(_TrajectoryCall.__call__, "trajectory", {
                "trajectory_rope_steps": rope_steps, "trajectory_isolate_duplicates": isolate_duplicates,
                "trajectory_mask_steps": mask_steps, "trajectory_layers": trajectory_layers,
                "foreground_prompt": foreground_prompt, "background_prompt": background_prompt,
                "foreground_prompt_embeds": foreground_prompt_embeds,
                "background_prompt_embeds": background_prompt_embeds,
            }, "DiTraj")
            return super().__call__(*args, **kwargs)
        self.check_rope()
        # The parent's arguments by name, whether given by position or keyword.
        call_kwargs = inspect.signature(super().__call__).bind_partial(*args, **kwargs).arguments
        height = call_kwargs.get("height") or self.default_video_size()[0]
        width = call_kwargs.get("width") or self.default_video_size()[1]
        num_frames = call_kwargs.get("num_frames") or self.default_num_frames()
        trajectory.check_video(self.check_num_frames(num_frames, trajectory.num_frames), height, width)
        config = pipeline_transformers(self)[0].config  # the experts of a Wan 2.2 pipeline share their layout
        frame_stride = self.vae_scale_factor_temporal * (config.get("patch_size_t") or 1)
        processors = [STDRoPEProcessor(trajectory, rope_steps, frame_stride, isolate_duplicates)]
        text = self.foreground_background_text(foreground_prompt, background_prompt, foreground_prompt_embeds,
                                               background_prompt_embeds, call_kwargs)
        if text is not None:
            background, foreground = text
            processors.append(ForegroundBackgroundCrossAttnProcessor(
                trajectory, background.shape[1], foreground.shape[1], mask_steps, frame_stride))
        with installed(self, *processors, layers=trajectory_layers):
            if text is None:
                return super().__call__(*args, **kwargs)
            registries = [HookRegistry.check_if_exists_or_initialize(transformer)
                          for transformer in pipeline_transformers(self)]
            for registry in registries:  # each expert's conditional forwards of the first mask_steps steps
                registry.register_hook(_ForegroundBackgroundPromptHook(torch.cat(text, dim=1), mask_steps),
                                       FG_BG_HOOK_NAME)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                for registry in registries:
                    registry.remove_hook(FG_BG_HOOK_NAME, recurse=False)

    def check_rope(self) -> None:
        """ValueError when the transformer has no 3D RoPE. Default: it has (Wan)."""

    def default_video_size(self) -> tuple[int, int]:
        """(height, width) the parent pipeline uses when the call gives none."""
        return 480, 832

    def default_num_frames(self) -> int:
        """Frames the parent pipeline makes when the call gives no ``num_frames``."""
        return 81

    def check_num_frames(self, num_frames: int, boxes: int | None = None) -> int:
        """The frames the parent pipeline makes for ``num_frames`` (the trajectory, of ``boxes`` frames, needs one
        box for each); ValueError when it would round a request to a count the trajectory does not have.
        Default: any count is kept."""
        return num_frames

    def foreground_background_text(self, foreground_prompt, background_prompt, foreground_prompt_embeds,
                                   background_prompt_embeds, call_kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(background, foreground) text embeddings ``[B, L, C]``, or None when no split is given."""
        given = [x is not None for x in (foreground_prompt, background_prompt, foreground_prompt_embeds,
                                         background_prompt_embeds)]
        if not any(given):
            return None
        raise ValueError("foreground_prompt / background_prompt (and their embeddings) are supported by "
                         "WanTrajectoryPipeline only")


class WanTrajectoryPipeline(_TrajectoryCall, WanPipeline):
    """``WanPipeline`` (Wan2.1 and Wan 2.2 text-to-video; on A14B both experts) with DiTraj trajectory control.

    Extra ``__call__`` arguments: ``trajectory``, ``trajectory_rope_steps`` (5), ``trajectory_isolate_duplicates``
    (True), ``foreground_prompt`` / ``background_prompt`` or ``foreground_prompt_embeds`` /
    ``background_prompt_embeds``, ``trajectory_mask_steps`` (30), ``trajectory_layers`` (None: all). The authors
    run Wan2.1 at 50 steps, guidance 5, 81 frames of 832x480, UniPC with flow shift 3.
    """

    def foreground_background_text(self, foreground_prompt, background_prompt, foreground_prompt_embeds,
                                   background_prompt_embeds, call_kwargs):
        parts = []
        for name, prompt, embeds in (("background", background_prompt, background_prompt_embeds),
                                     ("foreground", foreground_prompt, foreground_prompt_embeds)):
            if prompt is not None and embeds is not None:
                raise ValueError(f"give either {name}_prompt or {name}_prompt_embeds, not both")
            if embeds is None and prompt is not None:
                embeds, _ = self.encode_prompt(
                    prompt, do_classifier_free_guidance=False, device=self._execution_device,
                    max_sequence_length=call_kwargs.get("max_sequence_length", 512),
                )
            parts.append(embeds)
        if (parts[0] is None) != (parts[1] is None):
            raise ValueError("give both a foreground and a background prompt (or prompt embeddings), or neither")
        if parts[0] is None:
            return None
        text_dim = pipeline_transformers(self)[0].config.text_dim
        for name, embeds in zip(("background_prompt_embeds", "foreground_prompt_embeds"), parts, strict=True):
            if embeds.dim() != 3 or embeds.shape[-1] != text_dim:
                raise ValueError(f"{name} of shape {tuple(embeds.shape)} must be [batch, tokens, {text_dim}]")
        if parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"background_prompt_embeds and foreground_prompt_embeds have batch sizes "
                             f"{parts[0].shape[0]} and {parts[1].shape[0]}")
        prompt, prompt_embeds = call_kwargs.get("prompt"), call_kwargs.get("prompt_embeds")
        if prompt is not None:
            prompts = 1 if isinstance(prompt, str) else len(prompt)
        else:
            prompts = prompt_embeds.shape[0] if prompt_embeds is not None else 1
        per_prompt = call_kwargs.get("num_videos_per_prompt") or 1
        text_batch = parts[0].shape[0]
        if text_batch not in (1, prompts):
            raise ValueError(
                f"the foreground/background prompts have batch size {text_batch} but the call has {prompts} "
                f"prompt(s) ({prompts * per_prompt} videos): give 1 or {prompts} foreground/background prompts"
            )
        if text_batch > 1:
            parts = [embeds.repeat_interleave(per_prompt, dim=0) for embeds in parts]
        return parts[0].to(self._execution_device), parts[1].to(self._execution_device)

    def check_num_frames(self, num_frames: int, boxes: int | None = None) -> int:
        """The frames WanPipeline makes for ``num_frames``; ValueError when it would round a request to a count
        other than the trajectory's ``boxes``.

        WanPipeline (diffusers 0.42.1, ``__call__``) keeps ``num_frames`` when ``num_frames % t == 1`` (``t`` the
        VAE's temporal factor ``vae_scale_factor_temporal``: ``num_frames - 1`` must be divisible by it) and
        otherwise makes ``num_frames // t * t + 1`` frames. With ``t = 4`` (Wan2.1) a request that is not
        ``4k + 1`` is refused; with no temporal compression (``t = 1``, the world model) the check
        ``num_frames % 1 != 1`` always holds, so ``num_frames`` makes ``num_frames + 1`` frames, and a trajectory of
        ``T`` frames needs ``num_frames = T - 1`` (``diffusers_attn_ext.world.wan_num_frames(T, pipe.vae)``)."""
        temporal = self.vae_scale_factor_temporal
        made = num_frames if num_frames % temporal == 1 else num_frames // temporal * temporal + 1
        rule = (f"WanPipeline makes num_frames // {temporal} * {temporal} + 1 frames unless num_frames % {temporal} "
                f"== 1, since num_frames - 1 must be divisible by the VAE's temporal factor "
                f"(vae_scale_factor_temporal={temporal})")
        if temporal == 1:
            if boxes is None or made == boxes:
                return made
            raise ValueError(
                f"num_frames={num_frames} makes {made} frames, not {num_frames}: {rule}; with factor 1 (no temporal "
                f"compression) every request gets one frame more. The trajectory has {boxes} boxes, one per frame: "
                f"pass num_frames={boxes - 1} for a {boxes}-frame trajectory (diffusers_attn_ext.world."
                f"wan_num_frames({boxes}, pipe.vae) gives it), or give a trajectory of {made} frames"
            )
        if made != num_frames:
            fix = (f"pass num_frames={boxes}, the trajectory's frame count" if boxes is not None
                   and boxes % temporal == 1 else f"draw the trajectory for {temporal}k + 1 frames and pass that count")
            raise ValueError(
                f"num_frames={num_frames} with a trajectory must be {temporal}k + 1 (WanPipeline would round it to "
                f"{made} frames: {rule}; the trajectory has one box per frame"
                + ("" if boxes is None else f", {boxes} boxes") + f"): {fix}"
            )
        return made


class CogVideoXTrajectoryPipeline(_TrajectoryCall, CogVideoXPipeline):
    """``CogVideoXPipeline`` with DiTraj's STD-RoPE, for checkpoints with 3D RoPE
    (``use_rotary_positional_embeddings=True``: CogVideoX-5B, 1.5); others raise a ValueError.

    Extra ``__call__`` arguments: ``trajectory``, ``trajectory_rope_steps`` (5), ``trajectory_isolate_duplicates``
    (True), ``trajectory_layers``. Foreground/background prompts are not supported on CogVideoX (its text and video
    share one joint attention; the authors' masking is defined for Wan's cross-attention).
    """

    def check_rope(self) -> None:
        if not self.transformer.config.get("use_rotary_positional_embeddings", False):
            raise ValueError(
                "trajectory control needs 3D RoPE, but this CogVideoX transformer has "
                "use_rotary_positional_embeddings=False (sin-cos positions; e.g. CogVideoX-2B): use CogVideoX-5B or 1.5"
            )

    def default_video_size(self) -> tuple[int, int]:
        scale = self.vae_scale_factor_spatial
        return self.transformer.config.sample_height * scale, self.transformer.config.sample_width * scale

    def default_num_frames(self) -> int:
        return self.transformer.config.sample_frames
