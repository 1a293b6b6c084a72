"""Memory and time of the attention inspector on one Wan2.1-1.3B layer (12 heads, d 128) at 81 frames 480p
(32760 video tokens, bf16, random weights): the whole transformer forward with and without the inspector on
blocks.0.attn1, and one attn1 call (stock processor, StockAttnProcessor, inspector). Run on a CUDA GPU:

    PYTHONPATH=. python benchmarks/inspect_memory.py            # --smoke: the same code, tiny, on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import WAN_1_3B, cuda_time_ms, device_name, wan_inputs, wan_transformer, write_results
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diffusers_attn_ext import StockAttnProcessor, install, uninstall
from diffusers_attn_ext.inspect import AttentionInspector

LAYER = r"^blocks\.0\.attn1$"
TINY_WAN = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=32,
                num_layers=2, rope_max_seq_len=32)


def measure(fn, cuda: bool, iters: int) -> tuple[float, float | None]:
    """(median ms, peak memory above what was allocated before, in MiB; None on CPU) of ``fn()``."""
    if not cuda:
        fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), None
    ms = cuda_time_ms(fn, warmup=1, iters=iters)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def row(what: str, ms: float, peak: float | None, base: float | None) -> dict:
    ratio = "n/a (CPU)" if peak is None else f"{100 * (peak / base - 1):+.1f}%"
    return {"what": what, "ms": ms, "peak MiB above inputs": "n/a (CPU)" if peak is None else peak,
            "peak vs plain": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny Wan transformer and video, on CPU")
    smoke = parser.parse_args().smoke
    cuda = not smoke
    device = "cuda" if cuda else "cpu"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("inspect_memory needs a CUDA GPU; pass --smoke for the tiny CPU run")
    model = wan_transformer(TINY_WAN if smoke else None, device=device)
    inputs = wan_inputs(*((9, 64, 64) if smoke else (81, 480, 832)), device=device)
    if smoke:
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][..., :32]
    iters = 2 if smoke else 3
    rows = []
    with torch.inference_mode():
        plain_out = model(**inputs)[0]
        plain_ms, plain_peak = measure(lambda: model(**inputs), cuda, iters)
        rows.append(row("forward, stock processors", plain_ms, plain_peak, plain_peak))
        inspector = AttentionInspector(layers=LAYER)
        heads = f"all {model.blocks[0].attn1.heads} heads"
        install(model, inspector, layers=LAYER)  # alone, the inspector is the stock processor plus recording
        unchanged = torch.equal(model(**inputs)[0], plain_out)
        ms, peak = measure(lambda: model(**inputs), cuda, iters)
        rows.append(row(f"forward, inspector on blocks.0.attn1 ({heads})", ms, peak, plain_peak))

        # One attn1 call; the context (grid, step) is the one the last forward left.
        attn = model.blocks[0].attn1
        hidden = torch.randn(1, inputs["hidden_states"][0, 0].numel() // 4, attn.inner_dim, device=device,
                             dtype=torch.bfloat16)
        rotary = model.rope(inputs["hidden_states"])
        calls = {"stock WanAttnProcessor": WanAttnProcessor(), "StockAttnProcessor": StockAttnProcessor(),
                 f"inspector ({heads})": inspector}
        base = None
        for name, processor in calls.items():
            attn.set_processor(processor)
            ms, peak = measure(lambda: attn(hidden, None, None, rotary), cuda, iters)
            base = base or peak
            rows.append(row(f"attn1 call, {name}", ms, peak, base))
        uninstall(model)
    stats = inspector.layer_statistics("blocks.0.attn1")
    total = float((stats.temporal.sum(-1) + stats.text_mass).sub(1).abs().max())
    header = (f"Attention inspector, Wan2.1-1.3B-shaped, {'tiny smoke run' if smoke else '480x832x81 (32760 tokens)'}, bf16, "
              f"{device_name()}; forward output unchanged by the inspector: {unchanged}; "
              f"max |sum of profile + text mass - 1|: {total:.2e}")
    print(write_results("inspect_memory" + ("_smoke" if smoke else ""), rows, header))


if __name__ == "__main__":
    main()
