"""Overhead of StockAttnProcessor over diffusers' stock processors: one Wan2.1-1.3B transformer forward
(random weights, bf16, 480x832, 81 frames: 32760 video tokens), and one self-attention module call. Run on
a CUDA GPU:

    PYTHONPATH=. python benchmarks/stock_overhead.py
"""

from __future__ import annotations

import torch
from common import cuda_time_ms, device_name, wan_inputs, wan_transformer, write_results
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diffusers_attn_ext import StockAttnProcessor, attach_context, detach_context, install, uninstall

ROUNDS = 5


def forward_rows(model, inputs) -> list[dict]:
    """Whole-forward medians, the variants interleaved over several rounds so that drift hits all alike."""
    def stock():
        pass

    def hook_only():
        attach_context(model)

    def ours():
        install(model, StockAttnProcessor())

    variants = {"stock processors": stock, "context hook only": hook_only, "StockAttnProcessor (install)": ours}
    times = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, setup in variants.items():
            setup()
            times[name].append(cuda_time_ms(lambda: model(**inputs), warmup=1, iters=3))
            uninstall(model)
            detach_context(model)
    base = min(times["stock processors"])
    return [
        {"what": f"forward, {name}", "ms (best of rounds)": min(t), "ms (median of rounds)": sorted(t)[len(t) // 2],
         "overhead % (best)": 100 * (min(t) / base - 1)}
        for name, t in times.items()
    ]


def module_rows(model, inputs) -> list[dict]:
    """One self-attention module (blocks.0.attn1) at full size: stock processor vs StockAttnProcessor."""
    attn = model.blocks[0].attn1
    hidden = torch.randn(1, 32760, 1536, device="cuda", dtype=torch.bfloat16)
    rotary = model.rope(inputs["hidden_states"])
    rows, base = [], None
    for name, processor in (("stock WanAttnProcessor", WanAttnProcessor()), ("StockAttnProcessor", StockAttnProcessor())):
        attn.set_processor(processor)
        values = [cuda_time_ms(lambda: attn(hidden, None, None, rotary), warmup=3, iters=20) for _ in range(ROUNDS)]
        base = base or min(values)
        rows.append({"what": f"attn1 call, {name}", "ms (best of rounds)": min(values),
                     "ms (median of rounds)": sorted(values)[len(values) // 2], "overhead % (best)": 100 * (min(values) / base - 1)})
    attn.set_processor(WanAttnProcessor())
    return rows


def main() -> None:
    model = wan_transformer()
    inputs = wan_inputs()
    with torch.inference_mode():
        stock_out = model(**inputs)[0]
        install(model, StockAttnProcessor())
        equal = torch.equal(stock_out, model(**inputs)[0])
        uninstall(model)
        rows = module_rows(model, inputs) + forward_rows(model, inputs)
    print(write_results("stock_overhead", rows, f"Wan2.1-1.3B, 480x832x81, bf16, {device_name()}; outputs bit-identical: {equal}"))


if __name__ == "__main__":
    main()
