"""From validated items to token ids + vision blocks, in two steps.

`plan` (cheap: image headers, video container metadata, tokenization) fixes every sequence's
token ids and grids, so a batch can be sorted by length and split before any pixel is decoded;
`load` (costly: decode, resize, patchify) runs one micro-batch at a time. One bad item fails in
whichever step sees the problem, with an `InputError` naming what is wrong.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.image import DEFAULT_TIMEOUT, patch_rows, probe_image, smart_resize
from q3vl.preprocess.items import Content, EmbedItem
from q3vl.preprocess.media import MediaAccess, MediaPolicy, media_errors
from q3vl.preprocess.prompt import (
    VIDEO_SLOT,
    ChatTemplate,
    TextTokenizer,
    check_text,
    expand_pads,
    fit_texts,
    video_slot,
)
from q3vl.preprocess.rope import rope_positions
from q3vl.preprocess.video import FrameList, VideoFile
from q3vl.preprocess.vision import VisionBlock

RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                 'provided. Note that the answer can only be "yes" or "no".')
TAIL_TOKENS = 5  # <|im_end|> \n <|im_start|> assistant \n
TRUNCATION_MODES = ("text", "reference")


@dataclass(frozen=True)
class ImagePlan:
    """An image whose target size is known; pixels are decoded at load time."""

    image: Any  # an `ImageSource`: header read, no open file, no decoded pixels
    height: int
    width: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return 1, self.height // 16, self.width // 16


Media = ImagePlan | VideoFile | FrameList


@dataclass(frozen=True)
class PreprocessConfig:
    """The wrapper's constructor values that shape preprocessing (REFERENCE.md sections 1-2)."""

    max_length: int
    min_pixels: int = 4096
    max_pixels: int = 1_843_200
    total_pixels: int = 7_864_320
    fps: float = 1.0
    max_frames: int = 64
    truncation: str = "text"
    timeout: float = DEFAULT_TIMEOUT
    media_policy: MediaPolicy = field(default_factory=MediaPolicy)

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, not {self.truncation!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError("need 0 < min_pixels <= max_pixels")


@dataclass
class Encoded:
    """One sequence ready for the graphs once its media are loaded."""

    ids: np.ndarray  # int64 [L]
    media: list[Media]  # in token order
    positions: np.ndarray = field(repr=False)  # int64 [3, L]

    @property
    def num_vision_tokens(self) -> int:
        return sum(int(np.prod(m.grid if isinstance(m, ImagePlan) else m.plan.grid)) // 4 for m in self.media)


class Encoder:
    """Turns validated items into `Encoded` sequences (plan) and vision blocks (load)."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate, config: PreprocessConfig) -> None:
        self.tokenizer, self.template, self.config = tokenizer, template, config
        sp = tokenizer.special
        self.pad_ids = (sp.image_pad, sp.video_pad)

    # ------------------------------------------------------------ media
    def plan_media(self, c: Content, fps: float | None, max_frames: int | None) -> list[Media]:
        """Videos then images (the wrapper's content order), each sized but not decoded, read under the
        media policy (inside a call wrapped by `media.per_call`, with that call's byte budget).
        """
        cfg = self.config
        access = MediaAccess.current(cfg.media_policy, cfg.timeout)
        media: list[Media] = []
        for v in c.videos:
            with media_errors("video"):
                if isinstance(v, str):
                    media.append(VideoFile.probe(v, fps or cfg.fps, max_frames or cfg.max_frames, access=access))
                else:
                    media.append(FrameList.probe(list(v), cfg.max_frames, cfg.total_pixels, access=access))
        for src in c.images:
            with media_errors("image"):
                img = probe_image(src, access)
                h, w = smart_resize(img.height, img.width, 32, cfg.min_pixels, cfg.max_pixels)
                media.append(ImagePlan(img, h, w))
        return media

    @staticmethod
    def load(media: list[Media]) -> list[VisionBlock]:
        """Decode and cut into patch rows: one block per image and per video frame pair, in token order.

        One medium at a time, its source pixels dropped once its rows exist; rows stay uint8 until a
        vision call normalises them. Any failure is the item's `InputError`.
        """
        blocks: list[VisionBlock] = []
        for m in media:
            with media_errors("image" if isinstance(m, ImagePlan) else "video"):
                if isinstance(m, ImagePlan):
                    rgb = m.image.resized(m.height, m.width)
                    blocks.append(VisionBlock(patch_rows(np.stack([rgb, rgb])), (m.height // 16, m.width // 16)))
                    continue
                rows = patch_rows(m.load())
                t, h, w = m.plan.grid
                blocks.extend(VisionBlock(part, (h, w)) for part in np.split(rows, t))
        return blocks

    # ------------------------------------------------------------ prompts
    def _slots(self, media: list[Media]) -> tuple[list[dict[str, Any]], list[int]]:
        """Template content items for the media, and the token count of each vision block."""
        items: list[dict[str, Any]] = []
        counts: list[int] = []
        for m in media:
            if isinstance(m, ImagePlan):
                items.append({"type": "image"})
                counts.append(m.height * m.width // 1024)
            else:
                items.append({"type": "video", "timestamps": m.plan.timestamps})
                t, h, w = m.plan.grid
                counts.extend([h * w // 4] * t)
        return items, counts

    def _render(self, messages: list[dict[str, Any]], counts: list[int]) -> np.ndarray:
        videos = [it["timestamps"] for msg in messages for it in msg["content"] if it.get("type") == "video"]
        parts = self.template.render(messages).split(VIDEO_SLOT)
        if len(parts) != len(videos) + 1:
            raise ValueError("the chat template did not place every video slot")
        text = parts[0] + "".join(video_slot(ts) + rest for ts, rest in zip(videos, parts[1:]))
        return expand_pads(self.tokenizer.encode(text), self.pad_ids, counts)

    def _finish(self, ids: np.ndarray, media: list[Media]) -> Encoded:
        grids = [g for m in media for g in _block_grids(m)]
        return Encoded(ids, media, rope_positions(ids, self.pad_ids, grids))

    def embedding(self, item: EmbedItem, default_instruction: str) -> Encoded:
        """Plan one embedding input (REFERENCE.md section 1)."""
        instruction = item.instruction
        if instruction:
            instruction = instruction.strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction += "."
        c = item.content
        for t in c.texts:
            check_text(t)
        media = self.plan_media(c, item.fps, item.max_frames)
        slots, counts = self._slots(media)

        def build(texts: list[str]) -> np.ndarray:
            user = [{"type": "text", "text": "NULL"}] if c.empty else [*slots, *({"type": "text", "text": t}
                                                                                 for t in texts)]
            system = [{"type": "text", "text": instruction or default_instruction}]
            return self._render([{"role": "system", "content": system}, {"role": "user", "content": user}], counts)

        texts = list(c.texts)
        if self.config.truncation == "reference":
            ids = _truncate_right(build(texts), self.config.max_length, sum(counts), self.pad_ids)
        else:
            ids = fit_texts(build, texts, range(len(texts) - 1, -1, -1), self.config.max_length, self.tokenizer)
        return self._finish(ids, media)

    def rerank_pair(self, query: Content, doc: Content, instruction: str, fps: float | None,
                    max_frames: int | None) -> Encoded:
        """Plan one (query, document) pair (REFERENCE.md section 2)."""
        for t in (*query.texts, *doc.texts):
            check_text(t)
        q_media, d_media = self.plan_media(query, fps, max_frames), self.plan_media(doc, fps, max_frames)
        q_slots, q_counts = self._slots(q_media)
        d_slots, d_counts = self._slots(d_media)
        nq = len(query.texts)

        def side(prefix: str, c: Content, slots: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
            body = [{"type": "text", "text": "NULL"}] if c.empty else [*slots, *({"type": "text", "text": t}
                                                                                 for t in texts)]
            return [{"type": "text", "text": prefix}, *body]

        def build(texts: list[str]) -> np.ndarray:
            user = [{"type": "text", "text": "<Instruct>: " + instruction},
                    *side("<Query>:", query, q_slots, texts[:nq]), *side("\n<Document>:", doc, d_slots, texts[nq:])]
            return self._render([{"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM}]},
                                 {"role": "user", "content": user}], q_counts + d_counts)

        texts = [*query.texts, *doc.texts]
        if self.config.truncation == "reference":
            ids = _truncate_keep_special(build(texts), self.config.max_length, self.tokenizer.special.all_special)
        else:  # document text first (last item first), then query text
            order = [*range(len(texts) - 1, nq - 1, -1), *range(nq - 1, -1, -1)]
            ids = fit_texts(build, texts, order, self.config.max_length, self.tokenizer)
        return self._finish(ids, q_media + d_media)


def _block_grids(m: Media) -> list[tuple[int, int]]:
    t, h, w = m.grid if isinstance(m, ImagePlan) else m.plan.grid
    return [(h, w)] * t


def _truncate_right(ids: np.ndarray, max_length: int, vision_tokens: int, pad_ids: tuple[int, int]) -> np.ndarray:
    """The published embedder's right-side truncation; it fails when the cut splits vision tokens."""
    if len(ids) <= max_length:
        return ids
    cut = ids[:max_length]
    if int(np.isin(cut, pad_ids).sum()) != vision_tokens:
        raise InputError(f"truncation='reference' cuts a vision block at max_length {max_length} "
                         "(the published wrapper raises here too); use the default truncation")
    return cut


def _truncate_keep_special(ids: np.ndarray, max_length: int, special: frozenset[int]) -> np.ndarray:
    """The published reranker's truncation: keep the 5-token tail and every special token of the rest,
    drop the latest other tokens until the rest fits (the result may exceed max_length).
    """
    rest, tail = ids[:-TAIL_TOKENS], ids[-TAIL_TOKENS:]
    if len(rest) <= max_length:
        return ids
    is_special = np.isin(rest, list(special))
    budget = max_length - int(is_special.sum())
    plain_rank = np.cumsum(~is_special)  # 1-based rank among non-special tokens
    keep = is_special | (plain_rank <= budget)
    return np.concatenate([rest[keep], tail])
