"""Training throughput of the world video model's phase 2 at several batch sizes (one GPU, random data).

    python benchmarks/world_video_throughput.py --batches 64 128 256

Times the whole phase-2 step of ``world.train_video`` (VAE encode of every frame, text encoder, transformer
forward and backward, AdamW step) in bf16 autocast, after warm-up steps, and prints one JSON line per batch:
optimizer steps per second and videos per second. The training script's GPU driver picks its batch from this.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> None:
    from diffusers_attn_ext.world.models import VideoModelConfig, build_video_pipeline
    from diffusers_attn_ext.world.train_video import _optimizer, as_frames, encode_text, from_frames

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    config = VideoModelConfig()
    pipe = build_video_pipeline(config).to(device)
    pipe.vae.requires_grad_(False).eval()
    params = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
    optimizer = _optimizer(params, 1e-4, 0.01, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    caption = "a small striped red circle moves left slowly on a checkered gray background"
    for batch in args.batches:
        video = torch.rand(batch, 3, config.frames, config.height, config.width, device=device) * 2 - 1

        def step(video=video, batch=batch):
            with torch.no_grad(), autocast:
                latents = from_frames(pipe.vae.encode(as_frames(video)).latent_dist.mode().float(), batch)
            noise = torch.randn_like(latents)
            sigma = torch.rand(batch, device=device)
            noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1, 1) * noise
            with autocast:
                text = encode_text(pipe, [caption] * batch, device)
                pred = pipe.transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text,
                                        return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise - latents)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        print(json.dumps({"batch": batch, "steps_per_s": 1 / seconds, "videos_per_s": batch / seconds,
                          "peak_gib": memory}), flush=True)


if __name__ == "__main__":
    main()
