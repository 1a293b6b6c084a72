"""Objectives for HeadHunter: image statistics that need no model weights.

An objective is ``objective(images, prompts) -> scores``: ``images`` is ``[B, 3, H, W]`` in [0, 1] (a pipeline's
``output_type="pt"``), ``prompts`` the B prompt strings (None where the prompt was given as embeddings), and
the result one score per image (higher is better). HeadHunter averages it over its prompt-seed pairs: the
O(x, p) of Algorithm 1 in arXiv 2506.10978 (Sec. 4.1), where the paper uses PickScore.

A reward model plugs in the same way; see ``docs/softpag.md`` for a CLIP-based example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Objective = Callable[[torch.Tensor, Sequence[str | None]], torch.Tensor]

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``[B, 3, H, W]`` images: ``[B, H, W]``."""
    red, green, blue = images.float().unbind(1)
    return 0.299 * red + 0.587 * green + 0.114 * blue


def contrast(images: torch.Tensor, prompts: Sequence[str | None] = ()) -> torch.Tensor:
    """RMS contrast: the standard deviation of the luminance of each image."""
    return luminance(images).flatten(1).std(dim=1)


def sharpness(images: torch.Tensor, prompts: Sequence[str | None] = ()) -> torch.Tensor:
    """Variance of the Laplacian of the luminance (the usual focus measure): high for crisp edges."""
    kernel = _LAPLACIAN.to(images.device).view(1, 1, 3, 3)
    edges = F.conv2d(luminance(images).unsqueeze(1), kernel)
    return edges.flatten(1).var(dim=1)


def colorfulness(images: torch.Tensor, prompts: Sequence[str | None] = ()) -> torch.Tensor:
    """Hasler and Suesstrunk (2003) colorfulness on [0, 1] RGB: with rg = R - G and yb = (R + G) / 2 - B,
    ``sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)``."""
    red, green, blue = images.float().flatten(2).unbind(1)
    rg, yb = red - green, 0.5 * (red + green) - blue
    spread = (rg.std(dim=1) ** 2 + yb.std(dim=1) ** 2).sqrt()
    mean = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
    return spread + 0.3 * mean


def similarity_to(reference: torch.Tensor) -> Objective:
    """An objective rewarding closeness to ``reference`` images (``[B, 3, H, W]``, in the order HeadHunter
    generates its prompts): minus the mean squared error per image."""

    def negative_mse(images: torch.Tensor, prompts: Sequence[str | None] = ()) -> torch.Tensor:
        if images.shape != reference.shape:
            raise ValueError(
                f"images of shape {tuple(images.shape)} do not match the reference {tuple(reference.shape)}"
            )
        return -(images.float() - reference.to(images.device).float()).pow(2).flatten(1).mean(dim=1)

    return negative_mse


BUILTIN_OBJECTIVES: dict[str, Objective] = {
    "contrast": contrast,
    "sharpness": sharpness,
    "colorfulness": colorfulness,
}
