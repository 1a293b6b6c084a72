"""Ready-made pipelines: diffusers pipelines whose __call__ takes a method's arguments."""

from .head_pag import FluxHeadPAGPipeline, HeadPerturbedAttentionGuidance, StableDiffusion3HeadPAGPipeline
from .sparse_video import CogVideoXSparsePipeline, WanSparsePipeline
from .ultravico_video import CogVideoXUltraViCoPipeline, WanUltraViCoPipeline

__all__ = [
    "CogVideoXSparsePipeline",
    "CogVideoXUltraViCoPipeline",
    "FluxHeadPAGPipeline",
    "HeadPerturbedAttentionGuidance",
    "StableDiffusion3HeadPAGPipeline",
    "WanSparsePipeline",
    "WanUltraViCoPipeline",
]
