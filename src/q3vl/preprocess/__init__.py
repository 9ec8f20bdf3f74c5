"""Torch-free preprocessing shared by the runtime, the export validation and the tests.

Images, videos, prompts and tokenization, M-RoPE positions and the vision graph's host inputs,
reproducing qwen-vl-utils 0.0.14 + the transformers processor (docs/reference-behaviour.md#preprocessing).
"""

from q3vl.preprocess.media import CallBudget, Deadline, MediaAccess, MediaPolicy, media_call

__all__ = ["CallBudget", "Deadline", "MediaAccess", "MediaPolicy", "media_call"]
