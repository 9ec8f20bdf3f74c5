"""Pieces both reference wrappers share: model loading, the wrapper's input normalisation, and the
transformers/qwen-vl-utils preprocessing call.

This is the parity oracle. It is written the way the published wrapper works (conversation dicts,
`processor.apply_chat_template`, `qwen_vl_utils.process_vision_info`, the processor with
`do_resize=False`) and deliberately shares no preprocessing code with `q3vl.preprocess`, so that
comparing the two proves something.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from q3vl.errors import missing_extra
from q3vl.export.weights import bars_only_on_a_terminal

log = logging.getLogger(__name__)

# transformers >= 5 keeps the template's own wrapper around a video; 4.57.3 (the wrapper's pin)
# replaces it with the per-frame-pair blocks. Feeding the processor a bare <|video_pad|> gives the
# 4.57.3 prompt on both.
_VIDEO_WRAPPED = "<|vision_start|><|video_pad|><|vision_end|>"
_VIDEO_BARE = "<|video_pad|>"
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".svg"}


def require_torch() -> Any:
    """Import torch, or say which extra provides it."""
    try:
        import torch
    except ImportError as e:
        raise missing_extra("torch", "export") from e
    return torch


def load(path: str | Path, dtype: str, device: str, attn_implementation: str,
         padding_side: str) -> tuple[Any, Any]:
    """(Qwen3VLForConditionalGeneration in eval mode, processor) loaded offline-capable."""
    torch = require_torch()
    try:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    except ImportError as e:
        raise missing_extra("transformers", "export") from e
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with bars_only_on_a_terminal():
        model: Any = Qwen3VLForConditionalGeneration.from_pretrained(
            str(path), dtype=torch_dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path), padding_side=padding_side)
    _prefer_decord()
    return model, processor


def _prefer_decord() -> None:
    """qwen-vl-utils picks torchcodec > decord > torchvision; the wrapper ran on decord.

    torchvision >= 0.24 has no video reader at all, so without decord, fall back to a PyAV reader
    registered in qwen-vl-utils' table (same ffmpeg decode; logged so reports can say so).
    """
    import importlib.util

    from qwen_vl_utils import vision_process as vp

    if importlib.util.find_spec("decord") is not None:
        os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
        vp.FORCE_QWENVL_VIDEO_READER = "decord"
    else:
        from q3vl.reference._pyav_reader import read_video_pyav

        log.warning("decord is not installed: the reference decodes video files with PyAV instead")
        vp.VIDEO_READER_BACKENDS["pyav"] = read_video_pyav
        vp.FORCE_QWENVL_VIDEO_READER = "pyav"
    vp.get_video_reader_backend.cache_clear()
    # the first call prints its choice to stderr (between q3vl's own lines); make it once, quietly
    with contextlib.redirect_stderr(io.StringIO()):
        backend = vp.get_video_reader_backend()
    log.debug("qwen-vl-utils reads videos with %s", backend)


class Wrapper:
    """What both reference wrappers keep from their (published) constructor arguments, and the model."""

    def __init__(self, path: str | Path, max_length: int, min_pixels: int, max_pixels: int, total_pixels: int,
                 fps: float, max_frames: int, default_instruction: str, dtype: str, device: str,
                 attn_implementation: str, padding_side: str) -> None:
        self.max_length = max_length
        self.min_pixels, self.max_pixels, self.total_pixels = min_pixels, max_pixels, total_pixels
        self.fps, self.max_frames = fps, max_frames
        self.default_instruction = default_instruction
        self.device = device
        lm, self.processor = load(path, dtype, device, attn_implementation, padding_side)
        self.model, self.config = lm.model, lm.config
        self.keep_head(lm)  # the LM head itself is dropped (1.2 GB at 8B) unless a wrapper keeps it

    def keep_head(self, lm: Any) -> None:
        """Keep what the wrapper needs of the LM head (nothing, for the embedder)."""


def side_content(owner: Any, text: Any, image: Any, video: Any, fps: float | None,
                 max_frames: int | None) -> list[dict[str, Any]]:
    """One side's user content as both wrappers build it: videos, images, then texts; "NULL" if empty.

    `owner` is the wrapper (its constructor's fps, max_frames and pixel bounds apply).
    """
    texts, images, videos = as_list(text), as_list(image), videos_of(video)
    if not texts and not images and not videos:
        return [{"type": "text", "text": "NULL"}]
    content = media_content(images, videos, fps=fps or owner.fps, max_frames=max_frames or owner.max_frames,
                            list_max_frames=owner.max_frames, min_pixels=owner.min_pixels,
                            max_pixels=owner.max_pixels, total_pixels=owner.total_pixels)
    return [*content, *({"type": "text", "text": t} for t in texts)]


def as_list(value: Any) -> list[Any]:
    """The wrapper's scalar-or-list normalisation for `text` and `image`."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def is_single_video(video: Any) -> bool:
    """A str, or a list whose first element is a PIL image or an image-file path, is ONE video."""
    from PIL import Image

    if isinstance(video, str):
        return True
    if isinstance(video, list) and video:
        first = video[0]
        if isinstance(first, Image.Image):
            return True
        if isinstance(first, str):
            from urllib.parse import urlparse

            path = urlparse(first).path if first.startswith(("http://", "https://")) else first
            return os.path.splitext(path.lower())[1] in _IMAGE_EXTS
    return False


def videos_of(video: Any) -> list[Any]:
    """The wrapper's normalisation of the `video` field to a list of videos."""
    if video is None:
        return []
    return [video] if is_single_video(video) else list(video)


def sample_frames(frames: list[Any], max_segments: int) -> list[Any]:
    """The wrapper's frame-list subsampling: linspace(...).astype(int), only when too long."""
    import numpy as np

    if len(frames) <= max_segments:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_segments, dtype=int).tolist()]


def media_content(images: list[Any], videos: list[Any], *, fps: float, max_frames: int, list_max_frames: int,
                  min_pixels: int, max_pixels: int, total_pixels: int) -> list[dict[str, Any]]:
    """Video items, then image items, as the wrapper writes them into the conversation.

    `max_frames`/`fps` (per item, else the constructor's) apply to video files; frame lists are
    subsampled to `list_max_frames`, the constructor's value, whatever the item says.
    """
    from PIL import Image

    content: list[dict[str, Any]] = []
    src: Any
    for vid in videos:
        if isinstance(vid, list):
            frames = sample_frames(vid, list_max_frames) if list_max_frames is not None else vid
            frames = ["file://" + f if isinstance(f, str) else f for f in frames]
            content.append({"type": "video", "video": frames, "total_pixels": total_pixels})
        elif isinstance(vid, str):
            src = vid if vid.startswith(("http://", "https://")) else "file://" + vid
            content.append({"type": "video", "video": src, "fps": fps, "max_frames": max_frames})
        else:
            raise TypeError(f"Unrecognized video type: {type(vid)}")
    for img in images:
        if isinstance(img, Image.Image):
            src = img
        elif isinstance(img, str):
            src = img if img.startswith(("http://", "https://")) else "file://" + img
        else:
            raise TypeError(f"Unrecognized image type: {type(img)}")
        content.append({"type": "image", "image": src, "min_pixels": min_pixels, "max_pixels": max_pixels})
    return content


def render(processor: Any, conversations: list[list[dict[str, Any]]]) -> list[str]:
    """The chat template applied as the wrapper does, in the transformers-4.57.3 video form."""
    texts = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    if isinstance(texts, str):
        texts = [texts]
    return [t.replace(_VIDEO_WRAPPED, _VIDEO_BARE) for t in texts]


def vision_inputs(conversations: list[list[dict[str, Any]]]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(images, videos, video_metadata, video_kwargs) from qwen-vl-utils, as the wrapper calls it."""
    from qwen_vl_utils import process_vision_info

    images, video_inputs, video_kwargs = process_vision_info(
        conversations, image_patch_size=16, return_video_metadata=True, return_video_kwargs=True)
    videos, metadata = None, None
    if video_inputs is not None:
        videos = [v for v, _ in video_inputs]
        metadata = [m for _, m in video_inputs]
    return images, videos, metadata, video_kwargs


def processor_call(processor: Any, texts: list[str], images: Any, videos: Any, metadata: Any,
                   video_kwargs: dict[str, Any], **kwargs: Any) -> Any:
    """The processor call with the wrapper's arguments (`do_resize=False`: qwen-vl-utils resized)."""
    extra = {"cap_pixels_per_frame": False} if _has_frame_cap(processor) else {}
    return processor(text=texts, images=images, videos=videos, video_metadata=metadata, do_resize=False,
                     return_tensors="pt", **video_kwargs, **extra, **kwargs)


def _has_frame_cap(processor: Any) -> bool:
    video = getattr(processor, "video_processor", None)
    return video is not None and hasattr(type(video), "cap_pixels_per_frame")


def mm_token_type_ids(input_ids: Any, image_token_id: int, video_token_id: int) -> Any:
    """0 text, 1 image, 2 video per token: what transformers 5 needs for M-RoPE."""
    return (input_ids == image_token_id).int() + 2 * (input_ids == video_token_id).int()
