"""Torch-free preprocessing shared by the runtime, the export validation and the tests.

Images, videos, prompts and tokenization, M-RoPE positions and the vision graph's host inputs,
reproducing qwen-vl-utils 0.0.14 + the transformers processor (docs/reference-behaviour.md#preprocessing).
What front ends use is exported here: the item model's keys (`items.py`), the one item adapter
(`adapter.py`), the media policy and its options. The item names load on first use, so importing
the package (as the command line does to make its flags) does not load numpy and Pillow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from q3vl.preprocess.media import CallBudget, Deadline, MediaAccess, MediaPolicy, media_call
from q3vl.preprocess.media_options import MediaOptions

if TYPE_CHECKING:
    from q3vl.preprocess.adapter import ID, KINDS, Record, parse_item, parse_json, resolve_path, to_item
    from q3vl.preprocess.image import release_free_memory
    from q3vl.preprocess.items import CONTENT_KEYS, IMAGE_EXTENSIONS, KEY, KEYS, OPTION_KEYS, ItemKey

# How an over-long item is cut (`Encoder`): here, so the option declarations read it without loading numpy.
TRUNCATION_MODES = ("text", "reference")

_WHERE = {**dict.fromkeys(("ID", "KINDS", "Record", "parse_item", "parse_json", "resolve_path", "to_item"), "adapter"),
          **dict.fromkeys(("CONTENT_KEYS", "IMAGE_EXTENSIONS", "KEY", "KEYS", "OPTION_KEYS", "ItemKey"), "items"),
          "release_free_memory": "image"}
__all__ = ["CONTENT_KEYS", "ID", "IMAGE_EXTENSIONS", "KEY", "KEYS", "KINDS", "OPTION_KEYS", "TRUNCATION_MODES",
           "CallBudget", "Deadline", "ItemKey", "MediaAccess", "MediaOptions", "MediaPolicy", "Record", "media_call",
           "parse_item", "parse_json", "release_free_memory", "resolve_path", "to_item"]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(f"q3vl.preprocess.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'q3vl.preprocess' has no attribute {name!r}")
