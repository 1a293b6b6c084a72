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


def _register_with_diffusers() -> None:
    """Make each ready-made pipeline class an attribute of the ``diffusers`` module, as diffusers' own pipelines
    are: a saved folder's ``model_index.json`` names its class (``"_class_name": "WanUltraViCoPipeline"``), and
    ``DiffusionPipeline.from_pretrained`` looks that name up on ``diffusers``. So once this package is imported,
    ``DiffusionPipeline.from_pretrained(folder)`` returns the ready-made class, while loading with a diffusers class
    (``WanPipeline.from_pretrained(folder)``) still gives that class. Names diffusers has are never replaced."""
    import diffusers

    for name in __all__:
        if not hasattr(diffusers, name):
            setattr(diffusers, name, globals()[name])


_register_with_diffusers()
