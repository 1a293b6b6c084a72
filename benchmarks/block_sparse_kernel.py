"""Block-sparse attention kernels on the GPU: our Triton kernel vs FlexAttention's block-sparse kernel vs dense
cuDNN, at Wan2.1-1.3B (12 heads, 32760 tokens) and Wan2.1-14B (40 heads, 75600 tokens) shapes, d 128, bf16,
128x128 blocks; random per-head tables (diagonal kept) at several densities and the radial mask; plus the
accuracy of both sparse kernels against a float64 reference.

    PYTHONPATH=. python benchmarks/block_sparse_kernel.py [--quick]
"""

from __future__ import annotations

import argparse

import torch
from common import attention_tflops, cuda_time_ms, device_name, peak_memory_gib, write_results
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusers_attn_ext.kernels.block_sparse_table import mark_static
from diffusers_attn_ext.kernels.block_sparse_triton import block_sparse_attention
from diffusers_attn_ext.kernels.flex import flex_attention_bnhd, flex_block_mask
from diffusers_attn_ext.masks import radial_block_mask

# Calls queued per timed run, dense and sparse alike (common.cuda_time_ms): kernel time without host gaps.
BACK_TO_BACK = 5
SHAPES = {"Wan2.1-1.3B 480p 81f": (12, 21, 1560), "Wan2.1-14B 720p 81f": (40, 21, 3600)}


def random_table(heads: int, blocks: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator("cuda").manual_seed(seed)
    table = torch.rand(1, heads, blocks, blocks, generator=g, device="cuda") < density
    table[..., torch.arange(blocks), torch.arange(blocks)] = True
    return table


def accuracy_rows() -> list[dict]:
    g = torch.Generator("cuda").manual_seed(1)
    n, heads = 1000, 4
    q, k, v = (torch.randn(1, n, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    table = random_table(heads, 8, 0.4, seed=2)
    keep = table.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :n]
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    ref = ((qd @ kd.transpose(-1, -2) * 128**-0.5).masked_fill(~keep, float("-inf")).softmax(-1) @ vd).transpose(1, 2)
    rows = []
    for name, out in (("Triton block-sparse", block_sparse_attention(q, k, v, table)),
                      ("Flex block-sparse", flex_attention_bnhd(q, k, v, block_mask=flex_block_mask(table, 128, n, n)))):
        rows.append({"kernel": name, "rel. L2 error vs float64": ((out.double() - ref).norm() / ref.norm()).item()})
    return rows


def shape_rows(shape: str, densities: list[float], configs: list[dict]) -> list[dict]:
    heads, frames, frame_tokens = SHAPES[shape]
    n = frames * frame_tokens
    blocks = -(-n // 128)
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    dense_ms = cuda_time_ms(cudnn, back_to_back=BACK_TO_BACK)
    rows = [{"shape": shape, "mask": "dense", "density": 1.0, "kernel": "cuDNN", "ms": dense_ms, "x dense": 1.0,
             "x dense / (1/d)": 1.0, "sparse TFLOP/s": attention_tflops(1, heads, n, n, 128, dense_ms),
             "peak GiB": peak_memory_gib(cudnn)}]
    tables = [(f"random {d:.2f}", random_table(heads, blocks, d)) for d in densities]
    tables.append(("radial decay 1.0", radial_block_mask(frames, frame_tokens)[:blocks, :blocks].cuda()[None, None]))
    # As the sparse processors mark their cached masks: compressed once, not at every call.
    tables = [(name, mark_static(table)) for name, table in tables]
    for label, table in tables:
        density = table.float().mean().item()
        flex_mask = flex_block_mask(table, 128, n, n)
        kernels = [(f"Triton {c}" if c else "Triton", lambda table=table, c=c: block_sparse_attention(q, k, v, table, config=c))
                   for c in configs]
        kernels.append(("Flex", lambda flex_mask=flex_mask: flex_attention_bnhd(q, k, v, block_mask=flex_mask)))
        for kernel, fn in kernels:
            try:
                ms = cuda_time_ms(fn, back_to_back=BACK_TO_BACK)
            except Exception as error:  # a tuning config may not fit shared memory
                print(f"{kernel} on {label} failed: {type(error).__name__}: {str(error)[:160]}")
                continue
            rows.append({"shape": shape, "mask": label, "density": density, "kernel": kernel, "ms": ms,
                         "x dense": dense_ms / ms, "x dense / (1/d)": dense_ms / ms * density,
                         "sparse TFLOP/s": attention_tflops(1, heads, n, n, 128, ms) * density,
                         "peak GiB": peak_memory_gib(fn)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="Wan-1.3B shape, two densities")
    parser.add_argument("--configs", action="store_true", help="also time other pipeline depths of the Triton kernel")
    args = parser.parse_args()
    configs = [{}] + ([dict(num_stages=2), dict(num_warps=4, num_stages=2)] if args.configs else [])
    print(write_results("block_sparse_accuracy", accuracy_rows(), f"Block-sparse kernels vs float64, bf16, {device_name()}"))
    densities = [0.1, 0.5] if args.quick else [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    shapes = list(SHAPES)[:1] if args.quick else list(SHAPES)
    rows = [row for shape in shapes for row in shape_rows(shape, densities, configs)]
    print(write_results("block_sparse_kernel", rows, f"Block-sparse attention kernels, d 128, bf16, 128-blocks, {device_name()}"))


if __name__ == "__main__":
    main()
