"""Every method under diffusers' context parallelism vs one GPU (issue 9 acceptance).

Wan2.1-1.3B-shaped transformer (random weights, bf16), 81 frames 480p (21 x 30 x 52 = 32760 tokens), one
forward per method: on one GPU, then with ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` and
``ring_degree=N``. Reports the max relative difference ``max|out_cp - out_1| / max|out_1|`` and the forward
time ratio ``t_cp / t_1`` (median of timed forwards, rank 0's clock).

    PYTHONPATH=. torchrun --nproc_per_node=2 benchmarks/parallel.py            # H200 x2 / H100 x2, NCCL
    PYTHONPATH=. torchrun --nproc_per_node=2 benchmarks/parallel.py --smoke    # tiny, CPU, gloo

UltraViCo acts only beyond the training window; at 81 frames Wan is inside it, so the benchmark declares
``train_frames=11`` (the method then acts on the 21 latent frames as on a 2x-long video).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

# NVLink multicast off before any NCCL / symmetric-memory init (the device machines' README asks for it).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import WAN_1_3B, cuda_time_ms, wan_inputs, wan_transformer, write_results  # noqa: E402

from diffusers_attn_ext import install, uninstall  # noqa: E402
from diffusers_attn_ext.context import get_context  # noqa: E402
from diffusers_attn_ext.processors.adaptive_sparse import AdaptiveSparseProcessor  # noqa: E402
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor  # noqa: E402
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor  # noqa: E402
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor  # noqa: E402

SMOKE_CONFIG = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
                    num_layers=2, rope_max_seq_len=32)


def methods(smoke: bool) -> dict:
    block = 16 if smoke else 128
    layer, heads = ("blocks.1", [0, 3]) if smoke else ("blocks.10", [0, 7])  # one head on each Ulysses rank
    return {
        "stock": lambda: (),
        "UltraViCo": lambda: (UltraViCoProcessor(train_frames=2 if smoke else 11),),
        "Radial": lambda: (RadialSparseProcessor(block_size=block),),
        "Adaptive (density 0.25)": lambda: (AdaptiveSparseProcessor(density=0.25, block_size=block),),
        "SoftPAG (2 heads, perturbed row)": lambda: (SoftPAGProcessor({layer: heads}, alpha=0.7),),
        "UltraViCo + Radial": lambda: (UltraViCoProcessor(train_frames=2 if smoke else 11),
                                       RadialSparseProcessor(block_size=block)),
    }


def install_methods(model, processors) -> None:
    """``install`` (it keeps the backend and parallel config diffusers set on the stock processors) and declare
    the batch as a conditional row and a perturbed row."""
    if not processors:
        return
    install(model, *processors)
    get_context(model.blocks[0].attn1).set_branch_labels(("cond", "perturbed"))


def forward_fn(model, inputs):
    def run():
        with torch.no_grad():
            return model(**inputs)[0]

    return run


def timed(fn, smoke: bool) -> tuple[torch.Tensor, float]:
    dist.barrier()
    if smoke:
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3
    out = fn()
    return out, cuda_time_ms(fn, warmup=1, iters=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU with gloo")
    args = parser.parse_args()
    smoke = args.smoke
    if smoke:
        torch.accelerator.device_count = lambda: 1  # diffusers takes rank % device_count() (0 on a CPU host)
    dist.init_process_group("gloo" if smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if smoke else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if not smoke:
        torch.cuda.set_device(device)
    dtype = torch.float32 if smoke else torch.bfloat16

    from diffusers import ContextParallelConfig

    torch.manual_seed(0)
    base = wan_transformer(SMOKE_CONFIG if smoke else None, dtype=dtype, device=device)
    for tensor in base.state_dict().values():  # identical random weights on every rank
        dist.broadcast(tensor, src=0)
    frames, height, width = (9, 64, 64) if smoke else (81, 480, 832)
    inputs = wan_inputs(frames, height, width, batch=2, dtype=dtype, device=device)
    if smoke:
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][..., :32].contiguous()
    backend = None if smoke else "_native_cudnn"  # ring needs a backend that returns the LSE
    parallel = {}
    for mode in ("ulysses", "ring"):
        model = copy.deepcopy(base)
        if backend:
            model.set_attention_backend(backend)
        model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
        parallel[mode] = model

    rows = []
    for name, make in methods(smoke).items():
        install_methods(base, make())
        reference, single_ms = timed(forward_fn(base, inputs), smoke)
        uninstall(base)
        for mode, model in parallel.items():
            row = {"method": name, "mode": f"{mode} x{world}"}
            dense_layers = name in ("stock", "SoftPAG (2 heads, perturbed row)")
            if smoke and mode == "ring" and dense_layers:
                row.update({"max rel. diff": "-", "time ratio": "-",
                            "note": "diffusers' ring on dense layers needs an LSE backend (GPU only)"})
                rows.append(row)
                continue
            install_methods(model, make())
            out, parallel_ms = timed(forward_fn(model, inputs), smoke)
            uninstall(model)
            diff = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
            row.update({"max rel. diff": f"{diff:.2e}", "max rel. diff < 1e-2": diff < 1e-2, "time ratio": parallel_ms / single_ms,
                        "single ms": single_ms, "parallel ms": parallel_ms, "note": ""})
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
    if rank == 0:
        header = (f"Methods under diffusers' context parallelism, {world} ranks vs one, Wan2.1-1.3B shape, "
                  f"{frames} frames {height}x{width}, {'float32 CPU smoke' if smoke else 'bf16'}; "
                  "max rel. diff = max|out_cp - out_1| / max|out_1|; time ratio = t_cp / t_1 (rank 0)")
        name = "parallel_smoke" if smoke else "parallel"
        columns = ("method", "mode", "max rel. diff", "max rel. diff < 1e-2", "time ratio", "single ms", "parallel ms", "note")
        print(write_results(name, [{c: row.get(c, "-") for c in columns} for row in rows], header))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
