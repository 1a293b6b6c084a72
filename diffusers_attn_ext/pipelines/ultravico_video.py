"""Ready-made pipelines for video longer than trained: Wan and CogVideoX with UltraViCo.

They are the diffusers pipelines (same components; ``from_pretrained`` and ``from_pipe`` work) whose
``__call__`` also takes ``extrapolation_ratio`` (or a plain ``num_frames`` beyond training) and the
method's settings; UltraViCo is installed for the call only, in every transformer of the pipeline (both experts
of Wan 2.2 A14B), composed after any method the user has installed, and the processors are restored afterwards.
"""

from __future__ import annotations

from diffusers import CogVideoXPipeline, WanPipeline

from ..context import family_of_transformer
from ..install import installed, pipeline_transformers
from ..processors.ultravico import UltraViCoProcessor, default_train_frames
from ..validation import integer
from .arguments import deprecated_aliases, pipeline_argument_errors

PROCESSOR_ARGUMENTS = ("alpha", "train_frames", "restrict_first_frame", "center_keys", "stock_within_training")


class _UltraViCoCall:
    """The shared ``__call__``: resolve the length, install the processor, run the parent pipeline."""

    default_extrapolation_ratio: int = 3
    method_prefix = "ultravico"
    method_inputs = ("extrapolation_ratio",)

    @deprecated_aliases(train_frames="ultravico_train_frames", restrict_first_frame="ultravico_restrict_first_frame",
                        center_keys="ultravico_center_keys", stock_within_training="ultravico_stock_within_training")
    def __call__(self, *args, extrapolation_ratio: int | None = None, ultravico_alpha: float = 0.9,
                 ultravico_train_frames: int | None = None, ultravico_restrict_first_frame: bool = True,
                 ultravico_center_keys: bool = True, ultravico_stock_within_training: bool = False, **kwargs):
        """The parent pipeline's call, with UltraViCo installed for it (in every transformer: both experts of a
        Wan 2.2 A14B pipeline).

        Args:
            extrapolation_ratio: video length as a multiple of the training length (an integer >= 1); with
                neither this nor ``num_frames`` given, the class default (Wan 3, as the authors' script).
            ultravico_alpha, ultravico_train_frames, ultravico_restrict_first_frame, ultravico_center_keys,
                ultravico_stock_within_training: ``alpha``, ``train_frames``, ... of
                :class:`~diffusers_attn_ext.processors.ultravico.UltraViCoProcessor`. The names without the
                prefix (``train_frames``, ...) are deprecated aliases.
            everything else: the parent pipeline's arguments.
        """
        if extrapolation_ratio is not None and "num_frames" in kwargs:
            raise ValueError("give either extrapolation_ratio or num_frames, not both")
        with pipeline_argument_errors(self.method_prefix, PROCESSOR_ARGUMENTS):
            processor = UltraViCoProcessor(ultravico_alpha, ultravico_train_frames, ultravico_restrict_first_frame,
                                           ultravico_center_keys, ultravico_stock_within_training)
        if "num_frames" not in kwargs:
            ratio = self.default_extrapolation_ratio if extrapolation_ratio is None else extrapolation_ratio
            kwargs["num_frames"] = self.extrapolated_num_frames(ratio, processor.train_frames)
        with installed(self, processor):
            return super().__call__(*args, **kwargs)

    def extrapolated_num_frames(self, extrapolation_ratio: int, train_frames: int | None = None) -> int:
        """Frames for ``extrapolation_ratio`` times the training length, as the authors' script computes
        it for Wan: ``(21 * ratio - 1) * 4 + 1`` (latent frames, then the VAE's temporal compression)."""
        extrapolation_ratio = integer("extrapolation_ratio", extrapolation_ratio, 1)
        train_frames = integer("train_frames", train_frames, 1, allow_none=True)
        transformer = pipeline_transformers(self)[0]  # the experts of a Wan 2.2 pipeline share their config
        config = transformer.config
        trained = train_frames or default_train_frames(family_of_transformer(transformer), config)
        if trained is None:
            raise ValueError("the training length of this checkpoint is unknown: pass train_frames=... (latent frames)")
        latent_frames = trained * (config.get("patch_size_t") or 1) * extrapolation_ratio
        return (latent_frames - 1) * self.vae_scale_factor_temporal + 1


class WanUltraViCoPipeline(_UltraViCoCall, WanPipeline):
    """``WanPipeline`` with UltraViCo length extrapolation; by default 3x the 81 trained frames (249 frames; for
    Wan2.2-TI2V-5B 3x its 121). On a Wan 2.2 A14B pipeline both experts run UltraViCo.

    Extra ``__call__`` arguments: ``extrapolation_ratio``, ``ultravico_alpha`` (0.9), ``ultravico_train_frames``
    (latent frames; None: from the checkpoint), ``ultravico_restrict_first_frame`` (True), ``ultravico_center_keys``
    (True), ``ultravico_stock_within_training`` (False: as the authors, the rule acts at ``extrapolation_ratio=1``
    too).
    """


class CogVideoXUltraViCoPipeline(_UltraViCoCall, CogVideoXPipeline):
    """``CogVideoXPipeline`` with UltraViCo length extrapolation; CogVideoX trains on 13 latent frames, so the
    default ratio 2 gives 101 frames. Same extra arguments as :class:`WanUltraViCoPipeline`."""

    default_extrapolation_ratio = 2
