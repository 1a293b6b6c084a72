"""diffusers' operations that rebuild or swap attention processors refuse, naming the method, instead of silently
resetting or dropping it: IP-Adapter loading and unloading (``type(processor)()``) and fused QKV on SD3 and
CogVideoX. Each goes through diffusers' own code on a tiny pipeline."""

import copy

import pytest
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from diffusers_attn_ext import install, installed, uninstall
from diffusers_attn_ext.processors import (
    ComposedProcessor,
    EntropyScalingProcessor,
    ForegroundBackgroundCrossAttnProcessor,
    IsolationRepositionProcessor,
    SoftPAGProcessor,
    STDRoPEProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)

SINGLE_BLOCKS = "single_transformer_blocks"


def processors_of(transformer):
    return dict(transformer.attn_processors)


def test_unload_ip_adapter_refuses_to_reset_a_method(pipe_for):
    pipe = pipe_for("flux")
    processor = install(pipe, EntropyScalingProcessor(train_tokens=64), layers=SINGLE_BLOCKS)
    before = processors_of(pipe.transformer)
    with pytest.raises(ValueError, match=r"EntropyScalingProcessor\(train_tokens=64\).*uninstall"):
        pipe.unload_ip_adapter()  # rebuilds every processor as type(processor)()
    assert processors_of(pipe.transformer) == before and processor.train_tokens == 64


def test_load_ip_adapter_refuses_before_any_processor_changes(pipe_for):
    pipe = pipe_for("flux")
    install(pipe, EntropyScalingProcessor(train_tokens=64))
    before = processors_of(pipe.transformer)
    with pytest.raises(ValueError, match=r"load_ip_adapter.*EntropyScalingProcessor"):
        pipe.load_ip_adapter({"image_proj": {}, "ip_adapter": {}}, weight_name="ip.safetensors",
                             image_encoder_pretrained_model_name_or_path=None)
    assert processors_of(pipe.transformer) == before


def test_after_uninstall_diffusers_rebuilds_run_as_stock(pipe_for):
    pipe = pipe_for("flux")
    install(pipe, EntropyScalingProcessor(train_tokens=64))
    uninstall(pipe)
    pipe.unload_ip_adapter()  # stock processors rebuild fine
    assert not any(isinstance(p, EntropyScalingProcessor) for p in processors_of(pipe.transformer).values())


def test_install_refuses_to_drop_a_loaded_ip_adapter(pipe_for):
    pipe = pipe_for("flux")
    transformer = pipe.transformer
    name = "transformer_blocks.0.attn"
    original = transformer.get_submodule(name).processor
    ip = FluxIPAdapterAttnProcessor(transformer.inner_dim, transformer.config.joint_attention_dim, num_tokens=(4,))
    transformer.get_submodule(name).set_processor(ip)
    try:
        with pytest.raises(ValueError, match="IP-Adapter.*unload_ip_adapter"):
            install(pipe, StockAttnProcessor())
        assert transformer.get_submodule(name).processor is ip
    finally:
        transformer.get_submodule(name).set_processor(original)


@pytest.mark.parametrize(("family", "make"), [
    ("sd3", lambda: EntropyScalingProcessor(train_tokens=64)),
    ("cogvideox", lambda: UltraViCoProcessor(train_frames=1)),
])
def test_fuse_qkv_projections_refuses_to_drop_a_method(pipe_for, family, make):
    pipe = pipe_for(family)
    processor = install(pipe, make())
    with pytest.raises(ValueError, match=rf"fuse_qkv_projections.*{type(processor).__name__}"):
        pipe.transformer.fuse_qkv_projections()
    assert all(p is processor for p in processors_of(pipe.transformer).values())
    assert not any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())


def test_installed_block_guards_only_while_it_lasts(pipe_for):
    pipe = pipe_for("sd3")
    with installed(pipe, EntropyScalingProcessor(train_tokens=64)):
        with pytest.raises(ValueError, match="fuse_qkv_projections"):
            pipe.transformer.fuse_qkv_projections()
    assert "fuse_qkv_projections" not in pipe.transformer.__dict__  # the diffusers method is back


@pytest.mark.parametrize("cls", [SoftPAGProcessor, IsolationRepositionProcessor, STDRoPEProcessor,
                                 ForegroundBackgroundCrossAttnProcessor, ComposedProcessor])
def test_rebuild_without_arguments_is_a_value_error_naming_the_method(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__} needs .*uninstall"):
        cls()


def test_unload_ip_adapter_with_required_arguments_names_the_method(pipe_for):
    pipe = pipe_for("flux")
    install(pipe, SoftPAGProcessor({"single_transformer_blocks.0": [0]}), EntropyScalingProcessor(train_tokens=64),
            layers=SINGLE_BLOCKS)
    before = processors_of(pipe.transformer)
    with pytest.raises(ValueError, match="ComposedProcessor needs"):
        pipe.unload_ip_adapter()
    assert processors_of(pipe.transformer) == before


def test_a_deep_copy_of_an_installed_transformer_guards_itself(pipe_for):
    pipe = pipe_for("sd3")
    install(pipe, EntropyScalingProcessor(train_tokens=64))
    copied = copy.deepcopy(pipe.transformer)
    copied.set_attn_processor(AttnProcessor2_0())  # another class: allowed, and on the copy only
    assert all(isinstance(p, AttnProcessor2_0) for p in processors_of(copied).values())
    assert all(isinstance(p, EntropyScalingProcessor) for p in processors_of(pipe.transformer).values())
    with pytest.raises(ValueError, match="fuse_qkv_projections"):
        pipe.transformer.fuse_qkv_projections()
