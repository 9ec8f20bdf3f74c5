"""The model shapes q3vl makes random-weight checkpoints for.

`2b` and `8b` are the published Qwen3-VL-Embedding/Reranker shapes (docs/reference-behaviour.md#model-sizes).
`tiny` keeps every structural feature (GQA, q/k norms, interleaved M-RoPE, DeepStack, the real
vocabulary and position table) at toy widths for fast tests; `small` (217M parameters) is sized
for CPU benchmarks.
"""

from __future__ import annotations

from typing import Any

from q3vl.tasks import task_for

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5], tie=True),
        "vision": dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4,
                       deepstack_visual_indexes=[0, 1]),
    },
    "small": {
        "text": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=128, mrope_section=[24, 20, 20], tie=True),
        "vision": dict(depth=8, hidden_size=512, intermediate_size=2048, num_heads=8,
                       deepstack_visual_indexes=[1, 3, 5]),
    },
    "2b": {
        "text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], tie=True),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                       deepstack_visual_indexes=[5, 11, 17]),
    },
    "8b": {
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], tie=False),
        "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                       deepstack_visual_indexes=[8, 16, 24]),
    },
}

VOCAB_SIZE = 151936


def config_dict(shape: str, task: str) -> dict[str, Any]:
    """A `config.json` in the transformers 4.57 layout the published checkpoints use."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    t, v = dict(SHAPES[shape]["text"]), SHAPES[shape]["vision"]
    tie = t.pop("tie")
    section = t.pop("mrope_section")
    text_config = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "dtype": "bfloat16", "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": section, "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": tie, "use_cache": True, "vocab_size": VOCAB_SIZE, **t,
    }
    vision_config = {
        "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
        "model_type": "qwen3_vl", "num_position_embeddings": 2304, "out_hidden_size": t["hidden_size"],
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, **v,
    }
    return {
        "_name_or_path": f"q3vl-testing/{task_for(task).model_name}-{shape}-random",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655, "model_type": "qwen3_vl", "text_config": text_config,
        "tie_word_embeddings": tie, "transformers_version": "4.57.3", "video_token_id": 151656,
        "vision_config": vision_config, "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


def processor_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """(preprocessor_config.json, video_preprocessor_config.json) with the Qwen3-VL values."""
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor"}
    image = {**common, "size": {"longest_edge": 16777216, "shortest_edge": 65536},
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "size": {"longest_edge": 25165824, "shortest_edge": 4096},
             "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "do_sample_frames": True,
             "min_frames": 4, "max_frames": 768}
    return image, video
