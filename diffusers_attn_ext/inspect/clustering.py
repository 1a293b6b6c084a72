"""Heads grouped by what they do: k-means over per-head attention profiles.

The seed paper of the inspector ("How Does Attention Work in Vision Transformers? A Visual Analytics Attempt",
Li et al., IEEE TVCG 2023) clusters heads by their attention patterns to find the few kinds a model uses. Here a
recorded (layer, head) is described by what :class:`~diffusers_attn_ext.inspect.AttentionInspector` keeps for it:
its temporal profile (mass at each frame distance), its spatial profile (mass at each Chebyshev token distance)
and its text mass, concatenated. Heads that stay in their own frame, heads that look far in time, local
spatial heads and text-reading heads then fall in different clusters. k-means (Lloyd's algorithm, k-means++
seeding from a seeded generator) is deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..validation import integer


@dataclass
class HeadClusters:
    """Result of :func:`cluster_heads`.

    Attributes:
        heads: ``(layer, head)`` of each row of ``features``.
        features: ``[N, F]`` per-head feature vectors (temporal profile, spatial profile, text mass).
        labels: ``[N]`` cluster of each head.
        centroids: ``[k, F]`` mean feature vector of each cluster.
        frames: length of the temporal part of a feature vector (the rest: spatial profile, then text mass).
    """

    heads: list[tuple[str, int]]
    features: torch.Tensor
    labels: torch.Tensor
    centroids: torch.Tensor
    frames: int

    def members(self, cluster: int) -> list[tuple[str, int]]:
        """The ``(layer, head)`` pairs of ``cluster``."""
        cluster = integer("cluster", cluster, 0, len(self.centroids) - 1)
        return [head for head, label in zip(self.heads, self.labels.tolist(), strict=True) if label == cluster]

    def plot(self, path: str | Path | None = None):
        """Each cluster's mean temporal and spatial profile and text mass; returns the figure."""
        from ..plotting import plot_head_clusters

        return plot_head_clusters(self, path=path)


def head_features(inspector) -> tuple[list[tuple[str, int]], torch.Tensor, int]:
    """``(heads, features [N, F], frames)`` of every recorded (layer, head) of ``inspector`` (one token grid)."""
    heads, rows, frames, width = [], [], None, None
    for layer in inspector.records:
        stats = inspector.layer_statistics(layer)
        if frames is None:
            frames, width = stats.temporal.shape[1], stats.spatial.shape[1]
        if (stats.temporal.shape[1], stats.spatial.shape[1]) != (frames, width):
            raise ValueError(f"layer {layer!r} was recorded on another token grid ({stats.grid}); cluster one size")
        rows.append(torch.cat([stats.temporal, stats.spatial, stats.text_mass[:, None]], dim=1))
        heads += [(layer, head) for head in stats.heads]
    if not rows:
        raise ValueError("the inspector has no records: run inspect_pipeline (or a pipeline with it installed) first")
    return heads, torch.cat(rows), frames


def kmeans(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N], centroids [k, F])`` of Lloyd's k-means on the rows of ``features``, k-means++ seeded."""
    k = integer("k", k, 1, len(features))
    iterations = integer("iterations", iterations, 1)
    seed = integer("seed", seed, 0)
    features = features.double()
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randint(len(features), (1,), generator=generator)]
    while len(centroids) < k:  # k-means++: the next seed far from the chosen ones, by squared distance
        distance = torch.cdist(features, centroids).min(dim=1).values.square()
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, features[torch.multinomial(weights, 1, generator=generator)]])
    labels = torch.cdist(features, centroids).argmin(dim=1)
    for _ in range(iterations):
        centroids = torch.stack([
            features[labels == c].mean(dim=0) if (labels == c).any() else centroids[c] for c in range(k)
        ])
        updated = torch.cdist(features, centroids).argmin(dim=1)
        if torch.equal(updated, labels):
            break
        labels = updated
    return labels, centroids


def cluster_heads(inspector, k: int, seed: int = 0) -> HeadClusters:
    """Group the heads ``inspector`` recorded into ``k`` clusters of similar attention profiles."""
    integer("k", k, 1)
    integer("seed", seed, 0)
    heads, features, frames = head_features(inspector)
    labels, centroids = kmeans(features, k, seed)
    return HeadClusters(heads, features, labels, centroids, frames)
