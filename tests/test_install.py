"""install / uninstall: layer selection, composition, and bad input."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext import AttnExtProcessor, ComposedProcessor, StockAttnProcessor, install, uninstall
from diffusers_attn_ext.families import adapter_for
from diffusers_attn_ext.install import select_modules


class ScaleOutput(AttnExtProcessor):
    """Test method: multiplies the attention output by a constant."""

    def __init__(self, factor):
        self.factor = factor

    def edit_output(self, call, out):
        return out * self.factor


def test_layers_pattern_selects_like_pag_applied_layers(pipe_for):
    transformer = pipe_for("wan").transformer
    names = set(select_modules(transformer, "blocks.1"))
    assert names == {"blocks.1.attn1", "blocks.1.attn2"}
    assert set(select_modules(transformer, ["blocks.0.attn1", "blocks.1.attn2"])) == {"blocks.0.attn1", "blocks.1.attn2"}
    assert len(select_modules(transformer, None)) == len(transformer.attn_processors)


def test_install_on_selected_layers_only(pipe_for):
    pipe = pipe_for("wan")
    stock = dict(pipe.transformer.attn_processors)
    install(pipe, StockAttnProcessor(), layers="blocks.0.attn1")
    processors = pipe.transformer.attn_processors
    changed = {name for name in processors if processors[name] is not stock[name]}
    assert changed == {"blocks.0.attn1.processor"}


def test_composition_runs_stages_in_order(pipe_for, stock_outputs):
    pipe = pipe_for("flux")
    composed = install(pipe, ScaleOutput(2.0), ScaleOutput(0.5))
    assert isinstance(composed, ComposedProcessor) and [m.factor for m in composed.methods] == [2.0, 0.5]
    assert torch.equal(run(pipe, "flux"), stock_outputs("flux"))  # x2 then x0.5 is exact in float32
    uninstall(pipe)
    install(pipe, ScaleOutput(1.5))
    assert not torch.equal(run(pipe, "flux"), stock_outputs("flux"))


def test_uninstall_after_two_installs_restores_the_first_processors(pipe_for):
    pipe = pipe_for("sd3")
    stock = dict(pipe.transformer.attn_processors)
    install(pipe, StockAttnProcessor())
    install(pipe, ScaleOutput(1.0), layers="transformer_blocks.0")
    uninstall(pipe)
    assert all(pipe.transformer.attn_processors[name] is stock[name] for name in stock)


def test_bad_input_errors(pipe_for):
    pipe = pipe_for("sd3")
    with pytest.raises(ValueError, match="layers pattern 'blocks.99' matches no attention module"):
        install(pipe, StockAttnProcessor(), layers="blocks.99")
    with pytest.raises(ValueError, match="got an object of type 'str'"):
        install(pipe, "softpag")
    with pytest.raises(ValueError, match="at least one processor"):
        install(pipe)
    with pytest.raises(ValueError, match="neither a diffusers pipeline"):
        install(42, StockAttnProcessor())
    with pytest.raises(ValueError, match="ComposedProcessor takes diffusers_attn_ext processors, got 'int'"):
        ComposedProcessor(StockAttnProcessor(), 3)
    with pytest.raises(ValueError, match="attention module of type 'Linear' is not supported"):
        adapter_for(torch.nn.Linear(2, 2), None, False)
    with pytest.raises(ValueError, match="transformer class 'Linear' is not supported"):
        install(torch.nn.Linear(2, 2), StockAttnProcessor())


def test_install_after_set_attention_backend_keeps_the_backend(pipe_for):
    pipe = pipe_for("wan")
    pipe.transformer.set_attention_backend("native")
    try:
        backend = next(iter(pipe.transformer.attn_processors.values()))._attention_backend
        assert backend is not None
        install(pipe, StockAttnProcessor())
        assert {p._attention_backend for p in pipe.transformer.attn_processors.values()} == {backend}
    finally:
        uninstall(pipe)
        pipe.transformer.reset_attention_backend()
    assert all(p._attention_backend is None for p in pipe.transformer.attn_processors.values())


def test_a_processor_reused_elsewhere_does_not_keep_the_last_backend(pipe_for):
    pipe = pipe_for("wan")
    processor = StockAttnProcessor()
    pipe.transformer.set_attention_backend("native")
    try:
        install(pipe, processor)
        assert processor._attention_backend is not None
    finally:
        uninstall(pipe)
        pipe.transformer.reset_attention_backend()
    install(pipe, processor)  # the stock processors have no backend set now
    assert processor._attention_backend is None
