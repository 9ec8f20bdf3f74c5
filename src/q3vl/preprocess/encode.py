"""From validated items to token ids + vision blocks, in two steps.

`plan` (cheap: image headers, video container metadata, tokenization) fixes every sequence's
token ids and grids, so a batch can be sorted by length and split before any pixel is decoded;
`load` (costly: decode, resize, patchify) runs one micro-batch at a time. One bad item fails in
whichever step sees the problem, with an `InputError` naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from q3vl.errors import ConfigError, InputError, LimitError, QueryError
from q3vl.preprocess import TRUNCATION_MODES
from q3vl.preprocess.image import DEFAULT_TIMEOUT, ImageSource, patch_rows, probe_image, smart_resize
from q3vl.preprocess.items import VIDEO_BUDGETS, Content, EmbedItem, Pixels
from q3vl.preprocess.media import MediaAccess, MediaPolicy, media_errors
from q3vl.preprocess.prompt import (
    MARK,
    VIDEO_SLOT,
    ChatTemplate,
    TextTokenizer,
    check_text,
    expand_pads,
    fit_texts,
    video_slot,
)
from q3vl.preprocess.rope import rope_positions
from q3vl.preprocess.video import FrameList, VideoFile, fit_video_files
from q3vl.preprocess.vision import Geometry, VisionBlock

RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                 'provided. Note that the answer can only be "yes" or "no".')
TAIL_TOKENS = 5  # <|im_end|> \n <|im_start|> assistant \n
MAX_VARIANTS = 64  # encoders kept for items' own pixel limits; more distinct sets are built per item
DEFAULT_GEOMETRY = Geometry()  # every published Qwen3-VL checkpoint's: patch 16, temporal 2, merge 2


@dataclass(frozen=True)
class ImagePlan:
    """An image whose target size is known; pixels are decoded at load time."""

    image: ImageSource  # header read, no open file, no decoded pixels
    height: int
    width: int
    grid: tuple[int, int, int]  # (1, h, w) in patches

    def pixels(self) -> np.ndarray:
        """Decoded and resized to the planned size (PIL bicubic): uint8 `[height, width, 3]`."""
        return self.image.resized(self.height, self.width)


def plan_image(src: object, access: MediaAccess, geometry: Geometry, min_pixels: float,
               max_pixels: float) -> ImagePlan:
    """An image read (its header only, under `access`'s media policy) and sized as the model sizes it:
    smart_resize to multiples of the patch factor, its area within [min_pixels, max_pixels].

    With `ImagePlan.pixels` this is every step from an image reference to the pixels the vision
    graph sees; the embedder's planning and loading, and the Ray decode stage, all run these two.
    """
    img = probe_image(src, access)
    h, w = smart_resize(img.height, img.width, geometry.factor, min_pixels, max_pixels)
    return ImagePlan(img, h, w, (1, h // geometry.patch, w // geometry.patch))


Media = ImagePlan | VideoFile | FrameList


def media_grid(m: Media) -> tuple[int, int, int]:
    """(t, h, w) in patches of an image (t = 1) or a video (t = frame pairs)."""
    return m.grid if isinstance(m, ImagePlan) else m.plan.grid


@dataclass(frozen=True)
class PreprocessConfig:
    """The wrapper's constructor values that shape preprocessing (docs/reference-behaviour.md#embedder),
    plus q3vl's own bounds.
    """

    max_length: int
    min_pixels: int = 4096
    max_pixels: int = 1_843_200
    total_pixels: int = 7_864_320
    fps: float = 1.0
    max_frames: int = 64
    truncation: str = "text"
    timeout: float = DEFAULT_TIMEOUT
    max_text_chars: int = 1 << 20  # raw characters of text (+ instruction) per item, checked before tokenizing
    max_parts: int = 16384  # text, image and video elements per item (or per rerank side)
    media_policy: MediaPolicy = field(default_factory=MediaPolicy)
    video_budget: str = "off"  # "fit": video files shrink to fit max_length (docs/reference-behaviour.md#video-budget)

    def __post_init__(self) -> None:
        if self.truncation not in TRUNCATION_MODES:
            raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, not {self.truncation!r}")
        if self.video_budget not in VIDEO_BUDGETS:
            raise ConfigError(f"video_budget must be one of {VIDEO_BUDGETS}, not {self.video_budget!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("need 0 < min_pixels <= max_pixels")
        if not 0 < self.fps < float("inf") or not self.max_frames >= 2 or self.max_length < 1:
            raise ConfigError("need 0 < fps < inf, max_frames >= 2 and max_length >= 1")


class SharedMedia:
    """The media every pair of one rerank call shares (the query's): planned once, loaded once.

    Pairs are spread over micro-batches and loader threads; the first to need the blocks loads them
    under the lock, the others reuse them. A failure is the query's (`QueryError`), not one document's,
    and is kept: every later pair gets the same error at once instead of fetching again (a stalled
    query URL would otherwise cost one media deadline per document).
    """

    def __init__(self, media: list[Media], load: Any) -> None:
        self.media = media
        self._load = load
        self._lock = threading.Lock()
        self._blocks: list[VisionBlock] | None = None
        self._error: QueryError | None = None

    def blocks(self) -> list[VisionBlock]:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._blocks is None:
                try:
                    self._blocks = self._load(self.media)
                except Exception as e:
                    self._error = QueryError(f"query: {getattr(e, 'reason', None) or e}")
                    raise self._error from e
            return self._blocks


@dataclass
class Encoded:
    """One sequence ready for the graphs once its media are loaded."""

    ids: np.ndarray  # int64 [L]
    media: list[Media]  # in token order (a reranker pair: the query's, then the document's)
    positions: np.ndarray = field(repr=False)  # int64 [3, L]
    grids: list[tuple[int, int]] = field(default_factory=list)  # (h, w) of every vision block, in token order
    shared: SharedMedia | None = None  # loads `media[:len(shared.media)]` once for every pair of a call
    merge: int = 2

    @property
    def num_vision_tokens(self) -> int:
        return sum(h * w for h, w in self.grids) // self.merge**2


class Encoder:
    """Turns validated items into `Encoded` sequences (plan) and vision blocks (load)."""

    def __init__(self, tokenizer: TextTokenizer, template: ChatTemplate, config: PreprocessConfig,
                 geometry: Geometry = DEFAULT_GEOMETRY) -> None:
        self.tokenizer, self.template, self.config, self.geometry = tokenizer, template, config, geometry
        sp = tokenizer.special
        self.pad_ids = (sp.image_pad, sp.video_pad)
        self._variants: dict[Pixels, Encoder] = {}
        self._variants_lock = threading.Lock()

    def configured(self, pixels: Pixels) -> Encoder:
        """The encoder for an item that sets its own `min_pixels`/`max_pixels`/`total_pixels` (else self).

        Only planning reads those limits (loading follows the plan), so a planned item needs nothing
        else. A few variants are cached; a caller sending endless distinct values gets fresh ones.
        """
        if not pixels:
            return self
        with self._variants_lock:
            found = self._variants.get(pixels)
        if found is not None:
            return found
        try:
            config = dataclasses.replace(self.config, **dict[str, Any](pixels))
        except ConfigError as e:
            raise InputError(str(e)) from None
        variant = Encoder(self.tokenizer, self.template, config, self.geometry)
        with self._variants_lock:
            if len(self._variants) < MAX_VARIANTS:
                self._variants[pixels] = variant
        return variant

    # ------------------------------------------------------------ media
    def plan_media(self, c: Content, fps: float | None, max_frames: int | None) -> list[Media]:
        """Videos then images (the wrapper's content order), each sized but not decoded, read under the
        media policy (inside a call wrapped by `media.media_call`, with that call's byte budget).
        """
        cfg, g = self.config, self.geometry
        access = MediaAccess.current(cfg.media_policy, cfg.timeout)
        media: list[Media] = []
        for v in c.videos:
            with media_errors("video"):
                if isinstance(v, str):
                    media.append(VideoFile.probe(v, fps or cfg.fps, max_frames or cfg.max_frames, access=access,
                                                 geometry=g))
                else:
                    media.append(FrameList.probe(list(v), cfg.max_frames, cfg.total_pixels, access=access, geometry=g))
        for src in c.images:
            with media_errors("image"):
                media.append(plan_image(src, access, g, cfg.min_pixels, cfg.max_pixels))
        return media

    def load(self, media: list[Media]) -> list[VisionBlock]:
        """Decode and cut into patch rows: one block per image and per video frame pair, in token order.

        One medium at a time, its source pixels dropped once its rows exist; rows stay uint8 until a
        vision call normalises them. Any failure is the item's `InputError`.
        """
        g = self.geometry
        blocks: list[VisionBlock] = []
        for m in media:
            with media_errors("image" if isinstance(m, ImagePlan) else "video"):
                if isinstance(m, ImagePlan):
                    rgb = m.pixels()
                    rows = patch_rows(np.stack([rgb] * g.temporal), g.patch, g.temporal, g.merge)
                    blocks.append(VisionBlock(rows, m.grid[1:]))
                    continue
                rows = patch_rows(m.load(), g.patch, g.temporal, g.merge)
                t, h, w = m.plan.grid
                blocks.extend(VisionBlock(part, (h, w)) for part in np.split(rows, t))
        return blocks

    def blocks(self, enc: Encoded) -> list[VisionBlock]:
        """Every vision block of a planned sequence, the shared (query) ones loaded once per call."""
        if enc.shared is None:
            return self.load(enc.media)
        return [*enc.shared.blocks(), *self.load(enc.media[len(enc.shared.media):])]

    # ------------------------------------------------------------ prompts
    def _slots(self, media: list[Media]) -> tuple[list[dict[str, Any]], list[int]]:
        """Template content items for the media, and the token count of each vision block."""
        items: list[dict[str, Any]] = []
        counts: list[int] = []
        for m in media:
            t, h, w = media_grid(m)
            items.append({"type": "image"} if isinstance(m, ImagePlan) else
                         {"type": "video", "timestamps": m.plan.timestamps})
            counts.extend([h * w // self.geometry.merge**2] * t)
        return items, counts

    def _render(self, messages: list[dict[str, Any]], counts: list[int]) -> np.ndarray:
        """Render and tokenize; every text content item is user text (see `TextTokenizer.encode_prompt`)."""
        user: list[str] = []

        def mark(item: dict[str, Any]) -> dict[str, Any]:
            if item.get("type") != "text":
                return item
            user.append(item["text"])
            return {**item, "text": f"{MARK}{len(user) - 1}{MARK}"}

        marked = [{**m, "content": [mark(it) for it in m["content"]]} for m in messages]
        videos = [it["timestamps"] for msg in messages for it in msg["content"] if it.get("type") == "video"]
        parts = self.template.render(marked).split(VIDEO_SLOT)
        if len(parts) != len(videos) + 1:
            raise ValueError("the chat template did not place every video slot")
        text = parts[0] + "".join(video_slot(ts) + rest for ts, rest in zip(videos, parts[1:]))
        return expand_pads(self.tokenizer.encode_prompt(text, user), self.pad_ids, counts)

    def _finish(self, ids: np.ndarray, media: list[Media], shared: SharedMedia | None = None) -> Encoded:
        grids = [(h, w) for m in media for t, h, w in [media_grid(m)] for _ in range(t)]
        merge = self.geometry.merge
        return Encoded(ids, media, rope_positions(ids, self.pad_ids, grids, merge), grids, shared, merge)

    def _check_texts(self, texts: tuple[str, ...] | list[str], instruction: str | None, *sides: Content) -> None:
        """Bounds first (element count, characters), then valid Unicode: all before any tokenizing."""
        parts = max((len(c.texts) + len(c.images) + len(c.videos) for c in sides), default=0)
        if parts > self.config.max_parts:
            raise LimitError(f"item has {parts} text/image/video elements; the limit is max_parts="
                             f"{self.config.max_parts} (join the texts, or split the item)")
        chars = sum(map(len, texts)) + len(instruction or "")
        if chars > self.config.max_text_chars:
            raise LimitError(f"item has {chars} characters of text; the limit is max_text_chars="
                             f"{self.config.max_text_chars} (split the text or raise the limit)")
        for t in texts:
            check_text(t)
        if instruction:
            check_text(instruction, "instruction")

    def embedding(self, item: EmbedItem, default_instruction: str) -> Encoded:
        """Plan one embedding input (docs/reference-behaviour.md#embedder-prompt)."""
        if item.pixels:
            return self.configured(item.pixels).embedding(dataclasses.replace(item, pixels=()), default_instruction)
        instruction = item.instruction
        if instruction:
            instruction = instruction.strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction += "."
        c = item.content
        self._check_texts(c.texts, instruction, c)

        def prompt(texts: list[str], media: list[Media]) -> np.ndarray:
            slots, counts = self._slots(media)
            user = [{"type": "text", "text": "NULL"}] if c.empty else [*slots, *({"type": "text", "text": t}
                                                                                 for t in texts)]
            system = [{"type": "text", "text": instruction or default_instruction}]
            return self._render([{"role": "system", "content": system}, {"role": "user", "content": user}], counts)

        texts = list(c.texts)
        media = self.fit_videos(self.plan_media(c, item.fps, item.max_frames), lambda m: prompt(texts, m))
        vision = sum(self._slots(media)[1])
        if self.config.truncation == "reference":
            ids = _truncate_right(prompt(texts, media), self.config.max_length, vision, self.pad_ids)
        else:
            ids = fit_texts(lambda t: prompt(t, media), texts, [range(len(texts))], self.config.max_length,
                            self.tokenizer, advice(media, self.config.video_budget))
        return self._finish(ids, media)

    def fit_videos(self, media: list[Media], measure: Callable[[list[Media]], np.ndarray],
                   limit: int | None = None) -> list[Media]:
        """With `video_budget="fit"`, `media` whose video files fit `measure(media)` (the prompt's ids) into
        `limit` (default max_length) (`video.fit_video_files`); otherwise `media` unchanged.
        """
        if self.config.video_budget != "fit":
            return media
        return fit_video_files(media, measure, limit or self.config.max_length)

    def plan_query(self, query: Content, instruction: str, fps: float | None, max_frames: int | None
                   ) -> SharedMedia:
        """A rerank query's media, planned once for all of a call's documents (errors are the query's).

        With `video_budget="fit"` the query's video files fit in half of max_length (the documents,
        not known yet, get the rest).
        """
        try:
            self._check_texts(query.texts, instruction, query)
            nothing = Content((), (), ())
            media = self.fit_videos(self.plan_media(query, fps, max_frames), lambda m: self._pair_ids(
                query, nothing, instruction, list(query.texts), m, []), self.config.max_length // 2)
            return SharedMedia(media, self.load)
        except InputError as e:
            raise QueryError(f"query: {e.reason}") from e

    def _pair_ids(self, query: Content, doc: Content, instruction: str, texts: list[str], q_media: list[Media],
                  d_media: list[Media]) -> np.ndarray:
        """The rendered and tokenized rerank prompt; `texts` are the query's texts, then the document's."""
        nq = len(query.texts)
        q_slots, q_counts = self._slots(q_media)
        d_slots, d_counts = self._slots(d_media)

        def side(prefix: str, c: Content, slots: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
            body = [{"type": "text", "text": "NULL"}] if c.empty else [*slots, *({"type": "text", "text": t}
                                                                                 for t in texts)]
            return [{"type": "text", "text": prefix}, *body]

        user = [{"type": "text", "text": "<Instruct>: " + instruction},
                *side("<Query>:", query, q_slots, texts[:nq]), *side("\n<Document>:", doc, d_slots, texts[nq:])]
        return self._render([{"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM}]},
                             {"role": "user", "content": user}], q_counts + d_counts)

    def rerank_pair(self, query: Content, doc: Content, instruction: str, fps: float | None, max_frames: int | None,
                    shared: SharedMedia | None = None) -> Encoded:
        """Plan one (query, document) pair (docs/reference-behaviour.md#reranker-prompt).

        `shared`: the query's media from `plan_query`, shared by every pair of a call (planned here if absent).
        """
        shared = shared or self.plan_query(query, instruction, fps, max_frames)
        self._check_texts([*query.texts, *doc.texts], instruction, query, doc)
        texts = [*query.texts, *doc.texts]
        q_media = shared.media
        d_media = self.fit_videos(self.plan_media(doc, fps, max_frames),
                                  lambda m: self._pair_ids(query, doc, instruction, texts, q_media, m))

        def build(texts: list[str]) -> np.ndarray:
            return self._pair_ids(query, doc, instruction, texts, q_media, d_media)

        if self.config.truncation == "reference":
            ids = _truncate_keep_special(build(texts), self.config.max_length, self.tokenizer.special.all_special)
        else:  # document text first, then query text
            nq = len(query.texts)
            groups = [range(nq, len(texts)), range(nq)]
            ids = fit_texts(build, texts, groups, self.config.max_length, self.tokenizer,
                            advice([*q_media, *d_media], self.config.video_budget))
        return self._finish(ids, [*q_media, *d_media], shared if q_media else None)


def advice(media: list[Media], budget: str = "off") -> str:
    """What lowers this item's vision tokens, per kind of medium: only options that act on it (the
    wrapper ignores max_pixels/total_pixels for video files, and per-item max_frames for frame lists).
    """
    tips = []
    if any(isinstance(m, VideoFile) for m in media):
        tips.append("video file: lower max_frames or fps, or set video_budget='fit' to fit it into max_length"
                    if budget != "fit" else "video file: already at video_budget='fit''s smallest plan (4 frames)")
    if any(isinstance(m, FrameList) for m in media):
        tips.append("frame list: lower total_pixels or send fewer frames")
    if any(isinstance(m, ImagePlan) for m in media):
        tips.append("image: lower max_pixels")
    return "; ".join([*tips, "or raise max_length"])


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
