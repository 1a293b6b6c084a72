"""Head-PAG pipelines and guider: parity with diffusers' SD3 PAG pipeline, identity settings, loading."""

import pytest
import torch
from conftest import run
from diffusers import FluxPipeline, StableDiffusion3PAGPipeline
from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
    StableDiffusion3T2ICoreDenoiseStep,
)

from diffusers_attn_ext import StockAttnProcessor, install
from diffusers_attn_ext.context import attach_context
from diffusers_attn_ext.install import installed
from diffusers_attn_ext.pipelines.head_pag import (
    PAG_HOOK_NAME,
    FluxHeadPAGPipeline,
    HeadPerturbedAttentionGuidance,
    StableDiffusion3HeadPAGPipeline,
    _PerturbedBranchHook,
)
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor
from diffusers_attn_ext.testing import TEXT_COMPONENTS, tiny_call_kwargs

HEAD_PAG = {"sd3": StableDiffusion3HeadPAGPipeline, "flux": FluxHeadPAGPipeline}


def head_pag(tiny_pipes, family, **kwargs):
    pipe = HEAD_PAG[family].from_pipe(tiny_pipes(family), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_alpha_one_on_every_head_of_a_layer_equals_diffusers_sd3_pag(tiny_pipes, stock_outputs, layer, guidance_scale):
    """The strongest check: diffusers' own StableDiffusion3PAGPipeline on the same components and seed, with
    CFG (batch [uncond, cond, perturbed]) and without (batch [cond, perturbed])."""
    name = f"transformer_blocks.{layer}"
    diffusers_pag = StableDiffusion3PAGPipeline.from_pipe(tiny_pipes("sd3"), pag_applied_layers=[name])
    diffusers_pag.set_progress_bar_config(disable=True)
    expected = run(diffusers_pag, "sd3", pag_scale=3.0, guidance_scale=guidance_scale)
    ours = run(head_pag(tiny_pipes, "sd3"), "sd3", pag_heads={name: [0, 1]}, pag_alpha=1.0, pag_scale=3.0,
               guidance_scale=guidance_scale)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert (expected - run(tiny_pipes("sd3"), "sd3", guidance_scale=guidance_scale)).abs().max() > 1e-3  # PAG acts


def test_diffusers_parity_holds_with_adaptive_scale(tiny_pipes):
    layers = ["transformer_blocks.0"]
    diffusers_pag = StableDiffusion3PAGPipeline.from_pipe(tiny_pipes("sd3"), pag_applied_layers=layers)
    diffusers_pag.set_progress_bar_config(disable=True)
    expected = run(diffusers_pag, "sd3", pag_scale=3.0, pag_adaptive_scale=0.004, num_inference_steps=3)
    ours = run(head_pag(tiny_pipes, "sd3", pag_heads={"transformer_blocks.0": [0, 1]}), "sd3", pag_scale=3.0,
               pag_adaptive_scale=0.004, num_inference_steps=3)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_identity_settings_equal_the_plain_pipeline(tiny_pipes, stock_outputs, family):
    heads = {"transformer_blocks.0": [1], "transformer_blocks.1": [0]}
    pipe = head_pag(tiny_pipes, family, pag_heads=heads)
    before = dict(pipe.transformer.attn_processors)
    assert torch.equal(run(pipe, family, pag_scale=0.0), stock_outputs(family))  # exact: nothing runs
    assert torch.equal(run(pipe, family, pag_heads={}), stock_outputs(family))  # no heads: plain pipeline
    # alpha = 0: the perturbed branch is the conditional one (a batch of 3 or 2 instead of 2 or 1 rows).
    torch.testing.assert_close(run(pipe, family, pag_alpha=0.0), stock_outputs(family), rtol=0, atol=1e-5)
    changed = run(pipe, family, pag_alpha=1.0)
    assert (changed - stock_outputs(family)).abs().max() > 1e-3
    after = pipe.transformer.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)  # restored


def test_a_method_installed_by_the_user_composes_with_the_call(pipe_for):
    pipe = StableDiffusion3HeadPAGPipeline.from_pipe(pipe_for("sd3"))
    pipe.set_progress_bar_config(disable=True)
    heads = {"transformer_blocks.0": [0, 1]}
    expected = run(pipe, "sd3", pag_heads=heads, pag_alpha=0.5)
    user = install(pipe, StockAttnProcessor())
    assert torch.equal(run(pipe, "sd3", pag_heads=heads, pag_alpha=0.5), expected)
    assert all(processor is user for processor in pipe.transformer.attn_processors.values())


def test_flux_single_block_heads_and_identity_modes_act(tiny_pipes, stock_outputs):
    pipe = head_pag(tiny_pipes, "flux")
    single = run(pipe, "flux", pag_heads={"single_transformer_blocks.1": [0]})
    assert (single - stock_outputs("flux")).abs().max() > 1e-3
    all_identity = run(pipe, "flux", pag_heads={"single_transformer_blocks.1": [0]}, pag_identity="all")
    assert (all_identity - single).abs().max() > 1e-4


@pytest.mark.parametrize("divisor", [1.0, 2.5])
def test_flux_hook_guides_conditional_forwards_and_passes_unconditional_ones(tiny_pipes, divisor):
    """cond' = cond + (pag / divisor)(cond - perturbed); with true CFG (divisor = true_cfg_scale) the pipeline's
    uncond + tcfg (cond' - uncond) is uncond + tcfg (cond - uncond) + pag (cond - perturbed)."""
    transformer = tiny_pipes("flux").transformer
    processor = SoftPAGProcessor({"transformer_blocks.0": [0, 1]}, alpha=0.6)
    context = attach_context(transformer)
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 64, 16, generator=generator),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([0.75]), "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
        "txt_ids": torch.zeros(16, 3), "return_dict": False,
    }
    plain = transformer(**inputs)[0]
    with installed(transformer, processor, layers=processor.module_patterns(transformer)):
        context.set_branch_labels(("cond", "perturbed"))
        doubled = {k: torch.cat([v, v]) if k in _PerturbedBranchHook.BATCHED else v for k, v in inputs.items()}
        cond, perturbed = transformer(**doubled)[0].chunk(2)
        context.set_branch_labels(None)
        pag = 3.0 - 0.002 * (1000 - 750)  # adaptive scale at t = 750
        registry = transformer._diffusers_hook
        registry.register_hook(_PerturbedBranchHook(context, 3.0, 0.002, divisor), PAG_HOOK_NAME)
        try:
            with transformer.cache_context("cond"):
                guided = transformer(**inputs)[0]
            with transformer.cache_context("uncond"):
                unguided = transformer(**inputs)[0]
        finally:
            registry.remove_hook(PAG_HOOK_NAME, recurse=False)
    torch.testing.assert_close(guided, cond + pag / divisor * (cond - perturbed), rtol=0, atol=1e-6)
    assert torch.equal(unguided, plain)
    assert context.branch_labels is None


def test_flux_true_cfg_runs_the_three_term_guidance(tiny_pipes):
    pipe = head_pag(tiny_pipes, "flux", pag_heads={"transformer_blocks.1": [1]})
    with_cfg = run(pipe, "flux", true_cfg_scale=2.0)
    assert with_cfg.shape == (1, 3, 32, 32) and torch.isfinite(with_cfg).all()
    assert (with_cfg - run(pipe, "flux", true_cfg_scale=2.0, pag_scale=0.0)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_from_pretrained_loads_a_saved_pipeline(tiny_pipes, family, tmp_path):
    heads = {"transformer_blocks.1": [0, 1]}
    tiny_pipes(family).save_pretrained(tmp_path)
    loaded = HEAD_PAG[family].from_pretrained(tmp_path, pag_heads=heads, **dict.fromkeys(TEXT_COMPONENTS[family]))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(run(loaded, family), run(head_pag(tiny_pipes, family, pag_heads=heads), family))


NO_CFG_GUIDER = {"guidance_scale": 0.0, "use_original_formulation": True}


@pytest.mark.parametrize(("guider_cfg", "guidance_scale"), [({"guidance_scale": 5.0}, 5.0), (NO_CFG_GUIDER, 1.0)])
def test_guider_in_diffusers_modular_sd3_equals_the_pipeline(tiny_pipes, guider_cfg, guidance_scale):
    """diffusers' modular SD3 denoising blocks with HeadPerturbedAttentionGuidance (passes [cond, uncond,
    perturbed], or [cond, perturbed] without CFG) give the head-PAG pipeline's latents. Without CFG the
    pipelines' cond + pag (cond - perturbed) is the guider's original formulation (diffusers' guider convention)."""
    heads, alpha = {"transformer_blocks.0": [1]}, 0.5
    guider = HeadPerturbedAttentionGuidance(heads, pag_alpha=alpha, perturbed_guidance_scale=2.0, **guider_cfg)
    modular = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    modular.update_components(transformer=tiny_pipes("sd3").transformer, scheduler=tiny_pipes("sd3").scheduler,
                              guider=guider)
    kwargs = tiny_call_kwargs("sd3")
    # No VAE in these blocks: the default scale factor 8 turns 128 px into the tiny pipeline's 16 x 16 latents.
    latents = modular(**{k: kwargs[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                                                "negative_pooled_prompt_embeds", "generator")},
                      num_inference_steps=2, height=128, width=128, output="latents")
    expected = run(head_pag(tiny_pipes, "sd3"), "sd3", pag_heads=heads, pag_alpha=alpha, pag_scale=2.0,
                   guidance_scale=guidance_scale, output_type="latent")
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    plain = run(tiny_pipes("sd3"), "sd3", guidance_scale=guidance_scale, output_type="latent")
    assert (plain - expected).abs().max() > 1e-2
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in modular.transformer.attn_processors.values())
    copy = guider.new(perturbed_guidance_scale=1.0)
    assert dict(copy.config.pag_heads) == {"transformer_blocks.0": (1,)}
    assert copy.processor.alpha == {"transformer_blocks.0": (0.5,)}
    assert not copy.processor.dual_attention  # the authors' default: a named SD3.5 block leaves its attn2 alone
    assert HeadPerturbedAttentionGuidance(heads, pag_dual_attention=True).new().processor.dual_attention


def test_pipeline_passes_dual_attention_to_the_processor(tiny_pipes):
    pipe = head_pag(tiny_pipes, "sd3")
    heads = {"transformer_blocks.0": [1]}
    assert not pipe.softpag_processor(heads).dual_attention
    assert pipe.softpag_processor(heads, pag_dual_attention=True).dual_attention


def test_pipeline_bad_input(tiny_pipes):
    pipe = head_pag(tiny_pipes, "sd3")
    with pytest.raises(ValueError, match=r"heads\['transformer_blocks.0'\] has head index 2; allowed range for "
                                         r"transformer_blocks.0.attn: 0..1"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.0": [2]})
    with pytest.raises(ValueError, match=r"heads has unknown layer 'transformer_blocks.7'"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.7": [0]})
    with pytest.raises(ValueError, match=r"alpha=2.0 \(layer 'transformer_blocks.0'\) is outside the allowed range"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.0": [0]}, pag_alpha=2.0)
    with pytest.raises(ValueError, match=r"dual_attention=1 is not allowed: allowed values are True and False"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.0": [0]}, pag_dual_attention=1)
