"""Train the world video model: one command, deterministic, resumable in pieces of any length.

    python -m diffusers_attn_ext.world.train_video --workdir runs/video --time-budget 540

Two phases, one step counter each, both kept in ``--workdir``:

1. ``vae``: the ``AutoencoderKLWan`` learns to reconstruct rendered world frames (L1 + MSE on pixels in [-1, 1]
   through the posterior mean: a plain autoencoder). It codes frames one by one (``models.per_frame_vae``), so
   it trains on each batch's frames as one-frame videos. At its end the per-channel latent mean and
   standard deviation over ``STAT_BATCHES`` batches become the VAE's ``latents_mean``/``latents_std`` (the
   normalisation ``WanPipeline`` undoes before decoding).
2. ``dit``: the ``WanTransformer3DModel`` and the ``UMT5EncoderModel`` learn together, the VAE frozen, with the
   rectified-flow objective of Wan: ``x_s = (1 - s) z + s e``, target ``e - z``, timestep ``1000 s``; ``s`` is drawn
   as ``shift u / (1 + (shift - 1) u)`` with ``u`` uniform (the scheduler's shift, so training weights the noise
   levels as sampling visits them); captions are dropped to "" with probability ``--caption-dropout`` so that
   classifier-free guidance works; text is encoded exactly as ``WanPipeline._get_t5_prompt_embeds`` does (the
   encoder's outputs at the prompt's tokens, zeros up to 512). With ``--dit-object-weight w`` the flow loss weighs
   the latent positions an object covers (its mask max-pooled to the latent grid) ``1 + w`` times: objects are
   a few percent of the positions, and an unweighted loss spends the model on backgrounds it already draws. With
   ``--dit-straight-fraction f`` a fraction ``f`` of every batch is single objects on straight paths, the scenes
   whose caption fixes the motion exactly (a bouncing or curving object's direction word names only its start).

``--init-from EXPORT --init-step N`` starts phase 2 from an exported pipeline (``save_pretrained`` folder, e.g. the
shipped model) as if ``N`` transformer steps had been taken: its weights (in whatever dtype it was saved) become the
float32 starting point, its VAE (and latent statistics) the frozen VAE, and the learning rate warms up again
(there are no optimizer moments to resume). This is how a run continues from the shipped weights.

Every batch is a function of the step alone: scenes from ``sample_scene`` with seeds ``phase_base + step * batch
+ i`` (training seeds are below ``EVAL_SEED_BASE``; evaluation uses seeds from there on), noise and timesteps from a
generator seeded with the step. A run cut at any step and resumed gives the same batches.
``--time-budget`` seconds after the start, the run saves and exits; the next call resumes from the checkpoint. At
the end it exports the pipeline with ``save_pretrained`` to ``--export`` (weights in ``--export-dtype``) and
writes the loss curve (``loss.png``, ``log.jsonl``) in the workdir.

The checkpoint is a set of safetensors files of at most ``--shard-mib`` MiB each (the device tool returns files
of at most 16 MiB): the weights in float32 and the AdamW moments in ``--moment-dtype``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..validation import real
from . import training
from .models import VideoModelConfig, build_video_pipeline
from .render import render_scenes
from .scenes import caption, sample_scene
from .training import load_checkpoint, save_checkpoint

# names other modules import from here (the utilities now live in ``training``)
_optimizer, _restore = training.adamw, training.restore

EVAL_SEED_BASE = 1_000_000_000
VAE_SEED_BASE = 500_000_000
DIT_SEED_BASE = 0
STAT_BATCHES = 8
TEXT_TOKENS = 48  # longest caption (3 objects) is 32 words + </s>
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default


@dataclasses.dataclass
class TrainConfig:
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 5e-4
    dit_steps: int = 12000
    dit_batch: int = 64
    dit_lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    decoder_steps: int = 4000
    decoder_batch: int = 32
    decoder_lr: float = 3e-4
    object_weight: float = 20.0
    dit_object_weight: float = 0.0
    dit_straight_fraction: float = 0.0


class _Batches(torch.utils.data.Dataset):
    """Rendered batches indexed by step: (step, frames uint8 (B, T, 3, H, W), captions, object masks (B, T, H, W)).

    The first ``round(straight_fraction * batch)`` scenes of every batch are single objects on straight paths
    (``sample_scene(seed, num_objects=1, path="straight")``), the rest any scene of the world.
    """

    def __init__(self, base: int, batch: int, model: VideoModelConfig, start: int, stop: int,
                 straight_fraction: float = 0.0) -> None:
        self.base, self.batch, self.model, self.start, self.stop = base, batch, model, start, stop
        self.straight = round(straight_fraction * batch)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        step = self.start + index
        seeds = range(self.base + step * self.batch, self.base + (step + 1) * self.batch)
        scenes = [sample_scene(s, frames=self.model.frames, **({"num_objects": 1, "path": "straight"}
                                                               if i < self.straight else {}))
                  for i, s in enumerate(seeds)]
        video = render_scenes(scenes, self.model.frames, self.model.height, self.model.width)
        frames = (video.frames * 255).round().to(torch.uint8)
        return step, frames, [caption(s) for s in scenes], video.masks.any(1)


def to_model_video(frames: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, T, 3, H, W) -> float (B, 3, T, H, W) in [-1, 1], as the VAE takes videos."""
    return frames.to(device, non_blocking=True).permute(0, 2, 1, 3, 4).float().div(127.5).sub(1.0)


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B * T, C, 1, H, W): every frame a one-frame video (the per-frame VAE's batch)."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, 1, h, w)


def from_frames(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of ``as_frames``."""
    n, c, _, h, w = frames.shape
    return frames.reshape(batch, n // batch, c, h, w).permute(0, 2, 1, 3, 4)


def encode_text(pipe, captions: list[str], device) -> torch.Tensor:
    """Prompt embeddings exactly as ``WanPipeline._get_t5_prompt_embeds`` makes them, with gradients."""
    tokens = pipe.tokenizer(
        captions, padding="max_length", max_length=TEXT_TOKENS, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="pt",
    )
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = pipe.text_encoder(ids, mask).last_hidden_state * mask.unsqueeze(-1)
    return F.pad(hidden, (0, 0, 0, MAX_SEQUENCE_LENGTH - TEXT_TOKENS))


def latent_object_weight(objects: torch.Tensor, shape: torch.Size, weight: float) -> torch.Tensor:
    """Loss weights (B, 1, T, h, w) on the latent grid ``shape`` (B, C, T, h, w): ``1 + weight`` where an object's
    pixel mask (B, T, H, W) touches the latent cell (max-pooled by the VAE's spatial factor), 1 elsewhere."""
    b, t, height, width = objects.shape
    h, w = shape[-2:]
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"latent_object_weight: masks {height}x{width} do not tile the latent grid {h}x{w}")
    pooled = F.max_pool2d(objects.reshape(b * t, 1, height, width).float(), height // h)
    return 1.0 + weight * pooled.reshape(b, t, 1, h, w).permute(0, 2, 1, 3, 4)


def state_from_export(path: Path, step: int, cfg: TrainConfig, model_config: VideoModelConfig
                      ) -> tuple[dict, dict[str, torch.Tensor]]:
    """A phase-2 starting point (state, tensors) from an exported pipeline, as ``load_checkpoint`` returns one:
    the export's weights in float32 and no optimizer moments, at transformer step ``step``."""
    from diffusers import WanPipeline

    if not (path / "model_index.json").exists():
        raise ValueError(f"--init-from: {path} is not a save_pretrained pipeline folder (no model_index.json)")
    if not 0 <= step < cfg.dit_steps:
        raise ValueError(f"--init-step: {step} given, allowed 0 to dit_steps - 1 = {cfg.dit_steps - 1}")
    source = WanPipeline.from_pretrained(str(path), dtype=torch.float32)
    tensors = {f"{name}.{key}": value.float().clone() for name in ("vae", "transformer", "text_encoder")
               for key, value in getattr(source, name).state_dict().items()}
    state = {"phase": "dit", "step": step, "latents_mean": list(source.vae.config.latents_mean),
             "latents_std": list(source.vae.config.latents_std), "train": dataclasses.asdict(cfg),
             "model": dataclasses.asdict(model_config), "init_from": str(path)}
    print(f"starting phase dit at step {step} from {path}", flush=True)
    return state, tensors


def train(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_config = VideoModelConfig(**json.loads(args.model_config)) if args.model_config else VideoModelConfig()
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    real("--dit-straight-fraction", cfg.dit_straight_fraction, 0.0, 1.0)
    real("--dit-object-weight", cfg.dit_object_weight, 0.0)
    torch.manual_seed(cfg.seed)
    pipe = build_video_pipeline(model_config)
    pipe.to(device)
    vae, transformer, text_encoder = pipe.vae, pipe.transformer, pipe.text_encoder
    loaded = load_checkpoint(workdir)
    if loaded is None and args.init_from:
        loaded = state_from_export(Path(args.init_from), args.init_step, cfg, model_config)
    state = {"phase": "vae", "step": 0, "latents_mean": None, "latents_std": None,
             "train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_config)}
    tensors = None
    if loaded is not None:
        state, tensors = loaded
        print(f"resuming at phase {state['phase']} step {state['step']}", flush=True)
    log_path = workdir / "log.jsonl"
    if args.refine_decoder_of:
        return refine_decoder(args, cfg, model_config, vae, device, started)
    if args.export_only:
        if tensors is None or "transformer.proj_out.weight" not in tensors:
            raise ValueError(f"--export-only: no transformer checkpoint in {workdir}")
        training.restore({"vae": vae, "transformer": transformer, "text_encoder": text_encoder}, None, tensors)
        if args.vae_from:
            refined = load_checkpoint(Path(args.vae_from))
            if refined is None:
                raise ValueError(f"--vae-from: no checkpoint in {args.vae_from}")
            training.restore({"vae": vae}, None, refined[1])
        export(pipe, state, Path(args.export), args.export_dtype)
        plot_loss(log_path, workdir / "loss.png")
        return state
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def out_of_time() -> bool:
        return time.monotonic() - started > args.time_budget

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # ---- phase 1: the VAE
    if state["phase"] == "vae":
        modules = {"vae": vae}
        optimizer = training.adamw(vae.parameters(), cfg.vae_lr, 0.0, device)
        training.resume(modules, optimizer, tensors, state["step"])
        vae.train()
        data = training.loader(_Batches(VAE_SEED_BASE, cfg.vae_batch, model_config, state["step"], cfg.vae_steps),
                               args.workers)
        losses = training.LossLog(log_path, "vae", 50, started, last=cfg.vae_steps)
        for step, frames, _, _ in data:
            training.set_lr(optimizer, training.learning_rate(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup))
            video = as_frames(to_model_video(frames, device))
            with autocast:
                recon = vae.decode(vae.encode(video).latent_dist.mode()).sample
            recon = recon.float()
            loss = F.l1_loss(recon, video) + F.mse_loss(recon, video)
            training.optimizer_step(optimizer, loss, vae.parameters(), cfg.grad_clip)
            state["step"] = step + 1
            losses.add(state["step"], loss)
            if out_of_time():
                break
        if state["step"] < cfg.vae_steps:
            save_checkpoint(workdir, state, modules, optimizer, moment_dtype=args.moment_dtype_t,
                            shard_mib=args.shard_mib)
            return state
        mean, std = _latent_statistics(vae, model_config, device, args.workers)
        state.update(phase="dit", step=0, latents_mean=mean, latents_std=std)
        tensors = None
        save_checkpoint(workdir, state, {"vae": vae}, None, moment_dtype=args.moment_dtype_t,
                        shard_mib=args.shard_mib)
    # ---- phase 2: transformer + text encoder
    if state["phase"] == "dit":
        if tensors is not None and not any(k.startswith("transformer.") for k in tensors):
            vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
            tensors = None
        vae.requires_grad_(False).eval()
        modules = {"vae": vae, "transformer": transformer, "text_encoder": text_encoder}
        trainable = [p for m in (transformer, text_encoder) for p in m.parameters()]
        optimizer = training.adamw(trainable, cfg.dit_lr, cfg.weight_decay, device)
        rewarm_from = training.resume(modules, optimizer, tensors, state["step"])  # no moments saved: warm up again
        transformer.train()
        text_encoder.train()
        mean = torch.tensor(state["latents_mean"], device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(state["latents_std"], device=device).view(1, -1, 1, 1, 1)
        shift = model_config.flow_shift
        data = training.loader(_Batches(DIT_SEED_BASE, cfg.dit_batch, model_config, state["step"], cfg.dit_steps,
                                        cfg.dit_straight_fraction), args.workers)
        kind = f"object-weighted (1 + {cfg.dit_object_weight:g})" if cfg.dit_object_weight else ""
        losses = training.LossLog(log_path, "dit", 100, started, last=cfg.dit_steps, kind=kind)
        for step, frames, captions, objects in data:
            training.set_lr(optimizer, training.learning_rate(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup, rewarm_from))
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
            drop = torch.rand(len(captions), generator=torch.Generator().manual_seed(step)) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            with torch.no_grad(), autocast:
                video = to_model_video(frames, device)
                latents = vae.encode(as_frames(video)).latent_dist.mode().float()
                latents = (from_frames(latents, video.shape[0]) - mean) / std
            u = torch.rand(latents.shape[0], device=device, generator=generator)
            sigma = shift * u / (1 + (shift - 1) * u)
            noise = torch.randn(latents.shape, device=device, generator=generator)
            s = sigma.view(-1, 1, 1, 1, 1)
            noisy = (1 - s) * latents + s * noise
            with autocast:
                text = encode_text(pipe, captions, device)
                pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=text,
                                   return_dict=False)[0]
            error = (pred.float() - (noise - latents)) ** 2
            if cfg.dit_object_weight:
                weight = latent_object_weight(objects.to(device), latents.shape, cfg.dit_object_weight)
                loss = (error * weight).sum() / (weight.sum() * latents.shape[1])
            else:
                loss = error.mean()
            training.optimizer_step(optimizer, loss, trainable, cfg.grad_clip)
            state["step"] = step + 1
            losses.add(state["step"], loss)
            if out_of_time():
                break
        save_checkpoint(workdir, state, modules, optimizer, moment_dtype=args.moment_dtype_t,
                        shard_mib=args.shard_mib)
        if state["step"] >= cfg.dit_steps:
            state["phase"] = "done"
            (workdir / "ckpt" / "state.json").write_text(json.dumps(state, indent=1))
    if state["phase"] == "done":
        if args.export:
            export(pipe, state, Path(args.export), args.export_dtype)
        plot_loss(log_path, workdir / "loss.png")
    return state


def refine_decoder(args, cfg: TrainConfig, model_config: VideoModelConfig, vae, device, started: float) -> dict:
    """Phase 3 (``--refine-decoder-of WORKDIR``, its own ``--workdir``): train the VAE's decoder alone, encoder
    frozen, so the latents (and a transformer trained on them) stay valid, with the reconstruction loss weighted
    ``1 + object_weight`` on object pixels (the objects are a few percent of the pixels; an unweighted loss
    learns the backgrounds first and decodes objects as gray blurs). Independent of phase 2: it can run beside it.
    """
    workdir = Path(args.workdir)
    source = load_checkpoint(Path(args.refine_decoder_of))
    if source is None or source[0]["phase"] == "vae":
        raise ValueError(f"--refine-decoder-of: {args.refine_decoder_of} holds no finished VAE phase")
    training.restore({"vae": vae}, None, {k: v for k, v in source[1].items() if k.startswith("vae.")})
    state = {**source[0], "phase": "decoder", "step": 0}
    loaded = load_checkpoint(workdir)
    vae.requires_grad_(False)
    decoder = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    for p in decoder:
        p.requires_grad_(True)
    modules = {"vae": vae}
    optimizer = training.adamw(decoder, cfg.decoder_lr, 0.0, device)
    if loaded is not None:
        state = loaded[0]
        training.restore(modules, optimizer, loaded[1])
        print(f"resuming decoder refinement at step {state['step']}", flush=True)
    vae.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data = training.loader(_Batches(VAE_SEED_BASE + 100_000_000, cfg.decoder_batch, model_config, state["step"],
                                    cfg.decoder_steps), args.workers)
    losses = training.LossLog(workdir / "log.jsonl", "decoder", 100, started, last=cfg.decoder_steps)
    for step, frames, _, objects in data:
        training.set_lr(optimizer, training.learning_rate(step, cfg.decoder_steps, cfg.decoder_lr, cfg.warmup))
        video = as_frames(to_model_video(frames, device))
        weight = 1.0 + cfg.object_weight * as_frames(objects.to(device).unsqueeze(1).float())
        with torch.no_grad(), autocast:
            latents = vae.encode(video).latent_dist.mode()
        with autocast:
            recon = vae.decode(latents).sample.float()
        error = (recon - video).abs() + (recon - video) ** 2
        loss = (error * weight).sum() / (weight.sum() * 3)
        training.optimizer_step(optimizer, loss, decoder, cfg.grad_clip)
        state["step"] = step + 1
        losses.add(state["step"], loss)
        if time.monotonic() - started > args.time_budget:
            break
    if state["step"] >= cfg.decoder_steps:
        state["phase"] = "done"
    save_checkpoint(workdir, state, modules, optimizer, moment_dtype=args.moment_dtype_t, shard_mib=args.shard_mib)
    return state


@torch.no_grad()
def _latent_statistics(vae, model_config: VideoModelConfig, device, workers: int) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means over STAT_BATCHES batches of evaluation-free seeds."""
    vae.eval()
    data = training.loader(_Batches(VAE_SEED_BASE - 10_000, 16, model_config, 0, STAT_BATCHES), workers)
    latents = []
    for _, frames, _, _ in data:
        latents.append(vae.encode(as_frames(to_model_video(frames, device))).latent_dist.mode().float())
    z = torch.cat(latents).transpose(0, 1).reshape(model_config.z_dim, -1)
    return z.mean(1).tolist(), z.std(1).tolist()


def export(pipe, state: dict, path: Path, dtype_name: str) -> None:
    """``save_pretrained`` of the trained pipeline (``training.save_pipeline``) with the VAE's latent statistics in
    its config."""
    pipe.vae.register_to_config(latents_mean=state["latents_mean"], latents_std=state["latents_std"])
    training.save_pipeline(pipe, path, dtype_name)
    print(f"exported to {path}", flush=True)


LOSS_PANELS = (("vae", "VAE reconstruction (L1 + MSE)"), ("dit", "transformer + text encoder (flow MSE)"),
               ("decoder", "decoder refinement (object-weighted)"))


def plot_loss(log_path: Path, png: Path) -> None:
    """The loss curve of each phase in ``log.jsonl`` (log scale; ``training.plot_loss``)."""
    training.plot_loss(log_path, png, LOSS_PANELS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--export", default=None, help="save_pretrained directory for the finished pipeline")
    parser.add_argument("--init-from", default=None, help="exported pipeline to start phase 2 from (no checkpoint yet)")
    parser.add_argument("--init-step", type=int, default=0, help="with --init-from: transformer steps already taken")
    parser.add_argument("--export-only", action="store_true", help="export what the checkpoint holds; no training")
    parser.add_argument("--vae-from", default=None, help="with --export-only: the VAE of this refinement workdir")
    parser.add_argument("--refine-decoder-of", default=None, help="workdir whose VAE's decoder to refine (phase 3)")
    parser.add_argument("--export-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds before saving and exiting")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--shard-mib", type=float, default=15.0)
    parser.add_argument("--moment-dtype", default="bfloat16", choices=["float32", "bfloat16", "none"],
                        help="precision of the saved AdamW moments; none saves weights only (a resume then re-warms)")
    parser.add_argument("--model-config", default=None, help="JSON overrides of VideoModelConfig (tests)")
    training.add_config_options(parser, TrainConfig)
    args = parser.parse_args(argv)
    args.moment_dtype_t = training.moment_dtype(args.moment_dtype)
    return args


def main(argv=None) -> None:
    state = train(parse_args(argv))
    print(json.dumps({"phase": state["phase"], "step": state["step"]}), flush=True)


if __name__ == "__main__":
    main()
