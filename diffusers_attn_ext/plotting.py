"""Drawing attention masks (attention-gym style): a block or token mask as an image, kept cells bright."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_mask(mask: torch.Tensor, title: str | None = None, path: str | Path | None = None, ax=None):
    """Draw a boolean mask ``[q, kv]`` (or ``[1, 1, q, kv]`` / ``[1, q, kv]``) with its density in the title.

    Args:
        mask: block or token mask; rows are queries, columns keys.
        title: axes title (default: shape and density).
        path: when given, the figure is saved there (PNG by its suffix).
        ax: matplotlib axes to draw on (a new figure when None).

    Returns the matplotlib figure.
    """
    mask = torch.as_tensor(mask)
    while mask.dim() > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not 2-d: expected [q, kv] or [1, 1, q, kv]")
    if ax is None:
        import matplotlib.pyplot as plt

        figure, ax = plt.subplots(figsize=(5, 5))
    else:
        figure = ax.figure
    data = mask.detach().to("cpu", torch.float32).numpy()
    ax.imshow(data, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    density = float(data.mean())
    ax.set_title(title if title is not None else f"{data.shape[0]}x{data.shape[1]}, density {density:.3f}")
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure
