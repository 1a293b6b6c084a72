"""Drawing attention (attention-gym style): masks, layer x head heat maps, decay profiles, attention maps.

Every function draws on ``ax`` when given (else a new figure), saves the figure to ``path`` when given (PNG
by its suffix) and returns the matplotlib figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _axes(ax, figsize: tuple[float, float]):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def _finish(figure, path: str | Path | None):
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def plot_mask(mask: torch.Tensor, title: str | None = None, path: str | Path | None = None, ax=None):
    """Draw a boolean mask ``[q, kv]`` (or ``[1, 1, q, kv]`` / ``[1, q, kv]``) with its density in the title.

    Args:
        mask: block or token mask (e.g. a sparse method's block mask); rows are queries, columns keys.
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
    figure, ax = _axes(ax, (5, 5))
    data = mask.detach().to("cpu", torch.float32).numpy()
    ax.imshow(data, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    density = float(data.mean())
    ax.set_title(title if title is not None else f"{data.shape[0]}x{data.shape[1]}, density {density:.3f}")
    return _finish(figure, path)


def plot_layer_head(
    matrix: torch.Tensor, layers: Sequence[str], heads: Sequence[int] | None = None, title: str | None = None,
    path: str | Path | None = None, ax=None, cmap: str = "viridis",
):
    """Heat map of a per-head value, layers as rows and heads as columns (NaN cells left blank).

    Args:
        matrix: ``[layers, heads]`` values (e.g. ``AttentionInspector.layer_head_matrix("entropy")[0]`` or
            ``HeadImportance.matrix()[0]``).
        layers: row labels; heads: column labels (default 0..heads-1).
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] != len(layers):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} is not [layers={len(layers)}, heads]")
    heads = list(range(matrix.shape[1])) if heads is None else list(heads)
    if len(heads) != matrix.shape[1]:
        raise ValueError(f"heads has {len(heads)} labels for the {matrix.shape[1]} columns of matrix")
    figure, ax = _axes(ax, (1.8 + 0.35 * len(heads), 1.2 + 0.28 * len(layers)))
    image = ax.imshow(matrix.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(heads)), labels=[str(h) for h in heads])
    ax.set_yticks(range(len(layers)), labels=list(layers))
    ax.set_xlabel("head")
    if title is not None:
        ax.set_title(title)
    figure.colorbar(image, ax=ax)
    return _finish(figure, path)


def plot_decay_profiles(
    profiles: torch.Tensor, labels: Sequence[str], kind: str = "temporal", title: str | None = None,
    path: str | Path | None = None, ax=None, log: bool = True,
):
    """Attention mass by distance, one line per row of ``profiles`` ``[lines, distances]`` (a head or a
    layer), on a log scale by default: the energy-decay curves of Radial Attention (arXiv 2506.19852, Fig. 3).

    ``kind`` names the axis: "temporal" (latent frames) or "spatial" (tokens, Chebyshev distance).
    """
    if kind not in ("temporal", "spatial"):
        raise ValueError(f"kind={kind!r} is not one of ('temporal', 'spatial')")
    profiles = torch.as_tensor(profiles, dtype=torch.float64)
    if profiles.dim() != 2 or profiles.shape[0] != len(labels):
        raise ValueError(f"profiles of shape {tuple(profiles.shape)} is not [lines={len(labels)}, distances]")
    figure, ax = _axes(ax, (6, 3.5))
    distances = range(profiles.shape[1])
    for row, label in zip(profiles, labels, strict=True):
        ax.plot(distances, row.clamp(min=1e-12).numpy() if log else row.numpy(), marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("temporal distance (latent frames)" if kind == "temporal" else "spatial distance (tokens)")
    ax.set_ylabel("attention mass")
    ax.set_title(title if title is not None else f"{kind} decay profile")
    if len(labels) <= 12:
        ax.legend(fontsize=7)
    return _finish(figure, path)


def plot_query_maps(stats, heads: Sequence[int] | None = None, max_queries: int = 4, max_frames: int = 6,
                    path: str | Path | None = None):
    """Sampled attention rows over the latent grid: for each recorded head (or the given ``heads``) and up to
    ``max_queries`` sampled queries, the attention on visual keys drawn frame by frame (up to ``max_frames``
    evenly chosen frames), the query marked with a red cross in its own frame.

    ``stats`` is an :class:`~diffusers_attn_ext.inspect.statistics.AttentionStatistics` with stored rows.
    """
    import matplotlib.pyplot as plt

    if not len(stats.map_rows):
        raise ValueError("stats has no stored attention rows: use sampled_rows >= 1 in the AttentionInspector")
    heads = list(stats.heads) if heads is None else list(heads)
    unknown = [h for h in heads if h not in stats.heads]
    if unknown:
        raise ValueError(f"heads has {unknown}, not recorded; recorded heads: {list(stats.heads)}")
    grid = stats.grid
    maps = stats.visual_maps()  # [H, R, F, Y, X]
    queries = torch.linspace(0, len(stats.map_rows) - 1, min(max_queries, len(stats.map_rows))).round().long()
    frames = torch.linspace(0, grid.frames - 1, min(max_frames, grid.frames)).round().long().unique()
    # Videos: a row per (head, query), a column per frame; images: a row per head, a column per query.
    if grid.frames > 1:
        panels = [[(h, q, f) for f in frames] for h in heads for q in queries]
    else:
        panels = [[(h, q, 0) for q in queries] for h in heads]
    figure, axes = plt.subplots(len(panels), len(panels[0]), figsize=(1.6 * len(panels[0]) + 0.6, 1.6 * len(panels)),
                                squeeze=False)
    for r, row in enumerate(panels):
        for c, (head, query, frame) in enumerate(row):
            local = int(stats.map_rows[query]) - stats.visual.start
            q_frame, position = divmod(local, grid.tokens_per_frame)
            values = maps[stats.heads.index(head), query]
            ax = axes[r, c]
            ax.imshow(values[frame].float().numpy(), cmap="magma", vmin=0, vmax=float(values.max()) or 1.0)
            if int(frame) == q_frame:
                ax.scatter([position % grid.width], [position // grid.width], marker="x", color="red", s=30)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {int(frame)}" if grid.frames > 1 else f"query {local}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"head {head}" + (f"\nquery {local}" if grid.frames > 1 else ""), fontsize=7)
    figure.tight_layout()
    return _finish(figure, path)


def plot_head_clusters(clusters, path: str | Path | None = None):
    """Each cluster of :func:`~diffusers_attn_ext.inspect.clustering.cluster_heads`: its mean temporal profile,
    mean spatial profile and mean text mass, with its number of heads in the legend. Returns the figure."""
    import matplotlib.pyplot as plt

    frames = clusters.frames
    figure, (temporal, spatial, text) = plt.subplots(1, 3, figsize=(12, 3.2), width_ratios=(2, 2, 1))
    counts = torch.bincount(clusters.labels, minlength=len(clusters.centroids)).tolist()
    for cluster, centroid in enumerate(clusters.centroids):
        label = f"cluster {cluster} ({counts[cluster]} heads)"
        temporal.plot(range(frames), centroid[:frames].numpy(), marker="o", label=label)
        spatial.plot(range(len(centroid) - frames - 1), centroid[frames:-1].numpy(), marker="o", label=label)
        text.bar(cluster, float(centroid[-1]))
    temporal.set(xlabel="temporal distance (latent frames)", ylabel="attention mass", title="temporal profile")
    spatial.set(xlabel="spatial distance (tokens)", title="spatial profile")
    text.set(xlabel="cluster", title="text mass", xticks=range(len(clusters.centroids)))
    temporal.legend(fontsize=7)
    figure.tight_layout()
    return _finish(figure, path)
