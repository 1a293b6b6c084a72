"""The quality judge of the image world: a small CNN trained on rendered world images, and the metrics it scores.

    python -m diffusers_attn_ext.world.judge --output diffusers_attn_ext/shipped/world-judge --steps 3000

``WorldJudge`` reads a (B, 3, H, W) image in [0, 1] (resized to the trained 32x32 by area averaging or bilinear
interpolation) and predicts, for the whole image: the background (3 classes) and the number of subjects (1-3);
for every pixel its colour (background or one of the world's six subject colours, trained on the exact masks);
and for each colour ``c``: whether a subject of colour ``c`` is present (a logit), its shape (3 classes) and its
pattern (4 classes: the identity the captions do not name), read from ``c``'s pixels centred and scaled to one
size (see ``WorldJudge``). Its image features (``FEATURES`` values: global average pooling of a strided stack of
convolutions, then one linear layer and SiLU) are the space of a Frechet distance to real world images, as FID
uses Inception's.

Scores of an image against the prompt it was generated from (``score_prompts``), per named subject of colour
``c`` and shape ``s``:

    colour found   p_c = sigmoid(present_c) > 1/2
    class correct  argmax shape_c == s             (counted only as a whole: found and of the right shape)
    confidence     p_c * softmax(shape_c)[s]

averaged over the prompt's subjects; ``extra`` counts the colours found that the prompt does not name.
``frechet_distance`` is ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (Heusel et al. 2017,
Eq. 6; the symmetric form of ``Tr (S_a S_b)^1/2``, equal to it for positive semi-definite covariances), in float64.

Training (``train_judge``): every batch is rendered from seeds ``JUDGE_SEED_BASE + step * batch + i`` (below the
evaluation seeds ``train_video.EVAL_SEED_BASE``), with generic augmentations so the judge reads imperfect images:
Gaussian pixel noise, a Gaussian blur and a down-and-up resampling on a random part of each batch (the same
augmentation for every method judged; never tuned on generated images). AdamW, cosine decay. Deterministic from
the seed; the shipped judge took 3000 steps of 64 images, about 10 minutes on one CPU thread (a minute on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..validation import integer
from .image_render import render_parameters, scene_parameters
from .image_scenes import IMAGE_SIZE, PATTERNS, ImageScene, parse_image_caption, sample_image_scene
from .vocabulary import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

JUDGE_SEED_BASE = 800_000_000
SHIPPED_JUDGE = "world-judge"
COLOURS = tuple(OBJECT_COLOURS)
BACKGROUNDS = tuple(BACKGROUND_COLOURS)
FEATURES = 128
FOREGROUND_WEIGHT = 10.0
CROP = 16
CROP_SPREAD = 2.5
MIN_CROP = 0.1


class WorldJudge(ModelMixin, ConfigMixin):
    """A small CNN over 32x32 world images; see the module docstring. ``forward`` returns a dict of logits and
    ``features``.

    Layout: a convolution at full resolution whose 1x1 head classifies every pixel as background or one of the six
    colours (``pixels``, trained on the exact masks). Each colour's pixel probability map ``p_c`` (where above 1/2),
    with the image's
    luminance inside it (``p_c (2 Y - 1)``), is cropped around its centroid, ``CROP_SPREAD`` times its root mean
    square radius to either side, and resampled to ``CROP`` x ``CROP`` (so the next step sees every subject centred
    and at one scale); one small CNN shared by all colours (``subject``) reads the crop, and its pooled output with
    the log pixel mass gives the colour's presence, shape and pattern logits. A strided stack over
    the stem (``body``) gives the global ``features`` (the Frechet space: global average, a linear layer, SiLU),
    read by the background and count heads.
    """

    @register_to_config
    def __init__(self, channels: Sequence[int] = (32, 48, 64), subject_channels: Sequence[int] = (16, 32, 64, 64),
                 features: int = FEATURES, size: int = IMAGE_SIZE, groups: int = 8, hidden: int = 64):
        super().__init__()
        first = channels[0]
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, first, 3, padding=1), torch.nn.GroupNorm(groups, first),
                                        torch.nn.SiLU())
        self.pixels = torch.nn.Conv2d(first, len(COLOURS) + 1, 1)
        layers: list[torch.nn.Module] = []
        previous = first
        for width in channels[1:]:
            layers += [torch.nn.Conv2d(previous, width, 3, stride=2, padding=1), torch.nn.GroupNorm(groups, width),
                       torch.nn.SiLU()]
            previous = width
        self.body = torch.nn.Sequential(*layers)
        self.project = torch.nn.Linear(previous, features)
        self.scene_head = torch.nn.Linear(features, len(BACKGROUNDS) + 3)
        layers, previous = [], 2
        for i, width in enumerate(subject_channels):  # CROP -> CROP / 4: strides 1, 2, 2, 1
            stride = 2 if i in (1, 2) else 1
            layers += [torch.nn.Conv2d(previous, width, 3, stride=stride, padding=1), torch.nn.SiLU()]
            previous = width
        self.subject = torch.nn.Sequential(*layers)
        self.subject_head = torch.nn.Sequential(torch.nn.Linear(previous + 1, hidden), torch.nn.SiLU(),
                                                torch.nn.Linear(hidden, 1 + len(SHAPES) + len(PATTERNS)))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] at any size -> the judge's input: 32x32, centred to [-1, 1]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"WorldJudge images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
        size = self.config.size
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (size, size):
            if x.shape[-2] >= size and x.shape[-1] >= size:
                x = F.interpolate(x, size=(size, size), mode="area")
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    @staticmethod
    def crops(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) ``maps`` cropped around the centroid of ``weights`` (N, H, W), ``CROP_SPREAD`` root mean
        square radii (at least ``MIN_CROP`` of the image) to either side, resampled bilinearly to CROP x CROP."""
        n, _, height, width = maps.shape
        ys = (torch.arange(height, device=maps.device, dtype=maps.dtype) + 0.5) / height * 2 - 1
        xs = (torch.arange(width, device=maps.device, dtype=maps.dtype) + 0.5) / width * 2 - 1
        mass = weights.sum((-2, -1)) + 1e-6
        cx = (weights.sum(-2) * xs).sum(-1) / mass
        cy = (weights.sum(-1) * ys).sum(-1) / mass
        spread = (weights * ((xs.view(1, 1, -1) - cx.view(-1, 1, 1)) ** 2
                             + (ys.view(1, -1, 1) - cy.view(-1, 1, 1)) ** 2)).sum((-2, -1)) / mass
        half = (CROP_SPREAD * spread.clamp_min(0.0).sqrt()).clamp_min(MIN_CROP)
        zero = torch.zeros_like(half)
        theta = torch.stack([torch.stack([half, zero, cx], -1), torch.stack([zero, half, cy], -1)], 1)
        grid = F.affine_grid(theta, [n, maps.shape[1], CROP, CROP], align_corners=False)
        return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(images)
        stem = self.stem(x)
        pixels = self.pixels(stem)  # (B, 7, H, W)
        features = F.silu(self.project(self.body(stem).mean((-2, -1))))
        background, count = self.scene_head(features).split((len(BACKGROUNDS), 3), dim=-1)
        # each colour's pixels: probabilities above 1/2 (background leakage would pull the crop off the subject),
        # detached (the pixel head learns from the pixel labels alone)
        p = torch.softmax(pixels.detach(), 1)[:, 1:]  # (B, 6, H, W)
        p = torch.where(p > 0.5, p, torch.zeros_like(p))
        # the pattern darkens a subject's colour by a factor: its log luminance relative to the subject's mean
        # shows it at one contrast whatever the colour
        rgb = (x + 1.0) / 2.0
        log_luma = torch.log((0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).clamp_min(0.0) + 0.02)
        log_luma = log_luma.unsqueeze(1)
        mean = (p * log_luma).sum((-2, -1), keepdim=True) / (p.sum((-2, -1), keepdim=True) + 1e-6)
        maps = torch.stack([p, 2.0 * p * (log_luma - mean)], 2).flatten(0, 1)  # (B * 6, 2, H, W)
        pooled = self.subject(self.crops(maps, p.flatten(0, 1))).mean((-2, -1)).view(x.shape[0], len(COLOURS), -1)
        mass = p.mean((-2, -1))
        subject = self.subject_head(torch.cat([pooled, torch.log(mass + 1e-4).unsqueeze(-1)], -1))
        present, shape, pattern = subject.split((1, len(SHAPES), len(PATTERNS)), dim=-1)
        return {"background": background, "count": count, "present": present.squeeze(-1), "shape": shape,
                "pattern": pattern, "pixels": pixels, "features": features}


# ----------------------------------------------------------------------------------------------- ground truth
def scene_targets(scenes: Sequence[ImageScene]) -> dict[str, torch.Tensor]:
    """The judge's targets of ``scenes``: background and count indices (B,), present (B, 6) float, shape and
    pattern indices (B, 6) (-100, ignored, where the colour is absent)."""
    batch = len(scenes)
    present = torch.zeros(batch, len(COLOURS))
    shape = torch.full((batch, len(COLOURS)), -100, dtype=torch.int64)
    pattern = torch.full((batch, len(COLOURS)), -100, dtype=torch.int64)
    for b, scene in enumerate(scenes):
        for s in scene.subjects:
            c = COLOURS.index(s.colour)
            present[b, c] = 1.0
            shape[b, c] = SHAPES.index(s.shape)
            pattern[b, c] = PATTERNS.index(s.pattern)
    return {"background": torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]),
            "count": torch.tensor([len(s.subjects) - 1 for s in scenes]), "present": present, "shape": shape,
            "pattern": pattern}


def pixel_labels(scenes: Sequence[ImageScene], masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64: 0 for background pixels, 1 + the colour index for the pixels of a subject's mask."""
    labels = torch.zeros(masks.shape[0], *masks.shape[-2:], dtype=torch.int64, device=masks.device)
    for b, scene in enumerate(scenes):
        for k, s in enumerate(scene.subjects):
            labels[b][masks[b, k]] = 1 + COLOURS.index(s.colour)
    return labels


def judge_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of background and count, binary cross-entropy of presence, cross-entropy of shape and
    pattern over the present colours and of every pixel's colour (when ``targets`` has ``pixels``); their sum."""
    t = {k: v.to(out["present"].device) for k, v in targets.items()}
    pixels = 0.0
    if "pixels" in t:  # subject pixels weigh FOREGROUND_WEIGHT times a background pixel
        weight = 1.0 + (FOREGROUND_WEIGHT - 1.0) * (t["pixels"] > 0).float()
        pixels = (F.cross_entropy(out["pixels"], t["pixels"], reduction="none") * weight).sum() / weight.sum()
    return (pixels + F.cross_entropy(out["background"], t["background"]) + F.cross_entropy(out["count"], t["count"])
            + F.binary_cross_entropy_with_logits(out["present"], t["present"])
            + F.cross_entropy(out["shape"].flatten(0, 1), t["shape"].flatten())
            + F.cross_entropy(out["pattern"].flatten(0, 1), t["pattern"].flatten()))


# ----------------------------------------------------------------------------------------------- scores
def _subjects_of(prompt_or_scene) -> ImageScene:
    if isinstance(prompt_or_scene, ImageScene):
        return prompt_or_scene
    if isinstance(prompt_or_scene, str):
        return parse_image_caption(prompt_or_scene)
    raise ValueError(f"expected a caption string or an ImageScene, got {type(prompt_or_scene).__name__}")


@torch.no_grad()
def score_prompts(judge: WorldJudge, images: torch.Tensor, prompts: Sequence) -> dict[str, torch.Tensor]:
    """Per image (B,) float64: ``colour`` (fraction of the named subjects whose colour is found), ``class`` (found
    and of the named shape), ``confidence`` (mean of ``p_c softmax(shape_c)[s]``), ``extra`` (colours found but not
    named), ``background`` (1 when the named background is predicted), ``count`` (1 when the number of subjects is)
    and, for scenes with identities (``ImageScene`` from the world), ``pattern`` (fraction of subjects whose
    pattern is predicted). ``prompts``: captions in the world's grammar or ``ImageScene``."""
    scenes = [_subjects_of(p) for p in prompts]
    if len(scenes) != images.shape[0]:
        raise ValueError(f"score_prompts: {images.shape[0]} images for {len(scenes)} prompts")
    judge.eval()
    out = judge(images)
    p_present = torch.sigmoid(out["present"].double()).cpu()
    p_shape = torch.softmax(out["shape"].double(), -1).cpu()
    shape_pred = out["shape"].argmax(-1).cpu()
    pattern_pred = out["pattern"].argmax(-1).cpu()
    background_pred = out["background"].argmax(-1).cpu()
    count_pred = out["count"].argmax(-1).cpu()
    rows = {k: [] for k in ("colour", "class", "confidence", "extra", "background", "count", "pattern")}
    for b, scene in enumerate(scenes):
        named = [COLOURS.index(s.colour) for s in scene.subjects]
        shapes = [SHAPES.index(s.shape) for s in scene.subjects]
        found = [bool(p_present[b, c] > 0.5) for c in named]
        rows["colour"].append(sum(found) / len(named))
        rows["class"].append(sum(f and int(shape_pred[b, c]) == s for f, c, s in zip(found, named, shapes,
                                                                                         strict=True)) / len(named))
        rows["confidence"].append(sum(float(p_present[b, c] * p_shape[b, c, s]) for c, s in zip(named, shapes,
                                                                                                strict=True)) / len(named))
        rows["extra"].append(float(sum(bool(p_present[b, c] > 0.5) for c in range(len(COLOURS)) if c not in named)))
        rows["background"].append(float(int(background_pred[b]) == BACKGROUNDS.index(scene.background)))
        rows["count"].append(float(int(count_pred[b]) == len(scene.subjects) - 1))
        has_identity = all(s.centre is not None for s in scene.subjects)
        rows["pattern"].append(sum(int(pattern_pred[b, COLOURS.index(s.colour)]) == PATTERNS.index(s.pattern)
                                   for s in scene.subjects) / len(named) if has_identity else math.nan)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}


@torch.no_grad()
def judge_features(judge: WorldJudge, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(B, FEATURES) float64 penultimate features of ``images`` (the space of ``frechet_distance``)."""
    judge.eval()
    return torch.cat([judge(images[i:i + batch])["features"].double().cpu() for i in range(0, images.shape[0], batch)])


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) (module docstring), float64. Needs at
    least 2 rows each; with fewer rows than dimensions the covariances are singular and the distance is biased
    upwards (compare only distances over the same numbers of images)."""
    a, b = features_a.double(), features_b.double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"frechet_distance needs two (N >= 2, D) feature sets of one D, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0.0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross)


def judge_objective(judge: WorldJudge):
    """A HeadHunter objective (``headhunter.search``): the judge's ``confidence`` that each image shows its
    prompt's subjects (higher is better)."""

    def world_judge_confidence(images: torch.Tensor, prompts: Sequence[str | None] = ()) -> torch.Tensor:
        if len(prompts) != images.shape[0] or any(p is None for p in prompts):
            raise ValueError("world_judge_confidence needs the prompt string of every image")
        return score_prompts(judge, images, prompts)["confidence"]

    return world_judge_confidence


# ----------------------------------------------------------------------------------------------- training
def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Generic robustness augmentations (module docstring), drawn from ``generator``: each image gets Gaussian
    noise of a standard deviation uniform in [0, 0.04]; a random half is blurred (Gaussian, sigma uniform in
    [0.3, 0.9] pixels, 5 taps); a random quarter is resampled to half size and back (bilinear)."""
    batch, _, height, width = images.shape
    device = images.device
    draws = torch.rand(batch, 4, generator=generator).to(device)
    x = images
    sigma = (0.3 + 0.6 * draws[:, 0]).view(batch, 1, 1)
    taps = torch.arange(-2, 3, dtype=torch.float32, device=device).view(1, 1, 5)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).view(batch, 1, 1, 5)
    padded = F.pad(x, (2, 2, 0, 0), mode="replicate").unfold(-1, 5, 1)  # (B, 3, H, W, 5)
    rows = (padded * kernel.unsqueeze(1)).sum(-1)
    padded = F.pad(rows, (0, 0, 2, 2), mode="replicate").unfold(-2, 5, 1)
    blurred = (padded * kernel.unsqueeze(1)).sum(-1)
    x = torch.where((draws[:, 1] < 0.5).view(batch, 1, 1, 1), blurred, x)
    small = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False),
                          size=(height, width), mode="bilinear", align_corners=False)
    x = torch.where((draws[:, 2] < 0.25).view(batch, 1, 1, 1), small, x)
    noise = torch.randn(x.shape, generator=generator).to(device) * (0.04 * draws[:, 3]).view(batch, 1, 1, 1)
    return (x + noise).clamp(0.0, 1.0)


def train_judge(steps: int = 3000, batch: int = 64, lr: float = 2e-3, seed: int = 0, device=None,
                log: Path | None = None, every: int = 100) -> WorldJudge:
    """A judge trained for ``steps`` steps from scratch (module docstring)."""
    steps, batch = integer("train_judge steps", steps, 1), integer("train_judge batch", batch, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    judge = WorldJudge().to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=0.01)
    judge.train()
    started, window = time.monotonic(), []
    for step in range(steps):
        rate = lr * 0.5 * (1 + math.cos(math.pi * step / steps)) * min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = rate
        scenes = [sample_image_scene(JUDGE_SEED_BASE + step * batch + i) for i in range(batch)]
        images, masks = render_parameters(scene_parameters(scenes), device=device)
        images = augment(images, torch.Generator().manual_seed(seed * 1_000_003 + step))
        targets = {**scene_targets(scenes), "pixels": pixel_labels(scenes, masks)}
        loss = judge_loss(judge(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            entry = {"phase": "judge", "step": step + 1, "loss": sum(window) / len(window),
                     "elapsed": time.monotonic() - started}
            window = []
            print(json.dumps(entry), flush=True)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
    judge.eval()
    return judge


@torch.no_grad()
def ground_truth_accuracy(judge: WorldJudge, count: int = 256, *, offset: int = 0, size: int = IMAGE_SIZE,
                          device=None) -> dict[str, float]:
    """The judge's scores (``score_prompts``, means) on ``count`` rendered images from evaluation seeds
    (``train_video.EVAL_SEED_BASE + JUDGE_EVAL_OFFSET + offset`` on), at ``size`` pixels."""
    from .train_video import EVAL_SEED_BASE

    scenes = [sample_image_scene(EVAL_SEED_BASE + JUDGE_EVAL_OFFSET + offset + i) for i in range(count)]
    images, _ = render_parameters(scene_parameters(scenes), size, size, device=device or judge.device)
    scores = score_prompts(judge, images, scenes)
    return {k: float(v.mean()) for k, v in scores.items()}


JUDGE_EVAL_OFFSET = 300_000_000


def shipped_judge_path() -> str:
    path = Path(__file__).resolve().parent.parent / "shipped" / SHIPPED_JUDGE
    if not (path / "config.json").exists():
        raise ValueError(f"shipped judge not found at {path}")
    return str(path)


def load_world_judge(path: str | None = None, device=None) -> WorldJudge:
    """The shipped judge (or the ``save_pretrained`` folder ``path``), in float32, in eval mode."""
    judge = WorldJudge.from_pretrained(path or shipped_judge_path())
    return judge.to(device or "cpu", torch.float32).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="save_pretrained folder of the trained judge")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-images", type=int, default=512)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    log = output / "log.jsonl"
    log.unlink(missing_ok=True)
    judge = train_judge(args.steps, args.batch, args.lr, args.seed, args.device, log)
    judge.to("cpu").save_pretrained(str(output), safe_serialization=True)
    scores = ground_truth_accuracy(judge, args.eval_images)
    summary = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
               "ground_truth": scores, "eval_images": args.eval_images,
               "ground_truth_16": ground_truth_accuracy(judge, 128, size=16),
               "ground_truth_64": ground_truth_accuracy(judge, 128, size=64)}
    (output / "training.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()


__all__ = [
    "JUDGE_SEED_BASE",
    "WorldJudge",
    "augment",
    "frechet_distance",
    "ground_truth_accuracy",
    "judge_features",
    "judge_loss",
    "judge_objective",
    "load_world_judge",
    "main",
    "scene_targets",
    "score_prompts",
    "train_judge",
]
