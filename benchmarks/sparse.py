"""Sparse video attention on the GPU: FlexAttention block-sparse (random masks, Radial Attention's mask, the
adaptive draft pattern) against dense cuDNN attention, and the accuracy of each sparse pattern.

1. Kernel: time and effective TFLOP/s (dense FLOPs 4 B H N^2 D over the time, so sparse kernels can exceed
   the dense rate; "sparse TFLOP/s" counts only kept blocks) vs block density, bf16, d 128, at Wan2.1-1.3B
   480p 81 frames (12 heads, 21x30x52 = 32760 tokens) and Wan2.1-14B 720p 81 frames (40 heads, 21x45x80 =
   75600 tokens). Sequences are not a multiple of 128: FlexAttention masks the partial last block through its
   sequence lengths; random masks keep the diagonal and draw the other blocks per head.
2. Whole Wan2.1-1.3B-shaped transformer forward (random weights, bf16, 480x832, 81 frames): stock dense vs
   RadialSparseProcessor vs AdaptiveSparseProcessor (pattern cached, and searched at every call).
3. Accuracy: rel. L2 error ||O_sparse - O_dense|| / ||O_dense|| against dense float32 attention, on q/k/v with
   spatial-temporal locality: q = k = sqrt(beta sqrt(d)) * phi(p) + noise, where phi(p) are random Fourier
   features of the token's (frame, row, column) position p (phi(p).phi(p') ~ exp(-|p - p'|^2 / 2 l^2), length
   scales l = 1.5 frames and 4 tokens in space; beta = 8, noise 0.3 per dimension, per-head draws), so each
   token attends mostly to its spatio-temporal neighbourhood like video DiT heads; v is standard normal.

    PYTHONPATH=. python benchmarks/sparse.py [--quick]

Markdown tables are printed and written with JSON under $OUT (./out elsewhere).
"""

from __future__ import annotations

import argparse
import math

import torch
from common import attention_tflops, cuda_time_ms, device_name, wan_inputs, wan_transformer, write_results

from diffusers_attn_ext import install, reset_context, uninstall
from diffusers_attn_ext.kernels.flex import flex_attention_bnhd, flex_block_mask
from diffusers_attn_ext.masks import radial_block_mask
from diffusers_attn_ext.processors.adaptive_sparse import AdaptiveSparseProcessor, draft_block_pattern
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor

HEAD_DIM, BLOCK = 128, 128
SHAPES = {  # name: (heads, frames, height, width) in latent tokens after patching
    "Wan2.1-1.3B 480p 81f": (12, 21, 30, 52),
    "Wan2.1-14B 720p 81f": (40, 21, 45, 80),
}


def cudnn_attention(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def random_blocks(heads: int, blocks: int, density: float, seed: int = 0) -> torch.Tensor:
    """``[1, heads, blocks, blocks]`` with the diagonal and a random ``density`` of blocks per row kept."""
    g = torch.Generator("cuda").manual_seed(seed)
    scores = torch.rand(1, heads, blocks, blocks, generator=g, device="cuda")
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    keep = max(1, math.ceil(density * blocks))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, dim=-1).indices, True)


def local_qkv(heads: int, frames: int, height: int, width: int, seed: int = 0, dtype=torch.bfloat16):
    """q, k, v ``[1, N, heads, 128]`` with spatial-temporal locality (module docstring, item 3)."""
    g = torch.Generator("cuda").manual_seed(seed)
    f, y, x = torch.meshgrid(*(torch.arange(s, device="cuda", dtype=torch.float32) for s in (frames, height, width)),
                             indexing="ij")
    position = torch.stack([f / 1.5, y / 4.0, x / 4.0], -1).reshape(-1, 3)  # scaled by the length scales
    freqs = torch.randn(heads, 3, HEAD_DIM, generator=g, device="cuda")
    phase = torch.rand(heads, 1, HEAD_DIM, generator=g, device="cuda") * 2 * math.pi
    features = torch.cos(position @ freqs + phase) * math.sqrt(2.0 / HEAD_DIM)  # [heads, N, d]
    amplitude = math.sqrt(8.0 * math.sqrt(HEAD_DIM))
    n = position.shape[0]
    q = amplitude * features + 0.3 * torch.randn(heads, n, HEAD_DIM, generator=g, device="cuda")
    k = amplitude * features + 0.3 * torch.randn(heads, n, HEAD_DIM, generator=g, device="cuda")
    v = torch.randn(heads, n, HEAD_DIM, generator=g, device="cuda")
    return [t.transpose(0, 1)[None].to(dtype).contiguous() for t in (q, k, v)]


def kernel_rows(name: str, densities: list[float], iters: int) -> list[dict]:
    heads, frames, height, width = SHAPES[name]
    n = frames * height * width
    blocks = -(-n // BLOCK)
    q, k, v = (torch.randn(1, n, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_ms = cuda_time_ms(lambda: cudnn_attention(q, k, v), warmup=3, iters=iters)
    rows = [{"shape": name, "kernel": "dense cuDNN", "density": 1.0, "ms": dense_ms, "x dense": 1.0,
             "eff. TFLOP/s": attention_tflops(1, heads, n, n, HEAD_DIM, dense_ms),
             "sparse TFLOP/s": attention_tflops(1, heads, n, n, HEAD_DIM, dense_ms)}]
    masks = {f"Flex random {d:.2f}": random_blocks(heads, blocks, d) for d in densities}
    for decay in (1.0, 0.2):
        masks[f"Flex radial decay {decay}"] = radial_block_mask(frames, height * width, BLOCK, decay)[None, None].cuda()
    for label, table in masks.items():
        block_mask = flex_block_mask(table, BLOCK, n, n)
        ms = cuda_time_ms(lambda bm=block_mask: flex_attention_bnhd(q, k, v, block_mask=bm), warmup=3, iters=iters)
        density = table.float().mean().item()
        rows.append({"shape": name, "kernel": label, "density": density, "ms": ms, "x dense": dense_ms / ms,
                     "eff. TFLOP/s": attention_tflops(1, heads, n, n, HEAD_DIM, ms),
                     "sparse TFLOP/s": density * attention_tflops(1, heads, n, n, HEAD_DIM, ms)})
    return rows


def accuracy_rows(densities: list[float]) -> list[dict]:
    name = "Wan2.1-1.3B 480p 81f"
    heads, frames, height, width = SHAPES[name]
    n = frames * height * width
    q, k, v = local_qkv(heads, frames, height, width)
    reference = _float32_dense(q, k, v)

    def error(out):
        return ((out.float() - reference).norm() / reference.norm()).item()

    rows = [{"pattern": "dense cuDNN bf16 (noise floor)", "density": 1.0, "rel. L2 error": error(cudnn_attention(q, k, v))}]
    patterns = {f"radial decay {decay}": radial_block_mask(frames, height * width, BLOCK, decay)[None, None].cuda()
                for decay in (1.0, 0.2)}
    for d in densities:
        patterns[f"adaptive density {d:.2f}"] = draft_block_pattern(q, k, BLOCK, density=d)
        patterns[f"random density {d:.2f}"] = random_blocks(heads, -(-n // BLOCK), d, seed=1)
    patterns["adaptive mass 0.90"] = draft_block_pattern(q, k, BLOCK, mass=0.9)
    patterns["Flex all blocks (kernel check)"] = torch.ones(1, 1, -(-n // BLOCK), -(-n // BLOCK), dtype=torch.bool,
                                                            device="cuda")
    for label, table in patterns.items():
        out = flex_attention_bnhd(q, k, v, block_mask=flex_block_mask(table, BLOCK, n, n))
        rows.append({"pattern": label, "density": table.float().mean().item(), "rel. L2 error": error(out)})
    return rows


def _float32_dense(q, k, v):
    """Dense float32 attention head by head (the reference; memory-efficient SDPA)."""
    return torch.cat([
        torch.nn.functional.scaled_dot_product_attention(*(x[:, :, h:h + 1].float().transpose(1, 2) for x in (q, k, v)))
        .transpose(1, 2) for h in range(q.shape[2])
    ], dim=2)


def forward_rows(quick: bool, iters: int) -> list[dict]:
    from common import WAN_1_3B

    config = dict(WAN_1_3B, num_layers=4) if quick else WAN_1_3B
    model = wan_transformer(config)
    inputs = wan_inputs()
    variants = {
        "stock dense": None,
        "radial (decay 1.0)": lambda: RadialSparseProcessor(),
        "radial (decay 0.2)": lambda: RadialSparseProcessor(decay_factor=0.2),
        "adaptive density 0.25, pattern cached": lambda: AdaptiveSparseProcessor(density=0.25),
        "adaptive density 0.10, pattern cached": lambda: AdaptiveSparseProcessor(density=0.1),
        "adaptive density 0.25, searched every call": lambda: AdaptiveSparseProcessor(density=0.25),
    }
    rows, dense_ms = [], None
    with torch.inference_mode():
        for label, factory in variants.items():
            if factory is not None:
                install(model, factory())
            search = "every call" in label

            def forward(search=search):
                if search:
                    reset_context(model)  # a new generation: per-generation pattern caches are dropped
                return model(**inputs)

            ms = cuda_time_ms(forward, warmup=2, iters=iters)
            dense_ms = dense_ms or ms
            rows.append({"forward": label, "layers": config["num_layers"], "ms": ms, "x dense": dense_ms / ms})
            uninstall(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="Wan-1.3B shape only, two densities, 4-layer forward")
    parser.add_argument("--forward-only", action="store_true", help="only the whole-forward table")
    args = parser.parse_args()
    if args.forward_only:
        rows = forward_rows(args.quick, 3 if args.quick else 10)
        print(write_results("sparse_forward", rows, f"Wan2.1-1.3B-shaped forward, 480x832x81, bf16, {device_name()}"))
        return
    densities = [0.25, 1.0] if args.quick else [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    iters = 3 if args.quick else 10
    shapes = list(SHAPES)[:1] if args.quick else list(SHAPES)
    device = device_name()
    kernel = [row for name in shapes for row in kernel_rows(name, densities, iters)]
    print(write_results("sparse_kernels", kernel, f"Block-sparse attention kernels, bf16, d 128, block 128, {device}"))
    accuracy = accuracy_rows([d for d in densities if d < 1.0] or [0.25])
    print(write_results("sparse_accuracy", accuracy, f"Sparse attention vs dense float32 on local q/k/v, {device}"))
    forward = forward_rows(args.quick, iters)
    print(write_results("sparse_forward", forward, f"Wan2.1-1.3B-shaped forward, 480x832x81, bf16, {device}"))


if __name__ == "__main__":
    main()
