"""StockAttnProcessor installed everywhere equals diffusers' stock processors exactly, in every family."""

import torch
from conftest import run

from diffusers_attn_ext import StockAttnProcessor, install, uninstall
from diffusers_attn_ext.testing import load_tiny_pipeline


def test_install_everywhere_equals_stock_and_uninstall_restores(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    before = dict(pipe.transformer.attn_processors)
    install(pipe, StockAttnProcessor())
    assert all(isinstance(p, StockAttnProcessor) for p in pipe.transformer.attn_processors.values())
    out = run(pipe, family)
    assert torch.equal(out, stock_outputs(family))
    uninstall(pipe)
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_diffusers_way_set_attn_processor_equals_stock(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    before = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(StockAttnProcessor())
    try:
        assert torch.equal(run(pipe, family), stock_outputs(family))
    finally:
        pipe.transformer.set_attn_processor(before)


def test_save_and_load_then_install(family, pipe_for, stock_outputs, tmp_path):
    pipe_for(family).save_pretrained(tmp_path)
    loaded = load_tiny_pipeline(family, str(tmp_path))
    loaded_stock = run(loaded, family)
    # Same weights, but memory-mapped safetensors can take other CPU GEMM paths: equal up to float32 rounding.
    torch.testing.assert_close(loaded_stock, stock_outputs(family), rtol=0, atol=1e-5)
    install(loaded, StockAttnProcessor())
    assert torch.equal(run(loaded, family), loaded_stock)
    uninstall(loaded)
