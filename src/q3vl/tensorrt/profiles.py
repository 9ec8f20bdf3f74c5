"""TensorRT optimization profiles derived from user limits, and the check that inputs fit them.

TensorRT engines are built for ranges of input shapes (min/opt/max per dynamic dimension). Users
think in batch size, tokens, image pixels and video frames; `Limits` turns those into the exact
shape ranges of every input of q3vl's two graphs. The same ranges configure the ONNX Runtime
TensorRT execution provider, and inputs outside them get an error naming the limit, or are split
(batches) by the runtime before they reach the engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from q3vl.errors import ConfigError, LimitError
from q3vl.spec import ModelSpec, VisionSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Limits:
    """What an engine must accept. Defaults fit the published wrapper's defaults at batch 8."""

    max_batch: int = 8
    max_tokens: int = 8192  # per sequence, text + vision
    max_image_pixels: int = 1_843_200  # per image after smart_resize (the wrapper's max_pixels)
    max_frames: int = 64  # per video
    max_images: int = 8  # images + video frame pairs per vision call (vision blocks)
    opt_batch: int = 1
    opt_tokens: int = 256
    opt_image_pixels: int = 448 * 448

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_tokens, self.max_image_pixels, self.max_frames, self.max_images) < 1:
            raise ConfigError("every limit must be >= 1")
        # opt values are tuning hints: clamp them into range rather than reject a small max
        for opt, top in (("opt_batch", "max_batch"), ("opt_tokens", "max_tokens"),
                         ("opt_image_pixels", "max_image_pixels")):
            object.__setattr__(self, opt, max(1, min(getattr(self, opt), getattr(self, top))))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _patches(pixels: int, v: VisionSpec) -> int:
    """Patches of an image with `pixels` pixels, a whole number of merge blocks (16x16 patches, 2x2 merge)."""
    block = v.spatial_merge_size**2
    return max(block, pixels // v.patch_size**2 // block * block)


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape per input name for one graph."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {k: [list(s) for s in v] for k, v in self.shapes.items()}

    def ort_options(self) -> dict[str, str]:
        """The ONNX Runtime TensorRT EP spelling: 'name:1x2,name2:3x4'."""
        def fmt(i: int) -> str:
            return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in self.shapes.items())
        return {"trt_profile_min_shapes": fmt(0), "trt_profile_opt_shapes": fmt(1), "trt_profile_max_shapes": fmt(2)}

    def check(self, feeds: dict[str, Any]) -> None:
        """Raise `LimitError` naming the limit when a feed falls outside the profile."""
        for name, (lo, _, hi) in self.shapes.items():
            shape = tuple(feeds[name].shape)
            for axis, (v, a, b) in enumerate(zip(shape, lo, hi)):
                if not a <= v <= b:
                    raise LimitError(f"input {name!r} dimension {axis} is {v}, outside the engine's range [{a}, {b}]"
                                     f" ({_limit_hint(name, axis)}); rebuild the engines with a larger limit")


def _limit_hint(name: str, axis: int) -> str:
    if name in ("input_ids", "attention_mask"):
        return ["max_batch", "max_tokens"][axis]
    if name == "position_ids":
        return ["-", "max_batch", "max_tokens"][axis]
    if name in ("visual_embeds", "deepstack_embeds"):
        return "max_batch x max_tokens (visual rows)"
    return ["max_images (vision blocks per call)", "max_image_pixels (patches per block)", "-"][min(axis, 2)]


def vision_profile(spec: ModelSpec, limits: Limits) -> Profile:
    """Shapes of the vision graph: [blocks, patches, ...]."""
    v = spec.vision
    blocks = (1, 1, max(limits.max_images, limits.max_frames // v.temporal_patch_size))
    patches = (v.spatial_merge_size**2, _patches(limits.opt_image_pixels, v), _patches(limits.max_image_pixels, v))
    dims = {"pixel_values": v.patch_dim, "pos_ids": 2, "interp_idx": 4, "interp_w": 4}
    return Profile({name: ((blocks[0], patches[0], d), (blocks[1], patches[1], d), (blocks[2], patches[2], d))
                    for name, d in dims.items()})


def text_profile(spec: ModelSpec, limits: Limits) -> Profile:
    """Shapes of the text graph: batch, sequence and visual rows."""
    d, k = spec.text.hidden_size, spec.num_deepstack
    batch = (1, limits.opt_batch, limits.max_batch)
    seq = (2, limits.opt_tokens, limits.max_tokens)
    rows = (1, limits.opt_batch * limits.opt_tokens, limits.max_batch * limits.max_tokens)
    return Profile({
        "input_ids": tuple((b, s) for b, s in zip(batch, seq)),  # type: ignore[dict-item]
        "attention_mask": tuple((b, s) for b, s in zip(batch, seq)),  # type: ignore[dict-item]
        "position_ids": tuple((3, b, s) for b, s in zip(batch, seq)),  # type: ignore[dict-item]
        "visual_embeds": tuple((r, d) for r in rows),  # type: ignore[dict-item]
        "deepstack_embeds": tuple((r, k, d) for r in rows),  # type: ignore[dict-item]
    })


def profiles(spec: ModelSpec, limits: Limits) -> dict[str, Profile]:
    """{"vision": ..., "text": ...}."""
    return {"vision": vision_profile(spec, limits), "text": text_profile(spec, limits)}
