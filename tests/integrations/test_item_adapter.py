"""Every integration's `to_item` ends in the one item adapter (`q3vl.preprocess.to_item`): the same
keys, value checks, `~` expansion and error texts as the API, the CLI, the server and Ray.
"""

from __future__ import annotations

import importlib
import os

import pytest

from q3vl.errors import InputError
from q3vl.preprocess import to_item

CASES = [("langchain", "langchain_core"), ("llama_index", "llama_index.core"), ("lancedb", "lancedb"),
         ("chroma", "chromadb")]


@pytest.mark.parametrize(("module", "library"), CASES)
def test_integration_items_are_the_adapters(module: str, library: str) -> None:
    pytest.importorskip(library)
    integration = importlib.import_module(f"q3vl.integrations.{module}")
    given = {"image": "~/photos/cat.png", "text": "a cat", "max_pixels": 65536}
    item = integration.to_item(dict(given))
    assert item == to_item(dict(given)) and item["image"] == os.path.expanduser("~/photos/cat.png")
    with pytest.raises(InputError) as ours:
        to_item({"text": "x", "name": "n"})
    with pytest.raises(InputError) as theirs:
        integration.to_item({"text": "x", "name": "n"})
    assert theirs.value.reason == ours.value.reason and "the item's label is 'id'" in ours.value.reason
    with pytest.raises(InputError, match="max_pixels must be an integer >= 1"):
        integration.to_item({"text": "x", "max_pixels": 0})
