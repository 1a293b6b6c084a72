"""enable_sparse_attention and the ready-made sparse pipelines: install, restore, loading, bad input."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext import uninstall
from diffusers_attn_ext.pipelines.sparse_video import CogVideoXSparsePipeline, WanSparsePipeline
from diffusers_attn_ext.processors.adaptive_sparse import AdaptiveSparseProcessor
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor
from diffusers_attn_ext.sparse import enable_sparse_attention
from diffusers_attn_ext.testing import load_tiny_pipeline, tiny_call_kwargs

WAN_LARGER = dict(height=64, width=64, num_frames=17)  # 5 latent frames of 4x4 tokens


def processors(pipe):
    return dict(pipe.transformer.attn_processors)


def test_enable_sparse_attention_installs_and_uninstalls(pipe_for):
    pipe = pipe_for("wan")
    stock = run(pipe, "wan", **WAN_LARGER)
    processor = enable_sparse_attention(pipe, "radial", dense_layers=1, block_size=16)
    assert isinstance(processor, RadialSparseProcessor) and processor.dense_layers == 1
    sparse = run(pipe, "wan", **WAN_LARGER)
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, stock)
    uninstall(pipe)
    assert torch.equal(run(pipe, "wan", **WAN_LARGER), stock)


def test_adaptive_density_one_matches_stock(pipe_for):
    pipe = pipe_for("wan")
    stock = run(pipe, "wan", **WAN_LARGER)
    processor = enable_sparse_attention(pipe, "adaptive", density=1.0, dense_steps=0, block_size=16)
    assert isinstance(processor, AdaptiveSparseProcessor)
    torch.testing.assert_close(run(pipe, "wan", **WAN_LARGER), stock, atol=1e-4, rtol=0)


def test_rettention_through_enable_sparse_attention_and_the_pipeline(pipe_for):
    from diffusers_attn_ext.processors.rettention import RettentionProcessor

    pipe = pipe_for("wan")
    stock = run(pipe, "wan", **WAN_LARGER)
    processor = enable_sparse_attention(pipe, "rettention", density=0.2, refresh_steps=1, block_size=16)
    assert isinstance(processor, RettentionProcessor) and processor.density == 0.2 and processor.dense_steps == 0
    sparse = run(pipe, "wan", **WAN_LARGER)
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, stock)
    uninstall(pipe)
    assert torch.equal(run(pipe, "wan", **WAN_LARGER), stock)
    sparse_pipe = WanSparsePipeline.from_pipe(pipe)
    sparse_pipe.set_progress_bar_config(disable=True)
    via_pipeline = sparse_pipe(**tiny_call_kwargs("wan", **WAN_LARGER), sparse_method="rettention",
                               sparse_density=0.2, sparse_options={"refresh_steps": 1, "block_size": 16})[0]
    torch.testing.assert_close(torch.as_tensor(via_pipeline), sparse, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="sliding"), r"method='sliding' is not one of \('radial', 'adaptive', 'rettention'\)"),
        (dict(method="radial", density=0.5), r"density=0.5 is not a parameter of method='radial'"),
        (dict(method="adaptive", density=2.0), r"density=2.0 is outside the allowed range \(0, 1\]"),
        (dict(method="adaptive", dense_steps=-1), r"dense_steps=-1 is outside the allowed range"),
    ],
)
def test_bad_input(pipe_for, kwargs, message):
    with pytest.raises(ValueError, match=message):
        enable_sparse_attention(pipe_for("wan"), **kwargs)


def test_wan_sparse_pipeline_from_pipe(pipe_for):
    base = pipe_for("wan")
    enable_sparse_attention(base, "radial", block_size=16)
    expected = run(base, "wan", **WAN_LARGER)
    uninstall(base)
    before = processors(base)
    pipe = WanSparsePipeline.from_pipe(base)
    out = pipe(**tiny_call_kwargs("wan", **WAN_LARGER), sparse_options={"block_size": 16}).frames
    assert torch.equal(torch.as_tensor(out), expected)  # same computation as installing by hand
    assert processors(pipe) == before  # restored after the call
    plain = pipe(**tiny_call_kwargs("wan", **WAN_LARGER), sparse_method=None).frames
    assert torch.equal(torch.as_tensor(plain), run(base, "wan", **WAN_LARGER))


def test_sparse_pipeline_save_and_load(pipe_for, tmp_path):
    pipe_for("wan").save_pretrained(tmp_path)
    pipe = WanSparsePipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, WanSparsePipeline)
    out = pipe(**tiny_call_kwargs("wan"), sparse_method="adaptive", sparse_density=0.5,
               sparse_options={"block_size": 4}).frames
    assert torch.isfinite(torch.as_tensor(out)).all()
    pipe.save_pretrained(tmp_path / "sparse")
    assert type(load_tiny_pipeline("wan", tmp_path / "sparse")).__name__ == "WanPipeline"


def test_cogvideox_sparse_pipeline(pipe_for):
    pipe = CogVideoXSparsePipeline.from_pipe(pipe_for("cogvideox"))
    out = pipe(**tiny_call_kwargs("cogvideox", height=64, width=64, num_frames=17), sparse_method="adaptive",
               sparse_density=0.5, sparse_dense_steps=1, sparse_options={"block_size": 8}).frames
    assert torch.isfinite(torch.as_tensor(out)).all()
