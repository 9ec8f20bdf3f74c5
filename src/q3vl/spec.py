"""Model facts read from a checkpoint's `config.json` or a bundle's manifest.

One frozen table of facts (dims, token ids, DeepStack layers, rope) that export, runtime and
tests all read, so no module carries its own per-model `if`s. Accepts both config layouts:
transformers 4.57 (`rope_scaling` + `rope_theta`, as the published checkpoints are written) and
transformers 5 (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q3vl.errors import CheckpointError

# Token ids of the Qwen vocabulary (docs/reference-behaviour.md#special-tokens); checked against each tokenizer.
SPECIAL_TOKENS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
}


@dataclass(frozen=True)
class TextSpec:
    """The language backbone's shape."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        _check_sizes(self, {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                            "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096})
        _check_floats(self, ("rms_norm_eps", "rope_theta"))
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_heads {self.num_heads} is not a multiple of kv heads {self.num_kv_heads}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise CheckpointError(f"mrope_section {self.mrope_section} does not cover head_dim {self.head_dim}")
        if not self.mrope_interleaved:
            raise CheckpointError("only interleaved M-RoPE (Qwen3-VL) is supported")


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower's shape."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # the tower's LayerNorms (transformers hard-codes 1e-6 for Qwen3-VL)

    def __post_init__(self) -> None:
        _check_sizes(self, {"depth": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_heads": 1024,
                            "patch_size": 1024, "temporal_patch_size": 64, "spatial_merge_size": 64,
                            "out_hidden_size": 1 << 16, "num_position_embeddings": 1 << 24})
        _check_floats(self, ("rope_theta", "layer_norm_eps"))
        side = round(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise CheckpointError("num_position_embeddings must be a square")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise CheckpointError(f"deepstack indexes {self.deepstack_visual_indexes} outside depth {self.depth}")

    @property
    def patch_dim(self) -> int:
        """Values per pixel_values row: 3 channels x temporal x patch x patch (1536)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        """Image side multiple: patch x merge (32)."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class ModelSpec:
    """Everything q3vl needs to know about one Qwen3-VL checkpoint."""

    text: TextSpec
    vision: VisionSpec
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise CheckpointError("vision out_hidden_size must equal the text hidden size")

    @property
    def num_deepstack(self) -> int:
        """How many DeepStack feature maps the vision tower emits."""
        return len(self.vision.deepstack_visual_indexes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the bundle manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`."""
        text = dict(d["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        vision = dict(d["vision"])
        vision["deepstack_visual_indexes"] = tuple(vision["deepstack_visual_indexes"])
        rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
        return cls(text=TextSpec(**text), vision=VisionSpec(**vision), **rest)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read a Qwen3-VL `config.json` dict (transformers 4.57 or 5 layout)."""
        model_type = config.get("model_type")
        if model_type != "qwen3_vl":
            raise CheckpointError(
                f"not a Qwen3-VL checkpoint: model_type is {model_type!r} (architectures "
                f"{config.get('architectures')}); q3vl exports Qwen3-VL-Embedding/Reranker (model_type 'qwen3_vl')"
            )
        try:
            return cls(
                text=_text_spec(config["text_config"], config),
                vision=_vision_spec(config["vision_config"]),
                image_token_id=int(config.get("image_token_id", 151655)),
                video_token_id=int(config.get("video_token_id", 151656)),
                vision_start_token_id=int(config.get("vision_start_token_id", 151652)),
                vision_end_token_id=int(config.get("vision_end_token_id", 151653)),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r}") from e

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelSpec:
        """Read `config.json` from a checkpoint directory."""
        return cls.from_config(read_json(Path(path) / "config.json", CheckpointError))


# What q3vl's preprocessing implements (the Qwen3-VL processor's values); a checkpoint's processor
# configs, when present, must agree, and when absent these are the defaults the wrapper's processor uses.
PROCESSOR_VALUES = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


def check_processor_configs(path: Path, spec: ModelSpec) -> None:
    """Refuse a checkpoint whose processor configs ask for preprocessing q3vl does not implement.

    Why: q3vl computes pixels itself from the model's vision config (patch, temporal patch and merge
    sizes, mean = std = 0.5); a fine-tune whose processor normalises differently would export fine
    and embed every image wrongly. Absent configs are the Qwen3-VL defaults, as for the wrapper.
    """
    expected: dict[str, Any] = {**PROCESSOR_VALUES, "patch_size": spec.vision.patch_size,
                                "temporal_patch_size": spec.vision.temporal_patch_size,
                                "merge_size": spec.vision.spatial_merge_size}
    for name in PROCESSOR_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupt {file}: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file} does not hold a JSON object")
        for key, value in expected.items():
            got = config.get(key, value)
            if (list(got) if isinstance(got, (list, tuple)) else got) != value:
                raise CheckpointError(f"{file} sets {key} = {got!r}, but q3vl's preprocessing implements "
                                      f"{key} = {value!r} (the Qwen3-VL processor's, and this model's vision "
                                      "config): this checkpoint's images would be preprocessed differently")


def _check_sizes(obj: Any, bounds: dict[str, int]) -> None:
    """Each named field is an int in [1, bound]: a zero, negative or absurd size is a broken config."""
    for name, bound in bounds.items():
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
            raise CheckpointError(f"{type(obj).__name__}.{name} must be an integer in [1, {bound}], not {value!r}")


def _check_floats(obj: Any, names: tuple[str, ...]) -> None:
    """Each named field is a finite positive number."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise CheckpointError(f"{type(obj).__name__}.{name} must be a finite positive number, not {value!r}")


def _rope(text: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, rope dict) from either `rope_parameters` (v5) or `rope_scaling` + `rope_theta` (v4.57)."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise KeyError("rope_theta")
    if params.get("rope_type", "default") != "default":
        raise CheckpointError(f"unsupported rope_type {params.get('rope_type')!r}")
    return float(theta), params


def _text_spec(text: dict[str, Any], top: dict[str, Any]) -> TextSpec:
    theta, rope = _rope(text)
    heads = int(text["num_attention_heads"])
    return TextSpec(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        tie_word_embeddings=bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


def _vision_spec(v: dict[str, Any]) -> VisionSpec:
    rope = v.get("rope_parameters") or {}
    return VisionSpec(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_heads"]),
        patch_size=int(v.get("patch_size", 16)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        out_hidden_size=int(v["out_hidden_size"]),
        num_position_embeddings=int(v["num_position_embeddings"]),
        deepstack_visual_indexes=tuple(int(i) for i in v["deepstack_visual_indexes"]),
        hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
    )


def read_json(path: Path, error: type[Exception]) -> dict[str, Any]:
    """Load a JSON file, turning absence or corruption into `error` with the path in the message."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise error(f"missing file: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
