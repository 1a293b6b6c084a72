"""benchmarks/quality.py's ``quantized`` section on CPU (one seed, one step of the shipped world video model): the
bf16 row is measured on a bf16 copy whose attention reaches our dispatcher, the quantized rows (CUDA-only) are
left out, and the shared float32 model is untouched."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch

from diffusers_attn_ext import kernels
from diffusers_attn_ext.call import DENSE, KernelRequest
from diffusers_attn_ext.processors import StockAttnProcessor
from diffusers_attn_ext.world import load_world_video_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling quality_common, as when run as a script
    spec = importlib.util.spec_from_file_location("quality_benchmark_quantized", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour: without CUDA only the bf16 row is made")
def test_on_cpu_the_section_stores_the_bf16_row_only_and_leaves_the_float32_model_alone(quality, capsys):
    world = load_world_video_pipeline()
    weights = {k: v.clone() for k, v in world.transformer.state_dict().items()}
    processors = dict(world.transformer.attn_processors)
    results, saves = {}, []
    asked = mock.patch.object(kernels, "quantized_kernel", wraps=kernels.quantized_kernel)
    with asked as spy:
        quality.run_quantized(world, [0], 1, results, lambda: saves.append(1))
    assert "quantized rows are skipped" in capsys.readouterr().out
    assert set(results) == {"quantized/bf16 dense"} and saves == [1]
    row = results["quantized/bf16 dense"]
    assert row["reference"] == "bf16 dense vs float32 dense"
    assert len(row["psnr"]) == len(row["ssim"]) == 1
    assert 20 < row["psnr"][0] < quality.PSNR_CAP  # close to float32, yet not the float32 video: bf16 really ran
    assert 0.5 < row["ssim"][0] < 1
    # Every attention call of the bf16 copy asked the dispatcher's quantized kernel (which declines CPU tensors);
    # the float32 model's stock processors never did, so every query seen is bf16.
    requests = [call.args[0] for call in spy.call_args_list]
    assert {r.query.dtype for r in requests} == {torch.bfloat16} and {r.query.shape[-1] for r in requests} == {64}
    # One step with guidance: two forwards of six blocks, each a self-attention over the 576 video tokens and a
    # cross-attention to the 512 text tokens.
    assert Counter((r.query.shape[1], r.key.shape[1]) for r in requests) == {(576, 576): 12, (576, 512): 12}
    # The float32 model: same weights, still float32, same processors.
    state = world.transformer.state_dict()
    assert state.keys() == weights.keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], weights[k]) for k in weights)
    assert dict(world.transformer.attn_processors) == processors
    table = quality.report(results)
    assert "| bf16 dense | bf16 dense vs float32 dense | - | - |" in table


def test_the_bf16_copy_keeps_diffusers_float32_modules_and_reaches_our_processors(quality):
    world = load_world_video_pipeline()
    bf16 = quality.bf16_pipeline(world)
    assert bf16.vae is world.vae and bf16.text_encoder is world.text_encoder and bf16.transformer is not world.transformer
    assert bf16.transformer.dtype == torch.bfloat16 and world.transformer.dtype == torch.float32
    keep = type(world.transformer)._keep_in_fp32_modules
    source = {**dict(world.transformer.named_parameters()), **dict(world.transformer.named_buffers())}
    copied = {**dict(bf16.transformer.named_parameters()), **dict(bf16.transformer.named_buffers())}
    assert copied.keys() == source.keys()
    kept = [name for name in copied if any(k in name.split(".") for k in keep)]
    assert any(name.startswith("rope.") for name in kept) and any(".norm2." in name for name in kept)
    for name, tensor in copied.items():
        expected = torch.float32 if name in kept else torch.bfloat16
        assert tensor.dtype == expected and torch.equal(tensor, source[name].to(expected)), name
    assert all(isinstance(p, StockAttnProcessor) for p in bf16.transformer.attn_processors.values())
    assert not any(isinstance(p, StockAttnProcessor) for p in world.transformer.attn_processors.values())


def test_a_quantized_row_without_a_kernel_launch_is_refused(quality):
    before = kernels.quantized_setting()
    with pytest.raises(RuntimeError, match=r"the quantized kernel \(pv='bf16'\) took 0 of 0 self-attention calls: on"):
        with quality.quantized_attention("bf16") as fields:
            assert fields["kernel"].startswith("on: INT8 QK + 16-bit PV")
    assert kernels.quantized_setting() == before


def test_a_quantized_row_with_a_self_attention_call_off_the_kernel_is_refused(quality):
    """A self-attention request the kernel declines (here: CPU tensors) makes the row partly bf16 dense."""
    q = torch.randn(1, 256, 2, 64, dtype=torch.bfloat16)
    request = KernelRequest(kind=DENSE, query=q, key=q, value=q, scale=None, attn_mask=None, score_mods=(),
                            block_mask=None, block_size=128, rule=None, dense_via="dispatch", backend=None,
                            parallel_config=None)
    with pytest.raises(RuntimeError, match=r"took 0 of 1 self-attention calls"):
        with quality.quantized_attention("bf16"):
            assert kernels.quantized_kernel(request) is None


def test_the_bf16_dense_reference_is_never_quantized(quality):
    with kernels.use_quantized_attention(True):
        with quality.unquantized_attention() as value:
            assert value is None and kernels.quantized_setting() is None
        assert kernels.quantized_setting() == "bf16"
    assert kernels.quantized_setting() is None
