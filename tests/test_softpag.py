"""SoftPAGProcessor: float64 reference parity of the per-head blend, branch rows, head sets, bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from diffusers_attn_ext.context import MODULE_NAME_ATTR, AttnContext
from diffusers_attn_ext.families.base import AttentionCall
from diffusers_attn_ext.headset import HeadSet, as_headset, preset_names
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor

LAYER = "transformer_blocks.3"
HEADS = 4


def make_call(layout, batch=3, labels=("uncond", "cond", "perturbed"), n_image=12, n_text=5, dim=8, seed=0):
    """A float64 AttentionCall on random q, k, v of a module named ``LAYER + '.attn'``; ``layout`` is
    "image_first" (SD3), "text_first" (FLUX) or "no_text" (self-attention over image tokens)."""
    generator = torch.Generator().manual_seed(seed)
    text_len = 0 if layout == "no_text" else n_text
    total = n_image + text_len
    q, k, v = (torch.randn(batch, total, HEADS, dim, generator=generator, dtype=torch.float64) for _ in range(3))
    if layout == "text_first":
        text, visual = slice(0, text_len), slice(text_len, total)
    else:
        text, visual = (None if layout == "no_text" else slice(n_image, total)), slice(0, n_image)
    module = torch.nn.Module()
    setattr(module, MODULE_NAME_ATTR, LAYER + ".attn")
    context = AttnContext(family="sd3", batch_size=batch, text_len=text_len)
    context.set_branch_labels(labels)
    kind = "self" if layout == "no_text" else "joint"
    return AttentionCall(module=module, family="sd3", kind=kind, query=q, key=k, value=v, text=text, visual=visual,
                         context=context)


def dense(call):
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (call.query, call.key, call.value)))
    return out.transpose(1, 2)


def reference(call, heads, alpha, identity):
    """Eq. 7 with explicit float64 attention maps: A' = (1 - alpha) A + alpha A_PAG on the selected heads of
    the perturbed rows; A_PAG as diffusers' PAGJointAttnProcessor2_0 ("image") or the identity ("all")."""
    q, k, v = (x.transpose(1, 2) for x in (call.query, call.key, call.value))  # [B, H, N, D]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    attention = scores.softmax(-1)
    total = scores.shape[-1]
    if identity == "all":
        pag = torch.eye(total, dtype=torch.float64).expand_as(attention)
    else:
        mask = torch.zeros(total, total, dtype=torch.float64)
        image = torch.arange(total)[call.visual]
        mask[image[:, None], image[None, :]] = float("-inf")
        mask[image, image] = 0.0
        pag = (scores + mask).softmax(-1)
    perturbed = attention.clone()
    for row in call.context.rows("perturbed"):
        for head, a in zip(heads, alpha, strict=True):
            perturbed[row, head] = (1 - a) * attention[row, head] + a * pag[row, head]
    return (perturbed @ v).transpose(1, 2)


@pytest.mark.parametrize("layout", ["image_first", "text_first", "no_text"])
@pytest.mark.parametrize("identity", ["image", "all"])
def test_blend_matches_float64_reference(layout, identity):
    call = make_call(layout)
    heads, alpha = [1, 3], [0.3, 1.0]
    processor = SoftPAGProcessor({LAYER: heads}, alpha={LAYER: alpha}, identity=identity)
    assert processor.applies_to(call)
    out = processor.edit_output(call, dense(call))
    torch.testing.assert_close(out, reference(call, heads, alpha, identity), rtol=0, atol=1e-12)


def test_only_perturbed_rows_of_selected_heads_change():
    call = make_call("image_first", batch=6)  # two rows per branch
    before = dense(call)
    out = SoftPAGProcessor({LAYER: [2]}, alpha=0.7).edit_output(call, before.clone())
    changed = (out != before).any(dim=(1, 3))  # [B, H]
    expected = torch.zeros(6, HEADS, dtype=torch.bool)
    expected[[4, 5], 2] = True
    assert torch.equal(changed, expected)


def test_image_identity_keeps_text_queries_and_all_identity_outputs_values():
    call = make_call("image_first")
    before = dense(call)
    image_mode = SoftPAGProcessor({LAYER: [0]}, identity="image").edit_output(call, before.clone())
    assert torch.equal(image_mode[2, call.text], before[2, call.text])  # text queries unchanged, as diffusers
    all_mode = SoftPAGProcessor({LAYER: [0]}, identity="all").edit_output(call, before.clone())
    assert torch.equal(all_mode[2, :, 0], call.value[2, :, 0])  # alpha 1: every token outputs its own value


def test_alpha_zero_is_exactly_the_dense_output():
    call = make_call("text_first")
    before = dense(call)
    out = SoftPAGProcessor({LAYER: [0, 1, 2, 3]}, alpha=0.0).edit_output(call, before.clone())
    assert torch.equal(out, before)


def test_applies_only_to_its_layers_and_to_a_perturbed_branch():
    processor = SoftPAGProcessor({LAYER: [0]})
    assert processor.applies_to(make_call("image_first"))
    assert not processor.applies_to(make_call("image_first", batch=2, labels=("uncond", "cond")))
    assert not processor.applies_to(make_call("image_first", labels=None))  # plain forward: no perturbed rows
    assert not SoftPAGProcessor({"transformer_blocks.30": [0]}).applies_to(make_call("image_first"))
    assert processor.layer_of("transformer_blocks.30.attn") is None  # "blocks.3" does not select "blocks.30"


def test_a_named_block_perturbs_its_joint_attention_not_attn2_unless_dual_attention():
    """As the authors' JointTransformerBlock.forward: SD3.5's attn2 (image tokens only, in a model with text) is
    perturbed only when named itself or with dual_attention=True."""
    call = make_call("no_text")
    setattr(call.module, MODULE_NAME_ATTR, LAYER + ".attn2")
    call.context.text_len = 5  # the model's joint sequences carry text: this is the dual (image-only) attention
    assert not SoftPAGProcessor({LAYER: [0]}).applies_to(call)
    assert SoftPAGProcessor({LAYER: [0]}, dual_attention=True).applies_to(call)
    assert SoftPAGProcessor({LAYER + ".attn2": [0]}).applies_to(call)
    assert SoftPAGProcessor({LAYER: [0]}).applies_to(make_call("image_first"))  # the joint attention
    assert SoftPAGProcessor({LAYER: [0]}).applies_to(make_call("no_text"))  # video-only self-attention (Wan)


def test_per_layer_alpha_and_head_set_forms(tmp_path):
    headset = HeadSet({"transformer_blocks.1": [7, 3, 3], "single_transformer_blocks.0": 2}, description="d")
    assert headset.heads == {"single_transformer_blocks.0": (2,), "transformer_blocks.1": (3, 7)}
    assert headset.pairs == (
        ("single_transformer_blocks.0", 2), ("transformer_blocks.1", 3), ("transformer_blocks.1", 7)
    )
    assert len(headset) == 3 and headset.union([("transformer_blocks.1", 0)]).heads["transformer_blocks.1"] == (0, 3, 7)
    path = headset.save(tmp_path / "heads.json")
    assert json.loads(path.read_text())["heads"]["transformer_blocks.1"] == [3, 7]
    assert as_headset(path) == headset == as_headset(str(path))
    processor = SoftPAGProcessor(path, alpha={"transformer_blocks.1": [0.5, 1.0], "single_transformer_blocks.0": 0.25})
    assert processor.alpha == {"single_transformer_blocks.0": (0.25,), "transformer_blocks.1": (0.5, 1.0)}


def sd3_medium_on_meta():
    """SD3-medium-sized transformer (24 blocks of 24 heads) without weights, to check presets against."""
    with torch.device("meta"):
        return SD3Transformer2DModel(num_layers=24, num_attention_heads=24, attention_head_dim=64,
                                     caption_projection_dim=1536, pos_embed_max_size=192)


def flux_dev_on_meta():
    with torch.device("meta"):
        return FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)


def test_presets_load_and_fit_their_model():
    names = preset_names()
    assert any(name.startswith("sd3_") for name in names) and any(name.startswith("flux_") for name in names)
    models = {"sd3": sd3_medium_on_meta(), "flux": flux_dev_on_meta()}
    for name in names:
        headset = HeadSet.preset(name)
        assert headset.description and headset.source and len(headset)
        resolved = headset.modules(models[name.split("_")[0]])
        assert sum(len(heads) for heads in resolved.values()) == len(headset)


def test_bad_input_names_parameter_value_and_range():
    transformer = sd3_medium_on_meta()
    with pytest.raises(ValueError, match=r"heads\['transformer_blocks.3'\] has head index 24; allowed range for "
                                         r"transformer_blocks.3.attn: 0..23"):
        SoftPAGProcessor({"transformer_blocks.3": [1, 24]}).validate(transformer)
    with pytest.raises(ValueError, match=r"heads has unknown layer 'transformer_blocks.24'"):
        SoftPAGProcessor({"transformer_blocks.24": [0]}).validate(transformer)
    with pytest.raises(ValueError, match=r"heads has unknown layer 'blocks.3'"):
        HeadSet({"blocks.3": [0]}).modules(transformer)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"alpha={alpha} \(layer 'transformer_blocks.3'\) is outside the "
                                             r"allowed range \[0, 1\]"):
            SoftPAGProcessor({"transformer_blocks.3": [0]}, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha\['transformer_blocks.3'\] has 1 values for the 2 heads \[0, 1\]"):
        SoftPAGProcessor({"transformer_blocks.3": [0, 1]}, alpha={"transformer_blocks.3": [0.5]})
    with pytest.raises(ValueError, match=r"heads\['transformer_blocks.3'\] has head index -1; allowed: integers >= 0"):
        HeadSet({"transformer_blocks.3": [-1]})
    with pytest.raises(ValueError, match=r"identity='text' is not one of \('image', 'all'\)"):
        SoftPAGProcessor({"transformer_blocks.3": [0]}, identity="text")
    with pytest.raises(ValueError, match=r"dual_attention='yes' is not allowed: allowed values are True and False"):
        SoftPAGProcessor({"transformer_blocks.3": [0]}, dual_attention="yes")
    with pytest.raises(ValueError, match=r"preset='nope' is not one of"):
        HeadSet.preset("nope")
    call = make_call("image_first")
    with pytest.raises(ValueError, match=r"has head index 4; allowed range for transformer_blocks.3.attn: 0..3"):
        SoftPAGProcessor({LAYER: [4]}).edit_output(call, dense(call))
