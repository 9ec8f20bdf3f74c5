"""Export-time parity: the bundle's graphs (through the runtime's own pipeline) against transformers.

Both sides get identical token ids and pixel values (made by `q3vl.preprocess` from generated
images, a generated video and texts), so what is compared is the graphs: vision outputs
(merged embeddings and DeepStack features) against `Qwen3VLModel.visual`, and the fused heads
against the full transformers model's last hidden state (pooled + normalised, or the yes/no
logit difference through a sigmoid).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.export.heads import heads_for
from q3vl.preprocess.encode import Encoded, ImagePlan, media_grid
from q3vl.runtime import model_for
from q3vl.tasks import task_for
from q3vl.tolerances import TOLERANCES

log = logging.getLogger(__name__)


def hf_batch(seqs: list[Encoded], blocks: list[list[Any]], pad_id: int, spec: Any) -> dict[str, Any]:
    """Transformers inputs carrying exactly the token ids and pixel values the runtime uses."""
    import torch

    length = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    images: list[np.ndarray] = []
    videos: list[np.ndarray] = []
    image_grids: list[list[int]] = []
    video_grids: list[list[int]] = []
    for b, (s, blk) in enumerate(zip(seqs, blocks)):
        ids[b, :len(s.ids)] = torch.from_numpy(s.ids)
        mask[b, :len(s.ids)] = 1
        k = 0
        for m in s.media:
            t, h, w = media_grid(m)
            rows = np.concatenate([x.pixels for x in blk[k:k + t]])
            k += t
            (images if isinstance(m, ImagePlan) else videos).append(rows)
            (image_grids if isinstance(m, ImagePlan) else video_grids).append([t, h, w])
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if images:
        batch.update(pixel_values=torch.from_numpy(np.concatenate(images)), image_grid_thw=torch.tensor(image_grids))
    if videos:
        batch.update(pixel_values_videos=torch.from_numpy(np.concatenate(videos)),
                     video_grid_thw=torch.tensor(video_grids))
    if images or videos:
        batch["mm_token_type_ids"] = ((ids == spec.image_token_id).int() + 2 * (ids == spec.video_token_id).int())
    return batch


def _hf_vision(model: Any, blocks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    pv = torch.from_numpy(np.concatenate([b.pixels for b in blocks]))
    grid = torch.tensor([[1, *b.grid] for b in blocks])
    out = model.model.visual(pv, grid_thw=grid, return_dict=True)
    return out.pooler_output.numpy(), torch.stack(list(out.deepstack_features), 1).numpy()  # [rows, K, D]


def check(bundle: Path, checkpoint: Path, task: str, precision: str, backend: str = "cpu") -> dict[str, Any]:
    """Run every export case through the bundle (on `backend`) and transformers; the parity report."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from q3vl.export.cases import run_cases
    from q3vl.export.weights import bars_only_on_a_terminal

    with bars_only_on_a_terminal():
        model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    rt = model_for(task_for(task).name)(bundle, allow_unverified=True, backend=backend)
    pad, spec, token_ids = rt.encoder.tokenizer.special.endoftext, rt.manifest.spec, rt.manifest.token_ids

    def reference(loaded: Any) -> dict[str, np.ndarray]:
        seqs, blocks = [x.plan.encoded for x in loaded], [x.blocks for x in loaded]
        hidden = model.model(**hf_batch(seqs, blocks, pad, spec)).last_hidden_state
        last = torch.tensor([len(s.ids) - 1 for s in seqs])
        return heads_for(rt.task).reference_outputs(model, hidden[torch.arange(len(seqs)), last], token_ids)

    with torch.no_grad():
        return run_cases(rt, reference, TOLERANCES[precision], precision, lambda blocks: _hf_vision(model, blocks))
