"""torch.compile(fullgraph=True) over a whole CFG denoising loop: equal to eager, one graph per region.

Backend "eager" (dynamo traces, no codegen) is enough on CPU: what breaks fullgraph or recompiles is the tracing.
Two 4-step CFG generations run compiled; the first must make as many graphs as the stock transformer does
(:data:`STOCK_GRAPHS`) and the second none, so no step, branch, module or generation recompiles.

Every method: stock, entropy scaling, UltraViCo, radial, adaptive (installed; Re-ttention in tests/test_rettention.py),
composed methods,
DiTraj (STD-RoPE and foreground/background guidance through the trajectory pipeline), IR-Diffusion (through the
multi-subject pipelines) and SoftPAG (through the head-PAG pipelines). Where a method's schedule or inputs change
within a generation the graphs are bounded and counted exactly (one per phase, one per input shape); what cannot
compile says so (IR-Diffusion's reference dropout, Re-ttention's carried statistics: tests/test_rettention.py).
"""

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

from diffusers_attn_ext import install, uninstall
from diffusers_attn_ext.context import AttnContext, get_context
from diffusers_attn_ext.pipelines import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline
from diffusers_attn_ext.pipelines.multi_subject import FluxMultiSubjectPipeline, StableDiffusion3MultiSubjectPipeline
from diffusers_attn_ext.pipelines.trajectory_video import WanTrajectoryPipeline
from diffusers_attn_ext.processors import (
    AdaptiveSparseProcessor,
    EntropyScalingProcessor,
    RadialSparseProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)
from diffusers_attn_ext.testing import TEXT_DIM, TEXT_SEQ_LEN, tiny_call_kwargs, tiny_pipeline
from diffusers_attn_ext.trajectory import Trajectory

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Graphs the stock transformer compiles into. Regional compile (diffusers' ``compile_repeated_blocks``) exists for
# FLUX and Wan only; FLUX's stock double blocks compile twice (the first block's input has other strides).
STOCK_GRAPHS = {"whole": 1, ("regional", "wan"): 1, ("regional", "flux"): 3}

METHODS = {
    "stock": (("sd3", "flux", "cogvideox", "wan"), StockAttnProcessor),
    "entropy": (("sd3", "flux"), lambda: EntropyScalingProcessor(train_tokens=8)),
    "ultravico": (("cogvideox", "wan"), lambda: UltraViCoProcessor(alpha=0.9, train_frames=1)),
    "radial": (("cogvideox", "wan"), lambda: RadialSparseProcessor(block_size=16)),
    "adaptive": (("wan",), lambda: AdaptiveSparseProcessor(density=0.5, block_size=16, cache_steps=1)),
    "ultravico+radial": (("wan",), lambda: (UltraViCoProcessor(alpha=0.9, train_frames=1),
                                            RadialSparseProcessor(block_size=16))),
}
CASES = [
    pytest.param(family, mode, name, id=f"{name}-{family}-{mode}")
    for name, (families, _) in METHODS.items()
    for family in families
    for mode in ("whole", "regional")
    if mode == "whole" or (family in ("flux", "wan") and "+" not in name)  # composed: whole only (time)
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
    methods = METHODS[name][1]()
    install(pipe, *(methods if isinstance(methods, tuple) else (methods,)))
    assert_compiles_as_stock(pipe, family, mode, lambda: generate(pipe, family))


def compiled_generations(pipe, mode, generate_fn):
    """(eager output, first compiled output, graphs of the first compiled generation, second compiled output,
    graphs after it)."""
    eager = generate_fn()
    counter = CompileCounter()
    undo = compiled(pipe, mode, counter)
    try:
        first = generate_fn()
        graphs = counter.frame_count
        second = generate_fn()
    finally:
        undo()
    return eager, first, graphs, second, counter.frame_count


def assert_compiles_as_stock(pipe, family, mode, generate_fn, graphs=None):
    """Compiled equals eager; the first generation makes ``graphs`` graphs (default: the stock count), the second
    none."""
    eager, first, made, second, total = compiled_generations(pipe, mode, generate_fn)
    assert made == (graphs if graphs is not None else STOCK_GRAPHS.get((mode, family), STOCK_GRAPHS.get(mode)))
    assert total == made, "the second generation recompiled"
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)


def test_step_windows_reach_a_compiled_region_as_one_flag_per_phase():
    """``AttnContext.in_steps`` reads flags the eager bookkeeping keeps per threshold, never the step: a window
    ending inside the loop makes one graph per phase (a read of the step would specialise step 0, then recompile)."""
    context = AttnContext(family="wan")
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def scheduled(x):
        return x * 2 if context.in_steps(1, 5) else x + 1

    outputs = []
    for step in range(8):
        context.step_index = step  # eagerly, as the context hook does
        outputs.append(scheduled(torch.zeros(1)).item())
    assert outputs == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert counter.frame_count == 3  # before, inside, after the window
    far = [AttnContext(family="wan", step_index=step).in_steps(1500, None) for step in (1499, 1500)]
    assert far == [False, True]  # past the kept thresholds: compared with the step itself


# ---- DiTraj: STD-RoPE and foreground/background guidance through WanTrajectoryPipeline ----------------------------
SIZE = {"height": 64, "width": 64}  # 9 frames: 3 latent frames of 4x4 tokens
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


def split_embeds():
    generator = torch.Generator().manual_seed(1)
    return {"background_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=generator),
            "foreground_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN // 2, TEXT_DIM, generator=generator)}


def trajectory_generation(traj, **extra):
    return lambda: torch.as_tensor(traj(**tiny_call_kwargs("wan", num_inference_steps=4, **SIZE), trajectory=MOVING,
                                        **extra)[0])


def trajectory_pipe(pipe):
    traj = WanTrajectoryPipeline.from_pipe(pipe)
    traj.set_progress_bar_config(disable=True)
    return traj


@pytest.mark.parametrize("mode", ["whole", "regional"])
def test_std_rope_compiles_as_stock(pipe_for, mode):
    """STD-RoPE (its default 5 steps cover the 4-step loop) with the duplicate isolation (the rows path): its plan
    enters the graph as constants, its step window as the context's flags."""
    traj = trajectory_pipe(pipe_for("wan"))
    assert_compiles_as_stock(traj, "wan", mode, trajectory_generation(traj))


@pytest.mark.parametrize("mode", ["whole"])
def test_std_rope_composed_with_ultravico_compiles_as_stock(pipe_for, mode):
    """Composed (UltraViCo installed, STD-RoPE added by the pipeline): the isolation is a score_mod over constant
    token groups."""
    pipe = pipe_for("wan")
    install(pipe, UltraViCoProcessor(alpha=0.9, train_frames=1))
    traj = trajectory_pipe(pipe)
    assert_compiles_as_stock(traj, "wan", mode, trajectory_generation(traj))


def test_ditraj_schedules_compile_one_graph_per_phase_and_text(pipe_for):
    """Bounded, counted graphs: STD-RoPE and foreground/background guidance on steps 0-1 of 4. A step schedule that
    ends inside the loop compiles once per phase (never per step); while the guidance acts, the conditional forwards
    get another text ([background; foreground], 24 tokens, against the unconditional 16), so they have a graph of
    their own: cond and uncond of steps 0-1, then both branches of steps 2-3 (stock), 3 graphs."""
    traj = trajectory_pipe(pipe_for("wan"))
    generation = trajectory_generation(traj, trajectory_rope_steps=2, trajectory_mask_steps=2, **split_embeds())
    assert_compiles_as_stock(traj, "wan", "whole", generation, graphs=3)


# ---- IR-Diffusion through the multi-subject pipelines -------------------------------------------------------------
BOXES = [{"dog": (0.0, 0.25, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)},
         {"dog": (0.5, 0.0, 1.0, 0.5), "cat": (0.0, 0.5, 0.25, 1.0)}]
MULTI_SUBJECT = {"flux": FluxMultiSubjectPipeline, "sd3": StableDiffusion3MultiSubjectPipeline}


def multi_subject_generation(pipe, family, **extra):
    cfg = {"true_cfg_scale": 2.0} if family == "flux" else {}
    return lambda: torch.as_tensor(pipe(subject_boxes=BOXES, **tiny_call_kwargs(
        family, batch_size=2, num_inference_steps=4, **cfg), **extra)[0])


@pytest.mark.parametrize(("family", "mode"), [("sd3", "whole"), ("flux", "whole"), ("flux", "regional")])
def test_isolation_reposition_without_dropout_compiles_as_stock(tiny_pipes, family, mode):
    """Its plans (subject tokens, repositioned keys) enter the graph as constants; every step, so no step is read."""
    pipe = MULTI_SUBJECT[family].from_pipe(tiny_pipes(family))
    pipe.set_progress_bar_config(disable=True)
    assert_compiles_as_stock(pipe, family, mode, multi_subject_generation(pipe, family, ir_reference_dropout=0.0))


@pytest.mark.parametrize("mode", ["whole", "regional"])
def test_the_attention_inspector_under_compile_says_so(pipe_for, mode):
    """It records statistics into Python containers per layer and step: refused under compile, with the reason
    (before, dynamo failed on a data-dependent ``aten.equal`` deep inside the statistics)."""
    from diffusers_attn_ext.inspect import AttentionInspector

    pipe = pipe_for("wan")
    install(pipe, AttentionInspector())
    undo = compiled(pipe, mode, "eager")
    try:
        with pytest.raises(Exception, match="AttentionInspector records each call's attention statistics"):
            generate(pipe, "wan")
    finally:
        undo()


def test_isolation_reposition_with_reference_dropout_under_compile_says_so(tiny_pipes):
    """The authors' dropout draws new token sets (of data-dependent sizes) at every step: refused under compile."""
    pipe = FluxMultiSubjectPipeline.from_pipe(tiny_pipes("flux"))
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)
    try:
        with pytest.raises(Exception, match=r"reference_dropout=0.5\) draws new token sets at every step"):
            multi_subject_generation(pipe, "flux", ir_reference_dropout=0.5)()
    finally:
        pipe.transformer = transformer


@pytest.mark.parametrize(("family", "cls", "mode", "graphs"), [
    ("sd3", StableDiffusion3HeadPAGPipeline, "whole", 1),
    ("flux", FluxHeadPAGPipeline, "whole", 1),
    ("flux", FluxHeadPAGPipeline, "regional", STOCK_GRAPHS[("regional", "flux")] + 1),
])
def test_compiled_head_pag_pipeline_equals_eager_with_one_graph(tiny_pipes, family, cls, mode, graphs):
    """SoftPAG through the head-PAG pipeline (a perturbed branch in the batch, the context attached per call).
    Regional: the block whose heads are perturbed runs another processor, so it has a graph of its own (one per
    layer of the head set; the others share the stock graphs)."""
    pipe = cls.from_pipe(tiny_pipes(family), pag_heads={"transformer_blocks.1": [0]})
    pipe.set_progress_bar_config(disable=True)

    def generate_pag():
        return torch.as_tensor(pipe(**tiny_call_kwargs(family, num_inference_steps=4), pag_scale=2.0)[0])

    assert_compiles_as_stock(pipe, family, mode, generate_pag, graphs=graphs)


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


def test_a_method_with_a_dense_phase_compiles_one_graph_per_phase(pipe_for):
    """``dense_steps=2``: the step decides the phase, read as a phase flag (``AttnContext.in_steps``), never as
    the step: two graphs in the first generation (dense phase, sparse phase), none in the next."""
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16, dense_steps=2))
    assert_compiles_as_stock(pipe, "wan", "whole", lambda: generate(pipe, "wan"), graphs=2)


@pytest.mark.parametrize(("name", "make", "graphs"), [
    ("adaptive, first block dense", lambda: AdaptiveSparseProcessor(density=0.25, dense_layers=1, cache_steps=1,
                                                                    block_size=16), 2),
    # the authors' schedule (generation.py): block 0 dense; blocks 1-5 dense in the first 2 steps, sparse after
    ("radial, authors' schedule", lambda: RadialSparseProcessor(decay_factor=0.2, dense_steps=2, dense_layers=1,
                                                                block_size=16), 3),
])
def test_dense_first_blocks_compile_regionally_one_graph_per_kind_of_block(name, make, graphs):
    """Regional compile shares one code object among the blocks: ``dense_layers`` is read as a per-module flag
    (``AttentionCall.in_first_blocks``), so the blocks compile by kind (dense first blocks, sparse ones, and per
    phase), not one graph per block (a guard on the module's name did that: six blocks, six graphs, and with a
    dense phase dynamo's recompile limit, the failure the H200 run of generation.py hit on 30 blocks)."""
    pipe, _ = tiny_pipeline("wan", transformer_config={"num_layers": 6})
    install(pipe, make())
    assert_compiles_as_stock(pipe, "wan", "regional", lambda: generate(pipe, "wan"), graphs=graphs)


def test_a_compiled_radial_transformer_generates_a_second_length_and_a_new_decay(pipe_for):
    """Another frame count on the compiled transformer (dynamo makes the length dynamic, which a trace-time
    constant table could not follow: it failed so before the table became an operator) and a reinstalled radial
    with another decay factor: both run and equal eager."""
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16))
    lengths = (9, 13, 17)
    eager = [torch.as_tensor(pipe(**tiny_call_kwargs("wan", num_inference_steps=2, num_frames=n))[0]) for n in lengths]
    undo = compiled(pipe, "regional", "eager")
    try:
        for n, expected in zip(lengths, eager, strict=True):
            out = torch.as_tensor(pipe(**tiny_call_kwargs("wan", num_inference_steps=2, num_frames=n))[0])
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        install(pipe, RadialSparseProcessor(block_size=16, decay_factor=0.5))
        compiled_out = generate(pipe, "wan")
    finally:
        undo()
    torch.testing.assert_close(compiled_out, generate(pipe, "wan"), rtol=0, atol=1e-6)


def test_the_radial_table_is_a_constant_of_the_compiled_graph_not_traced(pipe_for):
    """The radial rule's Python loop over frame pairs runs inside one opaque operator, not in the graph: the
    compiled graph's size does not grow with the number of frames (177 operations at 3 and at 9 latent frames,
    against 381 and 861 when the loop was traced; StockAttnProcessor's graph has 112)."""
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16))
    counts = []
    for frames in (9, 33):  # 3 and 9 latent frames: 9 and 81 frame pairs
        dynamo.reset()
        counter = CompileCounter()
        undo = compiled(pipe, "regional", counter)
        try:
            pipe(**tiny_call_kwargs("wan", num_inference_steps=1, num_frames=frames))
        finally:
            undo()
        counts.append(counter.op_count)
    assert counts[0] == counts[1] and counts[0] < 2 * 112, counts
