"""Train the world image model: one command, deterministic, resumable in pieces of any length.

    python -m diffusers_attn_ext.world.train_image --workdir runs/image --time-budget 500 --export runs/image-export

Two phases, one step counter each, both kept in ``--workdir``:

1. ``vae``: the ``AutoencoderKL`` learns to reconstruct rendered world images (pixels in [-1, 1], through the
   posterior mean: a plain autoencoder) with the loss ``sum w (|x' - x| + (x' - x)^2) / (3 sum w)``, weighted
   ``w = 1 + vae_object_weight`` on subject pixels from the first step (unweighted, a small autoencoder learns the
   backgrounds first and the subjects' colours and patterns last). At its end the mean and standard deviation of
   the latents over ``STAT_BATCHES`` batches become the VAE's ``shift_factor`` and ``scaling_factor = 1 / std``
   (FLUX normalises latents as ``(z - shift_factor) * scaling_factor``).
2. ``dit``: the ``FluxTransformer2DModel`` and both text encoders learn together, the VAE frozen, with FLUX's
   rectified flow: ``x_s = (1 - s) z + s e`` on the packed latents, target ``e - z`` (the velocity
   ``FlowMatchEulerDiscreteScheduler`` integrates), timestep ``s`` (FLUX multiplies it by 1000 inside). ``s`` is
   drawn logit-normal (``u = sigmoid(n)``, ``n ~ N(0, 1)``; Esser et al. 2024, Sec. 3.1) and shifted as the
   pipeline shifts its schedule at the trained size: ``s = e^mu u / (1 + (e^mu - 1) u)`` with FLUX's
   ``mu = calculate_shift(image tokens)``. Captions are dropped to "" with probability ``--caption-dropout`` (the
   negative prompt of classifier-free guidance through ``true_cfg_scale``). Text is encoded exactly as
   ``FluxPipeline.encode_prompt`` does (CLIP's pooled output at ``clip_tokens``; T5's outputs padded, without a
   mask, to ``text_tokens``, and on a ``--long-text-fraction`` of the steps to FluxPipeline's default 512, so the
   default call is not off the training distribution).

Every batch is a function of the step alone: scenes from ``sample_image_scene`` with seeds ``phase_base + step *
batch + i`` (all below ``train_video.EVAL_SEED_BASE``; evaluation uses seeds from there on), caption dropout and
text length from a generator seeded with the step, noise and timesteps from a device generator seeded with the
step. Data workers sample scenes and tokenize; the images are rendered on the training device. A run cut at any
step and resumed gives the same batches (bit-identical weights when the moments are saved in float32).

``--time-budget`` seconds after the start, the run saves and exits; the next call resumes from the checkpoint.
``--dit-steps 0`` (the default) plans the length of phase 2 from the measured throughput: after ``PROBE_STEPS``
steps of the first call that reaches phase 2 it fixes ``dit_steps = step + rate * (dit_seconds - elapsed)``
(``--dit-seconds``: the seconds of phase 2 over all calls; default what is left of this call's budget less
``RESERVE_SECONDS``) and records it in the checkpoint; a positive ``--dit-steps`` sets it instead. The learning
rate warms up, stays, and decays linearly to zero over the last ``training.DECAY_FRACTION`` of the steps.
At the end it exports the pipeline with ``save_pretrained`` to ``--export`` (weights in ``--export-dtype``) with
``training.json`` (both configs, the steps), and writes the loss curve (``loss.png``, ``log.jsonl``) in the
workdir. The checkpoint is safetensors shards of at most ``--shard-mib`` MiB (``training.save_checkpoint``):
weights in float32, AdamW moments in ``--moment-dtype`` (``none``: weights only; a resume then re-warms the
learning rate over ``training.REWARM_STEPS``).

``--check`` (``check_first_step``) checks, before phase 2 trains, the ids of its first batch against every embedding
table of the text encoders (ValueError) and runs its first step at two batch sizes and both T5 lengths with the
device synchronised around every module, so that an asynchronous device error (which CUDA reports at a later
kernel, e.g. as ``CUBLAS_STATUS_EXECUTION_FAILED`` in a matrix product) is raised naming the module where it
happened; the parts of the pipeline are checked against each other (``image_models.check_image_pipeline``) on
every call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..validation import integer, real
from . import training
from .image_models import (
    ImageModelConfig,
    build_clip_tokenizer,
    build_image_pipeline,
    check_image_pipeline,
    check_text_ids,
)
from .image_render import render_parameters, scene_parameters
from .image_scenes import image_caption, sample_image_scene
from .models import build_tokenizer

IMAGE_DIT_SEED_BASE = 200_000_000
IMAGE_VAE_SEED_BASE = 700_000_000
IMAGE_STAT_SEED_BASE = 690_000_000
STAT_BATCHES = 8
LONG_TEXT_TOKENS = 512  # FluxPipeline's default max_sequence_length
PROBE_STEPS = 200
PROBE_SKIP = 20  # steps left out of the throughput probe (warm-up of kernels and workers)
RESERVE_SECONDS = 45.0  # what a call needs after training: the checkpoint, the export, the loss plot
UNPLANNED = 10**9
LOSS_PANELS = (("vae", "VAE reconstruction (object-weighted L1 + MSE)"),
               ("dit", "transformer + text encoders (flow MSE)"))


@dataclasses.dataclass
class ImageTrainConfig:
    vae_steps: int = 2000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_object_weight: float = 4.0
    dit_steps: int = 0
    dit_batch: int = 256
    dit_lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    long_text_fraction: float = 0.1
    dit_object_weight: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def model_config_from_json(text: str | None) -> ImageModelConfig:
    """``ImageModelConfig`` with the JSON overrides ``text`` (lists become tuples)."""
    if not text:
        return ImageModelConfig()
    overrides = json.loads(text) if isinstance(text, str) else dict(text)
    return ImageModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def tokenize(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Token ids (B, length) as FluxPipeline makes them: padded to ``length``, truncated, no mask."""
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


class ImageBatches(torch.utils.data.Dataset):
    """Batches indexed by step: (step, scene parameters, CLIP ids, T5 ids at ``text_tokens``, long text?)."""

    def __init__(self, base: int, batch: int, start: int, stop: int, model: ImageModelConfig, *,
                 caption_dropout: float = 0.0, long_text_fraction: float = 0.0, seed: int = 0,
                 text: bool = True) -> None:
        self.base, self.batch, self.start, self.stop, self.model = base, batch, start, stop, model
        self.caption_dropout, self.long_text_fraction, self.seed, self.text = (caption_dropout, long_text_fraction,
                                                                              seed, text)
        self.clip_tokenizer = build_clip_tokenizer(model.clip_tokens) if text else None
        self.t5_tokenizer = build_tokenizer() if text else None

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        step = self.start + index
        scenes = [sample_image_scene(self.base + step * self.batch + i) for i in range(self.batch)]
        params = scene_parameters(scenes)
        if not self.text:
            return step, params, None, None, False
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        drop = (torch.rand(self.batch, generator=generator) < self.caption_dropout).tolist()
        long = bool(torch.rand((), generator=generator) < self.long_text_fraction)
        captions = ["" if d else image_caption(s) for s, d in zip(scenes, drop, strict=True)]
        return (step, params, tokenize(self.clip_tokenizer, captions, self.model.clip_tokens),
                tokenize(self.t5_tokenizer, captions, self.model.text_tokens), long)


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled CLIP (B, clip_dim), T5 (B, length, t5_dim)) exactly as ``FluxPipeline.encode_prompt`` makes them
    from these ids, with gradients; T5 ids are padded with the pad id up to ``length``."""
    device = pipe.transformer.device
    if length > t5_ids.shape[1]:
        t5_ids = F.pad(t5_ids, (0, length - t5_ids.shape[1]), value=pipe.tokenizer_2.pad_token_id)
    pooled = pipe.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5 = pipe.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    return pooled, t5


def image_tokens_shift(model: ImageModelConfig) -> float:
    """``e^mu``: the factor FluxPipeline's schedule is shifted by at the trained size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(model.image_tokens, model.base_tokens, model.max_tokens, model.base_shift, model.max_shift)
    return math.exp(mu)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> FLUX's packed (B, h/2 * w/2, 4C) tokens (``FluxPipeline._pack_latents``)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def latent_ids(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    _, _, h, w = latents.shape
    return FluxPipeline._prepare_latent_image_ids(latents.shape[0], h // 2, w // 2, latents.device, latents.dtype)


def token_object_weight(masks: torch.Tensor, tokens_side: int, weight: float) -> torch.Tensor:
    """(B, K, H, W) subject masks -> (B, tokens, 1) loss weights ``1 + weight`` on the tokens a subject touches."""
    touched = F.adaptive_max_pool2d(masks.any(1, keepdim=True).float(), tokens_side)
    return (1.0 + weight * touched).flatten(1).unsqueeze(-1)


def check_config(cfg: ImageTrainConfig) -> ImageTrainConfig:
    """ValueError, naming the option, for a setting outside its range (before any model is built)."""
    for name in ("vae_steps", "vae_batch", "dit_batch"):
        integer(f"--{name.replace('_', '-')}", getattr(cfg, name), 1)
    for name in ("dit_steps", "warmup", "seed"):
        integer(f"--{name.replace('_', '-')}", getattr(cfg, name), 0)
    for name in ("caption_dropout", "long_text_fraction"):
        real(f"--{name.replace('_', '-')}", getattr(cfg, name), 0.0, 1.0)
    for name in ("vae_lr", "dit_lr", "grad_clip"):
        real(f"--{name.replace('_', '-')}", getattr(cfg, name), 0.0, low_open=True)
    for name in ("vae_object_weight", "dit_object_weight", "weight_decay"):
        real(f"--{name.replace('_', '-')}", getattr(cfg, name), 0.0)
    return cfg


def train(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_config = model_config_from_json(args.model_config)
    cfg = check_config(ImageTrainConfig(**{f.name: getattr(args, f.name)
                                            for f in dataclasses.fields(ImageTrainConfig)}))
    real("--time-budget", args.time_budget, 0.0)
    real("--dit-seconds", args.dit_seconds, 0.0, allow_none=True)
    integer("--workers", args.workers, 0)
    torch.manual_seed(cfg.seed)
    pipe = build_image_pipeline(model_config)
    check_image_pipeline(pipe)
    pipe.to(device)
    modules = {"vae": pipe.vae, "transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    state = {"phase": "vae", "step": 0, "shift_factor": None, "scaling_factor": None, "dit_steps": None,
             "train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_config)}
    tensors = None
    loaded = training.load_checkpoint(workdir)
    if loaded is not None:
        state, tensors = loaded
        print(f"resuming at phase {state['phase']} step {state['step']}", flush=True)
        if not args.export_only:  # the record says what this call trains with (earlier calls' settings are in the log)
            state["train"] = dataclasses.asdict(cfg)
    state["float32"] = bool(getattr(args, "float32", False)) if not args.export_only else state.get("float32", False)
    log_path = workdir / "log.jsonl"
    if state["phase"] == "done" and tensors is not None:  # a finished run called again: export what it holds
        training.restore(modules, None, tensors)
    if args.export_only:
        if tensors is None or state["phase"] == "vae":
            raise ValueError(f"--export-only: no transformer checkpoint in {workdir}")
        training.restore(modules, None, tensors)
        export(pipe, state, model_config, Path(args.export), args.export_dtype)
        training.plot_loss(log_path, workdir / "loss.png", LOSS_PANELS)
        return state
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def elapsed() -> float:
        return time.monotonic() - started

    # bfloat16 autocast on CUDA unless --float32 (then TF32 matmuls): the fallback when a bf16 GEMM fails
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and not getattr(args, "float32", False))
    size = model_config.size
    vae, transformer = pipe.vae, pipe.transformer
    # ---- phase 1: the VAE, object-weighted
    if state["phase"] == "vae":
        optimizer = training.adamw(vae.parameters(), cfg.vae_lr, 0.0, device)
        training.resume({"vae": vae}, optimizer, tensors, state["step"])
        vae.train()
        data = training.loader(ImageBatches(IMAGE_VAE_SEED_BASE, cfg.vae_batch, state["step"], cfg.vae_steps,
                                            model_config, text=False), args.workers)
        losses = training.LossLog(log_path, "vae", 100, started, rate=True)
        for step, params, _, _, _ in data:
            training.set_lr(optimizer, training.learning_rate(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup))
            images, masks = render_parameters(params, size, size, device=device)
            x = images * 2.0 - 1.0
            with autocast:
                recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
            error = (recon.float() - x).abs() + (recon.float() - x) ** 2
            weight = 1.0 + cfg.vae_object_weight * masks.any(1, keepdim=True).float()
            loss = (error * weight).sum() / (weight.sum() * 3)
            training.optimizer_step(optimizer, loss, vae.parameters(), cfg.grad_clip)
            state["step"] = step + 1
            losses.add(state["step"], loss, force=state["step"] == cfg.vae_steps)
            if elapsed() > args.time_budget:
                break
        if state["step"] < cfg.vae_steps:
            training.save_checkpoint(workdir, state, {"vae": vae}, optimizer, moment_dtype=args.moment_dtype_t,
                                     shard_mib=args.shard_mib)
            return state
        shift, scale = latent_statistics(vae, model_config, device, args.workers)
        state.update(phase="dit", step=0, shift_factor=shift, scaling_factor=scale)
        tensors = None
        training.save_checkpoint(workdir, state, {"vae": vae}, None, moment_dtype=args.moment_dtype_t,
                                 shard_mib=args.shard_mib)
    # ---- phase 2: transformer + text encoders
    if state["phase"] == "dit":
        if tensors is not None and not any(k.startswith("transformer.") for k in tensors):
            training.restore({"vae": vae}, None, tensors)
            tensors = None
        vae.requires_grad_(False).eval()
        trainable_modules = (transformer, pipe.text_encoder, pipe.text_encoder_2)
        trainable = [p for m in trainable_modules for p in m.parameters()]
        optimizer = training.adamw(trainable, cfg.dit_lr, cfg.weight_decay, device)
        rewarm_from = training.resume(modules, optimizer, tensors, state["step"])  # no moments saved: warm up again
        for m in trainable_modules:
            m.train()
        if cfg.dit_steps > 0:
            state["dit_steps"] = cfg.dit_steps
        planned_seconds = args.dit_seconds if args.dit_seconds is not None else (
            args.time_budget - elapsed() - RESERVE_SECONDS)
        latent_norm = (state["shift_factor"], state["scaling_factor"])
        if args.check:
            check_first_step(pipe, model_config, cfg, latent_norm, state["step"], trainable, autocast)
        dit_started = time.monotonic()
        probe = None  # (step, time) where the throughput probe starts
        stop = state["dit_steps"] or UNPLANNED
        data = training.loader(ImageBatches(IMAGE_DIT_SEED_BASE, cfg.dit_batch, state["step"], stop, model_config,
                                            caption_dropout=cfg.caption_dropout,
                                            long_text_fraction=cfg.long_text_fraction, seed=cfg.seed), args.workers)
        losses = training.LossLog(log_path, "dit", 100, started, rate=True)
        for step, params, clip_ids, t5_ids, long in data:
            total = state["dit_steps"] or UNPLANNED
            if step >= total:
                break
            training.set_lr(optimizer, training.learning_rate(step, total, cfg.dit_lr, cfg.warmup, rewarm_from))
            generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
            length = LONG_TEXT_TOKENS if long else model_config.text_tokens
            loss = dit_loss(pipe, model_config, cfg, latent_norm, (params, clip_ids, t5_ids), length, generator,
                            autocast)
            training.optimizer_step(optimizer, loss, trainable, cfg.grad_clip)
            state["step"] = step + 1
            losses.add(state["step"], loss, force=state["step"] == state["dit_steps"])
            if state["dit_steps"] is None:
                done_here = state["step"] - (data.dataset.start)
                if done_here == PROBE_SKIP:
                    probe = (state["step"], time.monotonic())
                elif probe is not None and done_here == PROBE_STEPS:
                    rate = (state["step"] - probe[0]) / (time.monotonic() - probe[1])
                    left = planned_seconds - (time.monotonic() - dit_started)
                    state["dit_steps"] = max(state["step"] + 1, state["step"] + int(rate * left))
                    print(json.dumps({"planned_dit_steps": state["dit_steps"], "steps_per_s": rate,
                                      "planned_seconds": planned_seconds}), flush=True)
            if state["dit_steps"] is not None and state["step"] >= state["dit_steps"]:
                break
            if elapsed() > args.time_budget:
                break
        if state["dit_steps"] is not None and state["step"] >= state["dit_steps"]:
            state["phase"] = "done"
        training.save_checkpoint(workdir, state, modules, optimizer, moment_dtype=args.moment_dtype_t,
                                 shard_mib=args.shard_mib)
    if state["phase"] == "done":
        if args.export:
            export(pipe, state, model_config, Path(args.export), args.export_dtype)
        training.plot_loss(log_path, workdir / "loss.png", LOSS_PANELS)
    return state


def dit_loss(pipe, model: ImageModelConfig, cfg: ImageTrainConfig, latent_norm: tuple[float, float], batch,
             length: int, generator: torch.Generator, autocast, stage=None) -> torch.Tensor:
    """The phase-2 loss of one batch ``(scene parameters, CLIP ids, T5 ids)`` with ``length`` T5 tokens (module
    docstring): VAE latents ``(z - shift_factor) * scaling_factor`` (``latent_norm``), packed; ``s`` logit-normal,
    shifted; ``x_s = (1 - s) z + s e``; the flow MSE against ``e - z``, object-weighted with ``dit_object_weight``.
    ``stage(name)``, if given, is called after each part (``check_first_step`` synchronises the device there)."""
    stage = stage or (lambda name: None)
    params, clip_ids, t5_ids = batch
    device, size = pipe.transformer.device, model.size
    with torch.no_grad():
        images, masks = render_parameters(params, size, size, device=device)
        stage("render")
        with autocast:
            latents = pipe.vae.encode(images * 2.0 - 1.0).latent_dist.mode()
        latents = (latents.float() - latent_norm[0]) * latent_norm[1]
        ids = latent_ids(latents)
        latents = pack(latents)
        stage("vae")
    shift = image_tokens_shift(model)
    u = torch.sigmoid(torch.randn(latents.shape[0], device=device, generator=generator))
    sigma = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(latents.shape, device=device, generator=generator)
    s = sigma.view(-1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    stage("noise")
    with autocast:
        pooled, text = encode_text(pipe, clip_ids, t5_ids, length)
        stage("text encoders")
        text_ids = torch.zeros(length, 3, device=device, dtype=latents.dtype)
        pred = pipe.transformer(hidden_states=noisy, timestep=sigma, guidance=None, pooled_projections=pooled,
                                encoder_hidden_states=text, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
        stage("transformer")
    error = (pred.float() - (noise - latents)) ** 2
    if cfg.dit_object_weight:
        tokens_side = size // 2 ** len(model.vae_channels)
        weight = token_object_weight(masks, tokens_side, cfg.dit_object_weight)
        return (error * weight).sum() / (weight.sum() * error.shape[-1])
    return error.mean()


CHECK_SMALL_BATCH = 8


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DeviceErrorLocator:
    """While active, synchronises the device before and after every module's forward, so that an asynchronous
    device error (a device assert, an illegal address) is raised by the module where it happened, not by a later
    kernel; ``where`` says what last finished and what was running."""

    def __init__(self, pipe, device: torch.device) -> None:
        self.device = device
        self.names = {id(m): f"{c}.{n}" if n else c for c in ("vae", "text_encoder", "text_encoder_2", "transformer")
                      for n, m in getattr(pipe, c).named_modules()}
        self.last, self.failed, self.handles = "no module", None, []

    def _sync(self, module, when: str) -> None:
        try:
            _synchronize(self.device)
        except RuntimeError:
            self.failed = f"{when} {self.names.get(id(module), type(module).__name__)}"
            raise

    def _before(self, module, _inputs) -> None:
        self._sync(module, "before")  # an error here is from the operations between self.last and this module

    def _after(self, module, _inputs, _output) -> None:
        self._sync(module, "in")
        self.last = self.names.get(id(module), type(module).__name__)

    def where(self) -> str:
        return f"module {self.failed}, after {self.last}" if self.failed else f"after module {self.last}"

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.handles = [register_module_forward_pre_hook(self._before), register_module_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def check_first_step(pipe, model: ImageModelConfig, cfg: ImageTrainConfig, latent_norm: tuple[float, float],
                     step: int, trainable, autocast) -> None:
    """``--check``: before phase 2 trains, validate the batch of its first ``step`` and run that step's loss and
    backward pass without an optimizer step, printing one JSON line each.

    1. ``image_models.check_text_ids``: every CLIP and T5 id and CLIP position inside its embedding table, for the
       batch's own T5 length and for ``LONG_TEXT_TOKENS`` (ValueError naming the tensor and the table).
    2. The step at ``CHECK_SMALL_BATCH`` samples, then at ``--dit-batch``, each at ``text_tokens`` and at
       ``LONG_TEXT_TOKENS`` T5 tokens (the long length only when ``--long-text-fraction`` is above 0), with the device synchronised after every stage and before and after every
       module (``_DeviceErrorLocator``): a device error is raised as a RuntimeError that names the batch size, the
       T5 length, the stage and the module where it surfaced; a non-finite loss raises one too. On CUDA each line
       has the peak memory and the free memory of the device.

    Gradients are cleared afterwards and no weight changes; the batches of training are functions of their steps,
    so a run with ``--check`` trains exactly as one without."""
    import diffusers
    import transformers

    device = pipe.transformer.device
    dataset = ImageBatches(IMAGE_DIT_SEED_BASE, cfg.dit_batch, step, step + 1, model,
                           caption_dropout=cfg.caption_dropout, long_text_fraction=cfg.long_text_fraction,
                           seed=cfg.seed)
    _, params, clip_ids, t5_ids, long = dataset[0]
    print(json.dumps({"check": "versions", "device": str(device), "torch": torch.__version__,
                      "cuda": torch.version.cuda, "transformers": transformers.__version__,
                      "diffusers": diffusers.__version__,
                      "clip_attention": pipe.text_encoder.config._attn_implementation,
                      "t5_attention": pipe.text_encoder_2.config._attn_implementation}), flush=True)
    lengths = sorted({model.text_tokens, LONG_TEXT_TOKENS} if cfg.long_text_fraction > 0 else {model.text_tokens})
    for length in lengths:
        check_text_ids(pipe, clip_ids, t5_ids, length)
    clip, t5 = pipe.text_encoder.config, pipe.text_encoder_2.config
    print(json.dumps({"check": "ids", "step": step, "long": long, "clip_ids": list(clip_ids.shape),
                      "clip_id_max": int(clip_ids.max()), "clip_vocab": clip.vocab_size,
                      "clip_positions": clip.max_position_embeddings, "t5_ids": list(t5_ids.shape),
                      "t5_id_max": int(t5_ids.max()), "t5_vocab": t5.vocab_size}), flush=True)
    batches = sorted({min(CHECK_SMALL_BATCH, cfg.dit_batch), cfg.dit_batch})
    for batch in batches:
        part = ({k: v[:batch] for k, v in params.items()}, clip_ids[:batch], t5_ids[:batch])
        for length in lengths:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            done = ["start"]

            def stage(name: str, done: list[str] = done) -> None:
                _synchronize(device)
                done.append(name)

            locator = _DeviceErrorLocator(pipe, device)
            try:
                with locator:
                    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
                    loss = dit_loss(pipe, model, cfg, latent_norm, part, length, generator, autocast, stage)
                stage("loss")
                loss.backward()
                stage("backward")
                value = float(loss.detach())
            except RuntimeError as err:
                raise RuntimeError(f"--check: phase-2 step {step} at batch {batch} with {length} T5 tokens failed "
                                   f"on {device} after stage {done[-1]!r} ({locator.where()}): {err}") from err
            finally:
                for p in trainable:
                    p.grad = None
            if not math.isfinite(value):
                raise RuntimeError(f"--check: phase-2 step {step} at batch {batch} with {length} T5 tokens: loss "
                                   f"{value} on {device}")
            line = {"check": "step", "batch": batch, "text_tokens": length, "loss": value}
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                line.update(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, free_gib=free / 2**30,
                            total_gib=total / 2**30)
            print(json.dumps(line), flush=True)
    print(json.dumps({"check": "passed", "step": step}), flush=True)


@torch.no_grad()
def latent_statistics(vae, model: ImageModelConfig, device, workers: int) -> tuple[float, float]:
    """(mean, 1 / std) of the posterior means over STAT_BATCHES batches of 64 (their own seeds)."""
    vae.eval()
    data = training.loader(ImageBatches(IMAGE_STAT_SEED_BASE, 64, 0, STAT_BATCHES, model, text=False), workers)
    latents = []
    for _, params, _, _, _ in data:
        images, _ = render_parameters(params, model.size, model.size, device=device)
        latents.append(vae.encode(images * 2.0 - 1.0).latent_dist.mode().float())
    z = torch.cat(latents)
    return float(z.mean()), float(1.0 / z.std())


def export(pipe, state: dict, model: ImageModelConfig, path: Path, dtype_name: str) -> None:
    """``save_pretrained`` of the trained pipeline (``training.save_pipeline``) with the VAE's latent normalisation
    in its config, and
    ``training.json`` (state without the tensors: configs, phase, steps)."""
    pipe.vae.register_to_config(shift_factor=state["shift_factor"], scaling_factor=state["scaling_factor"])
    training.save_pipeline(pipe, path, dtype_name)
    (path / "training.json").write_text(json.dumps({**state, "export_dtype": dtype_name}, indent=1))
    print(f"exported to {path}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--export", default=None, help="save_pretrained directory for the finished pipeline")
    parser.add_argument("--export-only", action="store_true", help="export what the checkpoint holds; no training")
    parser.add_argument("--export-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--time-budget", type=float, default=500.0, help="seconds before saving and exiting")
    parser.add_argument("--dit-seconds", type=float, default=None,
                        help="with --dit-steps 0: seconds of phase 2 over all calls, counted from where this call "
                             "reaches it (default: the rest of this call's budget)")
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1))
    parser.add_argument("--device", default=None)
    parser.add_argument("--float32", action="store_true", help="no bfloat16 autocast on CUDA (TF32 matmuls)")
    parser.add_argument("--shard-mib", type=float, default=15.0)
    parser.add_argument("--moment-dtype", default="none", choices=["float32", "bfloat16", "none"],
                        help="precision of the saved AdamW moments; none saves weights only (a resume re-warms)")
    parser.add_argument("--model-config", default=None, help="JSON overrides of ImageModelConfig (tests)")
    parser.add_argument("--check", action="store_true",
                        help="before phase 2 trains: check its first batch's ids against every embedding table and "
                             "run its first step at two batch sizes and both T5 lengths, the device synchronised "
                             "after every module (check_first_step)")
    training.add_config_options(parser, ImageTrainConfig)
    args = parser.parse_args(argv)
    args.moment_dtype_t = training.moment_dtype(args.moment_dtype)
    return args


def main(argv=None) -> dict:
    state = train(parse_args(argv))
    print(json.dumps({"phase": state["phase"], "step": state["step"], "dit_steps": state.get("dit_steps")}),
          flush=True)
    return state


if __name__ == "__main__":
    main()
