"""Chat-template rendering and tokenization, torch-free, with the same token ids as the processor.

The bundle's chat template is rendered with jinja2 the way transformers' `apply_chat_template`
does (sandboxed, trim_blocks + lstrip_blocks), with a time and size bound. Vision placeholders are
then expanded: an image keeps the template's `<|vision_start|><|image_pad|><|vision_end|>`; a video
becomes one `<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>` per frame pair with no
outer wrapper (transformers 4.57.3's form). The string is tokenized with ONE pad per block and each
pad id is then repeated to the block's token count: pads are special tokens, which the tokenizer
splits on before BPE, so this equals tokenizing the fully expanded string, without building it.

Prompt-structure integrity: only the template itself can place a special token. Every user-controlled
string (texts, instructions, the reranker's query and documents) enters the template as a marker,
and the rendered prompt is tokenized with special tokens recognised in the template's text only;
user text is tokenized as ordinary text, so `<|im_end|>` typed by a user (whole, or split across
list elements that the template concatenates) becomes the tokens of those characters, never the
control token. See docs/reference-behaviour.md#special-tokens-in-user-text for how the upstream
wrapper differs.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import BundleError, InputError

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"
# Marks a user string's place in the rendered template. A lone surrogate cannot occur in user text,
# which must be encodable as UTF-8 (`check_text`), nor in any template's literal text.
MARK = "\ud800"
RENDER_SECONDS = 5.0  # a template that renders longer than this is broken (or hostile)
RENDER_MAX_CHARS = 64 * 1024**2


def video_slot(timestamps: Sequence[float]) -> str:
    """One video's expansion with a single pad per frame pair."""
    return "".join(f"<{t:.1f} seconds><|vision_start|><|video_pad|><|vision_end|>" for t in timestamps)


class ChatTemplate:
    """A chat template rendered like transformers' `apply_chat_template(..., tokenize=False)`.

    The sandbox also bounds time (`RENDER_SECONDS`, checked at every call, attribute and item access
    the template makes) and output size, so a broken or hostile bundle template cannot hang a worker.
    A template that does not parse is a `BundleError` at load.
    """

    def __init__(self, source: str) -> None:
        from jinja2 import TemplateError

        try:
            self._template = _bounded_env().from_string(source)
        except TemplateError as e:
            raise BundleError(f"the bundle's chat template does not parse: {e}") from e

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt string for `messages` (content items: {"type": "text"|"image"|"video", ...})."""
        from jinja2 import TemplateError

        _DEADLINE.value = time.monotonic() + RENDER_SECONDS
        try:
            out = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise BundleError(f"the bundle's chat template failed to render: {e}") from e
        finally:
            _DEADLINE.value = None
        if len(out) > RENDER_MAX_CHARS:
            raise BundleError(f"the bundle's chat template rendered {len(out)} characters (limit {RENDER_MAX_CHARS})")
        return out


_DEADLINE = threading.local()


def _bounded_env() -> Any:
    """jinja2's immutable sandbox, with transformers' settings, a render deadline and bounded `*` / `**`."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def check() -> None:
        deadline = getattr(_DEADLINE, "value", None)
        if deadline is not None and time.monotonic() > deadline:
            raise TemplateError(f"rendering took longer than {RENDER_SECONDS} s")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            check()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            check()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            check()
            return super().getitem(obj, argument)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            check()
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise TemplateError("exponent too large in the chat template")
            if (operator == "*" and isinstance(right, int) and isinstance(left, (str, list)) and \
                    len(left) * right > RENDER_MAX_CHARS) or (isinstance(left, int) and \
                    isinstance(right, (str, list)) and len(right) * left > RENDER_MAX_CHARS):
                raise TemplateError("string repetition too large in the chat template")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TextTokenizer:
    """The bundle's `tokenizer.json` through the `tokenizers` library (no transformers).

    Two instances of the same tokenizer: one that recognises special tokens (for the template's
    text) and one that encodes their characters as ordinary text (for user text).
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
            self._plain = Tokenizer.from_file(str(path))
        except Exception as e:
            raise BundleError(f"cannot load tokenizer {path}: {e}") from e
        self._plain.encode_special_tokens = True
        ids = {name: self._tok.token_to_id(tok) for name, tok in {
            "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
            "endoftext": "<|endoftext|>"}.items()}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise BundleError(f"tokenizer {path} lacks the Qwen special tokens {missing}")
        self.special = SpecialIds(**{k: int(v) for k, v in ids.items() if v is not None})
        self.special_tokens = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len,
                                                                               reverse=True))) + ")")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with special tokens recognised (no BOS/EOS added, as the Qwen processor)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text: a special token's characters are just characters."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, rendered: str, user: Sequence[str]) -> list[int]:
        """Ids of a rendered prompt whose user strings are `MARK{k}MARK` markers for `user[k]`.

        Special tokens count only in the template's own text; between two of them, template text and
        user text form one ordinary run, tokenized as the tokenizer would (it splits on special tokens
        before BPE, so the runs are tokenized exactly as in the whole string).
        """
        runs, specials, run = [], [], []
        for k, segment in enumerate(rendered.split(MARK)):
            if k % 2:
                run.append(user[int(segment)])
                continue
            for j, part in enumerate(self._special_re.split(segment)):
                if j % 2:
                    runs.append("".join(run))
                    specials.append(self.special_tokens[part])
                    run = []
                else:
                    run.append(part)
        runs.append("".join(run))
        ids: list[int] = []
        for k, enc in enumerate(self._plain.encode_batch(runs, add_special_tokens=False)):
            ids.extend(enc.ids)
            if k < len(specials):
                ids.append(specials[k])
        return ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of `text` (ordinary text, as user text is tokenized)."""
        return self._plain.encode(text, add_special_tokens=False).offsets

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. "yes"), or None."""
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


def check_text(text: str, what: str = "text") -> None:
    """User text must be valid Unicode (encodable as UTF-8): a lone surrogate is an input error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid Unicode (unpaired surrogate at character {e.start}); "
                         "send UTF-8 text") from None


def expand_pads(ids: list[int], pad_ids: tuple[int, int], counts: Sequence[int]) -> np.ndarray:
    """Repeat the k-th pad id (image or video) `counts[k]` times: int64 `[L]`."""
    arr = np.asarray(ids, np.int64)
    is_pad = np.isin(arr, pad_ids)
    if int(is_pad.sum()) != len(counts):
        raise ValueError(f"{int(is_pad.sum())} vision slots in the prompt, {len(counts)} blocks planned")
    reps = np.ones(len(arr), np.int64)
    reps[is_pad] = counts
    return np.repeat(arr, reps)


def fit_texts(build: Callable[[list[str]], np.ndarray], texts: list[str], groups: Sequence[Sequence[int]],
              max_length: int, tokenizer: TextTokenizer, advice: str = "lower max_pixels or raise max_length"
              ) -> np.ndarray:
    """q3vl's truncation: shorten user texts until `build(texts)` fits `max_length`.

    `groups` lists runs of texts that the template concatenates (an embedding's texts; a reranker's
    document texts, then its query texts), in the order they give way: the joined text of a group is
    cut from its end at a token boundary, the next group is cut once the first is empty. Each round
    tokenizes a group once and builds the prompt once, and rounds repeat only while tokens merging
    across the cut leave the prompt a little long, so 12,000 short texts cost a few renders, not
    12,000. The template, every vision block and the template tail always survive; the pooled token
    stays the final template token. Raises InputError when nothing but template and vision is left
    and it still does not fit, with `advice`: what would lower this item's vision tokens.
    """
    texts = list(texts)
    ids = build(texts)
    for group in groups:
        while len(ids) > max_length:
            joined = "".join(texts[i] for i in group)
            if not joined:
                break
            offs = tokenizer.offsets(joined)
            keep = len(offs) - (len(ids) - max_length)
            cut = min(offs[keep][0] if keep > 0 else 0, len(joined) - 1)  # always remove at least one character
            for i in group:  # the joined text's first `cut` characters, back into the group's texts
                texts[i], cut = texts[i][:cut], max(0, cut - len(texts[i]))
            ids = build(texts)
    if len(ids) > max_length:
        raise InputError(f"prompt needs {len(ids)} tokens without any user text; max_length is {max_length} "
                         f"(too many vision tokens; {advice})")
    return ids
