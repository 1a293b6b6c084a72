"""Head-PAG pipelines and guider: parity with diffusers' SD3 PAG pipeline, identity settings, loading."""

import pytest
import torch
from conftest import run
from diffusers import FluxPipeline, StableDiffusion3PAGPipeline

from diffusers_attn_ext.context import attach_context
from diffusers_attn_ext.pipelines.head_pag import (
    PAG_HOOK_NAME,
    FluxHeadPAGPipeline,
    HeadPerturbedAttentionGuidance,
    StableDiffusion3HeadPAGPipeline,
    _PerturbedBranchHook,
    put_on_heads,
    restore_processors,
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
    diffusers_pag = StableDiffusion3PAGPipeline.from_pipe(tiny_pipes("sd3"), pag_applied_layers=["transformer_blocks.0"])
    diffusers_pag.set_progress_bar_config(disable=True)
    expected = run(diffusers_pag, "sd3", pag_scale=3.0, pag_adaptive_scale=0.004, num_inference_steps=3)
    ours = run(head_pag(tiny_pipes, "sd3", pag_heads={"transformer_blocks.0": [0, 1]}), "sd3", pag_scale=3.0,
               pag_adaptive_scale=0.004, num_inference_steps=3)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_identity_settings_equal_the_plain_pipeline(tiny_pipes, stock_outputs, family):
    heads = {"transformer_blocks.0": [1], "transformer_blocks.1": [0]}
    pipe = head_pag(tiny_pipes, family, pag_heads=heads)
    assert torch.equal(run(pipe, family, pag_scale=0.0), stock_outputs(family))  # exact: nothing runs
    assert torch.equal(run(pipe, family, pag_heads={}), stock_outputs(family))  # no heads: plain pipeline
    # alpha = 0: the perturbed branch is the conditional one (a batch of 3 or 2 instead of 2 or 1 rows).
    torch.testing.assert_close(run(pipe, family, pag_alpha=0.0), stock_outputs(family), rtol=0, atol=1e-5)
    changed = run(pipe, family, pag_alpha=1.0)
    assert (changed - stock_outputs(family)).abs().max() > 1e-3
    assert pipe.transformer.attn_processors == tiny_pipes(family).transformer.attn_processors  # restored


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
    saved = put_on_heads(transformer, processor)
    try:
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
    finally:
        restore_processors(transformer, saved)
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


def test_guider_equals_the_batched_pipeline_guidance(tiny_pipes):
    """The modular-diffusers guider (three passes) gives the pipeline's one-batch guidance on a denoising step."""
    transformer = tiny_pipes("sd3").transformer
    heads, alpha = {"transformer_blocks.0": [1]}, 0.5
    kwargs = tiny_call_kwargs("sd3")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([800.0])
    guider = HeadPerturbedAttentionGuidance(heads, pag_alpha=alpha, guidance_scale=5.0, perturbed_guidance_scale=2.0)
    guider.set_state(step=0, num_inference_steps=2, timestep=t)
    batches = guider.prepare_inputs({
        "hidden_states": (latents, latents),
        "encoder_hidden_states": (kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"]),
        "text_embeds": (kwargs["pooled_prompt_embeds"], kwargs["negative_pooled_prompt_embeds"]),
    })
    assert len(batches) == 3
    for batch in batches:
        guider.prepare_models(transformer)
        batch.noise_pred = transformer(hidden_states=batch.hidden_states, timestep=t,
                                       encoder_hidden_states=batch.encoder_hidden_states,
                                       pooled_projections=batch.text_embeds, return_dict=False)[0]
        guider.cleanup_models(transformer)
    guided = guider(batches).pred

    context = attach_context(transformer)
    saved = put_on_heads(transformer, SoftPAGProcessor(heads, alpha))
    try:
        context.set_branch_labels(("uncond", "cond", "perturbed"))
        text = torch.cat([kwargs["negative_prompt_embeds"], kwargs["prompt_embeds"], kwargs["prompt_embeds"]])
        pooled = torch.cat([kwargs["negative_pooled_prompt_embeds"], *[kwargs["pooled_prompt_embeds"]] * 2])
        uncond, cond, perturbed = transformer(hidden_states=latents.repeat(3, 1, 1, 1), timestep=t.repeat(3),
                                              encoder_hidden_states=text, pooled_projections=pooled,
                                              return_dict=False)[0].chunk(3)
    finally:
        context.set_branch_labels(None)
        restore_processors(transformer, saved)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond) + 2.0 * (cond - perturbed), rtol=0, atol=1e-5)
    copy = guider.new(perturbed_guidance_scale=1.0)
    assert dict(copy.config.pag_heads) == {"transformer_blocks.0": (1,)} and copy.processor.alpha == {"transformer_blocks.0": (0.5,)}


def test_pipeline_bad_input(tiny_pipes):
    pipe = head_pag(tiny_pipes, "sd3")
    with pytest.raises(ValueError, match=r"heads\['transformer_blocks.0'\] has head index 2; allowed range for "
                                         r"transformer_blocks.0.attn: 0..1"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.0": [2]})
    with pytest.raises(ValueError, match=r"heads has unknown layer 'transformer_blocks.7'"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.7": [0]})
    with pytest.raises(ValueError, match=r"alpha=2.0 \(layer 'transformer_blocks.0'\) is outside the allowed range"):
        run(pipe, "sd3", pag_heads={"transformer_blocks.0": [0]}, pag_alpha=2.0)
