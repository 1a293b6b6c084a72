"""Consistent multiple subjects across a batch of images (IR-Diffusion, arXiv 2411.19261) for FLUX.1 and SD3.

A call generates one image per prompt; the first prompt's image is the reference (generated in the same
batch, with stock attention) and the others are targets whose subjects attend the reference's subjects
through :class:`~diffusers_attn_ext.processors.isolation_reposition.IsolationRepositionProcessor`::

    pipe = FluxMultiSubjectPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    images = pipe(
        ["a corgi and a tabby cat, studio portrait", "the corgi and the tabby cat on a beach", ...],
        subject_boxes=[{"corgi": (0.05, 0.3, 0.45, 0.95), "cat": (0.55, 0.3, 0.95, 0.95)}, {...}, ...],
    ).images

``subject_boxes`` holds one ``{subject: (x0, y0, x1, y1)}`` per prompt (fractions of the image; a boolean
mask of any resolution works too); every subject must appear in every image and in every prompt string.
A call with subjects needs at least 2 prompts (the reference, then one or more targets): with one it would return
the reference only, so it is a ValueError. Without ``subject_boxes`` the pipeline is the stock one, and an ``ir_*``
setting other than its default is a ValueError (it would be ignored); the settings' ranges are checked in every
call, before any model work. Extra arguments (authors' defaults from
``DreamStory/pipe/pipe_test.py``): ``ir_start_step=0`` and ``ir_end_step=None`` (every step),
``ir_interpolation="nearest"``, ``ir_reference_dropout=0.5`` (``dropout``), ``ir_dropout_mode="queries"`` (what
``_dropout_mask`` drops: target subject tokens, which then attend no reference key), ``ir_dropout_seed``, and
``ir_layers`` (attention-module name patterns as ``install``'s ``layers``; default every layer, see
docs/ir-diffusion.md). Prompt embeddings work as in the parent pipelines (one row per image).

Under ``torch.compile`` pass ``ir_reference_dropout=0``: the dropout draws new token sets at every step, which a
compiled region cannot take (a ValueError says so); without it the call compiles as the stock pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from diffusers import FluxPipeline, StableDiffusion3Pipeline

from ..install import installed
from ..processors.isolation_reposition import IsolationRepositionProcessor
from ..subjects import SubjectLayout
from ..validation import integer, layer_patterns, schedule_length
from .arguments import pipeline_argument_errors, settings_need_input


class MultiSubjectMixin:
    """Builds the IR-Diffusion processor of a call and runs the parent pipeline with it installed."""

    method_prefix = "ir"
    method_inputs = ("subject_boxes",)

    def multi_subject_processor(
        self, subject_boxes: Sequence[Mapping[str, object]], prompt=None, prompt_embeds=None,
        num_images_per_prompt: int | None = 1, ir_start_step: int = 0, ir_end_step: int | None = None,
        ir_interpolation: str = "nearest", ir_reference_dropout: float = 0.5, ir_dropout_seed: int = 0,
        ir_dropout_mode: str = "queries",
    ) -> IsolationRepositionProcessor:
        """The processor a call with these arguments installs; ValueError when the batch does not match."""
        if num_images_per_prompt not in (None, 1):
            raise ValueError(
                f"num_images_per_prompt={num_images_per_prompt}: a multi-subject call makes one image per prompt "
                "(reference first); repeat the prompts instead"
            )
        if isinstance(subject_boxes, (str, bytes, Mapping)) or not isinstance(subject_boxes, Sequence):
            raise ValueError(f"subject_boxes={subject_boxes!r} is not allowed: give a list of one {{subject: box}} "
                             "mapping per prompt, reference first")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        images = len(prompts) if prompts is not None else (prompt_embeds.shape[0] if prompt_embeds is not None else 1)
        subjects = any(not (isinstance(boxes, Mapping) and len(boxes) == 0) for boxes in subject_boxes)
        if images < 2 and subjects:  # the batch would be the reference alone: nothing to make consistent
            given = f"prompt={prompt!r} is 1 prompt" if prompts is not None else (
                "prompt_embeds has 1 row" if prompt_embeds is not None else "no prompt is given")
            raise ValueError(
                f"{given}, but IR-Diffusion (subject_boxes) needs at least 2 prompts: the reference first, then one "
                "or more targets, with one subject_boxes entry each (with 1 the call would return the reference "
                "image only)"
            )
        if len(subject_boxes) != images:
            raise ValueError(
                f"subject_boxes has {len(subject_boxes)} entries for {images} images: give one per prompt, "
                "reference first"
            )
        layout = SubjectLayout.from_boxes(subject_boxes, prompts)
        with pipeline_argument_errors(self.method_prefix):  # start_step=... -> ir_start_step=...
            return IsolationRepositionProcessor(
                layout, start_step=ir_start_step, end_step=ir_end_step, interpolation=ir_interpolation,
                reference_dropout=ir_reference_dropout, dropout_seed=ir_dropout_seed, dropout_mode=ir_dropout_mode,
            )

    @staticmethod
    def ir_settings(**settings) -> dict[str, object]:
        """The ``ir_*`` settings in canonical form, range-checked by the processor's own checks (on a layout of
        no subjects, so that no ``subject_boxes`` are needed) with the pipeline's names; ValueError otherwise."""
        ir_layers = settings.pop("ir_layers")
        layers = layer_patterns("ir_layers", ir_layers)
        with pipeline_argument_errors(MultiSubjectMixin.method_prefix):  # start_step=... -> ir_start_step=...
            checked = IsolationRepositionProcessor(
                SubjectLayout.from_boxes([{}]), **{name.removeprefix("ir_"): value for name, value in settings.items()}
            )
        return {"ir_layers": None if layers is None else ir_layers,
                **{name: getattr(checked, name.removeprefix("ir_")) for name in settings}}

    def __call__(self, prompt=None, *, subject_boxes=None, ir_start_step: int = 0, ir_end_step: int | None = None,
                 ir_layers: str | list[str] | None = None, ir_interpolation: str = "nearest",
                 ir_reference_dropout: float = 0.5, ir_dropout_seed: int = 0, ir_dropout_mode: str = "queries",
                 **kwargs):
        """The parent pipeline's call with IR-Diffusion installed for it when ``subject_boxes`` is given (the
        ``ir_*`` arguments: see the module docstring); without it, the parent pipeline unchanged. The ``ir_*``
        ranges are checked in every call; without ``subject_boxes`` a non-default ``ir_*`` is a ValueError."""
        settings = self.ir_settings(ir_start_step=ir_start_step, ir_end_step=ir_end_step, ir_layers=ir_layers,
                                    ir_interpolation=ir_interpolation, ir_reference_dropout=ir_reference_dropout,
                                    ir_dropout_seed=ir_dropout_seed, ir_dropout_mode=ir_dropout_mode)
        steps = schedule_length(super().__call__, kwargs)
        if steps is not None and (subject_boxes is not None or settings["ir_start_step"] != 0):
            integer("ir_start_step", ir_start_step, 0, steps - 1)  # past the schedule every step would be stock
        if subject_boxes is None:
            settings_need_input(MultiSubjectMixin.__call__, "subject_boxes", settings, "IR-Diffusion")
            return super().__call__(prompt=prompt, **kwargs)
        processor = self.multi_subject_processor(
            subject_boxes, prompt, kwargs.get("prompt_embeds"), kwargs.get("num_images_per_prompt", 1),
            ir_start_step=ir_start_step, ir_end_step=ir_end_step, ir_interpolation=ir_interpolation,
            ir_reference_dropout=ir_reference_dropout, ir_dropout_seed=ir_dropout_seed, ir_dropout_mode=ir_dropout_mode,
        )
        with installed(self, processor, layers=ir_layers):
            return super().__call__(prompt=prompt, **kwargs)


class FluxMultiSubjectPipeline(MultiSubjectMixin, FluxPipeline):
    """``FluxPipeline`` with IR-Diffusion multi-subject consistency; see the module docstring."""


class StableDiffusion3MultiSubjectPipeline(MultiSubjectMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with IR-Diffusion multi-subject consistency; with classifier-free guidance
    the batch ``[negatives, prompts]`` holds two groups of images, each with its reference first."""
