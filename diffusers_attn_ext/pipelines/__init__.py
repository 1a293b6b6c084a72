"""Ready-made pipelines: diffusers pipelines whose __call__ takes a method's arguments."""

from .head_pag import FluxHeadPAGPipeline, HeadPerturbedAttentionGuidance, StableDiffusion3HeadPAGPipeline
from .multi_subject import FluxMultiSubjectPipeline, StableDiffusion3MultiSubjectPipeline
from .sparse_video import CogVideoXSparsePipeline, WanSparsePipeline
from .trajectory_video import CogVideoXTrajectoryPipeline, WanTrajectoryPipeline
from .ultravico_video import CogVideoXUltraViCoPipeline, WanUltraViCoPipeline

__all__ = [
    "CogVideoXSparsePipeline",
    "CogVideoXTrajectoryPipeline",
    "CogVideoXUltraViCoPipeline",
    "FluxHeadPAGPipeline",
    "FluxMultiSubjectPipeline",
    "HeadPerturbedAttentionGuidance",
    "StableDiffusion3HeadPAGPipeline",
    "StableDiffusion3MultiSubjectPipeline",
    "WanSparsePipeline",
    "WanTrajectoryPipeline",
    "WanUltraViCoPipeline",
]
