"""Saved ready-made pipelines reload through ``DiffusionPipeline.from_pretrained`` (the package registers
its classes on the ``diffusers`` module, where ``from_pretrained`` looks up ``model_index.json``'s class name) as their
own class, with their method defaults; a diffusers class still loads the folder as itself."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_attn_ext import pipelines
from diffusers_attn_ext.testing import PIPELINE_CLASSES, TEXT_COMPONENTS

READY_MADE = {
    "WanUltraViCoPipeline": "wan",
    "WanSparsePipeline": "wan",
    "WanTrajectoryPipeline": "wan",
    "CogVideoXUltraViCoPipeline": "cogvideox",
    "CogVideoXSparsePipeline": "cogvideox",
    "CogVideoXTrajectoryPipeline": "cogvideox",
    "FluxMultiSubjectPipeline": "flux",
    "StableDiffusion3MultiSubjectPipeline": "sd3",
    "FluxHeadPAGPipeline": "flux",
    "StableDiffusion3HeadPAGPipeline": "sd3",
}


def load(path, family, cls=DiffusionPipeline, **kwargs):
    return cls.from_pretrained(path, **kwargs, **dict.fromkeys(TEXT_COMPONENTS[family]))


@pytest.mark.parametrize("name", sorted(READY_MADE))
def test_diffusion_pipeline_from_pretrained_reloads_a_saved_ready_made_pipeline(tiny_pipes, name, tmp_path):
    family, cls = READY_MADE[name], getattr(pipelines, name)
    cls.from_pipe(tiny_pipes(family)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == name
    assert type(load(tmp_path, family)) is cls
    assert type(load(tmp_path, family, cls)) is cls
    base = PIPELINE_CLASSES[family]
    assert type(load(tmp_path, family, base)) is base


def test_head_pag_default_heads_survive_save_and_load(tiny_pipes, tmp_path):
    heads = {"transformer_blocks.1": [0]}
    pipe = pipelines.StableDiffusion3HeadPAGPipeline.from_pipe(tiny_pipes("sd3"), pag_heads=heads, pag_alpha=0.5)
    pipe.save_pretrained(tmp_path)
    loaded = load(tmp_path, "sd3")
    assert dict(loaded._pag_heads.heads) == {"transformer_blocks.1": (0,)} and loaded._pag_alpha == 0.5
    for module in loaded.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    assert loaded.softpag_processor() is not None
