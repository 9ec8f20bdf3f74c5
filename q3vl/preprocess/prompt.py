"""Chat-template rendering and tokenization, torch-free, with the same token ids as the processor.

The bundle's chat template is rendered with jinja2 the way transformers' `apply_chat_template`
does (sandboxed, trim_blocks + lstrip_blocks). Vision placeholders are then expanded:
an image keeps the template's `<|vision_start|><|image_pad|><|vision_end|>`; a video becomes one
`<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>` per frame pair with no outer wrapper
(transformers 4.57.3's form). The string is tokenized with ONE pad per block and each pad id is
then repeated to the block's token count: pads are special tokens, which the tokenizer splits on
before BPE, so this equals tokenizing the fully expanded string, without building it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import BundleError, InputError

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"
SPECIAL_IN_TEXT = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                   "<|im_end|>", "<|endoftext|>")


def video_slot(timestamps: Sequence[float]) -> str:
    """One video's expansion with a single pad per frame pair."""
    return "".join(f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>" for t in timestamps)


class ChatTemplate:
    """A chat template rendered like transformers' `apply_chat_template(..., tokenize=False)`."""

    def __init__(self, source: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` (content items: {"type": "text"|"image"|"video", ...})."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the runtime needs, read from the tokenizer (never hard-coded)."""

    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    endoftext: int

    @property
    def all_special(self) -> frozenset[int]:
        """The wrapper's `all_special_ids`: <|endoftext|> and every added special up to <|video_pad|>."""
        return frozenset(range(self.endoftext, self.video_pad + 1))


class TextTokenizer:
    """The bundle's `tokenizer.json` through the `tokenizers` library (no transformers)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise BundleError(f"cannot load tokenizer {path}: {e}") from e
        ids = {name: self._tok.token_to_id(tok) for name, tok in {
            "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
            "endoftext": "<|endoftext|>"}.items()}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise BundleError(f"tokenizer {path} lacks the Qwen special tokens {missing}")
        self.special = SpecialIds(**{k: int(v) for k, v in ids.items() if v is not None})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added, as the Qwen processor)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of `text`."""
        return self._tok.encode(text, add_special_tokens=False).offsets

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. "yes"), or None."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


def check_text(text: str) -> None:
    """User text may not smuggle in control tokens: they would desynchronise the vision rows."""
    for tok in SPECIAL_IN_TEXT:
        if tok in text:
            raise InputError(f"text contains the special token {tok}")


def expand_pads(ids: list[int], pad_ids: tuple[int, int], counts: Sequence[int]) -> np.ndarray:
    """Repeat the k-th pad id (image or video) `counts[k]` times: int64 `[L]`."""
    arr = np.asarray(ids, np.int64)
    is_pad = np.isin(arr, pad_ids)
    if int(is_pad.sum()) != len(counts):
        raise ValueError(f"{int(is_pad.sum())} vision slots in the prompt, {len(counts)} blocks planned")
    reps = np.ones(len(arr), np.int64)
    reps[is_pad] = counts
    return np.repeat(arr, reps)


def fit_texts(build: Callable[[list[str]], np.ndarray], texts: list[str], order: Sequence[int],
              max_length: int, tokenizer: TextTokenizer) -> np.ndarray:
    """q3vl's truncation: shorten user texts (in `order`) until `build(texts)` fits `max_length`.

    The template, every vision block and the template tail always survive; the pooled token stays
    the final template token. Raises InputError when nothing but template and vision is left and
    it still does not fit.
    """
    texts = list(texts)
    ids = build(texts)
    for i in order:
        while len(ids) > max_length and texts[i]:
            excess = len(ids) - max_length
            offs = tokenizer.offsets(texts[i])
            keep = len(offs) - excess
            cut = offs[keep][0] if keep > 0 else 0
            texts[i] = texts[i][:min(cut, len(texts[i]) - 1)]
            ids = build(texts)
    if len(ids) > max_length:
        raise InputError(f"prompt needs {len(ids)} tokens without any user text; max_length is {max_length} "
                         "(too many vision tokens: lower max_pixels / max_frames or raise max_length)")
    return ids
