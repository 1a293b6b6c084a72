"""The procedural world the shipped tiny models are trained on, and its exact ground truth.

``scenes`` (what is in a video and its caption), ``render`` (videos, masks, boxes), ``metrics`` (task metrics
scored against that ground truth). Deterministic from a seed.
"""

from .models import load_world_video_pipeline, shipped_model_path, wan_num_frames
from .render import WorldVideo, boxes_from_masks, object_centres, render_scenes, render_seeds
from .scenes import TRAIN_FRAMES, TRAIN_SIZE, Scene, WorldObject, caption, parse_caption, sample_scene

__all__ = [
    "TRAIN_FRAMES",
    "TRAIN_SIZE",
    "Scene",
    "WorldObject",
    "WorldVideo",
    "boxes_from_masks",
    "caption",
    "load_world_video_pipeline",
    "object_centres",
    "parse_caption",
    "render_scenes",
    "render_seeds",
    "sample_scene",
    "shipped_model_path",
    "wan_num_frames",
]
