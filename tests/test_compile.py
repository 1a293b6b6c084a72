"""torch.compile(fullgraph=True) over a whole CFG denoising loop: equal to eager, one graph per region.

Backend "eager" (dynamo traces, no codegen) is enough on CPU: what breaks fullgraph or recompiles is the tracing.
Two 4-step CFG generations run compiled; the first must make as many graphs as the stock transformer does
(:data:`STOCK_GRAPHS`) and the second none, so no step, branch, module or generation recompiles.
"""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

from diffusers_attn_ext import install, uninstall
from diffusers_attn_ext.context import get_context
from diffusers_attn_ext.pipelines import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline
from diffusers_attn_ext.processors import (
    AdaptiveSparseProcessor,
    EntropyScalingProcessor,
    RadialSparseProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)
from diffusers_attn_ext.testing import tiny_call_kwargs

# Graphs the stock transformer compiles into. Regional compile (diffusers' ``compile_repeated_blocks``) exists for
# FLUX and Wan only; FLUX's stock double blocks compile twice (the first block's input has other strides).
STOCK_GRAPHS = {"whole": 1, ("regional", "wan"): 1, ("regional", "flux"): 3}

METHODS = {
    "stock": (("sd3", "flux", "cogvideox", "wan"), StockAttnProcessor),
    "entropy": (("sd3", "flux"), lambda: EntropyScalingProcessor(train_tokens=8)),
    "ultravico": (("cogvideox", "wan"), lambda: UltraViCoProcessor(alpha=0.9, train_frames=1)),
    "radial": (("cogvideox", "wan"), lambda: RadialSparseProcessor(block_size=16)),
    "adaptive": (("wan",), lambda: AdaptiveSparseProcessor(density=0.5, block_size=16, cache_steps=1)),
}
CASES = [
    pytest.param(family, mode, name, id=f"{name}-{family}-{mode}")
    for name, (families, _) in METHODS.items()
    for family in families
    for mode in ("whole", "regional")
    if mode == "whole" or family in ("flux", "wan")
]


def generate(pipe, family):
    kwargs = tiny_call_kwargs(family, num_inference_steps=4)
    if family == "flux":
        kwargs["true_cfg_scale"] = 2.0  # FLUX's CFG: separate cond and uncond forwards
    return torch.as_tensor(pipe(**kwargs)[0])


def compiled(pipe, mode, counter):
    """Compile ``pipe.transformer`` in place; returns a function that undoes it."""
    transformer = pipe.transformer
    if mode == "whole":
        pipe.transformer = torch.compile(transformer, backend=counter, fullgraph=True)
    else:
        transformer.compile_repeated_blocks(backend=counter, fullgraph=True)

    def undo():
        pipe.transformer = transformer
        for module in transformer.modules():
            module._compiled_call_impl = None

    return undo


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.set_num_threads(1)
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize(("family", "mode", "name"), CASES)
def test_compiled_cfg_loop_equals_eager_with_one_graph_per_region(pipe_for, family, mode, name):
    pipe = pipe_for(family)
    install(pipe, METHODS[name][1]())
    eager = generate(pipe, family)
    counter = CompileCounter()
    undo = compiled(pipe, mode, counter)
    try:
        first = generate(pipe, family)
        graphs = counter.frame_count
        second = generate(pipe, family)
    finally:
        undo()
    assert graphs == STOCK_GRAPHS.get((mode, family), STOCK_GRAPHS.get(mode))
    assert counter.frame_count == graphs, "the second generation recompiled"
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "cls"), [("sd3", StableDiffusion3HeadPAGPipeline), ("flux", FluxHeadPAGPipeline)])
def test_compiled_head_pag_pipeline_equals_eager_with_one_graph(tiny_pipes, family, cls):
    """SoftPAG through the head-PAG pipeline (a perturbed branch in the batch, the context attached per call)."""
    pipe = cls.from_pipe(tiny_pipes(family), pag_heads={"transformer_blocks.1": [0]})

    def generate_pag():
        return torch.as_tensor(pipe(**tiny_call_kwargs(family, num_inference_steps=4), pag_scale=2.0)[0])

    eager = generate_pag()
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
    first, second = generate_pag(), generate_pag()
    assert counter.frame_count == 1
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)


def test_install_and_uninstall_on_a_compiled_transformer_both_ways_round(pipe_for):
    pipe = pipe_for("wan")
    stock = generate(pipe, "wan")
    processor = UltraViCoProcessor(alpha=0.5, train_frames=1)
    install(pipe, processor)
    expected = generate(pipe, "wan")
    uninstall(pipe)
    transformer = pipe.transformer
    try:
        pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)  # compile, then install
        install(pipe, processor)
        assert transformer.blocks[0].attn1.processor is processor and get_context(transformer.blocks[0].attn1)
        torch.testing.assert_close(generate(pipe, "wan"), expected, rtol=0, atol=1e-6)
        uninstall(pipe)
        assert not isinstance(transformer.blocks[0].attn1.processor, UltraViCoProcessor)
        torch.testing.assert_close(generate(pipe, "wan"), stock, rtol=0, atol=1e-6)
        pipe.transformer = transformer
        install(pipe, processor)  # install, then compile, then uninstall through the compiled module
        pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)
        uninstall(pipe)
        assert get_context(transformer.blocks[0].attn1) is None
        torch.testing.assert_close(generate(pipe, "wan"), stock, rtol=0, atol=1e-6)
    finally:
        pipe.transformer = transformer


def test_step_dependent_method_in_a_compiled_whole_sd3_says_the_step_is_unknown(pipe_for):
    pipe = pipe_for("sd3")
    install(pipe, StockAttnProcessor())
    transformer = pipe.transformer
    try:
        pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)
        generate(pipe, "sd3")
        with pytest.raises(ValueError, match="denoising step is unknown"):
            get_context(transformer.transformer_blocks[0].attn).step_index  # noqa: B018
    finally:
        pipe.transformer = transformer


def test_a_method_with_a_dense_phase_compiles_a_bounded_number_of_graphs_once(pipe_for):
    """``dense_steps=2``: the step decides the phase, so dynamo compiles per phase (step 0 specialised, then the
    step dynamic, then the sparse phase): three graphs in the first generation, none in the next."""
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16, dense_steps=2))
    eager = generate(pipe, "wan")
    counter = CompileCounter()
    undo = compiled(pipe, "whole", counter)
    try:
        first = generate(pipe, "wan")
        graphs = counter.frame_count
        second = generate(pipe, "wan")
    finally:
        undo()
    assert graphs <= 3 and counter.frame_count == graphs
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)
