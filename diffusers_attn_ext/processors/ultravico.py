"""UltraViCo: video length extrapolation by damping attention beyond the training window.

Paper: "UltraViCo: Breaking Extrapolation Limits in Video Diffusion Transformers" (arXiv 2511.20123);
the authors' attention kernel (thu-ml/DiT-Extrapolation). In every video self-attention, on the scaled logits
s = q.k / sqrt(d), a positive logit of a pair farther apart than half the training window is multiplied by
alpha, and first-frame queries do not attend to keys beyond the training length (see
:func:`diffusers_attn_ext.masks.ultravico_score_mod` for the exact rule). As in the authors' kernel, the rule
acts whatever the video length: a video at or below the training length still has pairs farther apart than
half the window (only the first-frame rule needs a longer video).

The rule reaches the kernel layer twice: as a FlexAttention score_mod and as the same function in the fused
kernels' form (:func:`~diffusers_attn_ext.masks.ultravico_rule`), which they run when it is the only score change.
"""

from __future__ import annotations

from ..call import AttentionCall
from ..families import adapter_named
from ..masks import ExtrapolationWindow, ultravico_rule, ultravico_score_mod
from ..parallel import sequence_mean
from ..validation import boolean, integer, real
from .base import AttnExtProcessor


def default_train_frames(family: str, config) -> int | None:
    """Latent frames a checkpoint of ``family`` was trained on, from its transformer config (None if unknown):
    what the config records, else the family's checkpoint lines
    (:meth:`~diffusers_attn_ext.families.base.FamilyAdapter.trained_latent_frames`)."""
    return adapter_named(family).trained_latent_frames(config)


class UltraViCoProcessor(AttnExtProcessor):
    """Constant decay on attention to tokens beyond the training window (video self-attention only).

    Args:
        alpha: factor on positive logits of far pairs, in (0, 1]; the authors' default 0.9.
        train_frames: latent frames of the training window (after temporal patching); None takes the
            checkpoint's (:func:`default_train_frames`): what its config records (``_trained_latent_frames``,
            as the shipped world video model's 9), else its family's released checkpoints'.
        restrict_first_frame: first-frame queries attend only inside the training length (authors: on).
        center_keys: apply the rule to logits against mean-centred keys, q.(k - mean k) / sqrt(d), as the
            authors' kernel does (SageAttention smooths K by its mean over the sequence before the logits,
            and their sign test and alpha act on those logits). Unmodified attention is invariant to the
            centring; the method is not: off, the rule acts on the raw logits q.k / sqrt(d) as the paper's
            formula reads. Default on, matching the released code.
        stock_within_training: at or below the training length, run stock attention instead of the rule.
            Default off, as the authors' kernel, whose far-pair test has no length condition: installed, it
            damps every pair farther than W/2 apart, so a video at the trained length (W/2 tokens of W) is
            changed too. On, the method acts only when the video is longer than trained (the behaviour of this
            package before; not the authors').

    The processor is the identity (stock attention, stock kernel) where no pair is far (a video of at
    most W/2 + 1 tokens), with ``stock_within_training=True`` at or below the training length, and at
    ``alpha=1`` with ``restrict_first_frame=False``.
    """

    media = ("video",)
    context_parallel = "global"
    kernel = ("score_mod",)

    def __init__(
        self, alpha: float = 0.9, train_frames: int | None = None, restrict_first_frame: bool = True,
        center_keys: bool = True, stock_within_training: bool = False,
    ):
        self.alpha = real("alpha", alpha, 0.0, 1.0, low_open=True)
        self.train_frames = integer("train_frames", train_frames, 1, allow_none=True)
        self.restrict_first_frame = boolean("restrict_first_frame", restrict_first_frame)
        self.center_keys = boolean("center_keys", center_keys)
        self.stock_within_training = boolean("stock_within_training", stock_within_training)

    def check_model(self, transformer, family: str, modules) -> None:
        """At install: a video family, and a training length (given, or known for the checkpoint)."""
        super().check_model(transformer, family, modules)
        if self.train_frames is None and default_train_frames(family, transformer.config) is None:
            raise ValueError(
                "train_frames=None and the training length of this checkpoint is unknown: pass "
                "UltraViCoProcessor(train_frames=...) in latent frames (an integer >= 1)"
            )

    def applies_to(self, call: AttentionCall) -> bool:
        return call.is_self_attention and not (self.alpha == 1.0 and not self.restrict_first_frame)

    def window(self, call: AttentionCall) -> ExtrapolationWindow:
        """The training window of this call, from the context's grid and the training length."""
        grid = call.require_grid(self)
        train_frames = self.train_frames
        if train_frames is None:
            train_frames = default_train_frames(call.family, call.context.config)
        if train_frames is None:
            raise ValueError(
                "train_frames=None and the training length of this checkpoint is unknown: pass "
                "UltraViCoProcessor(train_frames=...) in latent frames"
            )
        return ExtrapolationWindow(
            frame_tokens=grid.tokens_per_frame, train_frames=train_frames,
            video_start=call.visual.start, video_tokens=grid.num_tokens,
        )

    def edit_attention(self, call: AttentionCall) -> None:
        window = self.window(call)
        has_far_pair = window.video_tokens - 1 > window.half_window  # token counts: Python ints, no tensor read
        if not has_far_pair or (self.stock_within_training and not window.extrapolates):
            return
        if self.center_keys:  # the mean over the whole sequence, all ranks' keys under context parallelism
            mean = sequence_mean(call.key, call.parallel, window.video_tokens)
            call.key = call.key - mean.to(call.key.dtype)
        call.add_score_mod(ultravico_score_mod(window, self.alpha, self.restrict_first_frame),
                           rule=ultravico_rule(window, self.alpha, self.restrict_first_frame))

    def __repr__(self) -> str:
        return (
            f"UltraViCoProcessor(alpha={self.alpha}, train_frames={self.train_frames}, "
            f"restrict_first_frame={self.restrict_first_frame}, center_keys={self.center_keys}, "
            f"stock_within_training={self.stock_within_training})"
        )
