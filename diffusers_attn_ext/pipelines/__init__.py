"""Ready-made pipelines: diffusers pipelines whose __call__ takes a method's arguments."""

from .head_pag import FluxHeadPAGPipeline, HeadPerturbedAttentionGuidance, StableDiffusion3HeadPAGPipeline
from .ultravico_video import CogVideoXUltraViCoPipeline, WanUltraViCoPipeline

__all__ = [
    "CogVideoXUltraViCoPipeline",
    "FluxHeadPAGPipeline",
    "HeadPerturbedAttentionGuidance",
    "StableDiffusion3HeadPAGPipeline",
    "WanUltraViCoPipeline",
]
