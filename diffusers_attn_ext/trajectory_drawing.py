"""Drawing a trajectory on video frames and exporting the result as a GIF (PIL) or an MP4 (imageio-ffmpeg).

Frames are what pipelines return for one video: a ``[F, H, W, 3]`` array in [0, 1] (``output_type="np"``),
a ``[F, 3, H, W]`` tensor in [0, 1] (``output_type="pt"``), or a list of PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .trajectory import Trajectory

BOX_COLOR = (127, 255, 127)  # the authors' box colour (utils.save_videos_with_bbox)


def to_pil_frames(frames) -> list[Image.Image]:
    """PIL RGB images from a ``[F, H, W, 3]`` array, a ``[F, 3, H, W]`` tensor (values in [0, 1]) or PIL images."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames of shape {frames.shape} must be [frames, height, width, 3]")
        if frames.dtype != np.uint8:
            frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        return [Image.fromarray(frame) for frame in frames]
    return [frame.convert("RGB") for frame in frames]


def draw_trajectory(frames, trajectory: Trajectory, color: Sequence[int] = BOX_COLOR,
                    line_width: int = 2) -> list[Image.Image]:
    """The frames with each frame's box drawn on it (boxes scaled if the frames are another size)."""
    images = to_pil_frames(frames)
    if len(images) != trajectory.num_frames:
        raise ValueError(f"got {len(images)} frames but the trajectory has num_frames={trajectory.num_frames}")
    drawn = []
    for image, (left, top, right, bottom) in zip(images, trajectory.boxes, strict=True):
        sx, sy = image.width / trajectory.width, image.height / trajectory.height
        image = image.copy()
        ImageDraw.Draw(image).rectangle(
            (left * sx, top * sy, right * sx - 1, bottom * sy - 1), outline=tuple(color), width=line_width
        )
        drawn.append(image)
    return drawn


def export_gif(frames, path: str | Path, fps: int = 8) -> Path:
    """Write the frames as a looping GIF with PIL; returns the path."""
    images = to_pil_frames(frames)
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def export_mp4(frames, path: str | Path, fps: int = 8) -> Path:
    """Write the frames as an H.264 MP4 with imageio-ffmpeg (``pip install imageio imageio-ffmpeg``)."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "export_mp4 needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg "
            "(or use export_gif, which needs only PIL)"
        ) from error
    path = Path(path)
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
        for image in to_pil_frames(frames):
            writer.append_data(np.asarray(image))
    return path
