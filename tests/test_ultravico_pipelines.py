"""WanUltraViCoPipeline / CogVideoXUltraViCoPipeline: loading, length, composition, restoring."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext import StockAttnProcessor, install
from diffusers_attn_ext.pipelines.ultravico_video import CogVideoXUltraViCoPipeline, WanUltraViCoPipeline
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor
from diffusers_attn_ext.testing import TEXT_COMPONENTS, tiny_call_kwargs

PIPELINES = {"wan": WanUltraViCoPipeline, "cogvideox": CogVideoXUltraViCoPipeline}


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_from_pipe_equals_installing_the_processor(family, pipe_for):
    pipe = pipe_for(family)
    ultra = PIPELINES[family].from_pipe(pipe)
    stock_processors = dict(pipe.transformer.attn_processors)
    kwargs = tiny_call_kwargs(family)
    out = ultra(**kwargs, ultravico_alpha=0.5, ultravico_train_frames=1)[0]
    assert all(pipe.transformer.attn_processors[n] is p for n, p in stock_processors.items())  # restored
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=1))
    assert torch.equal(torch.as_tensor(out), run(pipe, family))


def test_extrapolation_ratio_sets_num_frames(pipe_for):
    ultra = WanUltraViCoPipeline.from_pipe(pipe_for("wan"))
    assert ultra.extrapolated_num_frames(3) == 249  # the authors' (21 * 3 - 1) * 4 + 1
    assert ultra.extrapolated_num_frames(2, train_frames=2) == 13
    kwargs = tiny_call_kwargs("wan")
    del kwargs["num_frames"]
    frames = ultra(**kwargs, extrapolation_ratio=2, ultravico_train_frames=2)[0]
    assert frames.shape[1] == 13
    with pytest.raises(ValueError, match="either extrapolation_ratio or num_frames"):
        ultra(**tiny_call_kwargs("wan"), extrapolation_ratio=2)
    with pytest.raises(ValueError, match="extrapolation_ratio=0"):
        ultra.extrapolated_num_frames(0)


def test_composes_with_installed_methods_and_restores_them(pipe_for):
    pipe = pipe_for("wan")
    mine = StockAttnProcessor()
    install(pipe, mine)
    WanUltraViCoPipeline.from_pipe(pipe)(**tiny_call_kwargs("wan"), ultravico_train_frames=1)
    assert all(p is mine for p in pipe.transformer.attn_processors.values())


def test_save_and_from_pretrained(pipe_for, tmp_path):
    pipe_for("wan").save_pretrained(tmp_path)
    loaded = WanUltraViCoPipeline.from_pretrained(tmp_path, **dict.fromkeys(TEXT_COMPONENTS["wan"]))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, WanUltraViCoPipeline)
    out = loaded(**tiny_call_kwargs("wan"), ultravico_train_frames=1)[0]
    assert torch.isfinite(torch.as_tensor(out)).all()
