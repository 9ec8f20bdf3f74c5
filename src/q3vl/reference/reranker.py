"""`ReferenceReranker`: the published `Qwen3VLReranker.process()` reproduced with torch + transformers.

Behaviour follows docs/reference-behaviour.md#reranker. The published wrapper runs one (query, document) pair per
forward pass; `batch_size` > 1 pads pairs on the right and reads each pair's last valid position,
which gives the same scores (tested) because causal attention never lets a valid token see a pad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from q3vl.reference import _common as C
from q3vl.reference.embedder import pool_last
from q3vl.tasks import TASKS

DEFAULT_INSTRUCTION = TASKS["reranker"].default_instruction
SYSTEM_PROMPT = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                 'provided. Note that the answer can only be "yes" or "no".')
TAIL_TOKENS = 5  # <|im_end|> \n <|im_start|> assistant \n


class ReferenceReranker(C.Wrapper):
    """The parity oracle and the PyTorch baseline for reranking."""

    def __init__(self, model_name_or_path: str | Path, max_length: int = 10240, min_pixels: int = 4096,
                 max_pixels: int = 1_843_200, total_pixels: int = 7_864_320, fps: float = 1.0,
                 max_frames: int = 64, default_instruction: str = DEFAULT_INSTRUCTION, *,
                 dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa",
                 batch_size: int = 1) -> None:
        torch = C.require_torch()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        super().__init__(model_name_or_path, max_length, min_pixels, max_pixels, total_pixels, fps, max_frames,
                         default_instruction, dtype, device, attn_implementation, "left")
        self.batch_size = batch_size
        self.special_ids = set(self.processor.tokenizer.all_special_ids)
        self._torch = torch

    def keep_head(self, lm: Any) -> None:
        """The one row `w_yes - w_no` the score needs, and the full head for the test that checks it."""
        vocab = self.processor.tokenizer.get_vocab()
        self.yes_id, self.no_id = vocab["yes"], vocab["no"]
        head = lm.lm_head.weight.detach()
        self.score_weight = (head[self.yes_id].float() - head[self.no_id].float()).to(self.model.dtype)
        self.lm_head = lm.lm_head  # kept for the test that compares with the full LM head softmax

    def format_mm_content(self, text: Any, image: Any, video: Any, prefix: str, fps: float | None,
                          max_frames: int | None) -> list[dict[str, Any]]:
        """Prefix text, then the side's videos, images, texts (or "NULL" when it has none)."""
        return [{"type": "text", "text": prefix}, *C.side_content(self, text, image, video, fps, max_frames)]

    def format_pair(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None,
                    fps: float | None, max_frames: int | None) -> list[dict[str, Any]]:
        """The conversation for one (query, document) pair."""
        query_text = query.get("text")
        if isinstance(query_text, tuple):
            instruction, query_text = query_text
        contents = [{"type": "text", "text": "<Instruct>: " + (instruction or self.default_instruction)}]
        contents += self.format_mm_content(query_text, query.get("image"), query.get("video"), "<Query>:",
                                           fps, max_frames)
        contents += self.format_mm_content(document.get("text"), document.get("image"), document.get("video"),
                                           "\n<Document>:", fps, max_frames)
        return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": contents}]

    def truncate(self, ids: list[int]) -> list[int]:
        """The wrapper's truncation: keep the 5-token tail; over budget, keep every special token and
        drop the latest other tokens until the rest fits.
        """
        rest, tail = ids[:-TAIL_TOKENS], ids[-TAIL_TOKENS:]
        if len(rest) <= self.max_length:
            return ids
        keep_plain = self.max_length - sum(1 for t in rest if t in self.special_ids)
        out, kept = [], 0
        for t in rest:
            if t in self.special_ids:
                out.append(t)
            elif kept < keep_plain:
                out.append(t)
                kept += 1
        return out + tail

    def tokenize_pair(self, conversation: list[dict[str, Any]]) -> dict[str, Any]:
        """Token ids (truncated as the wrapper does) and the pair's vision tensors."""
        texts = C.render(self.processor, [conversation])
        images, videos, metadata, video_kwargs = C.vision_inputs([conversation])
        out = C.processor_call(self.processor, texts, images, videos, metadata, video_kwargs,
                               truncation=False, padding=False)
        ids = self.truncate(out["input_ids"][0].tolist())
        pair = {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw",
                                                      "pixel_values_videos", "video_grid_thw")}
        pair["input_ids"] = ids
        return pair

    def collate(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad token ids and concatenate the vision tensors in pair order."""
        torch = self._torch
        length = max(len(p["input_ids"]) for p in pairs)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), length), dtype=torch.long)
        for i, p in enumerate(pairs):
            ids[i, :len(p["input_ids"])] = torch.tensor(p["input_ids"])
            mask[i, :len(p["input_ids"])] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            parts = [p[key] for p in pairs if key in p]
            if parts:
                batch[key] = torch.cat(parts)
        if "image_grid_thw" in batch or "video_grid_thw" in batch:
            batch["mm_token_type_ids"] = C.mm_token_type_ids(ids, self.config.image_token_id,
                                                             self.config.video_token_id)
        return batch

    def hidden_last(self, batch: dict[str, Any]) -> Any:
        """Final-norm hidden state at each row's last valid token."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        return pool_last(hidden, batch["attention_mask"])

    def process(self, inputs: dict[str, Any]) -> list[float]:
        """Scores in [0, 1] for each document, as Python floats."""
        query, documents = inputs.get("query") or {}, inputs.get("documents") or []
        if not query or not documents:
            return []
        convs = [self.format_pair(query, d, inputs.get("instruction"), inputs.get("fps", self.fps),
                                  inputs.get("max_frames", self.max_frames)) for d in documents]
        scores: list[float] = []
        for start in range(0, len(convs), self.batch_size):
            pairs = [self.tokenize_pair(c) for c in convs[start:start + self.batch_size]]
            h = self.hidden_last(self.collate(pairs))
            logits = h @ self.score_weight.to(h.device)
            scores.extend(self._torch.sigmoid(logits).float().cpu().tolist())
        return scores
