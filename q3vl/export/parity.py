"""Export-time parity: the bundle's graphs (through the runtime's own pipeline) against transformers.

Both sides get identical token ids and pixel values (made by `q3vl.preprocess` from generated
images, a generated video and texts), so what is compared is the graphs: vision outputs
(merged embeddings and DeepStack features) against `Qwen3VLModel.visual`, and the fused heads
against the full transformers model's last hidden state (pooled + normalised, or the yes/no
logit difference through a sigmoid).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import EMBEDDING, SCORE
from q3vl.preprocess.encode import Encoded, ImagePlan
from q3vl.preprocess.items import Content, EmbedItem
from q3vl.tolerances import TOLERANCES

log = logging.getLogger(__name__)


def _image(h: int, w: int, seed: int) -> Any:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx * 3 + yy) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8))


def cases() -> dict[str, list[Content]]:
    """The generated inputs: three image sizes (one non-square), a video, text only, and a mix."""
    text = lambda *t: Content(tuple(t), (), ())  # noqa: E731
    frames = tuple(_image(96, 128, 10 + i) for i in range(4))
    return {
        "images": [Content(("a photo",), (_image(224, 224, 1),), ()), Content((), (_image(160, 416, 2),), ()),
                   Content(("tall",), (_image(480, 96, 3),), ())],
        "video": [Content(("a clip",), (), (frames,))],
        "text_only": [text("short"), text("a longer sentence about retrieval " * 6), text("多语言文本 and mixed text")],
        "mixed": [text("query text"), Content(("caption",), (_image(128, 192, 4),), ()),
                  Content((), (_image(96, 96, 5),), (frames[:3],))],
    }


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


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
            t, h, w = m.grid if isinstance(m, ImagePlan) else m.plan.grid
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


def _hf_vision(model: Any, blocks: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    pv = torch.from_numpy(np.concatenate([b.pixels for b in blocks]))
    grid = torch.tensor([[1, *b.grid] for b in blocks])
    out = model.model.visual(pv, grid_thw=grid, return_dict=True)
    return out.pooler_output.numpy(), torch.stack(list(out.deepstack_features), 1).numpy()  # [rows, K, D]


def check(bundle: Path, checkpoint: Path, task: str, precision: str, backend: str = "cpu") -> dict[str, Any]:
    """Run every case through the bundle (on `backend`) and transformers; returns the parity report."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from q3vl.runtime import Embedder, Reranker

    tol = TOLERANCES[precision]
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    rt = (Embedder if task == "embedding" else Reranker)(bundle, allow_unverified=True, backend=backend)
    enc, spec = rt.encoder, rt.manifest.spec
    report: dict[str, Any] = {"precision": precision, "tolerance": asdict(tol), "cases": {}}
    worst_vision, worst_head = 1.0, 0.0 if task == "reranker" else 1.0
    with torch.no_grad():
        for name, contents in cases().items():
            if task == "embedding":
                seqs = [enc.embedding(EmbedItem(c, None, None, None), "Represent the user's input.") for c in contents]
            else:
                query = Content(("which picture shows a gradient?",), (), ())
                seqs = [enc.rerank_pair(query, c, "Given a search query, retrieve relevant candidates.", None, None)
                        for c in contents]
            blocks = [enc.load(s.media) for s in seqs]
            row: dict[str, Any] = {"shapes": [len(s.ids) for s in seqs]}
            flat = [b for per in blocks for b in per]
            if flat:
                got = rt.runner.vision(flat)
                ref_emb, ref_ds = _hf_vision(model, flat)
                emb = np.concatenate([g[0] for g in got])
                ds = np.concatenate([g[1] for g in got])
                row["vision_min_cos"] = float(min(_cos(emb, ref_emb).min(), _cos(ds, ref_ds).min()))
                worst_vision = min(worst_vision, row["vision_min_cos"])
            out = rt.runner.run(seqs, blocks)
            hidden = model.model(**hf_batch(seqs, blocks, enc.tokenizer.special.endoftext, spec)).last_hidden_state
            last = torch.tensor([len(s.ids) - 1 for s in seqs])
            h = hidden[torch.arange(len(seqs)), last]
            if task == "embedding":
                ref = torch.nn.functional.normalize(h, dim=-1).numpy()
                row["embed_min_cos"] = float(_cos(out[EMBEDDING], ref).min())
                worst_head = min(worst_head, row["embed_min_cos"])
            else:
                w = model.lm_head.weight
                yes, no = rt.manifest.token_ids["yes"], rt.manifest.token_ids["no"]
                ref = torch.sigmoid(h @ (w[yes] - w[no])).numpy()
                row["score_max_abs_diff"] = float(np.abs(out[SCORE] - ref).max())
                row["scores"] = [round(float(x), 6) for x in out[SCORE]]
                worst_head = max(worst_head, row["score_max_abs_diff"])
            row["finite"] = bool(all(np.isfinite(v).all() for v in out.values()))
            report["cases"][name] = row
            log.debug("parity %s: %s", name, {k: v for k, v in row.items() if k != "scores"})
    head_ok = worst_head <= tol.score_abs if task == "reranker" else worst_head >= tol.embed_cos
    finite = all(r["finite"] for r in report["cases"].values())
    report.update(vision_min_cos=worst_vision, passed=bool(worst_vision >= tol.vision_cos and head_ok and finite))
    head = f"score max |diff| {worst_head:.2e}" if task == "reranker" else f"embedding min cos {worst_head:.7f}"
    report["summary"] = f"vision min cos {worst_vision:.7f}, {head}, finite={finite} ({precision})"
    return report
