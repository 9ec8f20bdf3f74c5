"""`ReferenceEmbedder`: the published `Qwen3VLEmbedder.process()` reproduced with torch + transformers.

Behaviour follows docs/reference-behaviour.md#embedder (the wrapper as observed with transformers 4.57.3), on
whichever transformers 4.57/5.x is installed. Additions over the published wrapper, all opt-in
or diagnostic: `dtype`/`device`/`attn_implementation` arguments, `on_error` (the wrapper's silent
"embed the whole batch as NULL" fallback is available as `on_error="wrapper"`), and `preprocess()`
exposed so tests can compare token ids and pixel values directly.
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path
from typing import Any

from q3vl.reference import _common as C
from q3vl.tasks import TASKS

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = TASKS["embedding"].default_instruction


class ReferenceEmbedder(C.Wrapper):
    """The parity oracle and the PyTorch baseline for embeddings.

    Args mirror the published wrapper; `dtype` is "float32" | "bfloat16" | "float16".
    """

    def __init__(self, model_name_or_path: str | Path, max_length: int = 8192, min_pixels: int = 4096,
                 max_pixels: int = 1_843_200, total_pixels: int = 7_864_320, fps: float = 1.0,
                 max_frames: int = 64, default_instruction: str = DEFAULT_INSTRUCTION, *,
                 dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa",
                 on_error: str = "raise") -> None:
        if on_error not in ("raise", "wrapper"):
            raise ValueError("on_error must be 'raise' or 'wrapper'")
        super().__init__(model_name_or_path, max_length, min_pixels, max_pixels, total_pixels, fps, max_frames,
                         default_instruction, dtype, device, attn_implementation, "right")
        self.on_error = on_error

    def format_model_input(self, text: Any = None, image: Any = None, video: Any = None,
                           instruction: str | None = None, fps: float | None = None,
                           max_frames: int | None = None) -> list[dict[str, Any]]:
        """One conversation: system instruction, user turn with videos, images, texts in that order."""
        if instruction:
            instruction = instruction.strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction = instruction + "."
        return [
            {"role": "system", "content": [{"type": "text", "text": instruction or self.default_instruction}]},
            {"role": "user", "content": C.side_content(self, text, image, video, fps, max_frames)},
        ]

    def conversations(self, inputs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The conversations the wrapper builds for `inputs`."""
        return [self.format_model_input(text=e.get("text"), image=e.get("image"), video=e.get("video"),
                                        instruction=e.get("instruction"), fps=e.get("fps"),
                                        max_frames=e.get("max_frames")) for e in inputs]

    def preprocess(self, inputs: list[dict[str, Any]]) -> Any:
        """The processor output (input_ids, attention_mask, pixel values, grids) for `inputs`."""
        convs = self.conversations(inputs)
        texts = C.render(self.processor, convs)
        try:
            images, videos, metadata, video_kwargs = C.vision_inputs(convs)
        except Exception:
            if self.on_error == "raise":
                raise
            log.error("vision preprocessing failed; embedding the batch as one NULL prompt (wrapper mode)")
            images = videos = metadata = None
            video_kwargs = {"do_sample_frames": False}
            texts = C.render(self.processor, [[{"role": "user", "content": [{"type": "text", "text": "NULL"}]}]])
        return C.processor_call(self.processor, texts, images, videos, metadata, video_kwargs,
                                truncation=True, max_length=self.max_length, padding=True)

    def process(self, inputs: list[dict[str, Any]], normalize: bool = True) -> Any:
        """Embeddings `[N, hidden]` (torch tensor), one forward pass over the whole list."""
        torch = C.require_torch()
        batch = {k: v.to(self.device) for k, v in self.preprocess(inputs).items()}
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        emb = pool_last(hidden, batch["attention_mask"])
        return torch.nn.functional.normalize(emb, p=2, dim=-1) if normalize else emb


def pool_last(hidden: Any, attention_mask: Any) -> Any:
    """Hidden state at the last position whose mask is 1 (left or right padding)."""
    torch = C.require_torch()
    last = attention_mask.shape[1] - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
