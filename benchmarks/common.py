"""Shared pieces of the GPU benchmarks: model shapes, inputs, timing, and writing results."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

# Wan2.1-T2V-1.3B transformer config (the checkpoint's transformer/config.json).
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_TEXT_TOKENS = 512


def out_dir() -> Path:
    """Folder for results: $OUT on the device machine, ./out elsewhere."""
    path = Path(os.environ.get("OUT", "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model``'s floating-point parameters and buffers in ``dtype`` in place, but for the modules its class's
    ``_keep_in_fp32_modules`` names, which stay float32 as ``from_pretrained(torch_dtype=dtype)`` keeps them
    (a plain ``.to(dtype)`` would cast them too)."""
    keep = set(type(model)._keep_in_fp32_modules or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    return model


def wan_transformer(config: dict | None = None, dtype=torch.bfloat16, device="cuda"):
    """A Wan transformer with random weights, built directly on the device."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**(config or WAN_1_3B))
    return model.to(dtype).eval()


def wan_inputs(frames: int = 81, height: int = 480, width: int = 832, batch: int = 1, dtype=torch.bfloat16, device="cuda"):
    """Transformer inputs for a Wan video of ``frames`` x ``height`` x ``width`` pixels (VAE: 4x time, 8x space)."""
    g = torch.Generator(device).manual_seed(0)
    latent_frames = (frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(batch, 16, latent_frames, height // 8, width // 8, generator=g, device=device, dtype=dtype),
        timestep=torch.full((batch,), 500.0, device=device),
        encoder_hidden_states=torch.randn(batch, WAN_TEXT_TOKENS, 4096, generator=g, device=device, dtype=dtype),
        return_dict=False,
    )


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10, back_to_back: int = 1) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs.

    With ``back_to_back`` > 1 each timed run queues that many calls between the two events and reports the
    mean per call: the GPU then never waits for the host to prepare the next launch, as inside a model's
    forward, so the time is the kernel's alone. With 1, host time spent before the launch counts too."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(back_to_back):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / back_to_back)
    return statistics.median(times)


def peak_memory_gib(fn) -> float:
    """Peak GPU memory allocated during one ``fn()``, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def attention_tflops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, ms: float) -> float:
    """Effective TFLOP/s of dense attention (4 * B * H * Nq * Nkv * D flops) done in ``ms``."""
    return 4 * batch * heads * q_len * kv_len * head_dim / (ms * 1e-3) / 1e12


def write_results(name: str, rows: list[dict], header: str) -> str:
    """Write ``rows`` as JSON and as a markdown table under :func:`out_dir`; return the table."""
    folder = out_dir()
    (folder / f"{name}.json").write_text(json.dumps({"device": device_name(), "rows": rows}, indent=2))
    columns = list(rows[0])
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    (folder / f"{name}.md").write_text(table)
    return table


def device_name() -> str:
    return f"{torch.cuda.get_device_name()} (torch {torch.__version__})" if torch.cuda.is_available() else "cpu"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
