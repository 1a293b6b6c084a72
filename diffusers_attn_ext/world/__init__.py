"""The procedural world the shipped tiny models are trained on, and its exact ground truth.

``scenes`` (what is in a video and its caption), ``render`` (videos, masks, boxes), ``metrics`` (task metrics
scored against that ground truth); the image world beside it: ``image_scenes``, ``image_render``, the FLUX.1 model
(``image_models``) and the judge that scores generated images (``judge``). Deterministic from a seed.
"""

from .image_models import load_world_image_pipeline, world_image_call
from .image_render import WorldImages, render_image_scenes, render_image_seeds
from .image_scenes import (
    ImageScene,
    ImageSubject,
    image_caption,
    parse_image_caption,
    sample_image_scene,
    subject_boxes,
)
from .judge import frechet_distance, judge_objective, load_world_judge, score_prompts
from .models import load_world_video_pipeline, shipped_model_path, wan_num_frames
from .render import WorldVideo, boxes_from_masks, object_centres, render_scenes, render_seeds
from .scenes import TRAIN_FRAMES, TRAIN_SIZE, Scene, WorldObject, caption, parse_caption, sample_scene

__all__ = [
    "TRAIN_FRAMES",
    "TRAIN_SIZE",
    "ImageScene",
    "ImageSubject",
    "Scene",
    "WorldImages",
    "WorldObject",
    "WorldVideo",
    "boxes_from_masks",
    "caption",
    "frechet_distance",
    "image_caption",
    "judge_objective",
    "load_world_image_pipeline",
    "load_world_judge",
    "load_world_video_pipeline",
    "object_centres",
    "parse_caption",
    "parse_image_caption",
    "render_image_scenes",
    "render_image_seeds",
    "render_scenes",
    "render_seeds",
    "sample_image_scene",
    "sample_scene",
    "score_prompts",
    "shipped_model_path",
    "subject_boxes",
    "wan_num_frames",
    "world_image_call",
]
