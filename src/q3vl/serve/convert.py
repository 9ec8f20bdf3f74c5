"""From API request bodies to the runtime's item dicts, keeping the API's name for every item.

Each builder gathers an item's content parts and options into a dict and passes it through the item
adapter (`q3vl.preprocess.adapter.to_item`: the keys, values and error texts every front end shares),
returning the items `Embedder.plan` / `Reranker.plan` take and, for each item, the `param` an error
about it should name (`input[3]`, `inputs[1]`, `documents[0]`), so a bad item comes back as a 400 that
points at what the client sent. Media references pass the server's `MediaGate` first (the server's
path rule: under `--media-root`, or refused), before any planning work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from q3vl.errors import InputError, RequestError, RequestTooLargeError
from q3vl.options import default_of
from q3vl.preprocess import IMAGE_EXTENSIONS, to_item
from q3vl.runtime import RuntimeOptions
from q3vl.serve.media import MediaGate
from q3vl.serve.schemas import (
    ChatMessage,
    CohereInput,
    EmbeddingRequest,
    EmbedV2Request,
    ImagePart,
    ItemOptions,
    MultiModal,
    RerankRequest,
    TextPart,
)

MAX_ITEM_PARTS = default_of(RuntimeOptions, "max_parts")  # text/image/video parts per item: the runtime's default


@dataclass
class Items:
    """Runtime items and the API name of each (for errors)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    params: list[str] = field(default_factory=list)

    def add(self, item: dict[str, Any], param: str) -> None:
        self.items.append(adapt(item, param))
        self.params.append(param)


def adapt(fields: dict[str, Any], param: str, kind: str = "embed") -> dict[str, Any]:
    """The item adapter's item for `fields`; its error is a 400 naming `param`."""
    try:
        return to_item(fields, kind)
    except InputError as e:
        raise RequestError(e.reason, param) from None


def parts_item(parts: list[Any], gate: MediaGate, param: str) -> dict[str, Any]:
    """One item from content parts: its texts, images and videos (the runtime orders them)."""
    if len(parts) > MAX_ITEM_PARTS:  # the runtime's limit, checked before any media reference is looked at
        raise RequestTooLargeError(f"{len(parts)} content parts in one item; the limit is {MAX_ITEM_PARTS}",
                                   f"{param}.content")
    texts: list[str] = []
    images: list[str] = []
    videos: list[str] = []
    for j, part in enumerate(parts):
        where = f"{param}.content[{j}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            images.append(gate.check(part.image_url.url, "image", f"{where}.image_url.url"))
        else:
            url = part.video_url.url
            if url.lower().startswith("data:image") or os.path.splitext(url.lower())[1] in IMAGE_EXTENSIONS:
                raise RequestError("a video_url must point to a video, not an image", f"{where}.video_url.url")
            videos.append(gate.check(url, "video", f"{where}.video_url.url"))
    item: dict[str, Any] = {}
    if texts:
        item["text"] = texts
    if images:
        item["image"] = images
    if videos:
        item["video"] = videos[0] if len(videos) == 1 else videos
    return item


def openai_items(req: EmbeddingRequest, gate: MediaGate) -> Items:
    """`input` (one item per string) or vLLM's `messages` (one item for the whole conversation)."""
    if (req.input is None) == (req.messages is None):
        raise RequestError("give exactly one of `input` or `messages`", "input")
    opts = req.options()
    out = Items()
    if req.messages is not None:
        out.add({**_messages_item(req.messages, gate, opts), **opts}, "messages")
    elif isinstance(req.input, str):
        out.add({"text": req.input, **opts}, "input")
    else:
        for i, text in enumerate(req.input or []):
            out.add({"text": text, **opts}, f"input[{i}]")
    return out


def _messages_item(messages: list[ChatMessage], gate: MediaGate, opts: dict[str, Any]) -> dict[str, Any]:
    """The chat form (vLLM's): system text becomes the instruction, user content the item."""
    system: list[str] = []
    parts: list[Any] = []
    for i, m in enumerate(messages):
        content = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "user":
            parts.extend(content)
            continue
        texts = [p.text for p in content if isinstance(p, TextPart)]
        if len(texts) != len(content):
            raise RequestError("a system message (the instruction) may hold only text", f"messages[{i}].content")
        system.extend(texts)
    item = parts_item(parts, gate, "messages") if parts else {}
    if system:
        if "instruction" in opts:
            raise RequestError("give the instruction either as a system message or as `instruction`, not both",
                               "instruction")
        item["instruction"] = "\n".join(system)
    return item


def cohere_items(req: EmbedV2Request, gate: MediaGate, instructions: dict[str, str]) -> Items:
    """Exactly one of `texts`, `images` (data URIs) or `inputs` (mixed content, one item each)."""
    given = [name for name in ("texts", "images", "inputs") if getattr(req, name) is not None]
    if len(given) != 1:
        raise RequestError("give exactly one of `texts`, `images` or `inputs`", "texts")
    base = req.options()
    if "instruction" not in base and req.input_type in instructions:
        base["instruction"] = instructions[req.input_type]
    out = Items()
    for i, text in enumerate(req.texts or []):
        out.add({"text": text, **base}, f"texts[{i}]")
    for i, uri in enumerate(req.images or []):
        out.add({"image": gate.check(uri, "image", f"images[{i}]"), **base}, f"images[{i}]")
    for i, inp in enumerate(req.inputs or []):
        out.add({**parts_item(inp.content, gate, f"inputs[{i}]"), **base, **_own(inp)}, f"inputs[{i}]")
    return out


def _own(inp: CohereInput) -> dict[str, Any]:
    return ItemOptions.options(inp)


def rerank_request(req: RerankRequest, gate: MediaGate) -> tuple[dict[str, Any], list[str]]:
    """The runtime's rerank request and each document's API name."""
    query = {"text": req.query} if isinstance(req.query, str) else parts_item(req.query.content, gate, "query")
    adapt({**query, **req.options()}, "query", "query")
    docs = []
    params = []
    for i, doc in enumerate(req.documents):
        param = f"documents[{i}]"
        docs.append(adapt({"text": doc} if isinstance(doc, str) else parts_item(doc.content, gate, param), param,
                          "document"))
        params.append(param)
    return {"query": query, "documents": docs, **req.options()}, params


def echo_document(doc: str | MultiModal) -> dict[str, Any]:
    """The `document` a rerank result returns: the text, or vLLM's `multi_modal` parts."""
    if isinstance(doc, str):
        return {"text": doc}
    texts = [p.text for p in doc.content if isinstance(p, TextPart)]
    return {"text": "\n".join(texts) if texts else None,
            "multi_modal": [p.model_dump(exclude_none=True) for p in doc.content]}
