"""UltraViCo attention on the GPU: dense cuDNN vs FlexAttention score_mod vs the fused Triton kernel, at
1x-4x Wan2.1-1.3B length (480p: 1560 tokens per latent frame, 21 trained latent frames; 12 heads, d 128,
bf16), with peak memory; plus accuracy of both UltraViCo paths against a float64 reference.

    PYTHONPATH=. python benchmarks/ultravico.py [--configs]
"""

from __future__ import annotations

import argparse

import torch
from common import attention_tflops, cuda_time_ms, device_name, peak_memory_gib, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_attn_ext.kernels.block_sparse_table import mark_static
from diffusers_attn_ext.kernels.block_sparse_triton import block_sparse_attention
from diffusers_attn_ext.kernels.decay_triton import DEFAULT_CONFIG, decay_attention
from diffusers_attn_ext.kernels.flex import flex_attention_bnhd, flex_block_mask
from diffusers_attn_ext.masks import (
    ExtrapolationWindow,
    radial_block_mask,
    ultravico_reference,
    ultravico_rule,
    ultravico_score_mod,
)

FRAME_TOKENS, TRAIN_FRAMES, HEADS, HEAD_DIM, ALPHA = 1560, 21, 12, 128, 0.9


def qkv(n: int, seed: int = 0):
    g = torch.Generator("cuda").manual_seed(seed)
    return [torch.randn(1, n, HEADS, HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3)]


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def accuracy_rows() -> list[dict]:
    """UltraViCo paths vs float64 reference on a small grid (256 tokens/frame, 4 trained frames, 12 frames)."""
    window = ExtrapolationWindow(frame_tokens=256, train_frames=4, video_start=0, video_tokens=12 * 256)
    q, k, v = qkv(window.video_tokens, seed=1)
    ref = ultravico_reference(q, k, v, window, ALPHA)
    flex = flex_attention_bnhd(q, k, v, score_mod=ultravico_score_mod(window, ALPHA))
    fused = decay_attention(q, k, v, ultravico_rule(window, ALPHA, True))
    return [
        {"path": "FlexAttention score_mod", "rel. L2 error vs float64": rel_err(flex, ref)},
        {"path": "fused Triton kernel", "rel. L2 error vs float64": rel_err(fused, ref)},
    ]


def length_rows(ratio: int, configs: list[dict]) -> list[dict]:
    """Every kernel at ``ratio`` times the training length."""
    n = FRAME_TOKENS * TRAIN_FRAMES * ratio
    window = ExtrapolationWindow(FRAME_TOKENS, TRAIN_FRAMES, 0, n)
    q, k, v = qkv(n)
    mod = ultravico_score_mod(window, ALPHA)
    rule = ultravico_rule(window, ALPHA, True)
    variants = {
        "dense cuDNN (no method)": lambda: cudnn(q, k, v),
        "Flex score_mod": lambda: flex_attention_bnhd(q, k, v, score_mod=mod),
    }
    for config in configs:
        label = "fused Triton" + ("" if config == DEFAULT_CONFIG else f" {config}")
        variants[label] = lambda config=config: decay_attention(q, k, v, rule, config=config)
    # Composed with Radial Attention's mask (decay 1.0): the rule inside the block-sparse kernel, and Flex.
    radial = mark_static(radial_block_mask(TRAIN_FRAMES * ratio, FRAME_TOKENS).cuda()[None, None])
    radial_flex = flex_block_mask(radial, 128, n, n)
    variants[f"+ radial ({radial.float().mean().item():.2f}), fused Triton"] = lambda: block_sparse_attention(
        q, k, v, radial, rule=rule)
    variants["+ radial, Flex"] = lambda: flex_attention_bnhd(q, k, v, score_mod=mod, block_mask=radial_flex)
    rows, dense_ms = [], None
    for name, fn in variants.items():
        try:
            ms = cuda_time_ms(fn, warmup=3, iters=10)
            memory = peak_memory_gib(fn)
        except Exception as error:  # a tuning config may not fit shared memory
            print(f"{name} at {ratio}x failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        dense_ms = ms if dense_ms is None else dense_ms
        rows.append({
            "length": f"{ratio}x ({n} tokens)", "kernel": name, "ms": ms, "x dense": ms / dense_ms,
            "TFLOP/s": attention_tflops(1, HEADS, n, n, HEAD_DIM, ms), "peak GiB": memory,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", action="store_true", help="also time other tile configs of the fused kernel")
    args = parser.parse_args()
    configs = [DEFAULT_CONFIG]
    if args.configs:
        configs += [
            dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        ]
    print(write_results("ultravico_accuracy", accuracy_rows(), f"UltraViCo accuracy, bf16 inputs, {device_name()}"))
    print(write_results("ultravico_speed", [row for ratio in (1, 2, 3, 4) for row in length_rows(ratio, configs)], f"UltraViCo attention, 12 heads, d 128, bf16, {device_name()}"))


if __name__ == "__main__":
    main()
